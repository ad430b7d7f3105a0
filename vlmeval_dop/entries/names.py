"""The naming rule of evaluation entries, in one place.

An entry name is `{model}_{method}{budget}[.s{seed}]`, e.g. `llava15_7b_fastv28`, `tiny_llava15_rand90.s3`:

- `model`: a model key of eval_configs/entries.yaml; these contain underscores and digits themselves
  (`llava15_7b`), so names are split by the known model keys, longest first.
- `method`: lower-case letters and digits, starting AND ending with a letter, no underscore: `fastv`,
  `l2norm`, `dopcd`. Why: the TFLOPs label follows the method without a separator, so the method's last
  character must not be a digit (`l2norm28` = l2norm at 28 %, `norm2` at 28 % would read `norm228`); the
  underscore separates the model from the method and an installed search tag from the budget
  (`llava15_7b_dopcd28_acc_drop`). A method must not end in `<digits>p` either (`a2p5` would read as `a` at
  2.5 %, the `p` being the label's decimal point). `full` is the unpruned model; `resize` is the image-side
  reduction the wrappers do themselves (DOP_R; its entries never call a registered class); names starting
  with `dop` are DOP variants (`dop`, `dopcd`, and `dop<reducer>` for installed searches): none of these is
  a registrable method.
- `budget`: the TFLOPs percent as the paper labels it, `28` = 28 %, `12p5` = 12.5 %.
- `.s{seed}`: the seed of a method that declares a `seed` entry argument (`register_method(entry_args=
  {"seed": int})`), e.g. a random baseline; other methods refuse it.

`reproduce/tables.py` parses table rows with the same functions.
"""
from __future__ import annotations

import re

METHOD_PATTERN = r"[a-z](?:[a-z0-9]*[a-z])?"
BUDGET_PATTERN = r"\d+(?:p\d+)?"
METHOD_RULE = ("lower-case letters and digits, starting and ending with a letter, no underscore, not ending in "
               "<digits>p, not `full` or `resize` and not starting with `dop` (entry names are {model}_{method}{budget}, "
               "see vlmeval_dop/entries/names.py)")
RESERVED = ("full", "resize")  # the unpruned model; the wrappers' image-side reduction (IMAGE_SIDE_REDUCERS)
DOP_PREFIX = "dop"

_METHOD_RE = re.compile(rf"^{METHOD_PATTERN}$")
# non-greedy method: `dop12p5` = dop at 12.5 %; the rule above makes the split unique
_SUFFIX_RE = re.compile(rf"^(?P<method>[a-z](?:[a-z0-9]*?[a-z])??)(?P<budget>{BUDGET_PATTERN})?$")
_SEED_RE = re.compile(r"^(?P<base>.+)\.s(?P<seed>\d+)$")


class MethodNameError(ValueError):
    """A method name that breaks the naming rule."""


def method_name_problem(name: str) -> str | None:
    """Why `name` cannot be a registered method's name, or None if it can."""
    if not isinstance(name, str) or not _METHOD_RE.match(name):
        return f"method name {name!r} is not {METHOD_RULE}"
    if re.search(r"\d+p$", name):
        return f"method name {name!r} ends in <digits>p, which would read as a budget's decimal point ({METHOD_RULE})"
    if name in RESERVED or name.startswith(DOP_PREFIX):
        return f"method name {name!r} is reserved ({METHOD_RULE})"
    return None


def check_method_name(name: str) -> str:
    """`name` if it follows the rule, else MethodNameError saying the rule."""
    problem = method_name_problem(name)
    if problem:
        raise MethodNameError(problem)
    return name


def budget_label(budget: float) -> str:
    """0.28 -> '28', 0.125 -> '12p5' (entry names carry the TFLOPs percent as labelled in the paper)."""
    pct = round(budget * 100, 6)
    return str(int(pct)) if float(pct).is_integer() else str(pct).replace(".", "p")


def parse_budget(label: str) -> float:
    """'28' -> 0.28, '12p5' -> 0.125 (the inverse of budget_label)."""
    return float(label.replace("p", ".")) / 100


def split_method_budget(suffix: str) -> tuple[str, float | None] | None:
    """`fastv28` -> ('fastv', 0.28), `dop` -> ('dop', None); None if `suffix` is not `{method}[{budget}]`."""
    m = _SUFFIX_RE.match(suffix)
    if not m:
        return None
    b = m.group("budget")
    return m.group("method"), None if b is None else parse_budget(b)


def split_seed(name: str) -> tuple[str, int | None]:
    """`x_rand90.s3` -> ('x_rand90', 3); names without a seed suffix -> (name, None)."""
    m = _SEED_RE.match(name)
    return (m.group("base"), int(m.group("seed"))) if m else (name, None)


def split_entry_name(name: str, models) -> tuple[str, str, float | None] | None:
    """(model, method, budget) of `{model}_{method}{budget}` given the known model keys; bare model ->
    (model, 'full', None); None if the name is not of that form."""
    for model in sorted(models, key=len, reverse=True):
        if name == model:
            return model, "full", None
        if name.startswith(model + "_"):
            parts = split_method_budget(name[len(model) + 1:])
            if parts:
                return model, parts[0], parts[1]
    return None


def entry_name(model: str, method: str, budget: float | None = None, seed: int | None = None) -> str:
    """The entry name of (model, method, budget, seed)."""
    name = model if method == "full" else f"{model}_{method}{'' if budget is None else budget_label(budget)}"
    return name if seed is None else f"{name}.s{seed}"
