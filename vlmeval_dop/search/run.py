"""`vlmeval-dop search`: validation samples of a VLMEvalKit dataset -> divergence profile -> policies.

Glue between the VLMEvalKit plugin (wrappers build each sample's prompt and processor inputs exactly as
in evaluation) and the search library (profile.py, optimize.py, plot.py). Imports vlmeval lazily.
Outputs under `--out-dir/<model>-<reducer>-<dataset>-<samples>-<seed>/`: per-sample results (resumable),
`profile.json`, `profile.png`, `policies.yaml` (eval_configs form) and `search.json`.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from ..arch import ArchSpec
from ..models_config import load_models
from ..policy import PolicyError
from .curves import OBJECTIVES

# Table 6 sampling points of LLaVA-1.5-7B, rescaled for models outside models.yaml (tiny ones)
_REF_DEPTHS, _REF_L = (26, 20, 14, 8, 4, 0), 32
_REF_VISUAL, _REF_NV = (512, 256, 128, 64, 32, 16), 576


@dataclass
class SearchSetup:
    """Everything the search needs to know about the model, resolved from models.yaml or the model."""

    model_key: str
    spec: ArchSpec
    text_tokens: int
    alpha: float
    depths: list[int]
    visual: list[int]
    budgets: list[float]


def _scaled_points(L: int, n_v: int) -> tuple[list[int], list[int]]:
    depths = sorted({round(d * L / _REF_L) for d in _REF_DEPTHS}, reverse=True)
    visual = sorted({max(1, round(n * n_v / _REF_NV)) for n in _REF_VISUAL}, reverse=True)
    return [d for d in depths if d < L], [n for n in visual if n < n_v]


@dataclass
class ValidationSet:
    """Validation samples as model inputs, built by an unpruned entry's VLMEvalKit wrapper.

    Attributes:
        entry: the registry entry; model: the loaded model; dataset: the built VLMEvalKit dataset.
        items: `[([row index], single-sample processor inputs), ...]` in draw order.
        rows: the drawn dataset rows (pandas DataFrame, same order: answers for scoring).
        pad_token_id: the tokenizer's padding id, for batching (never the image token).
        wrapper: the loaded VLMEvalKit wrapper (decoding and generation settings of evaluation).
        messages: the VLMEvalKit messages the items were built from (same order).
    """

    entry: Any
    model: Any
    dataset: Any
    items: list[tuple[list[str], dict[str, Any]]]
    rows: Any
    pad_token_id: int
    wrapper: Any
    messages: list

    @property
    def dataset_name(self) -> str:
        return self.dataset.dataset_name

    def with_resized(self, points: Sequence[int]) -> list[tuple[list[str], dict[str, Any], dict[int, Any]]]:
        """The items with each sample's inputs for the image-side `resize` reduction (DOP_R) at every n_v
        in `points`: `(ids, inputs, {n_v: inputs})`, built by the wrapper exactly as its DOP_R entries do."""
        out = []
        for (ids, inputs), message in zip(self.items, self.messages):
            resized = {}
            for n in points:
                with self.wrapper.resized(n):
                    resized[int(n)] = self.wrapper.model_inputs(message, self.dataset_name)
            out.append((ids, inputs, resized))
        return out


def validation_items(entry: str, data: str, samples: int, seed: int, device: str | None = None) -> ValidationSet:
    """`samples` random rows (seed) of dataset `data` as model inputs built by `entry`'s wrapper.

    The unpruned entry's VLMEvalKit wrapper builds each prompt (its own custom prompt where it has one,
    else the dataset's) and processor inputs exactly as evaluation does.
    """
    from ..registry import get_entry, load_entry

    e = get_entry(entry)
    if e.policy is not None or e.baseline is not None:
        raise PolicyError(f"this runs on an unpruned model entry (e.g. {e.model.name!r}), not on {entry!r}")
    wrapper = load_entry(entry, **({"device": device} if device else {}))
    wrapper.load()

    from vlmeval.dataset import build_dataset

    dataset = build_dataset(data)
    if dataset is None:
        raise ValueError(f"dataset {data!r} could not be built by VLMEvalKit (name or $LMUData/{data}.tsv)")
    rows = dataset.data.sample(n=min(samples, len(dataset.data)), random_state=seed)
    wrapper.set_dump_image(dataset.dump_image)  # as VLMEvalKit's inference loop: custom prompts save images

    def message_of(row):
        if wrapper.use_custom_prompt(dataset.dataset_name):
            return wrapper.build_prompt(row, dataset.dataset_name)
        return dataset.build_prompt(row)

    messages = [message_of(row) for _, row in rows.iterrows()]
    items = [([str(row["index"])], wrapper.model_inputs(m, dataset.dataset_name))
             for (_, row), m in zip(rows.iterrows(), messages)]
    return ValidationSet(e, wrapper.model, dataset, items, rows, _pad_token_id(wrapper), wrapper, messages)


def _pad_token_id(wrapper) -> int:
    tok = getattr(wrapper.processor, "tokenizer", wrapper.processor)
    pad = getattr(tok, "pad_token_id", None)
    if pad is None:
        pad = getattr(tok, "eos_token_id", None)
    if pad is None or pad == getattr(wrapper.model.config, "image_token_id", None):
        raise ValueError("the tokenizer has no usable padding id; profile with --batch-size 1")
    return int(pad)


def run_fitprune(entry: str, data: str, budgets: list[float] | None, samples: int, seed: int, *,
                 force: bool = False, device: str | None = None) -> dict[str, str]:
    """Fit FitPrune's schedule for each budget on validation samples and write the files the
    `{model}_fitprune{budget}` entries read (eval_configs/baselines.yaml `schedule_file`).

    A schedule that exists is kept (finished work is never overwritten) unless `force`. Returns
    {budget: path}.
    """
    from ..baselines.fitprune import fit_fitprune_schedule
    from ..registry import load_entries

    todo = {}
    for cand in load_entries().values():
        if cand.baseline == "fitprune" and cand.required_file and cand.model.name == entry:
            if budgets is None or any(abs(cand.budget - b) < 1e-9 for b in budgets):
                todo[cand.budget] = Path(cand.required_file)
    if not todo:
        raise ValueError(f"no FitPrune entries for model {entry!r} at budgets {budgets} (eval_configs/baselines.yaml)")
    pending = {b: p for b, p in todo.items() if force or not p.exists()}
    if pending:
        val = validation_items(entry, data, samples, seed, device)
        calibration = [inputs for _, inputs in val.items]
        for budget, path in sorted(pending.items()):
            schedule = fit_fitprune_schedule(val.model, calibration, budget)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp" + path.suffix)
            schedule.save(tmp)
            tmp.replace(path)  # atomic: an interrupted fit leaves no half-written schedule
    return {str(b): str(p) for b, p in sorted(todo.items())}


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed's when a process group is initialised
    (`torchrun`), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def run_search(
    entry: str,
    data: str,
    reducer: str,
    budgets: list[float] | None,
    samples: int,
    seed: int,
    out_dir: Path,
    *,
    alpha: float | None = None,
    text_tokens: int | None = None,
    depths: list[int] | None = None,
    visual: list[int] | None = None,
    device: str | None = None,
    batch_size: int = 1,
    recompute: bool = False,
    objective: str = "kl",
    max_new_tokens: int | None = None,
    install: str | None = None,
    overwrite: bool = False,
    config_dir: Path | None = None,
) -> dict[str, Any] | None:
    """Profile `samples` random rows (seed) of dataset `data` on the unpruned model of `entry`, then solve
    Eq. 7 for each budget. Returns the summary that is also written to `search.json`.

    Samples are batched `batch_size` at a time where their image tensors allow (search/batching.py).
    Under `torchrun` (an initialised process group) every rank profiles its slice of the samples into its
    own file; rank 0 merges them, solves and writes the outputs, the other ranks return None. Finished
    samples are kept and skipped on a rerun unless `recompute`.

    `objective="acc_drop"` profiles Eq. 13's accuracy-drop curves instead (search/accuracy.py: whole greedy
    answers with evaluation's decoding settings, `max_new_tokens` if given, scored with VLMEvalKit's
    per-sample metric) into `<run dir>-acc_drop/`; Eq. 7 is then solved on those curves.

    `install="TAG"` also writes the policies to `eval_configs/searched/TAG.<reducer>.yaml` (or under
    `config_dir`), which makes them evaluation entries `{model}_{method}{budget}_TAG` (e.g.
    `llava15_7b_dopcd28_TAG` for `run.py --model`). A different policy already installed there for the same
    model and budget is kept (an error) unless `overwrite`.
    """
    import torch

    from .batching import batched, num_batches
    from .optimize import InfeasibleBudgetError, optimize, write_policy
    from .plot import plot_profile
    from .profile import ProfileRun, build_profile

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    from ..reducers import REDUCERS
    from .profile import IMAGE_SIDE_REDUCERS

    valid_reducers = sorted(REDUCERS) + list(IMAGE_SIDE_REDUCERS)
    if reducer not in valid_reducers:
        raise ValueError(f"unknown reducer {reducer!r}; valid reducers: {', '.join(valid_reducers)}")
    if install is not None:
        from ..registry import searched_policy_file

        searched_policy_file(install, reducer, config_dir)  # a bad tag fails before any work
    rank, world = distributed_rank()
    val = validation_items(entry, data, samples, seed, device)
    model, items = val.model, val.items
    setup = _setup(val.entry.model.name, model, items[0][1], alpha, text_tokens, depths, visual, budgets)
    suffix = "" if objective == "kl" else f"-{objective}"
    run_dir = Path(out_dir) / f"{val.entry.model.name}-{reducer}-{val.dataset_name}-{len(items)}-{seed}{suffix}"
    if objective == "kl":
        run = ProfileRun(run_dir, setup.depths, setup.visual, reducer, rank=rank, world_size=world)
    else:
        from .accuracy import AccuracyProfileRun, sample_scorer

        scorer = sample_scorer(val.dataset)  # refuses datasets without a per-sample metric, before any work
        gen = copy.deepcopy(val.wrapper.generation_config())  # evaluation's decoding settings
        if max_new_tokens is not None:
            gen.max_new_tokens = max_new_tokens
        run = AccuracyProfileRun(run_dir, setup.depths, setup.visual, reducer, gen.max_new_tokens,
                                 rank=rank, world_size=world, generation_config=gen)
    if recompute and rank == 0:
        for old in run_dir.glob(f"{run.FILE_PREFIX}.rank*.jsonl"):
            old.unlink()  # asked for: profile every sample again
    _barrier(world)
    if reducer in IMAGE_SIDE_REDUCERS:  # D_v runs the model on images resized for each n_v (DOP_R)
        items = val.with_resized(setup.visual)
    mine = list(run.shard(items))
    batches, total = batched(mine, batch_size, val.pad_token_id), num_batches(mine, batch_size)
    if objective == "kl":
        added = run.run(model, batches, total=total)
    else:
        rows = {str(row["index"]): row for _, row in val.rows.iterrows()}
        decode = lambda ids: [val.wrapper.decode(seq) for seq in ids]  # noqa: E731 - as generate_inner
        jobs = ((b[0], b[1], [rows[i] for i in b[0]], *b[2:]) for b in batches)  # + resized inputs if any
        added = run.run(model, decode, scorer, jobs, total=total)
    counter = getattr(run, "counter", None)  # generation has no prefix sharing to count
    counts = torch.tensor([counter.layer_forwards if counter else 0, counter.layer_equivalents if counter else 0,
                           added], dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist

        counts = counts.to(model.device)
        dist.all_reduce(counts)  # totals over ranks for the summary
        counts = counts.cpu()
    _barrier(world)  # every rank's samples are on disk before rank 0 merges
    if rank != 0:
        _barrier(world)
        return None
    profile = build_profile(
        run_dir, model=setup.model_key, reducer=reducer, dataset=val.dataset_name, seed=seed,
        num_layers=setup.spec.num_layers, num_visual=setup.spec.visual_tokens,
        depths=setup.depths, visual=setup.visual, pattern=f"{run.FILE_PREFIX}.rank*.jsonl", objective=objective,
    )
    profile.save(run_dir / "profile.json")
    results, policies = {}, {}
    for budget in setup.budgets:
        try:
            r = optimize(profile, setup.spec, budget, text_tokens=setup.text_tokens, alpha=setup.alpha,
                         model=setup.model_key)
        except InfeasibleBudgetError as exc:
            results[str(budget)] = {"error": str(exc)}
            continue
        results[str(budget)] = r.to_dict()
        policies[budget] = r.policy
        write_policy(run_dir / "policies.yaml", setup.model_key, budget, r.policy)
    plot_profile(run_dir / "profile.json", run_dir / "profile.png", policies=policies)
    installed = _install(install, reducer, setup.model_key, policies, overwrite, config_dir) if install else {}
    summary = {
        "entry": entry, "dataset": val.dataset_name, "reducer": reducer, "samples": len(items),
        "seed": seed, "objective": objective, "newly_profiled": int(counts[2]), "depths": setup.depths,
        "visual": setup.visual,
        "layer_forwards": int(counts[0]) if objective == "kl" else None,
        "layer_equivalents": round(float(counts[1]), 3) if objective == "kl" else None,
        "batch_size": batch_size, "world_size": world, "results": results, "dir": str(run_dir),
        "installed": installed,
    }
    (run_dir / "search.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    _barrier(world)
    return summary


def solve_profile(
    profile_path: Path,
    model: str,
    budgets: list[float] | None = None,
    *,
    alpha: float | None = None,
    text_tokens: int | None = None,
    reducer: str | None = None,
    install: str | None = None,
    overwrite: bool = False,
    config_dir: Path | None = None,
) -> dict[str, Any]:
    """Eq. 7 from a saved `profile.json` for paper model `model`, without running any model.

    A profile measured on another model is transferred first by rescaling its sampling points (Eq. 12,
    Appendix C.5): e.g. LLaVA-1.5-7B's curves solved for LLaVA-1.5-13B (Table 5). `reducer` names the
    reduction the target's policies run with (default: the profile's; the paper transfers DOP_CD curves to
    DOP_R models, `reducer="resize"`). Budgets default to the model's labels; `install` as in `run_search`.
    """
    from ..models_config import load_models
    from .curves import DivergenceProfile
    from .optimize import InfeasibleBudgetError, optimize
    from .transfer import transfer_to_model

    papers = load_models(config_dir)
    if model not in papers:
        raise ValueError(f"unknown paper model {model!r}; valid: {', '.join(papers)}")
    profile = DivergenceProfile.load(profile_path)
    reducer = reducer or profile.reducer
    if install is not None:
        from ..registry import searched_policy_file

        searched_policy_file(install, reducer, config_dir)  # a bad tag fails before any work
    pm = papers[model]
    source = profile.model
    if source != model:
        profile = transfer_to_model(profile, model, reducer=reducer, config_dir=config_dir)
    results, policies = {}, {}
    for budget in budgets or sorted(pm.budgets, reverse=True):
        try:
            r = optimize(profile, pm.arch, budget, text_tokens=text_tokens if text_tokens is not None else pm.text_tokens,
                         alpha=alpha if alpha is not None else pm.alpha, model=model)
        except InfeasibleBudgetError as exc:
            results[str(budget)] = {"error": str(exc)}
            continue
        results[str(budget)] = r.to_dict()
        policies[budget] = r.policy
    installed = _install(install, reducer, model, policies, overwrite, config_dir) if install else {}
    return {"profile": str(profile_path), "model": model, "reducer": reducer, "objective": profile.objective,
            "transferred_from": source if source != model else None, "results": results, "installed": installed}


def _install(tag: str, reducer: str, model_key: str, policies: dict, overwrite: bool, config_dir) -> dict[str, str]:
    """Write the solved policies where the registry makes entries of them; returns {budget: entry name}."""
    import yaml

    from ..registry import budget_label, load_entries, method_for_reducer, searched_policy_file
    from .optimize import write_policy

    path = searched_policy_file(tag, reducer, config_dir)
    old = (yaml.safe_load(path.read_text()) or {}).get(model_key, {}) if path.exists() else {}
    old = {float(b): list(v) for b, v in (old or {}).items()}
    for budget, policy in policies.items():
        new = [policy.d_A, policy.d_P, policy.n_v] + ([policy.d_A_sys, policy.d_P_sys] if policy.has_system_depths else [])
        if float(budget) in old and old[float(budget)] != new and not overwrite:
            raise ValueError(f"{path} already holds {model_key} @ {budget}: {old[float(budget)]} (not {new}); "
                             "pick another --install tag or pass --overwrite")
    method = method_for_reducer(reducer, config_dir)
    out = {}
    for budget, policy in sorted(policies.items(), reverse=True):
        write_policy(path, model_key, budget, policy)
        out[str(budget)] = f"{model_key}_{method}{budget_label(float(budget))}_{tag}"
    load_entries.cache_clear()  # the new entries exist from now on in this process too
    return out


def _setup(model_key, model, first_inputs, alpha, text_tokens, depths, visual, budgets) -> SearchSetup:
    papers = load_models()
    image_id = model.config.image_token_id
    n_vis = int((first_inputs["input_ids"][0] == image_id).sum())
    if model_key in papers:
        p = papers[model_key]
        spec = p.arch
        return SearchSetup(
            model_key, spec, text_tokens if text_tokens is not None else p.text_tokens,
            alpha if alpha is not None else p.alpha, depths or p.sampling_depths, visual or p.sampling_visual,
            budgets or sorted(p.budgets, reverse=True),
        )
    spec = ArchSpec.from_model(model, visual_tokens=n_vis)
    d_def, v_def = _scaled_points(spec.num_layers, n_vis)
    n_text = int(first_inputs["input_ids"].shape[1]) - n_vis
    return SearchSetup(
        model_key, spec, text_tokens if text_tokens is not None else n_text, alpha if alpha is not None else 1.5,
        depths or d_def, visual or v_def, budgets or [0.5],
    )
