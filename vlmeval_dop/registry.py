"""Evaluation entries: entry name -> (model, method, budget, policy, reducer) -> VLMEvalKit wrapper.

The public facade of `vlmeval_dop.entries` (naming rule, configuration, budget solving, generation: one
module each). Entries come from data (eval_configs/entries.yaml + baselines.yaml + models.yaml +
policies.yaml) and the method registry (`vlmeval_dop.methods`), never hard-coded:

- every paper model as its bare name (the unpruned model);
- `{model}_{method}{budget %}` for every paper budget of that model and every DOP variant the paper
  evaluates on it (LLaVA: dopv, dopcd; Qwen2.5-VL / InternVL3: dopr), with the paper's policy;
- `{model}_dop{budget %}`: the paper's headline variant of that family (DOP_CD for LLaVA, DOP_R else);
- `{model}_{baseline}{budget %}` for every baseline the paper reports on that model, at the same budgets,
  matched in TFLOPs (reducers keep n_e tokens; decoder-side methods get their registered budget knob
  solved against the analytic FLOPs);
- explicit one-line entries (tiny test/demo entries), installed searches (`_{tag}` suffix);
- on demand, not listed: `{model}_{method}{budget}` for ANY registered method (a plugin's too) at any model
  and budget, `{entry}.s{seed}` for methods with a seed, `{entry}__mha4-6` / `__swap3mha.s7` operation
  masks and perturbations. Names follow vlmeval_dop/entries/names.py.

An entry is *runnable* when everything it needs is registered (its reducer or decoder-side method, or
`resize`, which the wrappers do on the image) and a fitted file it needs exists. Entries that are not
runnable are still listed, with the reason.

This module does not import vlmeval and loads no weights (listing reads the tiny checkpoints' configs, built
offline on first use); `load_entry` imports the wrapper, and with it vlmeval, only when called.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from .entries.budgets import BudgetInfeasible, entry_layer_tokens, entry_tflops
from .entries.config import (  # noqa: F401  (re-exported: the facade keeps the old public names)
    BASELINES_FILE,
    ENTRIES_FILE,
    SEARCH_TAG_RE,
    SEARCHED_DIR,
    read_baselines_config,
    read_entries_config,
)
from .entries.config import CONFIG_FIX as _CONFIG_FIX
from .entries.entry import (  # noqa: F401  (IMAGE_SIDE_REDUCERS, RESIZE_WRAPPERS re-exported)
    IMAGE_SIDE_REDUCERS,
    RESIZE_WRAPPERS,
    Entry,
    EntryError,
    ModelSpec,
    registered_text,
)
from .entries.entry import tiny_arch as _tiny_arch
from .entries.generate import (
    SKIPPED_SEARCHED,
    check_resize,
    dop_method_of,
    explicit_entries,
    known_methods,
    method_entry,
    paper_baseline_entries,
    paper_dop_entries,
    searched_entries,
    with_seed,
)
from .entries.generate import missing_cells as _missing_cells
from .entries.names import budget_label, entry_name, split_entry_name, split_seed
from .fileio import FileFormatError, read_yaml
from .models_config import CONFIG_DIR, load_models, load_paper_policies
from .policy import DOPPolicy, OperationMask, PolicyError

# `{model}_{baseline}{budget}` names that baselines.yaml would generate but whose method cannot meet that
# budget (the paper has no such cell either); get_entry explains instead of "unknown entry".
INFEASIBLE_BASELINES: dict[str, str] = {}


def _baselines() -> dict[str, Any]:
    """The decoder-side methods' entry-level callables (`vlmeval_dop.baselines.BASELINES`), by name."""
    from .baselines import BASELINES

    return dict(BASELINES)


def _registered(kind: str) -> str:
    return registered_text(kind)


def _cfg_dir(config_dir: Path | None) -> Path:
    return config_dir or CONFIG_DIR


# ---------------------------------------------------------------------------------------------- loading
@lru_cache(maxsize=None)
def load_entries(config_dir: Path | None = None) -> dict[str, Entry]:
    """Every listed entry, keyed by name, in a stable order (paper models first, then explicit entries).
    Entries made on demand (any registered method at any budget, seeds, operation masks) are not listed:
    `get_entry` makes them."""
    cfg_dir = _cfg_dir(config_dir)
    cfg = read_entries_config(cfg_dir, config_dir)
    entries: dict[str, Entry] = {}

    def add(entry: Entry) -> None:
        if entry.name in entries:
            raise EntryError(f"entry {entry.name!r} is defined twice (generated and in entries.yaml?)")
        entries[entry.name] = check_resize(entry)

    for entry in paper_dop_entries(cfg, load_paper_policies(config_dir)):
        add(entry)
    for entry in paper_baseline_entries(read_baselines_config(cfg_dir), cfg, cfg_dir, load_models(config_dir),
                                        INFEASIBLE_BASELINES):
        add(entry)
    for entry in searched_entries(cfg_dir, cfg):
        add(entry)
    for entry in explicit_entries(cfg):
        add(entry)
    return entries


def method_for_reducer(reducer: str, config_dir: Path | None = None) -> str:
    """The method label of DOP with `reducer` (entries.yaml `methods`: cdpruner -> dopcd), else `dop<reducer>`."""
    raw = read_yaml(_cfg_dir(config_dir) / ENTRIES_FILE, _CONFIG_FIX) or {}
    return dop_method_of(reducer, raw.get("methods") or {})


def searched_policy_file(tag: str, reducer: str, config_dir: Path | None = None) -> Path:
    """Where `vlmeval-dop search --install TAG` keeps the policies it found with `reducer`."""
    if not SEARCH_TAG_RE.match(tag):
        raise EntryError(f"search tag {tag!r}: use lower-case letters and digits, single underscores between")
    return _cfg_dir(config_dir) / SEARCHED_DIR / f"{tag}.{reducer}.yaml"


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


# ---------------------------------------------------------------------------------------------- lookup
def _unknown(name: str, valid: list[str], what: str = "entry") -> EntryError:
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return EntryError(f"unknown {what} {name!r}.{hint} Run `vlmeval-dop list` for all {len(valid)} entries.")


def get_entry(name: str, config_dir: Path | None = None) -> Entry:
    """The entry called `name`: a listed one, or one made on demand:

    - `{model}_{method}{budget}` for any registered method (a plugin's too) at any model and budget
      (infeasible budgets and unregistered methods raise EntryError with the reason);
    - `{entry}.s{seed}`: `entry` with a seed, for methods that declare one (`Entry.seed`);
    - `{entry}__mha4-6` / `{entry}__swap3mha.s7`: operation masks and policy perturbations.

    Unknown names raise EntryError naming the closest entries.
    """
    entries = load_entries(config_dir)
    if name in entries:
        return entries[name]
    if OP_SEPARATOR in name:
        return _masked_entry(name, entries, config_dir)
    base, seed = split_seed(name)
    if seed is not None:
        if f"{base}.s{seed}" != name:  # `.s03`: seed 3 under a second name (a second results folder)
            raise EntryError(f"{name!r}: write it '{base}.s{seed}' (one name per entry: its results live under it)")
        inner, inner_seed = split_seed(base)
        if inner_seed is not None:  # `.s3.s4` would run seed 4 under a third name
            raise EntryError(f"{name!r}: an entry takes one seed suffix: '{inner}.s{seed}' or '{base}'")
        return with_seed(get_entry(base, config_dir), seed, name)
    if name in INFEASIBLE_BASELINES:
        raise EntryError(f"entry {name!r} does not exist: {INFEASIBLE_BASELINES[name]}")
    made = _on_demand(name, entries, config_dir)
    if made is not None:
        return made
    exc = _unknown(name, list(entries))
    if SKIPPED_SEARCHED:  # the entry may be in a searched file that could not be read
        exc = EntryError(f"{exc} (skipped unreadable searched policy files: {', '.join(SKIPPED_SEARCHED)})")
    raise exc


def _on_demand(name: str, entries: dict[str, Entry], config_dir: Path | None) -> Entry | None:
    """`{model}_{method}{budget}` of a known method (registered, or in baselines.yaml), else None."""
    models = {e.model.name: e.model for e in entries.values()}
    parts = split_entry_name(name, models)
    if parts is None:
        return None
    model, method, budget = parts
    cfg_dir = _cfg_dir(config_dir)
    bcfg = read_baselines_config(cfg_dir)
    if method not in known_methods(bcfg):
        return None
    if budget is None:
        raise EntryError(f"{name!r}: method {method!r} needs a TFLOPs budget label: {name}<percent> (e.g. 28 for 28 %)")
    canonical = entry_name(model, method, budget)
    if canonical != name:  # `fastv028`, `rand90p0`: the same entry under a second name (a second results folder)
        raise EntryError(f"{name!r}: write it '{canonical}' (one name per entry: its results live under it)")
    try:
        return method_entry(models[model], method, budget, bcfg, cfg_dir)
    except BudgetInfeasible as exc:
        raise EntryError(f"entry {name!r} does not exist: {exc}") from None


OP_SEPARATOR = "__"
_SWAP_RE = re.compile(r"^swap(\d+)(mha|mlp)\.s(\d+)$")


def _masked_entry(name: str, entries: dict[str, Entry], config_dir: Path | None = None) -> Entry:
    """`{entry}__mha4-6[__mlp12]`: an entry with single visual operations pruned on top of its policy
    (the paper's redundancy analysis, Tables 26-28; layers 1-based as in the paper's columns), or
    `{entry}__swap{k}{mha|mlp}.s{seed}`: its DOP policy randomly perturbed (Tables 29-30)."""
    base_name, _, suffix = name.partition(OP_SEPARATOR)
    models = {e.model.name for e in entries.values()}
    if base_name not in entries and split_entry_name(split_seed(base_name)[0], models) is None:
        raise _unknown(base_name, list(entries))
    base = entries.get(base_name) or get_entry(base_name, config_dir)  # a listed entry, or one made on demand
    if base.baseline is not None:
        raise EntryError(f"{name!r}: operation masks apply to DOP or unpruned entries, not the baseline {base_name!r}")
    L = (load_models()[base.model.name].arch if base.model.paper else _tiny_arch(base.model.tiny)).num_layers
    swap = _SWAP_RE.match(suffix)
    if swap:  # `__swap3mha.s7`: a random perturbation of the entry's DOP policy (Tables 29-30)
        from .perturbation import swap_operations

        canonical = f"{base_name}{OP_SEPARATOR}swap{int(swap.group(1))}{swap.group(2)}.s{int(swap.group(3))}"
        if canonical != name:  # one name per entry: `swap01mha.s07` would be a second results folder
            raise EntryError(f"{name!r}: write it {canonical!r}")

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


def parse_entry_name(name: str, config_dir: Path | None = None) -> tuple[str, str, float | None]:
    """Split `{model}_{method}{budget %}` into (model, method, budget fraction); bare model -> 'full'.

    Parses by the known model names (they contain underscores and digits themselves); the rule is
    vlmeval_dop/entries/names.py's. A `.s{seed}` suffix is ignored here (`get_entry(name).seed`).
    """
    models = {e.model.name for e in load_entries(config_dir).values()}
    parts = split_entry_name(split_seed(name)[0], models)
    if parts is None:
        ordered = sorted(models, key=len, reverse=True)
        raise EntryError(f"{name!r} is not of the form {{model}}_{{method}}{{budget}}; models: {', '.join(ordered)}")
    return parts


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
    if entry.reducer_args:  # the reducer's constructor arguments (a seed)
        kwargs["reducer_args"] = entry.reducer_args
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
        r = entry_tflops(e)
        if r is None:
            tf = "-"
        else:
            tf = f"{100 * r['ratio']:.1f}"
            if abs(r["executed_ratio"] - r["ratio"]) > 1e-9:
                tf += f" (exec {100 * r['executed_ratio']:.1f})"
        missing = e.missing()
        if missing is None:
            status = "runnable" + (f" ({e.source})" if e.source == "on demand" else "")
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


def missing_cells(models: list[str] | None = None, budgets: list[float] | None = None,
                  config_dir: Path | None = None) -> tuple[list[Entry], list[tuple[str, str, float, str]]]:
    """For `vlmeval-dop list --all`: every known method (registered or in baselines.yaml) at every budget
    label of each model (or at `budgets`): the entries made on demand, and each cell that cannot exist or
    cannot run as (model, method, budget, reason)."""
    cfg_dir = _cfg_dir(config_dir)
    entries = load_entries(config_dir)
    cfg = read_entries_config(cfg_dir, config_dir)
    unknown = [m for m in models or [] if m not in cfg.models]
    if unknown:
        raise EntryError(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(cfg.models)}")
    return _missing_cells(entries, read_baselines_config(cfg_dir), cfg, cfg_dir, models, budgets)


def format_missing(cells: list[tuple[str, str, float, str]]) -> str:
    """The `list --all` section of cells without a runnable entry, one line each with the reason."""
    if not cells:
        return "every (model, method, budget) cell has a runnable entry"
    lines = [f"{len(cells)} (model, method, budget) cell(s) without a runnable entry:"]
    for model, method, budget, reason in cells:
        lines.append(f"  {model}_{method}{budget_label(budget)}: {reason}")
    return "\n".join(lines)


__all__ = [
    "Entry",
    "EntryError",
    "ModelSpec",
    "budget_label",
    "entry_layer_tokens",
    "entry_tflops",
    "format_missing",
    "format_table",
    "get_entry",
    "install_policies",
    "load_entries",
    "load_entry",
    "missing_cells",
    "parse_entry_name",
    "runnable_entry",
]
