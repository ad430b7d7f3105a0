"""Visual token reducers behind one registry: name -> factory.

Adding a reducer: one module implementing `VisualTokenReducer` plus one line in `REDUCERS`.
"""
from __future__ import annotations

from collections.abc import Callable

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
from .cdpruner import CDPruner
from .divprune import DivPrune
from .uniform import UniformReducer
from .vispruner import VisPruner
from .visionzip import VisionZip
from .prumerge import PruMergePlus
from .trim import TRIM

REDUCERS: dict[str, Callable[[], VisualTokenReducer]] = {
    "uniform": UniformReducer,
    "divprune": DivPrune,
    "cdpruner": CDPruner,
    "vispruner": VisPruner,
    "visionzip": VisionZip,
    "prumergeplus": PruMergePlus,
    "trim": TRIM,
}


def get_reducer(reducer: str | VisualTokenReducer | None) -> VisualTokenReducer | None:
    """Resolve a reducer name (or pass an instance through); unknown names list the valid ones."""
    if reducer is None or not isinstance(reducer, str):
        return reducer
    if reducer not in REDUCERS:
        raise ReducerError(f"unknown reducer {reducer!r}; valid reducers: {', '.join(sorted(REDUCERS))}")
    return REDUCERS[reducer]()


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
