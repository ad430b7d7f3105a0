"""Decoder-side token-pruning baselines behind one registry: name -> factory.

Each is one module implementing `vlmeval_dop.executor.DecoderTokenPruner`, used through
`apply_dop(model, DOPPolicy.full(L), token_pruner=...)`. Adding one: a module + one line here.
"""
from __future__ import annotations

from collections.abc import Callable

from ..executor.token_pruner import DecoderTokenPruner
from .fastv import FastV

DECODER_PRUNERS: dict[str, Callable[..., DecoderTokenPruner]] = {
    "fastv": FastV,
}


def get_decoder_pruner(name: str, **kwargs) -> DecoderTokenPruner:
    """Instantiate a registered decoder-side baseline; unknown names list the valid ones."""
    if name not in DECODER_PRUNERS:
        raise ValueError(f"unknown decoder-side baseline {name!r}; valid: {', '.join(sorted(DECODER_PRUNERS))}")
    return DECODER_PRUNERS[name](**kwargs)
