"""The paper's Rel. Avg.: mean over benchmarks of score / base score, in percent.

Every accuracy table of the paper (Tables 1, 2, 4, 5, 8-13, 19, 21) prints a "Rel. Avg." column, "the mean
performance ratio relative to the original model averaged across all benchmarks". Recomputing it from the
printed cells (tests/test_reproduce_tables.py) confirms the plain, unweighted formula

    Rel. Avg. = 100 * mean_b( score_b / base_b )

with every benchmark in its own printed unit: no rescaling of MME or OCRBench is involved, because a ratio
does not depend on the unit. The only requirement is that score and base use the *same* unit for each
benchmark, and the unit differs between tables:

- MME: perception score (0-2000) in the LLaVA tables (1, 2, 4, 8-11; e.g. 1506.5), perception + reasoning
  (0-2800) in the Qwen2.5-VL / InternVL3 tables (12, 13, 19, 28, 30; e.g. 2286). VLMEvalKit reports both
  parts separately (`perception`, `reasoning`).
- OCRBench: the 0-1000 score (VLMEvalKit's "Final Score"), not a percentage.
- everything else: accuracy in percent (POPE: F1 in percent).

No vlmeval import: usable offline and in fast tests.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from decimal import ROUND_HALF_UP, Decimal


def rel_avg(scores: Mapping[str, float], base: Mapping[str, float], benchmarks: Iterable[str] | None = None) -> float:
    """Relative average of `scores` to `base` in percent, exactly as the paper: 100 * mean(score_b / base_b).

    Args:
        scores: benchmark -> score of the evaluated row.
        base: benchmark -> score of the reference row (the paper's upper bound: the unpruned model).
        benchmarks: the benchmarks to average over (default: all of `scores`). Every one of them must have a
            score and a base score; the paper averages over the table's full benchmark set, so a row missing
            a benchmark has no comparable Rel. Avg.

    Raises:
        ValueError: no benchmarks, a benchmark without a score or base score, a non-finite value, or a base
            score of 0 (the ratio is undefined).
    """
    names = list(scores if benchmarks is None else benchmarks)
    if not names:
        raise ValueError("rel_avg needs at least one benchmark")
    missing = [b for b in names if b not in scores]
    if missing:
        raise ValueError(f"no score for benchmark(s) {', '.join(map(str, missing))}")
    no_base = [b for b in names if b not in base]
    if no_base:
        raise ValueError(f"no base score for benchmark(s) {', '.join(map(str, no_base))}")
    ratios = []
    for b in names:
        s, r = float(scores[b]), float(base[b])
        if not (math.isfinite(s) and math.isfinite(r)):
            raise ValueError(f"non-finite score for benchmark {b!r}: score={s}, base={r}")
        if r == 0:
            raise ValueError(f"base score of benchmark {b!r} is 0; the ratio is undefined")
        ratios.append(s / r)
    return 100.0 * sum(ratios) / len(ratios)


def _half_unit(printed: str) -> float:
    """Half a unit in the last printed digit: '58.2' -> 0.05, '879' -> 0.5."""
    text = str(printed).strip().rstrip("%")
    decimals = len(text.split(".", 1)[1]) if "." in text else 0
    return 0.5 * 10.0**-decimals


def rel_avg_interval(
    scores: Mapping[str, str], base: Mapping[str, str], benchmarks: Iterable[str] | None = None
) -> tuple[float, float]:
    """The range of Rel. Avg. values compatible with *printed* (rounded) cells, in percent.

    Each printed cell (given as its printed string, e.g. '58.2' or '879') stands for any true value within
    half a unit of its last digit. Returns (min, max) of `rel_avg` over those true values, for the row and
    the base alike. A printed Rel. Avg. outside this range (widened by its own rounding) cannot come from
    the printed cells, whatever unrounded scores the authors used.
    """
    names = list(scores if benchmarks is None else benchmarks)
    lo = {b: float(scores[b]) - _half_unit(scores[b]) for b in names}
    hi = {b: float(scores[b]) + _half_unit(scores[b]) for b in names}
    base_lo = {b: float(base[b]) - _half_unit(base[b]) for b in names}
    base_hi = {b: float(base[b]) + _half_unit(base[b]) for b in names}
    return rel_avg(lo, base_hi, names), rel_avg(hi, base_lo, names)


def round_half_up(value: float, ndigits: int = 1) -> float:
    """Round as the paper prints (half away from zero on the decimal value): 97.85 -> 97.9.

    Python's round() works on the binary float and rounds half to even, so round(97.85, 1) gives 97.8.
    The value is first cut to 12 significant digits so that float noise (97.84999999999999) does not
    decide the direction.
    """
    d = Decimal(f"{value:.12g}")
    return float(d.quantize(Decimal(1).scaleb(-ndigits), rounding=ROUND_HALF_UP))


def matches_printed(value: float, printed: str) -> bool:
    """Whether `value` rounds (half up) to the printed string, e.g. matches_printed(97.876, '97.9')."""
    text = str(printed).strip().rstrip("%")
    decimals = len(text.split(".", 1)[1]) if "." in text else 0
    return round_half_up(value, decimals) == float(text)
