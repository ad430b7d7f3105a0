"""Decoder-side token-pruning baselines behind one registry: name -> factory.

Each is one module implementing `vlmeval_dop.executor.DecoderTokenPruner`, used through
`apply_dop(model, DOPPolicy.full(L), token_pruner=...)`. Adding one: a module + one line here.
"""
from __future__ import annotations

from collections.abc import Callable

from ..executor.token_pruner import DecoderTokenPruner
from ..policy import DOPPolicy
from .dart import DART
from .fastv import FastV
from .fitprune import FitPrune
from .pdrop import PDrop
from .sparsevlm import SparseVLM

DECODER_PRUNERS: dict[str, Callable[..., DecoderTokenPruner]] = {
    "fastv": FastV,
    "pdrop": PDrop,
    "dart": DART,
    "fitprune": FitPrune,
    "sparsevlm": SparseVLM,
}


def get_decoder_pruner(name: str, **kwargs) -> DecoderTokenPruner:
    """Instantiate a registered decoder-side baseline; unknown names list the valid ones."""
    if name not in DECODER_PRUNERS:
        raise ValueError(f"unknown decoder-side baseline {name!r}; valid: {', '.join(sorted(DECODER_PRUNERS))}")
    return DECODER_PRUNERS[name](**kwargs)


def _as_baseline(name: str) -> Callable[..., object]:
    """Entry-level form used by the VLMEvalKit wrappers: `(model, **args) -> context manager`."""

    def attach(model, **args):
        from ..arch import ArchSpec
        from ..executor import apply_dop

        num_layers = ArchSpec.from_model(model).num_layers
        return apply_dop(model, DOPPolicy.full(num_layers), token_pruner=get_decoder_pruner(name, **args))

    attach.__name__ = f"{name}_baseline"
    return attach


# eval_configs/entries.yaml names these in `baseline:`; the arguments come from `baseline_args:`
BASELINES: dict[str, Callable[..., object]] = {name: _as_baseline(name) for name in DECODER_PRUNERS}
