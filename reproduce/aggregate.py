"""Aggregate benchmark scores into the paper's table layout with its Rel. Avg. column.

    python reproduce/aggregate.py --work-dir outputs --base <row name> [--entries E ...] [--benchmarks B ...]
                                  [--mme auto|perception|total] [--out PREFIX] [--paper-table N]
    python reproduce/aggregate.py --scores scores.csv --base <row name> [--out PREFIX] [--paper-table N]
    python reproduce/aggregate.py --compare mine.yaml [--work-dir outputs] [--out DIR] [--mme auto]

--work-dir reads VLMEvalKit's own score files under `<work_dir>/<entry>/` (`collect_scores`: one row per
entry folder, one column per paper benchmark found, each in the paper's unit). --scores reads a long-format
CSV with columns method,benchmark,score (one line per cell; `method` is a row name, normally an entry name
such as llava15_7b_dopcd28; `benchmark` a short alias such as TextVQA). Both may be given, e.g. to add the
EvalAI server's VQAv2 test-dev scores to a work dir; a cell given twice is an error. The command prints a
markdown table with one column per benchmark and a final "Rel. Avg." column: the mean over benchmarks of
score / base score, in percent (reproduce/relavg.py), where the base is the `--base` row. A row that lacks
one of the benchmarks gets no Rel. Avg. (it would not be comparable) and a note on stderr.

--out PREFIX also writes PREFIX.csv (full precision) and PREFIX.xlsx. --paper-table N adds the paper's
printed Rel. Avg. of the rows that table N has, and our value minus the paper's ("Δ"; only where our row
has exactly the table's benchmarks).

    python reproduce/aggregate.py --work-dir outputs --paper-table 18 [--out PREFIX]

Table 18 (video QA) has no Rel. Avg.: its layout is acc / score per benchmark (TGIF-QA, MSVD-QA, MSRVTT-QA,
read from the video datasets' `_score.json`) and their averages, each row followed by the paper's printed row
(`video_table`); no --base.

Bad input (missing columns, non-numeric or duplicate scores, a missing work dir or entry folder, a requested
benchmark without any score file, a benchmark without a base score, an unknown base row or table, a missing
output folder) prints one error line and exits with code 2, before anything is written. Scores and base must
be in the same unit per benchmark (see relavg.py on MME / OCRBench; `--mme`).

--compare SPEC aggregates a comparison of your own (reproduce/compare.py): the markdown table (TFLOPs column,
mean +- std over seeds, Rel. Avg. against each model's full row, "undefined" where that base is 0 or missing,
missing cells with their reason) is printed, and written with NAME.csv, NAME_runs.csv and accuracy-vs-TFLOPs
plots (PNG, SVG) per benchmark and for Rel. Avg. to --out DIR (default <work-dir>/comparisons/NAME/).

No vlmeval import (nor torch): the score files are read with pandas, the aliases with yaml. --compare also
reads the entry registry (vlmeval_dop, hence torch) for the TFLOPs and the entries' reasons.
"""
from __future__ import annotations

import argparse
import io
import math
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `reproduce` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd

from reproduce.relavg import rel_avg, round_half_up
from reproduce.tables import (BENCHMARKS, DOP_METHODS, REPO_ROOT, TABLES, VIDEO_BENCHMARKS, VIDEO_METRICS, get_table, parse_row,
                              read_paper_table, rel_avg_benchmarks)

REQUIRED_COLUMNS = ("method", "benchmark", "score")
REL_AVG = "Rel. Avg."
PAPER = "Paper Rel. Avg."
DELTA = "Δ"


class InputError(ValueError):
    """Bad input to the aggregation: reported as one line, exit code 2, nothing written."""


# ---------------------------------------------------------------------------- VLMEvalKit work dirs
# How each dataset's score file is read. VLMEvalKit writes, next to the predictions
# `<work_dir>/<model>/<model>_<dataset>.xlsx` (vlmeval/smp/file.py: get_pred_file_path):
#   MCQ (ImageMCQDataset.evaluate_heuristic)  `_acc.csv`: report_acc, a `split` column, `Overall` a FRACTION;
#   VQA (ImageVQADataset, VizWiz, our plugins) `_acc.csv` (or `.json` with EVAL_FORMAT=json): one row,
#       `Overall` in percent;
#   Y/N (ImageYORNDataset)  `_score.csv`: POPE_rating (rows per split, `Overall` = F1 in percent),
#       MME_rating (one row: `perception`, `reasoning` and the 14 subtask scores);
#   OCRBench                `_score.json`: {"Final Score": 0-1000, ...};
#   captioning (vlmeval_dop/captioning.py, Table 17) `_score.json`: {"CIDEr": <Table 17 unit>, ...};
#   video QA (vlmeval_dop/video_qa.py, Table 18) `_score.json`: {"acc": percent, "score": 0-5, ...}.
POPE_DATASET, MME_DATASET, OCRBENCH_DATASET = "POPE", "MME", "OCRBench"
CAPTION_DATASETS = ("NoCaps_VAL", "TextCaps_VAL")
VIDEO_DATASETS = ("TGIF_QA", "MSVD_QA", "MSRVTT_QA", "TGIF_QA_VAL", "MSVD_QA_VAL", "MSRVTT_QA_VAL")
SERVER_SCORED = {
    "VQAv2_TestDev": "test-dev answers are not public: VLMEvalKit writes *_submission.json for the EvalAI "
                     "server; add the server's score with --scores",
}
MME_UNITS = ("auto", "perception", "total")
# model wrapper family (eval_configs/entries.yaml `models:`) -> the MME unit of the paper's tables for it
_MME_BY_WRAPPER = {"llava": "perception", "llava_next": "perception", "qwen2_5_vl": "total", "internvl": "total"}
# VLMEvalKit's timestamped run folders (vlmeval/smp/file.py: NEW_EVAL_ID_PATTERN, LEGACY_EVAL_ID_PATTERN)
_RUN_DIR = re.compile(r"^T\d{8}(-\d{6}|_G[0-9a-fA-F]+)$")


def _entries_config() -> dict:
    """eval_configs/entries.yaml, read with yaml only (vlmeval_dop would import torch)."""
    import yaml

    return yaml.safe_load((REPO_ROOT / "eval_configs" / "entries.yaml").read_text()) or {}


def benchmark_aliases() -> dict[str, str]:
    """The paper's short benchmark names -> VLMEvalKit dataset names (entries.yaml `benchmarks:`)."""
    return {str(k): str(v) for k, v in (_entries_config().get("benchmarks") or {}).items()}


def _mme_unit(entry: str, mme: str) -> str:
    """`perception` or `total` for this entry: as asked, or (auto) the paper's unit for its model family."""
    if mme != "auto":
        return mme
    cfg = _entries_config()
    models = cfg.get("models") or {}
    model = (cfg.get("entries") or {}).get(entry, {}).get("model")
    if model is None:  # generated paper entries: `{model}` or `{model}_{method}{budget}`
        model = next((m for m in sorted(models, key=len, reverse=True)
                      if entry == m or entry.startswith(m + "_")), None)
    wrapper = (models.get(model) or {}).get("wrapper")
    if wrapper not in _MME_BY_WRAPPER:
        raise InputError(f"cannot tell the MME unit of {entry!r} (not an entry of eval_configs/entries.yaml); "
                         f"pass --mme perception (LLaVA tables) or --mme total (Qwen2.5-VL / InternVL3 tables)")
    return _MME_BY_WRAPPER[wrapper]


def _suffixes(dataset: str) -> tuple[str, ...]:
    if dataset in (POPE_DATASET, MME_DATASET):
        return ("_score.csv",)
    if dataset == OCRBENCH_DATASET or dataset in CAPTION_DATASETS or dataset in VIDEO_DATASETS:
        return ("_score.json",)
    return ("_acc.csv", "_acc.json", "_score.csv")  # the last: Y/N datasets scored by default_rating


def find_score_file(work_dir: str | Path, entry: str, dataset: str) -> Path | None:
    """VLMEvalKit's score file of (entry, dataset), or None.

    Looks in `<work_dir>/<entry>/` and in its timestamped run folders (`T20250101-120000/`, legacy
    `T20250101_G1a2b3c/`, of which older VLMEvalKit versions symlink the files into `<entry>/`). Names are
    matched exactly (`<entry>_<dataset>_acc.csv`): a prefix match would mix datasets such as MMBench_DEV_EN
    and MMBench_DEV_EN_V11. Of several candidates the most recently modified one wins (the latest run);
    broken symlinks are ignored.
    """
    root = Path(work_dir) / entry
    if not root.is_dir():
        return None
    folders = [root] + sorted(d for d in root.iterdir() if d.is_dir() and _RUN_DIR.match(d.name))
    found = [f for d in folders for suf in _suffixes(dataset) for f in [d / f"{entry}_{dataset}{suf}"] if f.is_file()]
    return max(found, key=lambda f: f.stat().st_mtime) if found else None


def _read_table(path: Path) -> pd.DataFrame:
    """A score file as a DataFrame (csv, or json as written by VLMEvalKit's dump)."""
    try:
        if path.suffix == ".json":
            import json

            raw = json.loads(path.read_text())
            if isinstance(raw, dict) and all(not isinstance(v, (dict, list)) for v in raw.values()):
                return pd.DataFrame([raw])
            return pd.DataFrame(raw)
        return pd.read_csv(path)
    except (ValueError, OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"cannot read VLMEvalKit score file {str(path)!r}: {str(exc).strip()}") from None


def _column(df: pd.DataFrame, path: Path, column: str) -> pd.Series:
    if column not in df.columns or df.empty:
        raise InputError(f"{str(path)!r} has no {column!r} value (columns: {', '.join(map(str, df.columns))}); "
                         "is it a VLMEvalKit score file?")
    return pd.to_numeric(df[column], errors="coerce")


def read_score_file(path: str | Path, dataset: str, mme_unit: str = "perception") -> float:
    """The paper's metric for `dataset` from its VLMEvalKit score file, in the paper's unit.

    - MCQ (`_acc.csv` with a `split` column, report_acc): `Overall` x 100 (VLMEvalKit stores a fraction).
      MMBench's is the circular-evaluation Overall. Several splits in one file is an error (ambiguous).
    - VQA and other `_acc` / `_score.csv` files without `split`: `Overall` as written (percent).
    - POPE: the mean F1 over the split rows (adversarial / popular / random), as the LLaVA evaluation
      reports it (85.9 for LLaVA-1.5-7B); VLMEvalKit's own `Overall` row pools the three splits into one
      F1, which is not the paper's number. A file without split rows falls back to `Overall`.
    - MME: `perception` (0-2000, LLaVA tables) or `perception + reasoning` (0-2800, Qwen2.5-VL / InternVL3
      tables), by `mme_unit`.
    - OCRBench: `Final Score` (0-1000, the number of correct answers out of 1000, as the paper prints it).
    - NoCaps_VAL / TextCaps_VAL: `CIDEr` as the plugin's evaluate() writes it (Table 17's unit).

    Raises:
        InputError: unreadable file, a missing column, a non-finite value, ambiguous splits.
    """
    path = Path(path)
    df = _read_table(path)
    if dataset == OCRBENCH_DATASET:
        values = _column(df, path, "Final Score")
    elif dataset in CAPTION_DATASETS:
        values = _column(df, path, "CIDEr")
    elif dataset == MME_DATASET:
        if mme_unit not in ("perception", "total"):
            raise InputError(f"MME unit {mme_unit!r} unknown; valid: perception, total")
        values = _column(df, path, "perception")
        if mme_unit == "total":
            values = values + _column(df, path, "reasoning")
    elif dataset == POPE_DATASET:
        values = _column(df, path, "Overall")
        if "split" in df.columns:
            is_split = (df["split"].astype(str) != "Overall").to_numpy()
            values = pd.Series([values[is_split].mean()]) if is_split.any() else values[~is_split]
    else:
        values = _column(df, path, "Overall")
        if "split" in df.columns and path.name.endswith(("_acc.csv", "_acc.json")):  # report_acc: fractions
            if len(df) > 1:
                raise InputError(f"{str(path)!r} has several splits ({', '.join(map(str, df['split']))}); "
                                 "evaluate one split per dataset")
            values = 100.0 * values
    if len(values) != 1 or not math.isfinite(float(values.iloc[0])):
        raise InputError(f"{str(path)!r}: expected one finite score, got {list(values)}")
    return float(values.iloc[0])


def read_video_score_file(path: str | Path) -> dict[str, float]:
    """{"acc": percent, "score": 0-5} of a video QA dataset's `_score.json` (vlmeval_dop/video_qa.py): Table 18's
    two cells, the GPT judge's accuracy and mean score over all samples."""
    path = Path(path)
    df = _read_table(path)
    out = {}
    for metric in VIDEO_METRICS:
        values = _column(df, path, metric)
        if len(values) != 1 or not math.isfinite(float(values.iloc[0])):
            raise InputError(f"{str(path)!r}: expected one finite {metric!r}, got {list(values)}")
        out[metric] = float(values.iloc[0])
    failed = df["judge_failed"].iloc[0] if "judge_failed" in df else 0
    if failed and float(failed) > 0:  # counted as "no", score 0 by the evaluation: say so where the table is made
        print(f"aggregate: warning: {path}: the judge gave no usable reply for {int(failed)} sample(s), counted "
              "as 'no' with score 0; evaluate again (run.py --reuse) to retry them", file=sys.stderr)
    return out


def collect_scores(work_dir: str | Path, entries: list[str] | None = None, benchmarks: list[str] | None = None,
                   mme: str = "auto") -> pd.DataFrame:
    """Read a VLMEvalKit work dir into the long format (method, benchmark, score) `aggregate` takes.

    `method` is the entry (VLMEvalKit model) folder name, `benchmark` the paper's alias (entries.yaml
    `benchmarks:`; a dataset without an alias keeps its VLMEvalKit name), `score` the paper's metric in the
    paper's unit (`read_score_file`). A video QA dataset gives two rows, `<alias>_acc` and `<alias>_score`
    (Table 18's columns). Only VLMEvalKit's own score files are read; nothing is re-scored.

    Args:
        work_dir: the `--work-dir` of run.py / reproduce/run.py (holds `<entry>/` folders).
        entries: entry folders to read (default: every folder of the work dir except `logs`; folders
            without score files add no rows).
        benchmarks: paper aliases (`TextVQA`) or VLMEvalKit dataset names (`TextVQA_VAL`, `DOP_Demo`, a
            custom TSV's name). Default: every alias of entries.yaml (the paper's benchmarks) that has a
            score file for some entry.
            Every requested benchmark must have a score file for at least one entry; an entry lacking
            one simply has no cell (aggregate then leaves its Rel. Avg. empty).
        mme: `perception`, `total` (perception + reasoning), or `auto`: the unit of the paper's tables for
            the entry's model family (LLaVA: perception; Qwen2.5-VL / InternVL3: total).

    VQAv2 test-dev (`VQAv2_TestDev`) has no local score: its cells come from the EvalAI server (pass them
    with --scores). The returned frame's `attrs["files"]` maps (method, benchmark) to the file read.

    Raises:
        InputError: a missing work dir or entry folder, no score file at all / for a requested benchmark,
            an unreadable score file, an unknown `mme`.
    """
    root = Path(work_dir)
    if not root.is_dir():
        raise InputError(f"work dir {str(root)!r} not found (the --work-dir given to run.py)")
    if mme not in MME_UNITS:
        raise InputError(f"--mme {mme!r} unknown; valid: {', '.join(MME_UNITS)}")
    aliases = benchmark_aliases()
    to_alias = {d: a for a, d in aliases.items()}
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != "logs")
    if entries is not None:
        missing = [e for e in entries if e not in folders]
        if missing:
            raise InputError(f"no entry folder {', '.join(repr(str(root / e)) for e in missing)}; entries in "
                             f"{str(root)!r}: {', '.join(folders) or 'none'}")
    if benchmarks is None:
        order = _ordered(list(aliases), BENCHMARKS)
        requested = [(a, aliases[a]) for a in order if aliases[a] not in SERVER_SCORED]
    else:
        requested = []
        for name in dict.fromkeys(benchmarks):
            dataset = aliases.get(name, name)
            if dataset in SERVER_SCORED:
                raise InputError(f"{name} ({dataset}) has no local score: {SERVER_SCORED[dataset]}")
            requested.append((to_alias.get(dataset, dataset), dataset))
        requested = list(dict.fromkeys(requested))  # `TextVQA` and `TextVQA_VAL` are one column
    rows, files, got = [], {}, set()
    for entry in entries if entries is not None else folders:
        for label, dataset in requested:
            path = find_score_file(root, entry, dataset)
            if path is None:
                continue
            got.add(label)
            if dataset in VIDEO_DATASETS:  # two cells: accuracy and score
                for metric, value in read_video_score_file(path).items():
                    rows.append((entry, f"{label}_{metric}", value))
                    files[(entry, f"{label}_{metric}")] = path
                continue
            unit = _mme_unit(entry, mme) if dataset == MME_DATASET else "perception"
            rows.append((entry, label, read_score_file(path, dataset, unit)))
            files[(entry, label)] = path
    if benchmarks is not None:
        lacking = [(b, d) for b, d in requested if b not in got]
        if lacking:
            b, d = lacking[0]
            raise InputError(
                f"no VLMEvalKit score file for benchmark {b} ({d}) under {str(root)!r}: expected "
                f"<entry>/<entry>_{d}{_suffixes(d)[0]}; benchmarks with score files: {', '.join(sorted(got)) or 'none'}"
            )
    if not rows:
        raise InputError(f"no VLMEvalKit score files of the paper's benchmarks under {str(root)!r} "
                         f"(looked for <entry>/<entry>_<dataset>_acc.csv / _score.csv / _score.json, datasets: "
                         f"{', '.join(d for _, d in requested)}); name other datasets with --benchmarks")
    out = pd.DataFrame(rows, columns=list(REQUIRED_COLUMNS))
    out.attrs["files"] = files
    return out


# ------------------------------------------------------------------------------------------- reading
def read_scores(path: str | Path) -> pd.DataFrame:
    """Read and validate a long-format scores file; returns columns method, benchmark, score (float).

    Raises:
        InputError: unreadable file, missing columns, empty names, non-numeric scores, duplicate cells.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"scores file {str(path)!r} not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {str(path)!r} as CSV: {str(exc).strip()}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(
            f"{path.name} lacks column(s) {', '.join(missing)}; it needs the columns "
            f"{','.join(REQUIRED_COLUMNS)} (found: {','.join(df.columns) or 'none'})"
        )
    df = df[list(REQUIRED_COLUMNS)].apply(lambda s: s.str.strip())
    if df.empty:
        raise InputError(f"{path.name} has no score lines")
    line = lambda i: i + 2  # noqa: E731  (1-based, after the header line)
    for col in ("method", "benchmark"):
        empty = [line(i) for i, v in enumerate(df[col]) if not v]
        if empty:
            raise InputError(f"{path.name}: empty {col} on line(s) {', '.join(map(str, empty))}")
    values = pd.to_numeric(df["score"], errors="coerce")
    bad = [f"line {line(i)} ({df['score'].iloc[i]!r})" for i, v in enumerate(values)
           if v is None or not math.isfinite(v)]
    if bad:
        raise InputError(f"{path.name}: score is not a finite number on {', '.join(bad[:5])}"
                         + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    df["score"] = values.astype(float)
    dup = df[df.duplicated(["method", "benchmark"], keep=False)]
    if not dup.empty:
        cells = sorted({f"{m}/{b}" for m, b in zip(dup["method"], dup["benchmark"])})
        raise InputError(f"{path.name}: more than one score for {', '.join(cells)}")
    return df.reset_index(drop=True)


# ---------------------------------------------------------------------------------------- aggregation
def _ordered(items: list[str], preferred: tuple[str, ...] | list[str]) -> list[str]:
    """`items` with those in `preferred` first (in that order), the rest in their given order."""
    first = [p for p in preferred if p in items]
    return first + [i for i in items if i not in first]


def aggregate(scores: pd.DataFrame, base: str, paper_table: int | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The wide table: one row per method, one column per benchmark, then "Rel. Avg." (percent).

    Args:
        scores: long format from `read_scores`.
        base: the method whose scores are the denominators (the unpruned model).
        paper_table: also add the paper's printed Rel. Avg. ("Paper Rel. Avg.") and our value minus it
            ("Δ") for the rows that table has.

    Returns:
        (table indexed by method, notes for the user). Rows lacking a benchmark get NaN Rel. Avg.

    Raises:
        InputError: unknown base row, a benchmark without a base score, an unknown table or one that prints
            no Rel. Avg.
    """
    methods = list(dict.fromkeys(scores["method"]))
    if base not in methods:
        shown = ", ".join(methods[:10]) + (f", ... ({len(methods)} rows)" if len(methods) > 10 else "")
        raise InputError(f"unknown base row {base!r}; rows in the scores: {shown}")
    spec = None
    if paper_table is not None:
        try:
            spec = get_table(paper_table)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if not spec.has_rel_avg:
            with_rel = [n for n, t in TABLES.items() if t.has_rel_avg]
            raise InputError(f"table {paper_table} prints no Rel. Avg. to compare with; "
                             f"tables that do: {', '.join(map(str, with_rel))}")
    wide = scores.pivot(index="method", columns="benchmark", values="score")
    base_scores = wide.loc[base].dropna()
    no_base = [b for b in wide.columns if b not in base_scores.index]
    if no_base:
        raise InputError(f"benchmark(s) {', '.join(no_base)} have no score for the base row {base!r}")
    zero = [b for b, v in base_scores.items() if v == 0]
    if zero:
        raise InputError(f"the base row {base!r} scores 0 on {', '.join(zero)}; the ratio is undefined")

    column_order = spec.benchmarks if spec and spec.benchmarks else BENCHMARKS
    benchmarks = _ordered(list(dict.fromkeys(scores["benchmark"])), column_order)
    order = [base] + [m for m in methods if m != base]
    if spec:
        order = [base] + _ordered([m for m in order if m != base], spec.rows)
    wide = wide.loc[order, benchmarks]
    wide.columns.name = None

    notes: list[str] = []
    incomplete = {}
    rel = []
    for method, row in wide.iterrows():
        have = row.dropna()
        if len(have) < len(benchmarks):
            incomplete[method] = [b for b in benchmarks if b not in have.index]
            rel.append(math.nan)
        else:
            rel.append(rel_avg(have.to_dict(), base_scores.to_dict(), benchmarks))
    wide[REL_AVG] = rel
    if incomplete:
        notes.append("Rel. Avg. left empty for rows missing benchmarks: "
                     + "; ".join(f"{m} ({', '.join(bs)})" for m, bs in incomplete.items()))

    if spec:
        paper = read_paper_table(spec.number).set_index("row")["rel_avg"]
        wide[PAPER] = [paper.get(m, math.nan) for m in wide.index]
        deltas = []
        for method in wide.index:
            if method not in paper.index:
                deltas.append(math.nan)
                continue
            expected = rel_avg_benchmarks(spec.number, method)
            if set(benchmarks) == set(expected):  # same average, else the difference means nothing
                deltas.append(wide.at[method, REL_AVG] - wide.at[method, PAPER])
            else:
                deltas.append(math.nan)
                lack = [b for b in expected if b not in benchmarks]
                extra = [b for b in benchmarks if b not in expected]
                notes.append(f"Δ of {method} left empty: Table {spec.number} averages over {', '.join(expected)}"
                             + (f"; missing here: {', '.join(lack)}" if lack else "")
                             + (f"; not in the table: {', '.join(extra)}" if extra else ""))
        wide[DELTA] = deltas
        if not wide[PAPER].notna().any():
            notes.append(f"no row of the scores is a row of Table {spec.number} "
                         f"(its rows: {', '.join(spec.rows[:4])}, ...)")
        # the paper's denominators: the table's upper bound, or each row's own unpruned model (Table 5)
        paper_bases = {spec.base_row or parse_row(m).model for m in wide.index if m in paper.index}
        for other in sorted(paper_bases - {base}):
            notes.append(f"Table {spec.number}'s Rel. Avg. is relative to {other!r}, not to the base {base!r}")
    wide.index.name = "method"
    return wide, notes


# ------------------------------------------------------------------------------------------- output
def _decimals(values: pd.Series, most: int = 3) -> int:
    """Fewest decimals (up to `most`) that show every value of a column as given."""
    for d in range(most + 1):
        if all(abs(v - round(v, d)) < 1e-9 for v in values.dropna()):
            return d
    return most


def to_markdown(table: pd.DataFrame) -> str:
    """Markdown rendering: benchmark columns at their own precision, Rel. Avg. as the paper prints it."""
    cols = list(table.columns)
    lines = ["| " + " | ".join(["Method"] + cols) + " |", "|" + "|".join(["---"] * (len(cols) + 1)) + "|"]
    decimals = {c: _decimals(table[c]) for c in cols if c not in (REL_AVG, PAPER, DELTA)}
    for method, row in table.iterrows():
        cells = [str(method)]
        for c in cols:
            v = row[c]
            if pd.isna(v):
                cells.append("-")
            elif c in (REL_AVG, PAPER):
                cells.append(f"{round_half_up(v, 1):.1f}%")
            elif c == DELTA:
                d = round_half_up(v, 1)
                cells.append("0.0" if d == 0 else f"{d:+.1f}")
            else:
                cells.append(f"{v:.{decimals[c]}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _csv_frame(table: pd.DataFrame) -> pd.DataFrame:
    """Column names for PREFIX.csv / .xlsx (machine-friendly, full precision)."""
    return table.rename(columns={REL_AVG: "rel_avg", PAPER: "paper_rel_avg", DELTA: "diff_rel_avg"}).reset_index()


def _outputs(table: pd.DataFrame, prefix: Path) -> dict[Path, bytes]:
    """PREFIX.csv and PREFIX.xlsx, rendered in memory (so an error cannot leave one half written)."""
    frame = _csv_frame(table)
    xlsx = io.BytesIO()
    frame.to_excel(xlsx, index=False, sheet_name="rel_avg", engine="openpyxl")
    return {
        prefix.with_name(prefix.name + ".csv"): frame.to_csv(index=False).encode(),  # floats as repr: full precision
        prefix.with_name(prefix.name + ".xlsx"): xlsx.getvalue(),
    }


_SWAP_METHOD = re.compile(r"^(?P<entry>.+)__swap(?P<k>\d+)(?P<module>mha|mlp)\.s(?P<seed>\d+)$")


def swap_statistics(scores: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Tables 29-30: replace the per-draw rows `{entry}__swap{k}{mod}.s{seed}` by the paper's statistics.

    Each (entry, k, module, benchmark) becomes `{entry}[swap={k}{MOD};stat=best]` (the maximum over the draws,
    per benchmark) and `...;stat=mean]` (the mean). Returns the new long table and notes (draw counts other
    than reproduce/run.py's SWAP_DRAWS).
    """
    m = scores["method"].astype(str).str.extract(_SWAP_METHOD)
    is_swap = m["entry"].notna()
    if not bool(is_swap.any()):
        return scores, []
    draws = scores[is_swap].assign(row=[f"{e}[swap={k}{mod.upper()};stat=" for e, k, mod in
                                        zip(m["entry"][is_swap], m["k"][is_swap], m["module"][is_swap])])
    out, notes = [scores[~is_swap]], []
    for (row, bench), g in draws.groupby(["row", "benchmark"], sort=True):
        if len(g) != 10:
            notes.append(f"{row[:-6]}]: {len(g)} draws on {bench} (the paper uses 10)")
        out.append(pd.DataFrame({"method": [row + "best]", row + "mean]"], "benchmark": bench,
                                 "score": [float(g["score"].max()), float(g["score"].mean())]}))
    return pd.concat(out, ignore_index=True), notes


VIDEO_TABLE = 18
PAPER_SUFFIX = " (paper)"


def _paper_row(method: str, rows: tuple[str, ...]) -> str | None:
    """The table row a method stands for: itself, or the DOP row its searched entry `{row}_{tag}` installs
    (`videollava_7b_dopv16_val_msvd` -> `videollava_7b_dopv16`)."""
    if method in rows:
        return method
    cands = [r for r in rows if method.startswith(r + "_") and parse_row(r).method in DOP_METHODS]
    return max(cands, key=len) if cands else None


def video_table(scores: pd.DataFrame, number: int = VIDEO_TABLE) -> tuple[pd.DataFrame, list[str]]:
    """Table 18's layout: per method `<b>_acc`, `<b>_score` for the three video benchmarks, then `avg_acc`,
    `avg_score` (means over the three, as the paper's Average columns; empty when a benchmark is missing),
    each of our rows followed by the paper's printed row (`<row> (paper)`) where the method is a row of the
    table or a searched entry of one (`videollava_7b_dopv16_<tag>`).

    Raises:
        InputError: no score of the table's columns in `scores`.
    """
    spec = get_table(number)
    columns = [f"{b}_{m}" for b in VIDEO_BENCHMARKS for m in VIDEO_METRICS]
    scores = scores[scores["benchmark"].isin(columns)]
    if scores.empty:
        raise InputError(f"no Table {number} cells in the scores (benchmarks {', '.join(columns[:2])}, ...: "
                         "VLMEvalKit score files of TGIF_QA / MSVD_QA / MSRVTT_QA)")
    wide = scores.pivot(index="method", columns="benchmark", values="score").reindex(columns=columns)
    notes: list[str] = []
    for m in VIDEO_METRICS:
        cells = wide[[f"{b}_{m}" for b in VIDEO_BENCHMARKS]]
        wide[f"avg_{m}"] = cells.mean(axis=1).where(cells.notna().all(axis=1))
    incomplete = [str(i) for i in wide.index[wide["avg_acc"].isna() | wide["avg_score"].isna()]]
    if incomplete:
        notes.append(f"averages left empty for rows missing a benchmark: {', '.join(incomplete)}")
    paper = read_paper_table(number).set_index("row")
    mapped = {m: _paper_row(str(m), spec.rows) for m in wide.index}
    order = sorted(wide.index, key=lambda m: (spec.rows.index(mapped[m]) if mapped[m] else len(spec.rows), str(m)))
    out = []
    for m in order:
        out.append(wide.loc[[m]])
        row = mapped[m]
        if row is not None:
            printed = paper.loc[[row], list(wide.columns)]
            printed.index = [row + PAPER_SUFFIX]
            out.append(printed)
            if row != m:
                notes.append(f"{m} is Table {number}'s row {row}")
    table = pd.concat(out)
    table.index.name = "method"
    return table, notes


def video_markdown(table: pd.DataFrame) -> str:
    """Markdown of `video_table`: accuracies with 1 decimal, scores with 2, as the paper prints them."""
    cols = list(table.columns)
    lines = ["| " + " | ".join(["Method"] + cols) + " |", "|" + "|".join(["---"] * (len(cols) + 1)) + "|"]
    for method, row in table.iterrows():
        cells = [str(method)] + ["-" if pd.isna(row[c]) else
                                 f"{round_half_up(row[c], 1 if c.endswith('_acc') else 2):.{1 if c.endswith('_acc') else 2}f}"
                                 for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit code (0 ok, 2 bad input)."""
    parser = argparse.ArgumentParser(
        prog="python reproduce/aggregate.py",
        description="Scores (long CSV: method,benchmark,score, and/or a VLMEvalKit work dir) -> markdown table "
                    "with the paper's Rel. Avg.",
    )
    parser.add_argument("--scores", help="CSV with columns method,benchmark,score")
    parser.add_argument("--work-dir", help="VLMEvalKit work dir: read its score files (collect_scores)")
    parser.add_argument("--entries", nargs="+", metavar="ENTRY", help="with --work-dir: only these entry folders")
    parser.add_argument("--benchmarks", nargs="+", metavar="NAME",
                        help="with --work-dir: these benchmarks (aliases or VLMEvalKit dataset names; "
                             "default: the paper's benchmarks found)")
    parser.add_argument("--mme", choices=MME_UNITS, default="auto",
                        help="MME unit: perception (LLaVA tables), total = perception + reasoning (Qwen2.5-VL / "
                             "InternVL3 tables), auto = by each entry's model family (default)")
    parser.add_argument("--base", help="the row (method) whose scores are the denominators (required except with "
                                        "--compare; not for --paper-table 18, which prints averages and the paper's "
                                        "rows instead)")
    parser.add_argument("--out", help="also write PREFIX.csv (full precision) and PREFIX.xlsx; with --compare: "
                                      "the output folder (default <work-dir>/comparisons/<name>)")
    parser.add_argument("--compare", metavar="SPEC",
                        help="a comparison spec of your own (YAML, reproduce/compare.py): its table, CSVs and plots")
    parser.add_argument("--paper-table", type=int, metavar="N",
                        help="show the paper's Rel. Avg. of table N and the difference; 18: Table 18's layout (video "
                             "QA acc / score, averages) with the paper's rows beside ours")
    args = parser.parse_args(argv)
    if args.compare is not None:
        if args.scores or args.base or args.entries or args.benchmarks or args.paper_table is not None:
            parser.error("--compare takes its rows and benchmarks from the spec: use it with --work-dir, --out "
                         "and --mme only")
        from reproduce.compare import main_aggregate

        return main_aggregate(args.compare, args.work_dir or "outputs", args.out, args.mme)
    if args.base is None and args.paper_table != VIDEO_TABLE:  # Table 18 prints no Rel. Avg. (checked below)
        parser.error("the following arguments are required: --base")
    try:
        if not args.work_dir and (args.entries or args.benchmarks):
            raise InputError("--entries / --benchmarks select from a --work-dir; none was given")
        if not args.scores and not args.work_dir:
            raise InputError("give --scores CSV, --work-dir DIR (VLMEvalKit's outputs), or both")
        video = args.paper_table == VIDEO_TABLE
        if video and args.base:
            raise InputError(f"Table {VIDEO_TABLE} prints no Rel. Avg.: drop --base")
        if not video and not args.base:
            raise InputError(f"--base ROW is required (the row whose scores are the denominators), except with "
                             f"--paper-table {VIDEO_TABLE}")
        parts = []
        if args.work_dir:
            benchmarks = args.benchmarks or (list(VIDEO_BENCHMARKS) if video else None)
            parts.append(collect_scores(args.work_dir, args.entries, benchmarks, args.mme))
        if args.scores:
            parts.append(read_scores(args.scores))
        scores = pd.concat(parts, ignore_index=True)
        dup = scores[scores.duplicated(["method", "benchmark"], keep=False)]
        if not dup.empty:  # a cell both in the work dir and in --scores
            cells = sorted({f"{m}/{b}" for m, b in zip(dup["method"], dup["benchmark"])})
            raise InputError(f"--scores repeats cell(s) read from --work-dir: {', '.join(cells)}")
        if video:
            table, notes = video_table(scores)
        else:
            scores, swap_notes = swap_statistics(scores)
            table, notes = aggregate(scores, args.base, args.paper_table)
            notes = swap_notes + notes
        files: dict[Path, bytes] = {}
        if args.out:
            prefix = Path(args.out)
            if not prefix.parent.is_dir():
                raise InputError(f"output folder {str(prefix.parent)!r} does not exist")
            files = _outputs(table, prefix)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(video_markdown(table) if video else to_markdown(table))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for path, data in files.items():
        path.write_bytes(data)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
