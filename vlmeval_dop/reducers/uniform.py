"""Spatially uniform subsampling: the simplest reducer, used by tests and as a sanity baseline.

Keeps `n_keep` tokens evenly spaced over each image's placeholder sequence (row-major patch order, so
for a single square grid this spreads the kept tokens over rows and columns alike). Deterministic and
content-independent; not a method from the paper.
"""
from __future__ import annotations

import torch

from .base import ReductionContext
from ..methods import register_method


@register_method("uniform", kind="vision")
class UniformReducer:
    """Keep `n_keep` evenly spaced visual tokens per image."""

    name = "uniform"
    families = None  # every family

    def select(self, ctx: ReductionContext, n_keep: int) -> list[torch.Tensor]:
        return [uniform_indices(span.num_tokens, n_keep) for span in ctx.images]


def uniform_indices(num_tokens: int, n_keep: int) -> torch.Tensor:
    """`min(n_keep, num_tokens)` sorted unique indices spread evenly over `range(num_tokens)`."""
    n_keep = min(n_keep, num_tokens)
    if n_keep <= 0:
        return torch.empty(0, dtype=torch.long)
    # centre of each of n_keep equal bins: strictly increasing, so unique without post-processing
    return ((torch.arange(n_keep, dtype=torch.float64) + 0.5) * num_tokens / n_keep).floor().long()
