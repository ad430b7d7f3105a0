"""Argument checks that run before any model loads or any file is written.

Every check raises `UsageError` (a ValueError: the CLIs print it as one line and exit 2) naming the
argument, the value and what is valid.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from .fileio import check_writable_dir


# VLMEvalKit's recorded skip reasons (status.json) that mean a benchmark produced nothing; its other skip
# reasons (answers for an external server, evaluate() returning None) are finished runs without a local score
VLMEVAL_FAILED_SKIPS = frozenset({"invalid_dataset", "No infer result found", "Incomplete infer result"})


class UsageError(ValueError):
    """A command-line argument that cannot work; the message names it and what is valid."""


def check_budgets(budgets: Iterable[float] | None, flag: str = "--budget") -> None:
    """TFLOPs fractions: finite, in (0, 1]."""
    for b in budgets or []:
        if not (isinstance(b, (int, float)) and math.isfinite(b) and 0 < b <= 1):
            raise UsageError(f"{flag} {b}: a TFLOPs budget is a fraction of the full model in (0, 1], e.g. 0.28")


def check_alpha(alpha: float | None) -> None:
    if alpha is not None and not (math.isfinite(alpha) and alpha >= 0):
        raise UsageError(f"--alpha {alpha}: n_min = alpha * n_e needs a finite alpha >= 0 (paper: 1.5)")


def check_min(value: int | None, flag: str, low: int, what: str = "") -> None:
    """`value` (if given) >= `low`."""
    if value is not None and value < low:
        raise UsageError(f"{flag} {value}: must be >= {low}{what}")


def check_device(device: str | None) -> None:
    """`device` names a torch device that exists on this machine (None: the default)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA GPU is available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise UsageError(f"--device {device!r}: use cpu, cuda or cuda:N")


def check_reducer(reducer: str | None, flag: str = "--reducer") -> None:
    """A registered reducer name or an image-side reduction (`resize`)."""
    if reducer is None:
        return
    from .reducers import REDUCERS
    from .registry import IMAGE_SIDE_REDUCERS

    valid = sorted(REDUCERS) + list(IMAGE_SIDE_REDUCERS)
    if reducer not in valid:
        raise UsageError(f"unknown reducer {reducer!r}; valid reducers: {', '.join(valid)}")


def check_out_dir(path: str | Path, flag: str = "--out-dir") -> None:
    """A folder that exists and is writable, or can be created (nothing is created here)."""
    try:
        check_writable_dir(path, flag)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
