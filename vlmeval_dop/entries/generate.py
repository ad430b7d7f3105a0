"""Making entries from the configuration and the method registry. No vlmeval import.

- the paper's DOP entries (entries.yaml `paper` + policies.yaml) and explicit entries (entries.yaml `entries`);
- installed searches (eval_configs/searched/);
- `{model}_{method}{budget}` for ANY method, at any model and budget: `method_entry`. The paper's baselines
  (baselines.yaml `paper`) are generated with it at their models' budget labels; any other registered
  method (a user's plugin included) is made on demand by name, without a YAML edit. Vision side: policy
  (L, L, n_e); decoder side: the registered budget knob solved (entries/budgets.py). What cannot exist
  raises EntryError with the reason (infeasible budget with its numbers, unregistered component, no budget
  solver); `missing_cells` lists those reasons for `vlmeval-dop list --all`.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from ..fileio import FileFormatError
from ..policy import DOPPolicy, PolicyError
from .budgets import BudgetInfeasible, model_shape, solve_knob, visual_budget
from .config import SEARCHED_DIR, BaselinesConfig, EntriesConfig, parse_policy, read_searched_file
from .entry import IMAGE_SIDE_REDUCERS, RESIZE_WRAPPERS, Entry, EntryError, ModelSpec
from .names import budget_label, entry_name


def check_resize(entry: Entry) -> Entry:
    """`entry`, or EntryError if it resizes the image on a wrapper that cannot (DOP_R's `resize`)."""
    if entry.reducer == "resize" and entry.model.wrapper not in RESIZE_WRAPPERS:
        raise EntryError(
            f"entry {entry.name!r}: the resize reduction (DOP_R) is implemented for the "
            f"{' and '.join(RESIZE_WRAPPERS)} wrappers, not {entry.model.wrapper!r}"
        )
    return entry


# ------------------------------------------------------------------------------------------ DOP entries
def paper_dop_entries(cfg: EntriesConfig, paper_policies: dict) -> list[Entry]:
    """`{model}` (unpruned) and `{model}_{variant}{budget}` for the paper's policies (entries.yaml `paper`)."""
    out = []
    for model_name, d in cfg.paper.items():
        if model_name not in cfg.models or model_name not in paper_policies:
            raise EntryError(f"paper.{model_name}: needs a `models` entry and paper policies (policies.yaml)")
        spec = cfg.models[model_name]
        out.append(Entry(model_name, spec, "full", source="paper"))
        variants = list(d.get("methods") or [])
        headline = d.get("dop")
        for m in variants + ([headline] if headline else []):
            if m not in cfg.methods:
                raise EntryError(f"paper.{model_name}: method {m!r} unknown; valid: {', '.join(cfg.methods)}")
        for budget, policy in sorted(paper_policies[model_name].items(), reverse=True):
            for label, method in [("dop", headline)] * bool(headline) + [(m, m) for m in variants]:
                out.append(Entry(
                    f"{model_name}_{label}{budget_label(budget)}", spec, label, budget=budget, policy=policy,
                    reducer=cfg.methods[method]["reducer"], source="paper",
                ))
    return out


def explicit_entries(cfg: EntriesConfig) -> list[Entry]:
    """The one-line entries of entries.yaml `entries`."""
    out = []
    for name, d in cfg.entries.items():
        if d.get("model") not in cfg.models:
            raise EntryError(f"entries.{name}: model {d.get('model')!r} unknown; valid: {', '.join(cfg.models)}")
        policy = parse_policy(f"entries.{name}", d.get("policy"))
        if policy is not None and policy.n_v is not None and not d.get("reducer"):
            raise EntryError(f"entries.{name}: policy keeps n_v={policy.n_v} visual tokens but names no reducer")
        budget = d.get("budget")
        out.append(Entry(
            name, cfg.models[d["model"]], d.get("method") or ("full" if policy is None else "dop"),
            budget=None if budget is None else float(budget), policy=policy, reducer=d.get("reducer"),
            baseline=d.get("baseline"), baseline_args=dict(d.get("baseline_args") or {}),
            args=dict(d.get("args") or {}), reducer_args=dict(d.get("reducer_args") or {}),
        ))
    return out


def dop_method_of(reducer: str, methods: dict[str, dict]) -> str:
    """The DOP variant running `reducer` (entries.yaml `methods`: cdpruner -> dopcd), else `dop<reducer>`."""
    return next((m for m, d in methods.items() if (d or {}).get("reducer") == reducer), f"dop{reducer}")


# Searched policy files that could not be read, {path: reason}. Decision: a broken or stray file in
# eval_configs/searched/ is skipped with a warning naming it (its entries are missing), never a failure of
# every `run.py` / `vlmeval-dop list` call; installing into it is refused until it is fixed or deleted.
SKIPPED_SEARCHED: dict[str, str] = {}


def searched_entries(cfg_dir: Path, cfg: EntriesConfig) -> list[Entry]:
    """Entries `{model}_{method}{budget}_{tag}` for the searched policies in eval_configs/searched/ (files in
    policies.yaml form, one per search tag and reducer). Unreadable files are skipped (SKIPPED_SEARCHED)."""
    out = []
    for path in sorted((cfg_dir / SEARCHED_DIR).glob("*.yaml")):
        try:
            out += _searched_file_entries(path, cfg)
            SKIPPED_SEARCHED.pop(str(path), None)
        except (EntryError, FileFormatError, PolicyError, TypeError, ValueError, AttributeError) as exc:
            reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            SKIPPED_SEARCHED[str(path)] = reason
            print(f"vlmeval-dop: warning: skipped {path}: {reason} (its entries are unavailable; fix or delete the "
                  "file, or reinstall it with `vlmeval-dop search|solve --install`)", file=sys.stderr)
    return out


def _searched_file_entries(path: Path, cfg: EntriesConfig) -> list[Entry]:
    tag, reducer, data = read_searched_file(path)
    method = dop_method_of(reducer, cfg.methods)
    out = []
    for model_name, budgets in data.items():
        if model_name not in cfg.models:
            raise EntryError(f"model {model_name!r} unknown; valid: {', '.join(cfg.models)}")
        for budget, raw in sorted(budgets.items(), reverse=True):
            out.append(Entry(
                f"{model_name}_{method}{budget_label(float(budget))}_{tag}", cfg.models[model_name], method,
                budget=float(budget), policy=parse_policy(f"{path.name}: {model_name}", raw), reducer=reducer,
                source=f"{SEARCHED_DIR}/{path.name}",
            ))
    return out


# ------------------------------------------------------------------------------- any method at any budget
def known_methods(bcfg: BaselinesConfig) -> list[str]:
    """Every method an entry `{model}_{method}{budget}` can name: registered ones and baselines.yaml's."""
    from ..methods import registered

    return list(dict.fromkeys([*registered(), *bcfg.recipes]))


def _check_family(name: str, role: str, method: str, info, family: str) -> None:
    """EntryError when the method's class declares `families` without `family`: refused when the entry is made,
    not at the first sample."""
    families = getattr(info.cls, "families", None) if info else None
    if families is not None and family not in families:
        raise EntryError(f"{name!r}: {role} {method!r} does not support model family {family!r} "
                         f"(supported: {', '.join(families)})")


def method_entry(model: ModelSpec, method: str, budget: float, bcfg: BaselinesConfig, cfg_dir: Path,
                 source: str = "on demand") -> Entry:
    """The entry `{model}_{method}{budget}`: vision side policy (L, L, n_e) with the method as reducer,
    decoder side the method with its budget knob solved (fixed args: the registration's, overridden by
    baselines.yaml's for the paper's baselines; `solve_fallback`/registered fallbacks tried in turn).

    EntryError (BudgetInfeasible for budgets out of reach) with the reason when the entry cannot exist.
    A baseline that baselines.yaml names but nobody registered is made with unsolved arguments: it is
    listed as not runnable, with that reason.
    """
    from ..methods import registered

    name = entry_name(model.name, method, budget)
    recipe = bcfg.recipes.get(method)
    info = registered().get(method)
    if recipe is None and info is None:
        raise EntryError(f"{name!r}: method {method!r} is not registered (registered: "
                         f"{', '.join(sorted(known_methods(bcfg)))}; a method of your own: --plugins)")
    reducer = recipe.get("reducer") if recipe else (method if info.kind == "vision" else None)
    shape = model_shape(model)
    n_e = visual_budget(shape, budget)
    if reducer is not None:
        _check_family(name, "reducer", reducer, registered("vision").get(reducer), shape.arch.family)
        L = shape.arch.num_layers
        return check_resize(Entry(name, model, method, budget=budget, policy=DOPPolicy(L, L, n_e), reducer=reducer,
                                  source=source))
    baseline = recipe["baseline"] if recipe else method
    info = registered("decoder").get(baseline)
    _check_family(name, "baseline", baseline, info, shape.arch.family)
    args = {**(dict(info.args) if info else {}), **dict((recipe or {}).get("args") or {})}
    if info is not None:
        if info.budget_arg:
            args[info.budget_arg] = budget
        elif info.budget_knob:
            fallbacks = (recipe or {}).get("solve_fallback") or info.fallback
            error = None
            for extra in [{}] + list(fallbacks):  # e.g. DART: K=2, else K=1
                try:
                    args = solve_knob(info, shape, n_e, {**args, **extra}, label=baseline)
                    error = None
                    break
                except BudgetInfeasible as exc:  # e.g. FastV (K=2) at 23 %: two full layers exceed it
                    error = exc
            if error is not None:
                raise error
        else:
            raise EntryError(f"{name!r}: {info.budget_problem()}")
    required = None
    if recipe and recipe.get("schedule_file"):  # fitted offline (FitPrune): the entry runs once the file exists
        required = str(cfg_dir / recipe["schedule_file"].format(model=model.name, budget=budget_label(budget)))
        args["schedule"] = required
    return Entry(name, model, method, budget=budget, baseline=baseline, baseline_args=args, source=source,
                 required_file=required)


def paper_baseline_entries(bcfg: BaselinesConfig, cfg: EntriesConfig, cfg_dir: Path, paper_models: dict,
                           infeasible: dict[str, str]) -> list[Entry]:
    """Every baseline of baselines.yaml `paper` at every budget label of its model; cells the method cannot
    meet go to `infeasible` {entry name: reason} instead (the paper has no such cell either)."""
    out = []
    name = bcfg.path.name
    for model_name, methods in bcfg.paper.items():
        if model_name not in paper_models or model_name not in cfg.models:
            raise EntryError(f"{name}: paper.{model_name} is not a paper model; valid: {', '.join(paper_models)}")
        for method in methods:
            if method not in bcfg.recipes:
                raise EntryError(f"{name}: paper.{model_name} names baseline {method!r}; valid: {', '.join(bcfg.recipes)}")
            for budget in sorted(paper_models[model_name].budgets, reverse=True):
                try:
                    out.append(method_entry(cfg.models[model_name], method, budget, bcfg, cfg_dir, source="paper"))
                    infeasible.pop(entry_name(model_name, method, budget), None)
                except BudgetInfeasible as exc:
                    infeasible[entry_name(model_name, method, budget)] = str(exc)
    return out


def with_seed(entry: Entry, seed: int, name: str) -> Entry:
    """`entry` run with `seed` (the `.s{seed}` suffix): the seed goes to the method's constructor. EntryError
    for a method that declares no `seed` entry argument, naming those that do."""
    from ..methods import registered, seeded_methods

    component = entry.baseline or (entry.reducer if entry.reducer not in IMAGE_SIDE_REDUCERS else None)
    info = registered().get(component) if component else None
    if info is None or not info.takes_seed:
        what = f"method {component!r}" if component else f"entry {entry.name!r} (no method)"
        raise EntryError(f"{name!r}: {what} takes no seed; methods with a `seed` entry argument: "
                         f"{', '.join(seeded_methods()) or 'none registered'}")
    if entry.baseline is not None:
        return replace(entry, name=name, seed=seed, baseline_args={**entry.baseline_args, "seed": seed})
    return replace(entry, name=name, seed=seed, reducer_args={**entry.reducer_args, "seed": seed})


def missing_cells(entries: dict[str, Entry], bcfg: BaselinesConfig, cfg: EntriesConfig, cfg_dir: Path,
                  models: list[str] | None = None, budgets: list[float] | None = None
                  ) -> tuple[list[Entry], list[tuple[str, str, float, str]]]:
    """The (model, method, budget) grid beyond the listed entries: every known method at every budget label
    of each model (or `budgets`; tiny models have no labels, so only with `budgets`).

    Returns (entries made on demand, [(model, method, budget, reason)] for cells that cannot exist, the
    reason naming an infeasible budget's numbers, an unregistered component or a missing fitted file).
    """
    made, missing = [], []
    for model_name in models or list(cfg.models):
        model = cfg.models[model_name]
        try:
            table = sorted(model_shape(model).budgets, reverse=True)
        except EntryError:
            table = []
        for budget in sorted(budgets, reverse=True) if budgets else table:
            for method in known_methods(bcfg):
                name = entry_name(model_name, method, budget)
                if name in entries:
                    e = entries[name]
                    if e.missing() is not None:
                        missing.append((model_name, method, budget, e.unavailable_reason()))
                    continue
                try:
                    e = method_entry(model, method, budget, bcfg, cfg_dir)
                except EntryError as exc:
                    missing.append((model_name, method, budget, str(exc)))
                    continue
                if e.missing() is not None:
                    missing.append((model_name, method, budget, e.unavailable_reason()))
                else:
                    made.append(e)
    return made, missing
