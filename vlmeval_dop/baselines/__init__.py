"""Decoder-side token-pruning baselines, registered with `@vlmeval_dop.methods.register_method`.

Each is one module implementing `vlmeval_dop.executor.DecoderTokenPruner`, used through
`apply_dop(model, DOPPolicy.full(L), token_pruner=...)`. Adding one: a module whose class carries
`@register_method(name, kind="decoder", budget_knob=...)` (docs/adding_a_baseline.md); a built-in one is also
imported below, a user's own is loaded by `--plugins`. `DECODER_PRUNERS` / `BASELINES` are live views of the
decoder-side registrations.
"""
from __future__ import annotations

from collections.abc import Callable

from ..executor.token_pruner import DecoderTokenPruner
from ..methods import MethodView
from ..policy import DOPPolicy
from .dart import DART  # noqa: F401  (importing registers it)
from .fastv import FastV  # noqa: F401  (importing registers it)
from .fitprune import FitPrune  # noqa: F401  (importing registers it)
from .pdrop import PDrop  # noqa: F401  (importing registers it)
from .sparsevlm import SparseVLM  # noqa: F401  (importing registers it)

# every decoder-side method, built-in (the imports above register them) or a plugin's: name -> class
DECODER_PRUNERS = MethodView("decoder")


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
BASELINES = MethodView("decoder", lambda info: _as_baseline(info.name))
