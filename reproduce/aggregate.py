"""Aggregate benchmark scores into the paper's table layout with its Rel. Avg. column.

    python reproduce/aggregate.py --scores scores.csv --base <row name> [--out PREFIX] [--paper-table N]

scores.csv is long format with columns method,benchmark,score (one line per cell; `method` is a row name,
normally an entry name such as llava15_7b_dopcd28; `benchmark` a short alias such as TextVQA). The command
prints a markdown table with one column per benchmark and a final "Rel. Avg." column: the mean over
benchmarks of score / base score, in percent (reproduce/relavg.py), where the base is the `--base` row.
A row that lacks one of the benchmarks gets no Rel. Avg. (it would not be comparable) and a note on stderr.

--out PREFIX also writes PREFIX.csv (full precision) and PREFIX.xlsx. --paper-table N adds the paper's
printed Rel. Avg. of the rows that table N has, and our value minus the paper's ("Δ"; only where our row
has exactly the table's benchmarks).

Bad input (missing columns, non-numeric or duplicate scores, a benchmark without a base score, an unknown
base row or table, a missing output folder) prints one error line and exits with code 2, before anything
is written. Scores and base must be in the same unit per benchmark (see relavg.py on MME / OCRBench).

Reading VLMEvalKit's result files directly is not implemented yet: see `collect_scores`.
No vlmeval import.
"""
from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `reproduce` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd

from reproduce.relavg import rel_avg, round_half_up
from reproduce.tables import BENCHMARKS, TABLES, get_table, parse_row, read_paper_table, rel_avg_benchmarks

REQUIRED_COLUMNS = ("method", "benchmark", "score")
REL_AVG = "Rel. Avg."
PAPER = "Paper Rel. Avg."
DELTA = "Δ"


class InputError(ValueError):
    """Bad input to the aggregation: reported as one line, exit code 2, nothing written."""


def collect_scores(work_dir: str | Path) -> pd.DataFrame:
    """NOT IMPLEMENTED YET: read a VLMEvalKit work_dir into the long format (method, benchmark, score).

    What it has to do, and why it is not done here yet:
    - find the per-dataset score files VLMEvalKit writes under `<work_dir>/<model>/` (file names and
      columns differ by dataset type: `_acc.csv`, `_score.csv`, ...);
    - map VLMEvalKit dataset names back to the paper's aliases (eval_configs/entries.yaml, `benchmarks:`);
    - take the paper's metric for each benchmark, which depends on the target table: MME is `perception`
      in the LLaVA tables but `perception + reasoning` in the Qwen2.5-VL / InternVL3 tables; OCRBench is the
      0-1000 "Final Score"; POPE is F1 (the LLaVA papers report the mean over the random / popular /
      adversarial splits, VLMEvalKit's "Overall" pools them: to be decided and documented); MMBench the
      circular-evaluation Overall;
    - leave VQAv2 test-dev empty: its answers are not public, the score comes from the EvalAI server.

    Until then, write scores.csv by hand or with a script, one line per (method, benchmark, score).

    Raises:
        NotImplementedError: always.
    """
    raise NotImplementedError(
        f"collect_scores({str(work_dir)!r}): reading VLMEvalKit result files is not implemented yet; "
        "pass a scores.csv with columns method,benchmark,score (see reproduce/aggregate.py)"
    )


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


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit code (0 ok, 2 bad input)."""
    parser = argparse.ArgumentParser(
        prog="python reproduce/aggregate.py",
        description="Scores (long CSV: method,benchmark,score) -> markdown table with the paper's Rel. Avg.",
    )
    parser.add_argument("--scores", required=True, help="CSV with columns method,benchmark,score")
    parser.add_argument("--base", required=True, help="the row (method) whose scores are the denominators")
    parser.add_argument("--out", help="also write PREFIX.csv (full precision) and PREFIX.xlsx")
    parser.add_argument("--paper-table", type=int, metavar="N",
                        help="show the paper's Rel. Avg. of table N and the difference")
    args = parser.parse_args(argv)
    try:
        scores = read_scores(args.scores)
        table, notes = aggregate(scores, args.base, args.paper_table)
        files: dict[Path, bytes] = {}
        if args.out:
            prefix = Path(args.out)
            if not prefix.parent.is_dir():
                raise InputError(f"output folder {str(prefix.parent)!r} does not exist")
            files = _outputs(table, prefix)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(to_markdown(table))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for path, data in files.items():
        path.write_bytes(data)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
