"""`vlmeval-dop search`: validation samples of a VLMEvalKit dataset -> divergence profile -> policies.

Glue between the VLMEvalKit plugin (wrappers build each sample's prompt and processor inputs exactly as
in evaluation) and the search library (profile.py, optimize.py, plot.py). Imports vlmeval lazily.
Outputs under `--out-dir/<model>-<reducer>-<dataset>-<samples>-<seed>/`: per-sample results (resumable),
`profile.json`, `profile.png`, `policies.yaml` (eval_configs form) and `search.json`.
"""
from __future__ import annotations

import copy
import json
import os.path as osp
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
    grid: tuple[list[int], list[int]] | None = None  # the F.3 grid (depths, n_v values); None: extensions.f3_grid


def _scaled_points(L: int, n_v: int) -> tuple[list[int], list[int]]:
    depths = sorted({round(d * L / _REF_L) for d in _REF_DEPTHS}, reverse=True)
    visual = sorted({max(1, round(n * n_v / _REF_NV)) for n in _REF_VISUAL}, reverse=True)
    return [d for d in depths if d < L], [n for n in visual if n < n_v]


def _scaled_grid(L: int, n_v: int) -> tuple[list[int], list[int]]:
    """F.3's grid steps (2 layers of 32, 16 tokens of 576) scaled to a model outside models.yaml."""
    from .extensions import f3_grid

    return f3_grid(L, n_v, depth_step=max(1, round(2 * L / _REF_L)), n_step=max(1, round(16 * n_v / _REF_NV)))


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
    else the dataset's) and processor inputs exactly as evaluation does. The dataset and the drawn rows are
    checked before the weights load (datasets.load_checked_dataset / checked_messages: columns, unique
    indices, non-empty questions, images that decode, one image per prompt), so a bad dataset fails with a
    message naming the file and the row, in seconds.
    """
    from ..datasets import checked_messages, load_checked_dataset
    from ..registry import get_entry, load_entry

    e = get_entry(entry)
    if e.policy is not None or e.baseline is not None:
        raise PolicyError(f"this runs on an unpruned model entry (e.g. {e.model.name!r}), not on {entry!r}")
    wrapper = load_entry(entry, **({"device": device} if device else {}))  # no weights yet
    video = video_dataset(data)
    if video and not getattr(wrapper, "VIDEO_LLM", False):
        from ..checks import UsageError

        raise UsageError(f"{data} is a video dataset; {entry!r} takes images only (video models: Video-LLaVA)")
    dataset = load_video_dataset(data) if video else load_checked_dataset(data)
    rows = dataset.data.sample(n=min(samples, len(dataset.data)), random_state=seed)
    if not video:  # as VLMEvalKit's image inference loop: custom prompts save images
        wrapper.set_dump_image(dataset.dump_image)

    def message_of(row):
        if wrapper.use_custom_prompt(dataset.dataset_name):
            return wrapper.build_prompt(row, dataset.dataset_name)
        if video:  # as VLMEvalKit's video inference loop: the video file for a video LLM
            return dataset.build_prompt(row, video_llm=True)
        return dataset.build_prompt(row)

    if video:
        messages = checked_video_messages(dataset, rows, message_of)
    else:
        messages = checked_messages(dataset, rows, message_of, single_image=True)
    wrapper.load()
    items = [([str(row["index"])], wrapper.model_inputs(m, dataset.dataset_name))
             for (_, row), m in zip(rows.iterrows(), messages)]
    return ValidationSet(e, wrapper.model, dataset, items, rows, _pad_token_id(wrapper), wrapper, messages)


def video_dataset(name: str) -> bool:
    """Whether `name` is a registered VLMEvalKit video dataset (MODALITY "VIDEO": Table 18's video QA sets)."""
    import vlmeval.dataset as vd

    from ..datasets import register_datasets, resolve_dataset_name

    register_datasets()
    try:
        resolved = resolve_dataset_name(name)
    except ValueError:
        return False  # unknown: the image path reports it with the valid names
    return any(resolved in cls.supported_datasets() for cls in getattr(vd, "VIDEO_DATASET", []))


def load_video_dataset(name: str):
    """A video dataset for the search, checked before any model work: it builds, has rows, unique indices.
    Raises DatasetError naming the dataset and the problem."""
    from vlmeval.dataset import build_dataset

    from ..datasets import DatasetError, resolve_dataset_name

    resolved = resolve_dataset_name(name)
    try:
        dataset = build_dataset(resolved)
    except Exception as exc:  # a missing TSV names the command that builds it
        raise DatasetError(f"video dataset {resolved!r} could not be loaded: {exc}") from None
    data = dataset.data
    if len(data) == 0:
        raise DatasetError(f"video dataset {resolved!r} has no rows")
    dup = data["index"].astype(str).duplicated()
    if dup.any():
        raise DatasetError(f"video dataset {resolved!r}: index {data['index'].astype(str)[dup].iloc[0]} appears more "
                           "than once; every row needs its own index")  # fmt: skip
    return dataset


def checked_video_messages(dataset, rows, message_of) -> list:
    """The VLMEvalKit message of each row, checked: a non-empty question and exactly one video file that
    exists (the search profiles one video per prompt: n_v counts that video's tokens). DatasetError names the
    row and the problem."""
    from ..datasets import DatasetError, row_label

    out = []
    for _, row in rows.iterrows():
        label = row_label(dataset, row)
        message = message_of(row)
        videos = [m["value"] for m in message if m["type"] == "video"]
        texts = [m["value"] for m in message if m["type"] == "text"]
        if not any(str(t).strip() for t in texts):
            raise DatasetError(f"{label}: empty question")
        if len(videos) != 1 or any(m["type"] == "image" for m in message):
            raise DatasetError(f"{label}: the prompt has {len(videos)} videos; the search profiles one video per prompt")
        if not osp.isfile(str(videos[0])):
            raise DatasetError(f"{label}: video file {videos[0]} not found")
        out.append(message)
    return out


def weights_id(wrapper) -> str:
    """What identifies the loaded weights: a local checkpoint's content id (fileio.checkpoint_id), or the
    Hub id with the commit of its cached snapshot."""
    import os

    path = wrapper._checkpoint()
    if os.path.isdir(path):
        return _checkpoint_id_cached(os.path.realpath(path))
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(path, "config.json")
    return f"{path}@{Path(config).parent.name}" if isinstance(config, str) else path


_CHECKPOINT_IDS: dict[str, str] = {}


def _checkpoint_id_cached(path: str) -> str:
    from ..fileio import checkpoint_id

    if path not in _CHECKPOINT_IDS:
        _CHECKPOINT_IDS[path] = checkpoint_id(path)
    return _CHECKPOINT_IDS[path]


def sample_keys(val: ValidationSet, items: Sequence) -> dict[str, str]:
    """{sample id: fingerprint of what determines its record apart from the profiling settings}: the model
    entry and its wrapper settings, the weights id, the library versions that compute the forward, the
    dataset row's content and the exact model inputs built from it (also the resized ones of `resize`)."""
    import torch
    import transformers

    from ..fileio import fingerprint, tensor_digest

    w = val.wrapper
    context = fingerprint({
        "entry": val.entry.name, "model_args": val.entry.model.args, "weights": weights_id(w),
        "dtype": str(w.dtype), "device": w.device.type, "attn": w.attn_implementation,
        "dataset": val.dataset_name, "torch": torch.__version__, "transformers": transformers.__version__,
    })
    rows = {str(row["index"]): row for _, row in val.rows.iterrows()}
    keys = {}
    for item in items:
        (sid,) = item[0]
        row = {str(k): str(v) for k, v in rows[sid].items()}
        keys[sid] = fingerprint(context, row, tensor_digest(item[1]), tensor_digest(item[2]) if len(item) > 2 else None)
    return keys


def check_search_args(entry: str, reducer: str, budgets, samples: int, out_dir, *, alpha=None, text_tokens=None,
                      depths=None, visual=None, device=None, batch_size: int = 1, objective: str = "kl",
                      max_new_tokens=None, install=None, config_dir=None, system=None, joint_grid: bool = False,
                      grid_additive: bool = False, spearman=None) -> None:
    """Every argument of `run_search` checked before any model loads or anything is written (UsageError)."""
    from ..checks import (UsageError, check_alpha, check_budgets, check_device, check_min, check_out_dir,
                          check_reducer)
    from ..registry import get_entry
    from .profile import IMAGE_SIDE_REDUCERS

    e = get_entry(entry)
    if e.policy is not None or e.baseline is not None:
        raise PolicyError(f"this runs on an unpruned model entry (e.g. {e.model.name!r}), not on {entry!r}")
    check_reducer(reducer)
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    modes = [f for f, on in (("--system-tokens", system is not None), ("--joint-grid", joint_grid),
                              ("--grid-additive", grid_additive)) if on]
    if len(modes) > 1:
        raise UsageError(f"{' and '.join(modes)} are different searches; give one of them")
    if system is not None and spearman is not None:
        raise UsageError("--spearman compares visual-token policies; it does not combine with --system-tokens")
    extra = modes + (["--spearman"] if spearman is not None else [])
    if extra and objective != "kl":
        raise UsageError(f"{extra[0]} works on KL divergences (Eq. 10); drop --objective {objective}")
    runs = [f for f in extra if f in ("--joint-grid", "--spearman")]
    if runs and reducer in IMAGE_SIDE_REDUCERS:
        raise UsageError(f"{runs[0]} runs pruned policies on the model's own visual tokens; --reducer {reducer} "
                         "reduces the image before the processor (use a token reducer such as cdpruner)")
    check_min(spearman, "--spearman", 2, " (combinations of the sampling points)")
    check_min(system if system != SYSTEM_FROM_PROMPTS else None, "--system-tokens", 1, " (tokens before the image)")
    check_budgets(budgets)
    check_alpha(alpha)
    check_min(text_tokens, "--text-tokens", 0)
    check_min(samples, "--samples", 1)
    check_min(batch_size, "--batch-size", 1)
    check_min(max_new_tokens, "--max-new-tokens", 1)
    L, n_v = _model_shape(e)
    for d in depths or []:
        if d < 0 or (L is not None and d > L):
            top = L if L is not None else "its layer count"
            raise UsageError(f"--depths {d}: sampling depths of {e.model.name} are in 0..{top}")
    for n in visual or []:
        if n < 1 or (n_v is not None and n > n_v):
            raise UsageError(f"--visual {n}: sampling n_v values are in 1..{n_v or 'the visual tokens'}")
    check_device(device)
    check_out_dir(out_dir)
    if install is not None:
        _check_install_target(install, reducer, config_dir)


def _model_shape(entry) -> tuple[int | None, int | None]:
    """(decoder layers, visual tokens) of an entry's model without loading it; None where unknown or varying."""
    if entry.model.paper:
        papers = load_models()
        if entry.model.name not in papers:  # a model of entries.yaml outside models.yaml: checked later
            return None, None
        arch = papers[entry.model.name].arch
        return arch.num_layers, arch.visual_tokens
    from ..registry import _tiny_arch

    arch = _tiny_arch(entry.model.tiny)
    return arch.num_layers, None if entry.model.wrapper == "qwen2_5_vl" else arch.visual_tokens


def _check_install_target(tag: str, reducer: str, config_dir) -> None:
    """A bad tag, or an existing install file that cannot be read, fails before any work."""
    from ..checks import check_out_dir
    from ..fileio import read_yaml
    from ..registry import searched_policy_file

    path = searched_policy_file(tag, reducer, config_dir)
    check_out_dir(path.parent, "install folder")
    if path.exists():
        read_yaml(path, "fix the file or delete it, then install again")


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
    from ..checks import check_budgets, check_device, check_min
    from ..registry import load_entries

    check_budgets(budgets)
    check_min(samples, "--samples", 1)
    check_device(device)
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
    system: int | None = None,
    joint_grid: bool = False,
    grid_additive: bool = False,
    spearman: int | None = None,
) -> dict[str, Any] | None:
    """Profile `samples` random rows (seed) of dataset `data` on the unpruned model of `entry`, then solve
    Eq. 7 for each budget. Returns the summary that is also written to `search.json`.

    Search variants (one at a time; the profile is shared where the settings allow):

    - `system`: Eq. 14 (App. F.6): also profile the system-token curves and prune the tokens before the image
      (`SYSTEM_FROM_PROMPTS`: as many as the prompts have, else this count for the FLOPs model); run dir
      suffix `-system`, outputs as for Eq. 7.
    - `joint_grid`: App. F.3: the joint divergence of every budget-feasible policy of the F.3 grid
      (`extensions.f3_grid`) measured on the same samples (search/joint.py: prefix sharing, batched,
      resumable, sharded under torchrun), the best per budget is the result (`search.joint_grid.json`,
      `policies.joint_grid.yaml`); the grid-restricted additive optimum and Eq. 7's are reported beside it.
    - `grid_additive`: Table 22's other row, Eq. 7 restricted to the same grid (no joint runs).
    - `spearman=K`: App. E.1 / Table 7: joint divergences of K combinations of the sampling points (all
      `|S_d|^2 |S_v|` = 216 for the paper's points when K covers them, else K drawn with `seed`) and the
      Spearman correlation with D_sum (`summary["spearman"]`).

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
    import time

    import torch

    from .batching import batched, num_batches
    from .extensions import f3_grid
    from .optimize import write_policy
    from .plot import plot_profile
    from .profile import IMAGE_SIDE_REDUCERS, ProfileRun, build_profile

    check_search_args(entry, reducer, budgets, samples, out_dir, alpha=alpha, text_tokens=text_tokens,
                      depths=depths, visual=visual, device=device, batch_size=batch_size, objective=objective,
                      max_new_tokens=max_new_tokens, install=install, config_dir=config_dir, system=system,
                      joint_grid=joint_grid, grid_additive=grid_additive, spearman=spearman)
    rank, world = distributed_rank()
    val = validation_items(entry, data, samples, seed, device)
    model, items = val.model, val.items
    setup = _setup(val.entry.model.name, model, items[0][1], alpha, text_tokens, depths, visual, budgets)
    if reducer not in IMAGE_SIDE_REDUCERS:
        _check_visual_points(val, setup.visual)
    suffix = ("" if objective == "kl" else f"-{objective}") + ("-system" if system is not None else "")
    run_dir = Path(out_dir) / f"{val.entry.model.name}-{reducer}-{val.dataset_name}-{len(items)}-{seed}{suffix}"
    if reducer in IMAGE_SIDE_REDUCERS:  # D_v runs the model on images resized for each n_v (DOP_R)
        items = val.with_resized(setup.visual)
    keys = sample_keys(val, items)
    if objective == "kl":
        run = ProfileRun(run_dir, setup.depths, setup.visual, reducer, rank=rank, world_size=world, sample_keys=keys,
                         system=system is not None)
    else:
        from .accuracy import AccuracyProfileRun, sample_scorer

        scorer = sample_scorer(val.dataset)  # refuses datasets without a per-sample metric, before any work
        gen = copy.deepcopy(val.wrapper.generation_config())  # evaluation's decoding settings
        if max_new_tokens is not None:
            gen.max_new_tokens = max_new_tokens
        run = AccuracyProfileRun(run_dir, setup.depths, setup.visual, reducer, gen.max_new_tokens,
                                 rank=rank, world_size=world, generation_config=gen, sample_keys=keys)
    if recompute and rank == 0:
        prefixes = [run.FILE_PREFIX] + (["joint"] if joint_grid or spearman is not None else [])
        for old in (p for prefix in prefixes for p in run_dir.glob(f"{prefix}.rank*.jsonl")):
            old.unlink()  # asked for: profile (and measure the joint divergences of) every sample again
    _barrier(world)
    mine = list(run.shard(items))
    batches, total = batched(mine, batch_size, val.pad_token_id), num_batches(mine, batch_size)
    started = time.perf_counter()
    if objective == "kl":
        added = run.run(model, batches, total=total)
    else:
        rows = {str(row["index"]): row for _, row in val.rows.iterrows()}
        decode = lambda ids: [val.wrapper.decode(seq) for seq in ids]  # noqa: E731 - as generate_inner
        jobs = ((b[0], b[1], [rows[i] for i in b[0]], *b[2:]) for b in batches)  # + resized inputs if any
        added = run.run(model, decode, scorer, jobs, total=total)
    profile_seconds = time.perf_counter() - started
    joint_policies = _joint_policies(setup, joint_grid, spearman, seed)
    joint_run = None
    if joint_policies:
        from .joint import JointRun

        joint_run = JointRun(run_dir, reducer, rank=rank, world_size=world, sample_keys=keys)
        joint_added = joint_run.run(model, batched(mine, batch_size, val.pad_token_id), joint_policies, total=total)
    counter = getattr(run, "counter", None)  # generation has no prefix sharing to count
    jc = joint_run.counter if joint_run is not None else None
    counts = torch.tensor([counter.layer_forwards if counter else 0, counter.layer_equivalents if counter else 0,
                           added, run.stale, run.torn, profile_seconds,
                           jc.layer_forwards if jc else 0, jc.layer_equivalents if jc else 0,
                           joint_added if jc else 0, joint_run.stale if jc else 0], dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist

        counts = counts.to(model.device)
        dist.all_reduce(counts)  # totals over ranks for the summary
        counts = counts.cpu()
    _barrier(world)  # every rank's samples are on disk before rank 0 merges
    if rank != 0:
        _barrier(world)
        return None
    system_tokens = None
    if system is not None:
        system_tokens = _system_tokens(val) if system == SYSTEM_FROM_PROMPTS else system
    profile = build_profile(
        run_dir, model=setup.model_key, reducer=reducer, dataset=val.dataset_name, seed=seed,
        num_layers=setup.spec.num_layers, num_visual=setup.spec.visual_tokens,
        depths=setup.depths, visual=setup.visual, pattern=f"{run.FILE_PREFIX}.rank*.jsonl", objective=objective,
        expected=run.expected_keys(keys), meta={"system_tokens": system_tokens} if system_tokens else None,
    )
    from ..fileio import atomic_write_text

    atomic_write_text(run_dir / "profile.json", profile.to_json())  # never a half-written profile
    mode = "joint_grid" if joint_grid else "grid_additive" if grid_additive else None
    joint = None
    if joint_policies:
        from .joint import merge_joint

        joint = merge_joint(run_dir, joint_policies, joint_run.expected_keys(keys))
        atomic_write_text(run_dir / "joint.json", json.dumps(joint["mean"], indent=2, sort_keys=True) + "\n")
    results, policies = _solve_budgets(profile, setup.spec, setup.budgets, setup.text_tokens, setup.alpha,
                                       setup.model_key, system_tokens=system_tokens)
    if mode is not None:
        results, policies = _grid_results(mode, profile, setup, results, joint)
    tail = "" if mode is None else f".{mode}"
    for budget, policy in policies.items():
        write_policy(run_dir / f"policies{tail}.yaml", setup.model_key, budget, policy)
    plot_profile(run_dir / "profile.json", run_dir / "profile.png", policies=policies)
    installed, not_installed = _install(install, reducer, setup.model_key, policies, results, overwrite, config_dir)
    summary = {
        "entry": entry, "dataset": val.dataset_name, "reducer": reducer, "samples": len(items),
        "seed": seed, "objective": objective, "newly_profiled": int(counts[2]), "depths": setup.depths,
        "visual": setup.visual, "search": mode or ("system" if system is not None else "additive"),
        "system_tokens": system_tokens, "text_tokens": setup.text_tokens, "alpha": setup.alpha,
        "layer_forwards": int(counts[0]) if objective == "kl" else None,
        "layer_equivalents": round(float(counts[1]), 3) if objective == "kl" else None,
        "profile_seconds": round(float(counts[5]) / world, 3),
        "batch_size": batch_size, "world_size": world, "results": results, "dir": str(run_dir),
        "installed": installed, "not_installed": not_installed,
        "recomputed_stale": int(counts[3] + counts[9]), "dropped_incomplete": int(counts[4]),
    }
    if mode is not None:
        summary["grid"] = _grid_kwargs(setup) or dict(zip(("depths", "n_values"), f3_grid(*_grid_shape(setup))))
    if joint_policies:
        summary["joint"] = {"policies": len(joint_policies), "newly_computed": int(counts[8]),
                            "layer_forwards": int(counts[6]), "layer_equivalents": round(float(counts[7]), 3)}
    if spearman is not None:
        summary["spearman"] = _spearman_summary(profile, setup, spearman, seed, joint)
    atomic_write_text(run_dir / f"search{tail}.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    _barrier(world)
    return summary


SYSTEM_FROM_PROMPTS = 0  # `system=`: prune as many system tokens as the prompts have before the image


def _system_tokens(val: ValidationSet) -> int:
    """Tokens before the first image of the drawn prompts (their mean, rounded): the system group's size
    in the FLOPs model of Eq. 14."""
    from ..checks import UsageError
    from .profile import system_mask

    counts = [int(system_mask(val.model, inputs["input_ids"], inputs.get("attention_mask")).sum())
              for _, inputs in val.items]
    if not any(counts):
        raise UsageError("--system-tokens: the prompts have no token before the image; nothing to prune")
    return max(1, round(sum(counts) / len(counts)))


def _joint_policies(setup: SearchSetup, joint_grid: bool, spearman: int | None, seed: int) -> list:
    """Effective policies whose joint divergences the search measures: the F.3 grid's feasible ones for
    every budget and/or the Table 7 combinations. Deterministic (every torchrun rank computes the same)."""
    from .extensions import grid_policies

    out: dict = {}
    if joint_grid:
        for budget in setup.budgets:
            grid = grid_policies(setup.spec, budget, text_tokens=setup.text_tokens, alpha=setup.alpha,
                                 **_grid_kwargs(setup))
            out.update(dict.fromkeys(grid.policies))
    if spearman is not None:
        L = setup.spec.num_layers
        out.update(dict.fromkeys(p.effective(L) for p in _spearman_policies(setup, spearman, seed)))
    return list(out)


def _grid_shape(setup: SearchSetup) -> tuple[int, int]:
    return setup.spec.num_layers, setup.spec.visual_tokens


def _grid_kwargs(setup: SearchSetup) -> dict:
    return {} if setup.grid is None else {"depths": setup.grid[0], "n_values": setup.grid[1]}


def _spearman_policies(setup: SearchSetup, k: int, seed: int) -> list:
    """Table 7's combinations S_d x S_d x S_v of the sampling points: all of them when k covers them (216
    for the paper's six points each), else k drawn without replacement with `seed`."""
    import random

    from .extensions import table7_policies

    combos = table7_policies(setup.depths, setup.visual)
    if k >= len(combos):
        return combos
    return sorted(random.Random(seed).sample(combos, k), key=lambda p: (-p.d_A, -p.d_P, -p.n_v))


def _spearman_summary(profile, setup: SearchSetup, k: int, seed: int, joint) -> dict:
    """Spearman's rho of D_sum (the profile's measured individual divergences, literal policies as in E.1)
    and the measured joint D over the combinations."""
    from .extensions import spearman_additive_vs_joint
    from .joint import policy_key

    L = setup.spec.num_layers
    pols = _spearman_policies(setup, k, seed)
    joint_values = [joint["mean"][policy_key(p.effective(L))] for p in pols]
    res = spearman_additive_vs_joint(profile.tables(), pols, joint_values)
    return {"rho": res.rho, "pvalue": res.pvalue, "n": res.n, "requested": k}


def _grid_results(mode: str, profile, setup: SearchSetup, additive: dict, joint) -> tuple[dict, dict]:
    """Per budget, the F.3 grid search's result (`mode` joint_grid: least measured joint divergence;
    grid_additive: least D_sum on the grid) with the other grid optimum and Eq. 7's beside it."""
    from ..flops import BudgetError, full_flops, policy_flops
    from .extensions import grid_additive_search, joint_grid_search
    from .joint import policy_key

    spec, T = setup.spec, setup.text_tokens
    full = full_flops(spec, T)
    results, policies = {}, {}

    def describe(policy, objective, what):
        return {"policy": policy.to_dict(), "objective": objective, "objective_kind": what,
                "paper_ratio": policy_flops(spec, policy, T) / full,
                "executed_ratio": policy_flops(spec, policy, T, executed=True) / full}

    for budget in setup.budgets:
        kw = dict(text_tokens=T, alpha=setup.alpha, **_grid_kwargs(setup))
        try:
            add = grid_additive_search(profile, spec, budget, **kw)
            res = joint_grid_search(lambda p: joint["mean"][policy_key(p)], spec, budget, **kw) \
                if mode == "joint_grid" else add
        except BudgetError as exc:
            results[str(budget)] = {"error": str(exc), "additive": additive[str(budget)]}
            continue
        main = describe(res.best, res.best_divergence, "joint divergence" if mode == "joint_grid" else "D_sum")
        main.update(budget=budget, method=mode, n_feasible=res.n_feasible, n_evaluated=res.n_evaluated,
                    n_e=res.n_e, n_min=res.n_min, additive=additive[str(budget)])
        if mode == "joint_grid":
            main["grid_additive"] = describe(add.best, add.best_divergence, "D_sum")
            main["grid_additive"]["joint_divergence"] = joint["mean"][policy_key(add.best)]
        results[str(budget)], policies[budget] = main, res.best
    return results, policies


def _check_visual_points(val: ValidationSet, visual: Sequence[int]) -> None:
    """Every sample has at least max(visual) visual tokens (before anything is written)."""
    import torch

    from ..checks import UsageError

    visual_ids = _visual_ids(val.model)
    for ids, inputs in val.items:
        n = int(torch.isin(inputs["input_ids"][0], visual_ids.to(inputs["input_ids"].device)).sum())
        if max(visual) > n:
            raise UsageError(f"sampling point n_v={max(visual)} exceeds the {n} visual tokens of sample index {ids[0]} "
                             "of the validation set; give smaller --visual values")


def _solve_budgets(profile, spec, budgets, text_tokens, alpha, model, system_tokens=None) -> tuple[dict, dict]:
    """Eq. 7 per budget (Eq. 14 with `system_tokens`): ({budget: result dict or {"error": why}}, {budget:
    policy} of the feasible ones)."""
    from .extensions import optimize_with_system
    from .optimize import InfeasibleBudgetError, optimize

    results, policies = {}, {}
    for budget in budgets:
        try:
            if system_tokens:
                r = optimize_with_system(profile, spec, budget, text_tokens=text_tokens, system_tokens=system_tokens,
                                         alpha=alpha, model=model)
            else:
                r = optimize(profile, spec, budget, text_tokens=text_tokens, alpha=alpha, model=model)
        except InfeasibleBudgetError as exc:
            results[str(budget)] = {"error": str(exc)}
            continue
        results[str(budget)] = r.to_dict()
        policies[budget] = r.policy
    return results, policies


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
    system: int | None = None,
) -> dict[str, Any]:
    """Eq. 7 from a saved `profile.json` for paper model `model`, without running any model.

    A profile measured on another model is transferred first by rescaling its sampling points (Eq. 12,
    Appendix C.5): e.g. LLaVA-1.5-7B's curves solved for LLaVA-1.5-13B (Table 5). `reducer` names the
    reduction the target's policies run with (default: the profile's; the paper transfers DOP_CD curves to
    DOP_R models, `reducer="resize"`). Budgets default to the model's labels; `install` as in `run_search`.
    `system` (a profile of `search --system-tokens`): Eq. 14 with that many system tokens
    (`SYSTEM_FROM_PROMPTS`: the count the profile recorded). Every argument and the profile file are
    checked before anything is solved or written.
    """
    from ..checks import UsageError, check_alpha, check_budgets, check_min, check_reducer
    from ..models_config import load_models
    from .transfer import transfer_to_model

    papers = load_models(config_dir)
    if model not in papers:
        raise UsageError(f"unknown paper model {model!r}; valid: {', '.join(papers)}")
    check_budgets(budgets)
    check_alpha(alpha)
    check_min(text_tokens, "--text-tokens", 0)
    check_reducer(reducer)
    profile = load_profile(profile_path)
    reducer = reducer or profile.reducer
    check_reducer(reducer)
    if install is not None:
        _check_install_target(install, reducer, config_dir)
    if system is not None:
        check_min(system or None, "--system-tokens", 1, " (tokens before the image)")
        if profile.D_A_sys is None:
            raise UsageError(f"--system-tokens: {profile_path} has no system-token curves; profile them with "
                             "`vlmeval-dop search --system-tokens`")
        system = system or profile.meta.get("system_tokens")
        if not system:
            raise UsageError(f"--system-tokens: {profile_path} does not record the system token count; give it")
    pm = papers[model]
    source = profile.model
    if source != model:
        profile = transfer_to_model(profile, model, reducer=reducer, config_dir=config_dir)
    results, policies = _solve_budgets(
        profile, pm.arch, budgets or sorted(pm.budgets, reverse=True),
        text_tokens if text_tokens is not None else pm.text_tokens, alpha if alpha is not None else pm.alpha, model,
        system_tokens=system)
    installed, not_installed = _install(install, reducer, model, policies, results, overwrite, config_dir)
    return {"profile": str(profile_path), "model": model, "reducer": reducer, "objective": profile.objective,
            "transferred_from": source if source != model else None, "results": results, "installed": installed,
            "not_installed": not_installed, "system_tokens": system}


PROFILE_FIX = "rerun the `vlmeval-dop search` that wrote it (the same command resumes from its samples)"


def load_profile(path):
    """A `profile.json` written by `vlmeval-dop search`; FileFormatError naming the file and the fix if it is
    missing, not a file, not JSON (e.g. truncated) or not a profile."""
    from ..fileio import FileFormatError, read_json
    from .curves import DivergenceProfile

    data = read_json(path, PROFILE_FIX)
    if not isinstance(data, dict):
        raise FileFormatError(f"{path} holds a JSON {type(data).__name__}, not a divergence profile; {PROFILE_FIX}")
    try:
        return DivergenceProfile.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        msg = f"missing field {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
        raise FileFormatError(f"{path} is not a divergence profile ({msg}); {PROFILE_FIX}") from None


def _install(tag, reducer: str, model_key: str, policies: dict, results: dict, overwrite: bool,
             config_dir) -> tuple[dict[str, str], dict[str, str]]:
    """Install the solved policies where the registry makes entries of them (registry.install_policies: locked,
    atomic). Returns ({budget: entry name}, {budget: why not installed} for budgets without a policy)."""
    if not tag:
        return {}, {}
    from ..registry import install_policies

    not_installed = {b: r["error"] for b, r in results.items() if "error" in r}
    return install_policies(tag, reducer, model_key, policies, overwrite, config_dir), not_installed


def _setup(model_key, model, first_inputs, alpha, text_tokens, depths, visual, budgets) -> SearchSetup:
    import torch

    papers = load_models()
    visual_ids = _visual_ids(model)
    n_vis = int(torch.isin(first_inputs["input_ids"][0], visual_ids.to(first_inputs["input_ids"].device)).sum())
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
        depths or d_def, visual or v_def, budgets or [0.5], _scaled_grid(spec.num_layers, n_vis),
    )


def _visual_ids(model):
    """The model's visual placeholder ids as a tensor (Video-LLaVA: `<image>` and `<video>`)."""
    import torch

    from ..executor.families import adapter_for

    return torch.tensor(adapter_for(model).image_token_ids(model))
