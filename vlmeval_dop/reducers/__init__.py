"""Visual token reducers (vision-side methods), registered with `@vlmeval_dop.methods.register_method`.

Adding one: a module implementing `VisualTokenReducer` whose class carries `@register_method(name,
kind="vision")` (docs/adding_a_baseline.md); a built-in one is also imported below, a user's own is loaded by
`--plugins`. `REDUCERS` is the live name -> class view of the vision-side registrations.
"""
from __future__ import annotations

from .base import (
    ImageSpan,
    KeptTokens,
    ReducerError,
    ReductionContext,
    ReplacedSpan,
    Selection,
    VisualTokenReducer,
    check_family,
    check_selection,
    reported_indices,
    selection_embeds,
    selection_indices,
)
from .cdpruner import CDPruner  # noqa: F401  (importing registers it)
from .divprune import DivPrune  # noqa: F401  (importing registers it)
from .uniform import UniformReducer  # noqa: F401  (importing registers it)
from .vispruner import VisPruner  # noqa: F401  (importing registers it)
from .visionzip import VisionZip  # noqa: F401  (importing registers it)
from .prumerge import PruMergePlus  # noqa: F401  (importing registers it)
from .trim import TRIM  # noqa: F401  (importing registers it)

from ..methods import MethodView

# every vision-side method, built-in (the imports above register them) or a plugin's: name -> class
REDUCERS = MethodView("vision")


def get_reducer(reducer: str | VisualTokenReducer | None, **args) -> VisualTokenReducer | None:
    """Resolve a reducer name (or pass an instance through); `args` go to its constructor (an entry's
    arguments, e.g. seed=3). Unknown names list the valid ones."""
    if reducer is None or not isinstance(reducer, str):
        return reducer
    if reducer not in REDUCERS:
        raise ReducerError(f"unknown reducer {reducer!r}; valid reducers: {', '.join(sorted(REDUCERS))}")
    return REDUCERS[reducer](**args)


__all__ = [
    "REDUCERS",
    "ImageSpan",
    "KeptTokens",
    "ReducerError",
    "ReductionContext",
    "ReplacedSpan",
    "Selection",
    "VisualTokenReducer",
    "check_family",
    "check_selection",
    "get_reducer",
    "reported_indices",
    "selection_embeds",
    "selection_indices",
]
