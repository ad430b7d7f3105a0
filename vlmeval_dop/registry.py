"""Evaluation entries: entry name -> (model, method, budget, policy, reducer) -> VLMEvalKit wrapper.

Generated from data (eval_configs/entries.yaml + models.yaml + policies.yaml), never hard-coded:

- every paper model as its bare name (the unpruned model);
- `{model}_{method}{budget %}` for every paper budget of that model and every DOP variant the paper
  evaluates on it (LLaVA: dopv, dopcd; Qwen2.5-VL / InternVL3: dopr), with the paper's policy;
- `{model}_dop{budget %}`: the paper's headline variant of that family (DOP_CD for LLaVA, DOP_R else);
- `{model}_{baseline}{budget %}` for every baseline the paper reports on that model, at the same budgets,
  matched in TFLOPs as eval_configs/baselines.yaml says (reducers keep n_e tokens; decoder-side methods
  get their free argument solved against the analytic FLOPs);
- explicit one-line entries (tiny test/demo entries).

An entry is *runnable* when everything it needs is registered: its reducer in
`vlmeval_dop.reducers.REDUCERS` (or `resize`, which the wrappers do on the image), its baseline in
`vlmeval_dop.baselines.BASELINES`. Entries that are not runnable are still listed, with the reason.

This module does not import vlmeval and loads no weights (listing reads the tiny checkpoints' configs, built
offline on first use); `load_entry` imports the wrapper, and with it vlmeval, only when called.
"""
from __future__ import annotations

import difflib
import importlib
import math
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from .fileio import FileFormatError, read_yaml
from .models_config import CONFIG_DIR, load_models, load_paper_policies
from .policy import DOPPolicy, OperationMask, PolicyError

ENTRIES_FILE = "entries.yaml"
BASELINES_FILE = "baselines.yaml"
_BASELINE_KEYS = {"reducer", "baseline", "args", "solve", "solve_range", "solve_fallback", "budget_arg", "schedule_file"}
IMAGE_SIDE_REDUCERS = ("resize",)  # done by the wrappers before the processor (see models/base.py)
RESIZE_WRAPPERS = ("qwen2_5_vl", "internvl", "qwen2_vl", "internvl35", "qwen3_vl")  # wrappers doing `resize` (DOP_R)
_ENTRY_KEYS = {"model", "method", "budget", "policy", "reducer", "baseline", "baseline_args", "args"}
_MODEL_KEYS = {"wrapper", "tiny", "hf_id", "args", "text_tokens"}
_METHOD_KEYS = {"reducer", "label"}
_PAPER_KEYS = {"methods", "dop"}
_CONFIG_FIX = "it ships with the repository: restore it (git checkout -- eval_configs/) or fix the syntax"


class EntryError(KeyError):
    """An unknown or malformed entry; the message names the valid values."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ModelSpec:
    """One model an entry runs: its wrapper family and where its weights come from."""

    name: str
    wrapper: str
    hf_id: str | None = None  # Hugging Face id (paper models) ...
    tiny: str | None = None  # ... or a vlmeval_dop.tiny family (built offline)
    args: dict[str, Any] = field(default_factory=dict)
    text_tokens: int | None = None  # tiny models: non-visual tokens of the DOP_Demo prompt (for TFLOPs)

    @property
    def paper(self) -> bool:
        return self.tiny is None


@dataclass(frozen=True)
class Entry:
    """One evaluation entry.

    Attributes:
        name: the name `run.py --model` accepts.
        model: the ModelSpec it runs.
        method: `full`, `dop`, `dopv`, `dopcd`, `dopr` or a baseline name.
        budget: the TFLOPs label as a fraction (0.28 for `..._dop28`), None for unlabelled entries.
        policy: the DOP policy, None for the unpruned model.
        reducer: visual token reduction (`vlmeval_dop.reducers` name or `resize`), None if none.
        baseline: decoder-side baseline name (`vlmeval_dop.baselines.BASELINES`), None if none.
        source: `paper` (generated from policies.yaml), `entries.yaml`, or `searched/<file>` (a policy
            installed by `vlmeval-dop search --install`).
    """

    name: str
    model: ModelSpec
    method: str
    budget: float | None = None
    policy: DOPPolicy | None = None
    reducer: str | None = None
    baseline: str | None = None
    baseline_args: dict[str, Any] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)
    source: str = "entries.yaml"
    required_file: str | None = None  # a file fitted offline that the entry needs (FitPrune's schedule)
    op_mask: OperationMask | None = None  # single visual operations pruned on top (`{entry}__mha4-6` names)

    # ------------------------------------------------------------------ availability
    def missing(self) -> tuple[str, str] | None:
        """(`reducer` | `baseline`, name) of the first component that is not registered yet, else None."""
        if self.reducer is not None and self.reducer not in IMAGE_SIDE_REDUCERS:
            from .reducers import REDUCERS

            if self.reducer not in REDUCERS:
                return "reducer", self.reducer
        if self.baseline is not None and self.baseline not in _baselines():
            return "baseline", self.baseline
        if self.required_file is not None and not Path(self.required_file).exists():
            return "file", self.required_file
        return None

    def unavailable_reason(self) -> str | None:
        """None if the entry can run now, else why not (the missing reducer or baseline, by name)."""
        missing = self.missing()
        if missing is None:
            return None
        kind, name = missing
        if kind == "file":
            return (
                f"the fitted schedule {name} does not exist yet: fit it with `vlmeval-dop fitprune --model "
                f"{self.model.name} --budget {self.budget} --data <validation dataset>`"
            )
        return f"{kind} {name!r} is not registered yet ({_registered(kind)})"

    @property
    def runnable(self) -> bool:
        return self.unavailable_reason() is None

    # ------------------------------------------------------------------ compute
    def tflops(self) -> dict[str, float] | None:
        """Paper-count TFLOPs of the entry's policy (flops.policy_tflops); None for baselines.

        Paper models use their shapes and representative text tokens (models.yaml). Tiny models use their
        checkpoint's config (built offline on first use), the visual tokens of a 224x224 image
        (`tiny.TINY_VISUAL_TOKENS`, the DOP_Demo image size) and `text_tokens` from entries.yaml.
        """
        from .flops import policy_tflops

        if self.model.paper:
            paper = load_models()[self.model.name]
            spec, text = paper.arch, paper.text_tokens
        else:
            spec, text = _tiny_arch(self.model.tiny), self.model.text_tokens
            if text is None:
                return None
        if self.baseline is not None:
            return self._baseline_tflops(spec, text)
        policy = self.policy or DOPPolicy.full(spec.num_layers)
        return policy_tflops(spec, policy, text)

    def _baseline_tflops(self, spec, text: int) -> dict[str, float] | None:
        """A decoder-side baseline's TFLOPs from its class's per-layer token counts (None if it has none)."""
        from .flops import full_flops, schedule_flops

        cls = getattr(importlib.import_module("vlmeval_dop.baselines"), "DECODER_PRUNERS", {}).get(self.baseline)
        args = {k: v for k, v in self.baseline_args.items() if k not in ("n_visual", "budget")}
        try:
            if self.baseline == "fitprune":
                from .baselines.fitprune import as_schedule

                counts = as_schedule(args["schedule"]).layer_tokens(text, spec.visual_tokens)
            elif cls is not None and hasattr(cls, "layer_tokens"):
                counts = cls.layer_tokens(spec.num_layers, spec.visual_tokens, text, **args)
            else:
                return None
        except (ValueError, KeyError, TypeError):  # e.g. a FitPrune schedule not fitted yet
            return None
        tf, full = schedule_flops(spec, counts), full_flops(spec, text)
        return {"tflops": tf / 1e12, "full_tflops": full / 1e12, "ratio": tf / full,
                "executed_tflops": tf / 1e12, "executed_ratio": tf / full}

    def describe_policy(self) -> str:
        if self.baseline is not None:
            args = ",".join(f"{k}={Path(v).name if k == 'schedule' and isinstance(v, str) else v}"
                            for k, v in self.baseline_args.items() if k != "n_visual")
            return f"{self.baseline}({args})"
        if self.policy is None:
            return "full"
        p = self.policy
        n_v = "all" if p.n_v is None else str(p.n_v)
        return f"({p.d_A},{p.d_P},{n_v})" + (f" {self.reducer}" if self.reducer else "")


# ---------------------------------------------------------------------------------------------- loading
def _baselines() -> dict[str, Any]:
    """`vlmeval_dop.baselines.BASELINES` once that package exists (another issue), else empty."""
    try:
        mod = importlib.import_module("vlmeval_dop.baselines")
    except ModuleNotFoundError as exc:
        if exc.name != "vlmeval_dop.baselines":  # a missing package is "none yet", a broken one is an error
            raise
        return {}
    return dict(getattr(mod, "BASELINES", {}))


@lru_cache(maxsize=None)
def _tiny_arch(family: str):
    """ArchSpec of a tiny checkpoint (its config.json; the checkpoint is built offline if missing)."""
    from transformers import AutoConfig

    from .arch import ArchSpec
    from .tiny import TINY_VIDEO_FAMILIES, TINY_VISUAL_TOKENS, tiny_path

    config = AutoConfig.from_pretrained(tiny_path(family), local_files_only=True)
    # a video family's reference input is a video (the class's own default count: frames x patches)
    visual = None if family in TINY_VIDEO_FAMILIES else TINY_VISUAL_TOKENS[family]
    return ArchSpec.from_config(config, visual_tokens=visual)


def _registered(kind: str) -> str:
    if kind == "reducer":
        from .reducers import REDUCERS

        names = sorted(REDUCERS) + list(IMAGE_SIDE_REDUCERS)
        return f"registered reducers: {', '.join(names)}"
    return f"registered baselines: {', '.join(sorted(_baselines())) or 'none yet'}"


def budget_label(budget: float) -> str:
    """0.28 -> '28' (entry names carry the TFLOPs percent as labelled in the paper)."""
    pct = round(budget * 100, 6)
    return str(int(pct)) if float(pct).is_integer() else str(pct).replace(".", "p")


def _check_keys(what: str, data: Any, known: set[str]) -> dict:
    if not isinstance(data, dict):
        raise EntryError(f"{what}: expected a mapping, got {data!r}")
    unknown = set(data) - known
    if unknown:
        raise EntryError(f"{what}: unknown keys {sorted(unknown)}; valid keys: {sorted(known)}")
    return data


def _policy(what: str, raw: Any) -> DOPPolicy | None:
    if raw is None:
        return None
    if isinstance(raw, (list, tuple)) and len(raw) in (3, 5):
        return DOPPolicy(*raw)
    if isinstance(raw, dict):
        return DOPPolicy.from_dict(raw)
    raise EntryError(f"{what}: policy must be [d_A, d_P, n_v] (or a mapping), got {raw!r}")


@lru_cache(maxsize=None)
def load_entries(config_dir: Path | None = None) -> dict[str, Entry]:
    """Every entry, keyed by name, in a stable order (paper models first, then explicit entries)."""
    cfg_dir = config_dir or CONFIG_DIR
    path = cfg_dir / ENTRIES_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (eval_configs/ ships with the repository)")
    raw = read_yaml(path, _CONFIG_FIX) or {}
    _check_keys(str(path), raw, {"models", "methods", "paper", "entries", "benchmarks"})
    paper_models = load_models(config_dir)
    paper_policies = load_paper_policies(config_dir)
    from .models import WRAPPERS

    models: dict[str, ModelSpec] = {}
    for name, d in (raw.get("models") or {}).items():
        d = _check_keys(f"models.{name}", d, _MODEL_KEYS)
        if d.get("wrapper") not in WRAPPERS:
            raise EntryError(f"models.{name}: wrapper {d.get('wrapper')!r} unknown; valid: {', '.join(WRAPPERS)}")
        hf_id, tiny = d.get("hf_id"), d.get("tiny")
        if tiny is None and hf_id is None:
            if name not in paper_models:
                raise EntryError(
                    f"models.{name}: give `hf_id` or `tiny`, or use a paper model name ({', '.join(paper_models)})"
                )
            hf_id = paper_models[name].hf_id
        models[name] = ModelSpec(
            name, d["wrapper"], hf_id=hf_id, tiny=tiny, args=dict(d.get("args") or {}), text_tokens=d.get("text_tokens")
        )

    methods = {}
    for name, d in (raw.get("methods") or {}).items():
        methods[name] = _check_keys(f"methods.{name}", d, _METHOD_KEYS)

    entries: dict[str, Entry] = {}

    def add(entry: Entry) -> None:
        if entry.name in entries:
            raise EntryError(f"entry {entry.name!r} is defined twice (generated and in entries.yaml?)")
        if entry.reducer == "resize" and entry.model.wrapper not in RESIZE_WRAPPERS:
            raise EntryError(
                f"entry {entry.name!r}: the resize reduction (DOP_R) is implemented for the "
                f"{' and '.join(RESIZE_WRAPPERS)} wrappers, not {entry.model.wrapper!r}"
            )
        entries[entry.name] = entry

    for model_name, d in (raw.get("paper") or {}).items():
        d = _check_keys(f"paper.{model_name}", d, _PAPER_KEYS)
        if model_name not in models or model_name not in paper_policies:
            raise EntryError(f"paper.{model_name}: needs a `models` entry and paper policies (policies.yaml)")
        spec = models[model_name]
        add(Entry(model_name, spec, "full", source="paper"))
        variants = list(d.get("methods") or [])
        headline = d.get("dop")
        for m in variants + ([headline] if headline else []):
            if m not in methods:
                raise EntryError(f"paper.{model_name}: method {m!r} unknown; valid: {', '.join(methods)}")
        for budget, policy in sorted(paper_policies[model_name].items(), reverse=True):
            for label, method in [("dop", headline)] * bool(headline) + [(m, m) for m in variants]:
                add(Entry(
                    f"{model_name}_{label}{budget_label(budget)}", spec, label, budget=budget, policy=policy,
                    reducer=methods[method]["reducer"], source="paper",
                ))

    for entry in _paper_baseline_entries(cfg_dir, models, paper_models):
        add(entry)
    for entry in _searched_entries(cfg_dir, models, methods):
        add(entry)

    for name, d in (raw.get("entries") or {}).items():
        d = _check_keys(f"entries.{name}", d, _ENTRY_KEYS)
        if d.get("model") not in models:
            raise EntryError(f"entries.{name}: model {d.get('model')!r} unknown; valid: {', '.join(models)}")
        policy = _policy(f"entries.{name}", d.get("policy"))
        if policy is not None and policy.n_v is not None and not d.get("reducer"):
            raise EntryError(f"entries.{name}: policy keeps n_v={policy.n_v} visual tokens but names no reducer")
        budget = d.get("budget")
        add(Entry(
            name, models[d["model"]], d.get("method") or ("full" if policy is None else "dop"),
            budget=None if budget is None else float(budget), policy=policy, reducer=d.get("reducer"),
            baseline=d.get("baseline"), baseline_args=dict(d.get("baseline_args") or {}),
            args=dict(d.get("args") or {}),
        ))
    return entries


# `{model}_{baseline}{budget}` names that baselines.yaml would generate but whose method cannot meet that
# budget (the paper has no such cell either); get_entry explains instead of "unknown entry".
INFEASIBLE_BASELINES: dict[str, str] = {}


SEARCHED_DIR = "searched"  # eval_configs/searched/<tag>.<reducer>.yaml, written by `vlmeval-dop search --install`
SEARCH_TAG_RE = re.compile(r"^[a-z0-9]+(?:_[a-z0-9]+)*$")


def method_for_reducer(reducer: str, config_dir: Path | None = None) -> str:
    """The method label of DOP with `reducer` (entries.yaml `methods`: cdpruner -> dopcd), else `dop<reducer>`."""
    raw = read_yaml((config_dir or CONFIG_DIR) / ENTRIES_FILE, _CONFIG_FIX) or {}
    return _method_of(reducer, raw.get("methods") or {})


def _method_of(reducer: str, methods: dict[str, dict]) -> str:
    return next((m for m, d in methods.items() if (d or {}).get("reducer") == reducer), f"dop{reducer}")


def searched_policy_file(tag: str, reducer: str, config_dir: Path | None = None) -> Path:
    """Where `vlmeval-dop search --install TAG` keeps the policies it found with `reducer`."""
    if not SEARCH_TAG_RE.match(tag):
        raise EntryError(f"search tag {tag!r}: use lower-case letters and digits, single underscores between")
    return (config_dir or CONFIG_DIR) / SEARCHED_DIR / f"{tag}.{reducer}.yaml"


# Searched policy files that could not be read, {path: reason}. Decision: a broken or stray file in
# eval_configs/searched/ is skipped with a warning naming it (its entries are missing), never a failure of
# every `run.py` / `vlmeval-dop list` call; installing into it is refused until it is fixed or deleted.
SKIPPED_SEARCHED: dict[str, str] = {}


def _searched_entries(cfg_dir: Path, models: dict[str, ModelSpec], methods: dict[str, dict]) -> list[Entry]:
    """Entries `{model}_{method}{budget}_{tag}` for the searched policies in eval_configs/searched/ (files in
    policies.yaml form, one per search tag and reducer). Unreadable files are skipped (SKIPPED_SEARCHED)."""
    import sys

    out = []
    for path in sorted((cfg_dir / SEARCHED_DIR).glob("*.yaml")):
        try:
            out += _searched_file_entries(path, models, methods)
            SKIPPED_SEARCHED.pop(str(path), None)
        except (EntryError, FileFormatError, PolicyError, TypeError, ValueError, AttributeError) as exc:
            reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            SKIPPED_SEARCHED[str(path)] = reason
            print(f"vlmeval-dop: warning: skipped {path}: {reason} (its entries are unavailable; fix or delete the "
                  "file, or reinstall it with `vlmeval-dop search|solve --install`)", file=sys.stderr)
    return out


def _searched_file_entries(path: Path, models: dict[str, ModelSpec], methods: dict[str, dict]) -> list[Entry]:
    tag, _, reducer = path.stem.partition(".")
    if not reducer or not SEARCH_TAG_RE.match(tag):
        raise EntryError("searched policy files are named <tag>.<reducer>.yaml")
    method = _method_of(reducer, methods)
    data = read_yaml(path, "fix the file or delete it") or {}
    if not isinstance(data, dict):
        raise EntryError(f"expected a mapping of model -> {{budget: [d_A, d_P, n_v]}}, got {type(data).__name__}")
    out = []
    for model_name, budgets in data.items():
        if model_name not in models:
            raise EntryError(f"model {model_name!r} unknown; valid: {', '.join(models)}")
        if not isinstance(budgets, dict):
            raise EntryError(f"{model_name}: expected a mapping of budget -> [d_A, d_P, n_v], got {budgets!r}")
        for budget, raw in sorted(budgets.items(), reverse=True):
            out.append(Entry(
                f"{model_name}_{method}{budget_label(float(budget))}_{tag}", models[model_name], method,
                budget=float(budget), policy=_policy(f"{path.name}: {model_name}", raw), reducer=reducer,
                source=f"{SEARCHED_DIR}/{path.name}",
            ))
    return out


def install_policies(tag: str, reducer: str, model_key: str, policies: dict, overwrite: bool = False,
                     config_dir: Path | None = None) -> dict[str, str]:
    """Install solved policies {budget: DOPPolicy} as entries `{model}_{method}{budget}_{tag}`.

    Safe against concurrent installs and crashes: under an exclusive lock on eval_configs/searched/ the file
    is re-read, a budget already holding a *different* policy refuses the whole install (unless
    `overwrite`; nothing is written then), the merge is written to a temporary file (mode 0644) and renamed
    over the old one. Concurrent installs of different budgets therefore all land, and a conflicting one
    is refused exactly as it would be without concurrency. Returns {budget: entry name}.
    """
    from .fileio import atomic_write_text, locked
    from .search.optimize import policies_yaml

    path = searched_policy_file(tag, reducer, config_dir)
    method = method_for_reducer(reducer, config_dir)
    with locked(path.parent):
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        data = read_yaml(path, "fix the file or delete it, then install again") if text else {}
        if data is not None and not isinstance(data, dict):
            raise FileFormatError(f"{path} is not a mapping of model -> {{budget: policy}}; fix or delete it")
        old = {float(b): list(v) for b, v in ((data or {}).get(model_key) or {}).items()}
        for budget, policy in policies.items():
            new = _policy_list(policy)
            if float(budget) in old and old[float(budget)] != new and not overwrite:
                raise ValueError(f"{path} already holds {model_key} @ {budget}: {old[float(budget)]} (not {new}); "
                                 "pick another --install tag or pass --overwrite")
        if policies:
            atomic_write_text(path, policies_yaml(text, model_key, policies, path))
    load_entries.cache_clear()  # the new entries exist from now on in this process too
    return {str(b): f"{model_key}_{method}{budget_label(float(b))}_{tag}" for b in sorted(policies, reverse=True)}


def _policy_list(policy: DOPPolicy) -> list[int]:
    return [policy.d_A, policy.d_P, policy.n_v] + ([policy.d_A_sys, policy.d_P_sys] if policy.has_system_depths else [])


def _paper_baseline_entries(cfg_dir: Path, models: dict[str, ModelSpec], paper_models: dict) -> list[Entry]:
    """Entries of eval_configs/baselines.yaml: every paper baseline at every budget of its model."""
    path = cfg_dir / BASELINES_FILE
    if not path.exists():
        return []
    raw = _check_keys(str(path), read_yaml(path, _CONFIG_FIX) or {}, {"baselines", "paper"})
    methods = {n: _check_keys(f"baselines.{n}", d, _BASELINE_KEYS) for n, d in (raw.get("baselines") or {}).items()}
    out = []
    for model_name, names in (raw.get("paper") or {}).items():
        if model_name not in paper_models or model_name not in models:
            raise EntryError(f"{path.name}: paper.{model_name} is not a paper model; valid: {', '.join(paper_models)}")
        pm, spec = paper_models[model_name], models[model_name]
        for name in names:
            if name not in methods:
                raise EntryError(f"{path.name}: paper.{model_name} names baseline {name!r}; valid: {', '.join(methods)}")
            m = methods[name]
            for budget, n_e in sorted(pm.budgets.items(), reverse=True):
                entry_name = f"{model_name}_{name}{budget_label(budget)}"
                if m.get("reducer"):
                    L = pm.arch.num_layers
                    out.append(Entry(entry_name, spec, name, budget=budget, policy=DOPPolicy(L, L, n_e),
                                     reducer=m["reducer"], source="paper"))  # fmt: skip
                    continue
                args = dict(m.get("args") or {})
                if m.get("budget_arg"):
                    args[m["budget_arg"]] = budget
                if m.get("solve"):
                    solved = None
                    for extra in [{}] + list(m.get("solve_fallback") or []):  # e.g. DART: K=2, else K=1
                        try:
                            solved = _solve_baseline_args(
                                m["baseline"], pm, n_e, {**args, **extra}, m["solve"], m.get("solve_range")
                            )
                            break
                        except EntryError as exc:  # e.g. FastV (K=2) at 23%: two full layers exceed it
                            INFEASIBLE_BASELINES[entry_name] = str(exc)
                    if solved is None:
                        continue
                    INFEASIBLE_BASELINES.pop(entry_name, None)
                    args = solved
                required = None
                if m.get("schedule_file"):  # fitted offline (FitPrune): the entry runs once the file exists
                    required = str(cfg_dir / m["schedule_file"].format(model=model_name, budget=budget_label(budget)))
                    args["schedule"] = required
                out.append(Entry(entry_name, spec, name, budget=budget, baseline=m["baseline"],
                                 baseline_args=args, source="paper", required_file=required))  # fmt: skip
    return out


def _solve_baseline_args(baseline: str, pm, n_e: int, args: dict, solve: str, bounds) -> dict:
    """Set `args[solve]` to the largest value whose analytic FLOPs stay within n_e tokens in every layer.

    Needs the registered pruner class's `layer_tokens(num_layers, n_visual, text_tokens, **args)`; an
    unregistered baseline keeps its arguments unsolved (the entry is listed as not runnable anyway).
    """
    from .flops import schedule_flops

    classes = getattr(importlib.import_module("vlmeval_dop.baselines"), "DECODER_PRUNERS", {})
    cls = classes.get(baseline)
    if cls is None or not hasattr(cls, "layer_tokens"):
        return args
    spec, L, N, text = pm.arch, pm.arch.num_layers, pm.arch.visual_tokens, pm.text_tokens
    target = schedule_flops(spec, [(text + n_e, text + n_e)] * L)
    lo, hi = [N if b == "n_visual" else b for b in (bounds or [0, "n_visual"])]

    def cost(value) -> float:
        return schedule_flops(spec, cls.layer_tokens(L, N, text, **{**args, solve: value}))

    integer = isinstance(lo, int) and isinstance(hi, int)
    if cost(lo) > target:
        raise EntryError(
            f"{baseline}{args} cannot meet the TFLOPs of {n_e} visual tokens in every layer on {pm.name} "
            f"for any {solve} in [{lo}, {hi}]"
        )
    while (hi - lo > 1) if integer else (hi - lo > 1e-4):  # cost is monotone in the kept amount
        mid = (lo + hi) // 2 if integer else (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= target else (lo, mid)
    best = hi if cost(hi) <= target else lo
    extra = {"n_visual": N} if "n_visual" in _init_params(cls) else {}
    # ratios rounded *down* to 4 decimals: still within the budget (cost grows with the kept amount)
    return {**args, **extra, solve: best if integer else math.floor(best * 1e4) / 1e4}


def _init_params(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)


# ---------------------------------------------------------------------------------------------- lookup
def _unknown(name: str, valid: list[str], what: str = "entry") -> EntryError:
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return EntryError(f"unknown {what} {name!r}.{hint} Run `vlmeval-dop list` for all {len(valid)} entries.")


def get_entry(name: str, config_dir: Path | None = None) -> Entry:
    """The entry called `name`; unknown names raise EntryError naming the closest entries."""
    entries = load_entries(config_dir)
    if OP_SEPARATOR in name and name not in entries:
        return _masked_entry(name, entries)
    if name not in entries:
        if name in INFEASIBLE_BASELINES:
            raise EntryError(f"entry {name!r} does not exist: {INFEASIBLE_BASELINES[name]}")
        exc = _unknown(name, list(entries))
        if SKIPPED_SEARCHED:  # the entry may be in a searched file that could not be read
            exc = EntryError(f"{exc} (skipped unreadable searched policy files: {', '.join(SKIPPED_SEARCHED)})")
        raise exc
    return entries[name]


OP_SEPARATOR = "__"
_SWAP_RE = re.compile(r"^swap(\d+)(mha|mlp)\.s(\d+)$")


def _masked_entry(name: str, entries: dict[str, Entry]) -> Entry:
    """`{entry}__mha4-6[__mlp12]`: an entry with single visual operations pruned on top of its policy
    (the paper's redundancy analysis, Tables 26-28; layers 1-based as in the paper's columns), or
    `{entry}__swap{k}{mha|mlp}.s{seed}`: its DOP policy randomly perturbed (Tables 29-30)."""
    base_name, _, suffix = name.partition(OP_SEPARATOR)
    if base_name not in entries:
        raise _unknown(base_name, list(entries))
    base = entries[base_name]
    if base.baseline is not None:
        raise EntryError(f"{name!r}: operation masks apply to DOP or unpruned entries, not the baseline {base_name!r}")
    L = (load_models()[base.model.name].arch if base.model.paper else _tiny_arch(base.model.tiny)).num_layers
    swap = _SWAP_RE.match(suffix)
    if swap:  # `__swap3mha.s7`: a random perturbation of the entry's DOP policy (Tables 29-30)
        from .perturbation import swap_operations

        if base.policy is None:
            raise EntryError(f"{name!r}: swaps perturb a DOP policy; {base_name!r} has none")
        try:
            policy, mask = swap_operations(base.policy, L, swap.group(2), int(swap.group(1)), int(swap.group(3)))
        except PolicyError as exc:
            raise EntryError(f"{name!r}: {exc}") from None
        return replace(base, name=name, policy=policy, op_mask=mask, source="policy perturbation")
    try:
        mask = OperationMask.parse(suffix)
    except PolicyError as exc:
        raise EntryError(f"{name!r}: {exc}") from None
    bad = sorted(i + 1 for i in mask.attn | mask.mlp if i >= L)
    if bad:
        raise EntryError(f"{name!r}: {base.model.name} has layers 1..{L}, not {bad}")
    return replace(base, name=name, op_mask=mask, source="operation mask")


def runnable_entry(name: str, config_dir: Path | None = None) -> Entry:
    """`get_entry`, and EntryError if the entry cannot run yet (says which reducer/baseline is missing)."""
    entry = get_entry(name, config_dir)
    reason = entry.unavailable_reason()
    if reason:
        raise EntryError(f"entry {name!r} is listed but not runnable: {reason}")
    return entry


_NAME_RE = re.compile(r"^(?P<method>[a-z]+?)(?P<budget>\d+(?:p\d+)?)?$")


def parse_entry_name(name: str, config_dir: Path | None = None) -> tuple[str, str, float | None]:
    """Split `{model}_{method}{budget %}` into (model, method, budget fraction); bare model -> 'full'.

    Parses by the known model names (they contain underscores and digits themselves).
    """
    models = sorted({e.model.name for e in load_entries(config_dir).values()}, key=len, reverse=True)
    for model in models:
        if name == model:
            return model, "full", None
        if name.startswith(model + "_"):
            m = _NAME_RE.match(name[len(model) + 1 :])
            if m:
                b = m.group("budget")
                return model, m.group("method"), None if b is None else float(b.replace("p", ".")) / 100
    raise EntryError(f"{name!r} is not of the form {{model}}_{{method}}{{budget}}; models: {', '.join(models)}")


def load_entry(name: str, **overrides: Any):
    """The VLMEvalKit model (a `vlmeval.vlm.base.BaseModel`) of entry `name`; weights load at first use.

    `overrides` are wrapper keyword arguments (e.g. `max_new_tokens=16`, `device="cpu"`,
    `model_path="/local/checkpoint"`) on top of the entry's own. Imports vlmeval (the wrapper is a
    VLMEvalKit model) and registers the plugin datasets with it.
    """
    entry = runnable_entry(name)
    from .datasets import register_datasets
    from .models import wrapper_class

    register_datasets()  # the wrappers' prompt logic asks VLMEvalKit for dataset types (DOP_Demo, VQAv2)

    cls = wrapper_class(entry.model.wrapper)
    kwargs = dict(
        model_path=entry.model.hf_id, tiny=entry.model.tiny, entry=entry.name, policy=entry.policy,
        reducer=entry.reducer, baseline=entry.baseline, baseline_args=entry.baseline_args,
    )
    if entry.op_mask:
        kwargs["op_mask"] = entry.op_mask
    kwargs.update(entry.model.args)
    kwargs.update(entry.args)
    if "model_path" in overrides:  # a local checkpoint directory replaces the Hub id (or the tiny build)
        kwargs["tiny"] = None
    kwargs.update(overrides)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------- listing
def format_table(entries: list[Entry] | None = None) -> str:
    """The `vlmeval-dop list` table: entry, model, method, budget, policy, TFLOPs %, status."""
    entries = list(load_entries().values()) if entries is None else entries
    rows = [("entry", "model", "method", "budget", "policy (d_A,d_P,n_v) reducer", "TFLOPs %", "status")]
    for e in entries:
        r = e.tflops()
        if r is None:
            tf = "-"
        else:
            tf = f"{100 * r['ratio']:.1f}"
            if abs(r["executed_ratio"] - r["ratio"]) > 1e-9:
                tf += f" (exec {100 * r['executed_ratio']:.1f})"
        missing = e.missing()
        if missing is None:
            status = "runnable"
        elif missing[0] == "file":
            status = f"NOT RUNNABLE: needs fitted file {Path(missing[1]).name}"
        else:
            status = f"NOT RUNNABLE: needs {missing[0]} {missing[1]!r}"
        budget = "-" if e.budget is None else f"{budget_label(e.budget)}%"
        rows.append((e.name, e.model.name, e.method, budget, e.describe_policy(), tf, status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
    kinds = sorted({m[0] for m in (e.missing() for e in entries) if m})
    for kind in kinds:
        if kind == "file":
            lines.append("NOT RUNNABLE: fitted files (FitPrune schedules) are made by `vlmeval-dop fitprune`.")
        else:
            lines.append(f"NOT RUNNABLE: the {kind} is not registered yet ({_registered(kind)}); run.py refuses these.")
    return "\n".join(lines)


__all__ = [
    "Entry",
    "EntryError",
    "ModelSpec",
    "budget_label",
    "format_table",
    "get_entry",
    "load_entries",
    "load_entry",
    "parse_entry_name",
    "runnable_entry",
]
