"""Regenerate a paper table's accuracy cells with VLMEvalKit, resumably.

    python reproduce/run.py --table 8 --dry-run          # the plan: every cell, done / to run / blocked
    python reproduce/run.py --table 8 [--limit K] [--work-dir outputs] [--gpus N] [-- <run.py flags>]
    python reproduce/run.py --compare mine.yaml [--dry-run] [...]  # your own comparison (reproduce/compare.py)

A cell is (entry, benchmark). It counts as finished when VLMEvalKit's score file for it exists under
`<work-dir>/<entry>/` (`<entry>_<dataset>_{acc,score}*`); finished cells are never recomputed and VLMEvalKit
is always called with `--reuse`, so its own finished predictions are kept too. Cells of rows that need
something this framework lacks (data, weights, an unregistered reducer/baseline, a model family) are listed
as blocked with the reason, never silently dropped. A search-ablation row (other validation data or sample
count, transferred divergences, the F.3 grid searches, system tokens, five validation seeds, DOP on this
project's CDPruner port for Qwen2.5-VL) is blocked until its policy is installed and says the
`vlmeval-dop search|solve --install` command that installs it. Tables that print only a Rel. Avg. (5, 21)
are planned over each row model's benchmarks, with the unpruned model's cells as the denominators.
Non-accuracy tables (efficiency, search cost, Spearman, policies, ...) are produced by other commands: the
plan lists them.

A run ends with a failure summary: every cell that has no score file after its run.py call (run.py
failed, or VLMEvalKit logged the benchmark as failed and went on), why (VLMEvalKit's recorded error for
it, else run.py's exit code) and where the log is; the exit code is 1 if any cell failed. Arguments are
checked before anything runs (exit 2); Ctrl-C prints "interrupted; rerun the same command to resume" and
exits 130.

--compare SPEC plans and runs a comparison of your own (methods x budgets x benchmarks x seeds, a YAML spec:
reproduce/compare.py, reproduce/compare_example.yaml) with the same planner, runner and resume; the spec is
checked (models, methods, benchmarks, budgets, plugins) before anything runs, and `aggregate.py --compare
SPEC` makes its table and plots.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from anywhere: the repo root holds vlmeval_dop
    sys.path.insert(0, str(HERE.parent))

from reproduce.tables import DOP_METHODS, VIDEO_MODELS, get_table, parse_row  # noqa: E402

OTHER_TOOLS = {
    "efficiency": "reproduce/efficiency.py (GPU latency, peak memory, TFLOPs per attention implementation)",
    "search_cost": "`vlmeval-dop search` (its search.json reports profile_seconds, layer forwards and layer-equivalents)",
    "search_setup": "data: eval_configs/models.yaml (sampling points)",
    "policy": "data: eval_configs/policies.yaml, or `vlmeval-dop search`",
    "spearman": "`vlmeval-dop search --spearman 216` (search.json: spearman rho and p-value)",
}


@dataclass(frozen=True)
class Cell:
    """One (row, benchmark) cell of an accuracy table and what stands in its way, if anything.

    `note`: how the entry relates to the row where it is not the paper's own setting (e.g. this project's
    CDPruner port standing in for the authors' unreleased one, or a Rel. Avg. denominator)."""

    row: str
    entry: str
    benchmark: str
    dataset: str
    status: str  # "done", "todo" or "blocked"
    reason: str = ""
    note: str = ""
    data: str = ""  # a locally built dataset (video QA) whose TSV is missing: blocks the cell too


def benchmark_datasets() -> dict[str, str]:
    """The paper's benchmark aliases -> VLMEvalKit dataset names (eval_configs/entries.yaml)."""
    from vlmeval_dop.fileio import read_yaml
    from vlmeval_dop.registry import CONFIG_DIR, ENTRIES_FILE

    return dict(read_yaml(CONFIG_DIR / ENTRIES_FILE, "restore it (git checkout -- eval_configs/)")["benchmarks"])


def is_finished(work_dir: Path, entry: str, dataset: str) -> bool:
    """True when VLMEvalKit wrote a score file for (entry, dataset) under `work_dir/entry/` (or one of its
    timestamped run folders); names match exactly, so MMBench_DEV_EN is not done by MMBench_DEV_EN_V11's."""
    from reproduce.aggregate import find_score_file

    return find_score_file(work_dir, entry, dataset) is not None


def plan_table(number: int, work_dir: Path) -> list[Cell]:
    """Every cell of accuracy table `number` with its status (no vlmeval import, nothing written)."""
    spec = get_table(number)
    if spec.kind == "depth_redundancy":
        return _plan_operation_table(spec, work_dir)
    if spec.has_rel_avg and not spec.benchmarks:  # Tables 5, 21: each row over its model's benchmark set
        return _plan_rel_avg_table(number, work_dir)
    if spec.kind != "accuracy" and not spec.benchmarks:
        raise ValueError(
            f"table {number} ({spec.kind}) is not made of VLMEvalKit accuracy cells; it comes from "
            + "; ".join(tool_plan(number))
        )
    datasets = benchmark_datasets()
    cells = []
    for row in spec.rows:
        cells += _plan_row(row, spec.benchmarks, datasets, work_dir)
    return cells


def _plan_row(row: str, benchmarks, datasets: dict[str, str], work_dir: Path) -> list[Cell]:
    """The cells of one table row over `benchmarks`."""
    from vlmeval_dop.registry import EntryError, get_entry

    ref = parse_row(row)
    if "swap" in ref.config:  # Tables 29-30: the row's statistic over SWAP_DRAWS seeded perturbations
        return _plan_swap_row(row, ref, benchmarks, work_dir, datasets)
    if "val_seeds" in ref.config:  # Table 23: statistics over searches on differently seeded validation sets
        return _plan_seed_row(row, ref, benchmarks, work_dir, datasets)
    if ref.config.get("impl") == "reproduced" and ref.method == "cdpruner":
        # Table 19: the authors' unreleased CDPruner port; this project's own port is the stand-in
        reason = _unavailable(ref.entry)
        return [_cell(row, ref.entry, b, datasets[b], reason, work_dir, IMPL_NOTE) for b in benchmarks]
    searched = searched_row(ref)
    if searched is not None:  # a search ablation the CLI produces: its policies installed under a tag
        entry, command = searched
        blocked = "" if _unavailable(entry) == "" else f"install its policy first: {command}"
        note = IMPL_NOTE if "impl" in ref.config else ""
        return [_cell(row, entry, bench, datasets[bench], blocked, work_dir, note) for bench in benchmarks]
    video = video_search_row(ref)
    if video is not None:  # Table 18: DOP rows of a model without published policies
        entry, command = video
        blocked = "" if _unavailable(entry) == "" else f"install its policy first: {command}"
        return [_cell(row, entry, bench, datasets[bench], blocked, work_dir) for bench in benchmarks]
    if ref.config:
        blocked = f"needs a search/evaluation ablation ({', '.join(f'{k}={v}' for k, v in ref.config.items())})"
    else:
        try:
            blocked = get_entry(ref.entry).unavailable_reason() or ""
        except EntryError:
            blocked = f"no entry {ref.entry!r} in eval_configs/entries.yaml yet"
    return [_cell(row, ref.entry, bench, datasets[bench], blocked, work_dir) for bench in benchmarks]


IMPL_NOTE = ("this project's CDPruner port on Qwen2.5-VL (vlmeval_dop/reducers/cdpruner.py), standing in for the "
             "paper authors' unreleased reproduction")


def _plan_rel_avg_table(number: int, work_dir: Path) -> list[Cell]:
    """Tables 5 and 21 print only a Rel. Avg.: every row over its model's benchmark set (`rel_avg_benchmarks`),
    then the unpruned model of each row over the same set, the denominators (noted as such)."""
    from reproduce.tables import rel_avg_benchmarks

    spec = get_table(number)
    datasets = benchmark_datasets()
    cells: list[Cell] = []
    bases: dict[str, tuple[str, ...]] = {}
    for row in spec.rows:
        benchmarks = rel_avg_benchmarks(number, row)
        cells += _plan_row(row, benchmarks, datasets, work_dir)
        bases.setdefault(parse_row(row).model, benchmarks)
    for model, benchmarks in bases.items():
        reason = _unavailable(model)
        cells += [_cell(model, model, b, datasets[b], reason, work_dir, "Rel. Avg. denominator") for b in benchmarks]
    return cells


# Validation data of the search ablations (Tables 4, 20): VQAv2's val split is public (the evaluation uses
# test-dev); SEED-Bench has no split apart from its evaluation set, so the user supplies one.
ABLATION_DATA = {"TextVQA": "TextVQA_TRAIN", "VQAv2": "VQAv2_VAL", "SEED": "<a SEED-Bench TSV disjoint from SEEDBench_IMG>"}


# The DOP methods' reductions (entries.yaml `methods`), for searched rows whose entry is not a paper entry
METHOD_REDUCERS = {"dopcd": "cdpruner", "dopv": "vispruner", "dopr": "resize"}
SEARCH_KEYS = {"val", "samples", "objective", "transfer_from", "search", "groups", "impl", "val_seeds"}
# Table 22's rows (App. F.3): the search flag and the tag each one installs under
GRID_SEARCHES = {"grid_joint": " --joint-grid", "grid_additive": " --grid-additive"}
SEED_DRAWS = 5  # Table 23 (App. F.4): five validation sets; the paper's seeds are not published, ours are 0-4


def _row_reducer(ref) -> str | None:
    from vlmeval_dop.registry import EntryError, get_entry

    try:
        return get_entry(ref.entry).reducer
    except EntryError:
        return METHOD_REDUCERS.get(ref.method)


def searched_row(ref, seed: int = 42) -> tuple[str, str] | None:
    """(entry, command) for a search-ablation row that `vlmeval-dop search|solve --install` produces: the
    row's entry with a tag for its configuration (`llava15_7b_dopcd28[samples=25]` ->
    `llava15_7b_dopcd28_samples25`, `[search=grid_joint]` -> `_grid_joint` by `search --joint-grid`,
    `[groups=visual+system]` -> `_visual_system` by `search --system-tokens`, `qwen25vl_7b_dopcd26[impl=
    reproduced]` -> `_cdpruner_port`: DOP on this project's CDPruner port; `seed` for Table 23's draws). None
    for plain rows and rows these commands do not cover."""
    cfg = dict(ref.config)
    if not cfg or set(cfg) - SEARCH_KEYS or ref.budget is None or ref.method == "cdpruner":
        return None
    if cfg.get("search") not in (None, *GRID_SEARCHES) or cfg.get("groups") not in (None, "visual+system"):
        return None
    reducer = _row_reducer(ref)
    if reducer is None:
        return None
    data = ABLATION_DATA.get(cfg.get("val", "TextVQA"), cfg.get("val"))
    samples = int(cfg.get("samples", 100))
    parts, flags = [], ""
    if "val" in cfg:
        parts.append(f"val_{cfg['val'].lower()}")
    if "samples" in cfg:
        parts.append(f"samples{samples}")
    if cfg.get("objective") == "accuracy_drop":
        parts.append("acc_drop")
        flags += " --objective acc_drop"
    if "transfer_from" in cfg:
        parts.append(f"transfer_{cfg['transfer_from']}")
    if "search" in cfg:
        parts.append(cfg["search"])
        flags += GRID_SEARCHES[cfg["search"]]
    if "groups" in cfg:
        parts.append("visual_system")
        flags += " --system-tokens"
    if "impl" in cfg:
        parts.append("cdpruner_port")
    if "val_seeds" in cfg:
        parts.append(f"seed{seed}")
    tag = "_".join(parts)
    source = cfg.get("transfer_from", ref.model)
    src_reducer = "cdpruner" if reducer == "resize" and "transfer_from" in cfg else reducer  # the paper's Table 5
    search = (f"vlmeval-dop search --model {source} --reducer {src_reducer} --data {data} --samples {samples} "
              f"--seed {seed}{flags}")
    if "transfer_from" in cfg:
        command = (f"{search}; vlmeval-dop solve --profile profiles/{source}-{src_reducer}-{data}-{samples}-{seed}/"
                   f"profile.json --model {ref.model} --reducer {reducer} --budget {ref.budget} --install {tag}")
    else:
        command = f"{search} --budget {ref.budget} --install {tag}"
    return f"{ref.entry}_{tag}", command


# Table 18 (App. E.7): the video QA datasets are built locally (vlmeval_dop/video_qa.py) from Video-LLaVA's
# evaluation files (TRAIN_AND_VALIDATE.md: eval/GPT_Zero_Shot_QA/<X>_Zero_Shot_QA/, the folders its
# scripts/v1_5/eval/run_qa_*.sh read); the search's validation set from the official MSVD-QA val split.
VIDEO_DATASETS_PREPARE = {
    "TGIF_QA": "--annotations <GPT_Zero_Shot_QA>/TGIF_Zero_Shot_QA/test_q.json "
               "--videos <GPT_Zero_Shot_QA>/TGIF_Zero_Shot_QA/mp4",
    "MSVD_QA": "--annotations <GPT_Zero_Shot_QA>/MSVD_Zero_Shot_QA/test_q.json "
               "--videos <GPT_Zero_Shot_QA>/MSVD_Zero_Shot_QA/videos",
    "MSRVTT_QA": "--annotations <GPT_Zero_Shot_QA>/MSRVTT_Zero_Shot_QA/test_q.json "
                 "--videos <GPT_Zero_Shot_QA>/MSRVTT_Zero_Shot_QA/videos/all",
    "MSVD_QA_VAL": "--annotations <MSVD-QA>/val_qa.json --video-map <MSVD-QA>/youtube_mapping.txt "
                   "--videos <MSVD>/YouTubeClips",
}
# The DOP policies of Table 18 are not published: searched as the paper's image policies (100 samples,
# seed 42, KL objective) on a video validation set disjoint from the evaluated test questions
VIDEO_SEARCH = {"data": "MSVD_QA_VAL", "tag": "val_msvd", "samples": 100, "seed": 42}


def prepare_command(dataset: str) -> str:
    """The command that builds a video QA dataset's TSV (`--limit` default: the paper's first 1K)."""
    return f"python -m vlmeval_dop.datasets prepare-video-qa --name {dataset} {VIDEO_DATASETS_PREPARE[dataset]}"


def _lmu_root() -> Path:
    """VLMEvalKit's data root, as vlmeval.smp.LMUDataRoot finds it (its `LMUData` setting, else ~/LMUData),
    without importing vlmeval."""
    import os

    env = os.environ.get("LMUData")
    return Path(env) if env and Path(env).exists() else Path.home() / "LMUData"


def _unprepared(dataset: str) -> str:
    """Why a locally built video dataset cannot run yet (its TSV is missing), or ""."""
    if dataset not in VIDEO_DATASETS_PREPARE:
        return ""
    path = _lmu_root() / f"{dataset}.tsv"
    return "" if path.is_file() else f"{path} missing: {prepare_command(dataset)}"


def video_search_row(ref) -> tuple[str, str] | None:
    """(entry, command) for a DOP row of a model whose policies are not published (Table 18:
    `videollava_7b_dopv16` -> `videollava_7b_dopv16_val_msvd`, installed by `vlmeval-dop search ... --install
    val_msvd` on VIDEO_SEARCH's validation set); None for other rows."""
    if ref.model not in VIDEO_MODELS or ref.method not in DOP_METHODS or ref.budget is None or ref.config:
        return None
    reducer = METHOD_REDUCERS.get(ref.method, "vispruner")
    s = VIDEO_SEARCH
    command = (f"vlmeval-dop search --model {ref.model} --reducer {reducer} --data {s['data']} --samples "
               f"{s['samples']} --seed {s['seed']} --budget {ref.budget} --install {s['tag']}")
    if _unprepared(s["data"]):
        command = f"build {s['data']} first (data line below), then {command}"
    return f"{ref.entry}_{s['tag']}", command


def _cell(row: str, entry: str, column: str, dataset: str, blocked: str, work_dir: Path, note: str = "") -> Cell:
    """One cell: blocked with the reason (the entry's) and/or `data` (a locally built dataset that is missing),
    else done / todo by VLMEvalKit's score file."""
    data = dataset if _unprepared(dataset) else ""
    if not blocked:  # results of this name made with other settings are neither reused nor resumed
        from vlmeval_dop.entry_record import record_mismatch

        blocked = record_mismatch(work_dir, entry) or ""
    if blocked or data:
        return Cell(row, entry, column, dataset, "blocked", blocked, note, data)
    return Cell(row, entry, column, dataset, "done" if is_finished(work_dir, entry, dataset) else "todo", "", note)


def _unavailable(entry: str) -> str:
    """Why an on-demand entry (`__mha4`, `__swap1mlp.s3`) cannot run, or "" if it can."""
    from vlmeval_dop.registry import EntryError, get_entry

    try:
        return get_entry(entry).unavailable_reason() or ""
    except EntryError as exc:
        return str(exc)


SWAP_DRAWS = 10  # the paper's repetitions per perturbation (App. F.7.2)


def swap_entry(entry: str, swap: str, seed: int) -> str:
    """`llava15_7b_dopcd28`, `3MHA`, 7 -> `llava15_7b_dopcd28__swap3mha.s7` (vlmeval_dop.perturbation)."""
    return f"{entry}__swap{swap.lower()}.s{seed}"


def _plan_swap_row(row: str, ref, benchmarks, work_dir: Path, datasets: dict[str, str]) -> list[Cell]:
    """One cell per benchmark and draw; the `best` and `mean` rows of a swap share the same runs."""
    cells = []
    for seed in range(SWAP_DRAWS):
        entry = swap_entry(ref.entry, ref.config["swap"], seed)
        reason = _unavailable(entry)
        cells += [_cell(row, entry, bench, datasets[bench], reason, work_dir) for bench in benchmarks]
    return cells


def _plan_seed_row(row: str, ref, benchmarks, work_dir: Path, datasets: dict[str, str]) -> list[Cell]:
    """Table 23: one search per validation seed (0..SEED_DRAWS-1), each installed under `seed<s>`; one cell
    per benchmark and seed (the table's mean and standard deviation are over the seeds)."""
    cells = []
    for seed in range(SEED_DRAWS):
        entry, command = searched_row(ref, seed=seed)
        blocked = "" if _unavailable(entry) == "" else f"install its policy first: {command}"
        cells += [_cell(row, entry, bench, datasets[bench], blocked, work_dir) for bench in benchmarks]
    return cells


def _plan_operation_table(spec, work_dir: Path) -> list[Cell]:
    """Tables 26-28: row `model[prune=MHA;eval=TextVQA]` x column `l4` / `l4-6` -> entry `model__mha4` /
    `model__mha4-6` (that single operation of the visual tokens pruned, 1-based layers) on that benchmark."""
    datasets = benchmark_datasets()
    cells = []
    for row in spec.rows:
        ref = parse_row(row)
        op, dataset = ref.config["prune"].lower(), datasets[ref.config["eval"]]
        for column in spec.columns:
            entry = f"{ref.entry}__{op}{column[1:]}"
            cells.append(_cell(row, entry, column, dataset, _unavailable(entry), work_dir))
    return cells


def format_plan(number: int | None, cells: list[Cell], title: str | None = None) -> str:
    """Human-readable plan: counts, the cells to run grouped by entry, and the blocked rows with reasons.
    `title` replaces "table N" in the first line (a comparison's name)."""
    todo = [c for c in cells if c.status == "todo"]
    done = [c for c in cells if c.status == "done"]
    blocked = [c for c in cells if c.status == "blocked"]
    head = title or f"table {number}"
    lines = [f"{head}: {len(cells)} cells: {len(done)} done, {len(todo)} to run, {len(blocked)} blocked"]
    by_entry: dict[str, list[str]] = {}
    for c in todo:
        datasets = by_entry.setdefault(c.entry, [])
        if c.dataset not in datasets:  # the best/mean rows of a swap share their runs
            datasets.append(c.dataset)
    for entry, ds in by_entry.items():
        lines.append(f"  run   {entry}: {' '.join(ds)}")
    groups: dict[tuple[str, str], list[Cell]] = {}
    for c in blocked:
        groups.setdefault((c.row, c.reason), []).append(c)
    for (row, reason), group in groups.items():
        missing = list(dict.fromkeys(c.data for c in group if c.data))
        why = "; ".join(x for x in (reason, f"data not built: {', '.join(missing)}" if missing else "") if x)
        lines.append(f"  block {row} ({len(group)} cells): {why}")
    for d in VIDEO_DATASETS_PREPARE:  # each missing local dataset once, with the command that builds it
        if any(c.data == d or f"build {d} first" in c.reason for c in blocked):
            lines.append(f"  data  {d}: {_unprepared(d)}")
    notes = dict.fromkeys((c.row, c.entry, c.note) for c in cells if c.note)
    for row, entry, note in notes:
        lines.append(f"  note  {row} -> {entry}: {note}")
    for line in OTHER_COLUMNS.get(number, ()):
        lines.append(f"  make  {line}")
    return "\n".join(lines)


# Columns of accuracy/ablation tables that are not benchmark cells, and where they come from
OTHER_COLUMNS = {
    21: ("cost_min: `profile_seconds` of each row's search (its search.json; minutes on your GPU, the paper's "
         "are A100-80G)",),
    22: ("d_A, d_P, n_v: the installed policies (search.joint_grid.json / search.grid_additive.json; "
         "`vlmeval-dop list`)",),
    23: ("*_std: mean and standard deviation over the five seeds' cells",),
    18: ("*_acc, *_score: VLMEvalKit's evaluation asks the GPT judge of Video-LLaVA's scripts (default "
         "gpt-3.5-turbo through VLMEvalKit's build_judge): configure it as for any VLMEvalKit judge, OPENAI_API_KEY "
         "(+ OPENAI_API_BASE) in VLMEvalKit's .env, or append `-- --judge-key KEY [--judge-base-url URL]`",
         "avg_acc, avg_score and the paper's numbers beside: python reproduce/aggregate.py --work-dir <work dir> "
         "--paper-table 18"),
}


def tool_plan(number: int) -> list[str]:
    """The commands that produce a table that is not made of VLMEvalKit accuracy cells (one line each), or
    what blocks it (data, a model family)."""
    spec = get_table(number)
    search = "vlmeval-dop search --data TextVQA_TRAIN --samples 100 --seed 42"
    if spec.kind == "spearman":
        return [f"{search.replace('search', f'search --model {m} --reducer cdpruner', 1)} --spearman 216 "
                "(search.json: spearman rho, p-value)" for m in spec.rows]
    if spec.kind == "search_cost":
        return [f"{search.replace('search', f'search --model {m} --reducer {_paper_reducer(m)}', 1)} "
                "(search.json: profile_seconds, on the GPU to compare)" for m in spec.rows]
    if number == 20:  # policies searched on other validation tasks
        lines = []
        for val in ("TextVQA", "VQAv2", "SEED"):
            data = ABLATION_DATA[val]
            budgets = " ".join(f"--budget {b}" for b in spec.budgets)
            cmd = (f"vlmeval-dop search --model llava15_7b --reducer cdpruner --data {data} --samples 100 --seed 42 "
                   f"{budgets} (policies.yaml)")
            lines.append(cmd if not data.startswith("<") else f"blocked for data: {cmd}")
        return lines
    if spec.kind == "policy":
        return ["data: eval_configs/policies.yaml (the paper's policies), or `vlmeval-dop search --model M "
                f"--reducer {'resize' if number == 16 else 'cdpruner'} --data TextVQA_TRAIN --samples 100 --seed 42` "
                "for this framework's own"]
    if spec.missing:
        return [f"blocked: {m}" for m in spec.missing]
    return [OTHER_TOOLS.get(spec.kind, spec.notes)]


def _paper_reducer(model: str) -> str:
    return "resize" if model.startswith(("qwen", "internvl")) else "cdpruner"


def run_cells(cells: list[Cell], work_dir: Path, limit: int | None, gpus: int, extra: list[str]) -> int:
    """Run the `todo` cells (at most `limit`) through the repository's run.py, one call per entry; every
    entry is tried even if another failed. Returns 0 if every cell run has its score file, else 1 (after a
    summary of the failed cells on stderr)."""
    import time

    todo = [c for c in cells if c.status == "todo"][: limit if limit is not None else None]
    by_entry: dict[str, list[str]] = {}
    for c in todo:
        datasets = by_entry.setdefault(c.entry, [])
        if c.dataset not in datasets:  # the best/mean rows of a swap share their runs
            datasets.append(c.dataset)
    launcher = [sys.executable] if gpus <= 1 else ["torchrun", f"--nproc-per-node={gpus}"]
    failed: list[tuple[str, str, str]] = []  # (entry, dataset, why)
    unscored: list[tuple[str, str, str]] = []  # finished without a local score (e.g. an EvalAI submission)
    for entry, datasets in by_entry.items():
        cmd = launcher + [str(HERE.parent / "run.py"), "--model", entry, "--data", *datasets,
                          "--work-dir", str(work_dir), "--reuse", *extra]
        print("$", " ".join(cmd), flush=True)
        started = time.time()
        rc = subprocess.call(cmd)
        for dataset in datasets:
            if not is_finished(work_dir, entry, dataset):
                ok, why = _outcome(work_dir, entry, dataset, rc, started)
                (unscored if ok else failed).append((entry, dataset, why))
    for entry, dataset, why in unscored:
        print(f"reproduce/run.py: {entry} x {dataset} finished without a local score ({why})", file=sys.stderr)
    if failed:
        keys = {(e, d) for e, d, _ in failed}
        cells_failed = sum(1 for c in todo if (c.entry, c.dataset) in keys)
        print(f"reproduce/run.py: {cells_failed} of {len(todo)} cell(s) failed ({len(failed)} entry x benchmark "
              "run(s)); finished cells are kept, rerun the same command to retry the others:", file=sys.stderr)
        for entry, dataset, why in failed:
            print(f"  {entry} x {dataset}: {why}", file=sys.stderr)
        log = _latest_log(work_dir)
        if log is not None:
            print(f"  log: {log}", file=sys.stderr)
        return 1
    return 0


def _outcome(work_dir: Path, entry: str, dataset: str, rc: int, started: float) -> tuple[bool, str]:
    """(finished?, why) of a cell without a score file: VLMEvalKit's record of (entry, dataset) in this run
    (`<entry>/status.json`: an error, or a skip reason such as a test split scored by an external server),
    else the exit code of run.py."""
    import json

    from vlmeval_dop.checks import VLMEVAL_FAILED_SKIPS

    status = Path(work_dir) / entry / "status.json"
    try:
        if status.stat().st_mtime >= started - 1:
            rec = (json.loads(status.read_text()).get("datasets") or {}).get(dataset) or {}
            if rec.get("error_message"):
                return False, str(rec["error_message"]).splitlines()[0]
            skip = rec.get("skip_reason")
            if skip:
                return skip not in VLMEVAL_FAILED_SKIPS, str(skip).replace("_", " ")
    except (OSError, ValueError, AttributeError):
        pass
    return False, f"run.py exited with code {rc}" if rc else "run.py exited 0 but wrote no score file"


def _latest_log(work_dir: Path) -> Path | None:
    logs = sorted(Path(work_dir).glob("logs/*.log"), key=lambda p: p.stat().st_mtime)
    return logs[-1] if logs else None


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--table", type=int, help="paper table number (1-30)")
    what.add_argument("--compare", metavar="SPEC", help="a comparison spec of your own (YAML; reproduce/compare.py)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan only")
    parser.add_argument("--limit", type=int, default=None, help="run at most this many cells (>= 0)")
    parser.add_argument("--work-dir", type=Path, default=Path("outputs"), help="VLMEvalKit work dir")
    parser.add_argument("--gpus", type=int, default=1, help="> 1: launch run.py with torchrun")
    from vlmeval_dop.plugins import PluginError, add_plugins_argument, load_plugins, split_plugins

    add_plugins_argument(parser)  # users' methods: loaded here for the plan, passed on to run.py
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if args.compare is not None:
        return _main_compare(args, extra)
    try:
        if args.plugins:
            load_plugins(args.plugins)
            extra = ["--plugins", ",".join(_absolute(p) for p in split_plugins(args.plugins)), *extra]
        _check_args(args)
        spec = get_table(args.table)
        if spec.kind != "accuracy" and not spec.benchmarks and not spec.has_rel_avg and args.dry_run:
            lines = "\n".join(f"  make  {line}" for line in tool_plan(args.table))
            print(f"table {args.table} ({spec.kind}): not VLMEvalKit accuracy cells; produced by:\n{lines}")
            return 0
        cells = plan_table(args.table, args.work_dir)
    except (ValueError, PluginError) as exc:
        print(f"reproduce/run.py: error: {exc}", file=sys.stderr)
        return 2
    print(format_plan(args.table, cells))
    if args.dry_run:
        return 0
    return run_cells(cells, args.work_dir, args.limit, args.gpus, extra)


def _main_compare(args, extra: list[str]) -> int:
    """`--compare SPEC`: the spec checked and planned like a table, its todo cells run; the spec's plugins
    (and any --plugins) are loaded here and handed to every run.py call."""
    from reproduce.compare import plan_compare, plugin_targets, prepare
    from vlmeval_dop.plugins import PluginError, load_plugins, split_plugins
    from vlmeval_dop.registry import EntryError

    try:
        plugins = [_absolute(p) for p in split_plugins(args.plugins)]
        if plugins:
            load_plugins(plugins)
        _check_args(args)
        spec = prepare(args.compare)
        plugins += [p for p in plugin_targets(spec) if p not in plugins]
        cells = plan_compare(spec, args.work_dir)
    except (ValueError, EntryError, PluginError) as exc:
        print(f"reproduce/run.py: error: {exc}", file=sys.stderr)
        return 2
    print(format_plan(None, cells, title=f"comparison {spec.name}"))
    if args.dry_run:
        return 0
    extra = (["--plugins", ",".join(plugins)] if plugins else []) + extra
    return run_cells(cells, args.work_dir, args.limit, args.gpus, extra)


def _absolute(plugin: str) -> str:
    """A plugin .py path made absolute (run.py runs from the repository root); module names unchanged."""
    path = Path(plugin).expanduser()
    return str(path.resolve()) if plugin.endswith(".py") or path.is_file() else plugin


def _check_args(args) -> None:
    """Everything checked before anything runs (ValueError: one line, exit 2)."""
    from vlmeval_dop.fileio import check_writable_dir

    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit {args.limit}: give a number of cells >= 0")
    if args.gpus < 1:
        raise ValueError(f"--gpus {args.gpus}: give a number of GPUs >= 1")
    if not args.dry_run:
        check_writable_dir(args.work_dir, "--work-dir")


if __name__ == "__main__":
    sys.exit(main())
