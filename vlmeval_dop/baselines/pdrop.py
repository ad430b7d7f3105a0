"""PyramidDrop (Xing et al., 2024, "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction"), decoder-side.

The decoder is split into stages; at the end of each stage but the last, the visual tokens are ranked
by the attention they receive from the last instruction token in that layer and a fraction `ratio`
(lambda, official default 0.5) of them is kept, so the visual token count shrinks geometrically from
stage to stage (LLaVA-1.5 default: 4 stages of 8 layers, 576 -> 288 -> 144 -> 72). Dropped tokens keep
their original positions. Built on `AttentionRankPruner` (the same scoring as FastV, per boundary).
"""
from __future__ import annotations

import math

from .fastv import AttentionRankPruner


def pdrop_schedule(boundaries: list[int], n_visual: int, ratio: float) -> dict[int, int]:
    """{layer after which to drop: visual tokens kept}: each stage keeps ceil(ratio x previous)."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"PDrop ratio (lambda) must be in (0, 1), got {ratio}")
    out, n = {}, n_visual
    for layer in sorted(boundaries):
        n = math.ceil(ratio * n)
        out[layer - 1] = n
    return out


class PDrop(AttentionRankPruner):
    """PyramidDrop for `apply_dop(..., token_pruner=PDrop(boundaries=[8, 16, 24], n_visual=576))`.

    Args:
        boundaries: first layer of each new stage (0-based); tokens are dropped after the layer before.
        n_visual: visual tokens entering the decoder (sets the pyramid's kept counts).
        ratio: lambda, the fraction kept at each boundary.
    """

    name = "pdrop"

    def __init__(self, boundaries: list[int] = (8, 16, 24), n_visual: int = 576, ratio: float = 0.5):
        if any(b < 1 for b in boundaries):
            raise ValueError(f"PDrop stage boundaries must be >= 1, got {list(boundaries)}")
        self.boundaries, self.n_visual, self.ratio = list(boundaries), n_visual, ratio
        super().__init__(pdrop_schedule(self.boundaries, n_visual, ratio))

    @staticmethod
    def layer_tokens(
        num_layers: int, n_visual: int, text_tokens: int, boundaries: list[int] = (8, 16, 24), ratio: float = 0.5
    ) -> list[tuple[int, int]]:
        """Per-layer (n_A, n_P) for the analytic TFLOPs (used to match baselines to a budget)."""
        return pdrop_layer_tokens(num_layers, list(boundaries), n_visual, ratio, text_tokens)


def pdrop_layer_tokens(num_layers: int, boundaries: list[int], n_visual: int, ratio: float, text_tokens: int):
    """Per-layer (n_A, n_P) of PDrop for the analytic FLOPs model."""
    kept = {layer + 1: n for layer, n in pdrop_schedule(boundaries, n_visual, ratio).items()}
    n, out = n_visual, []
    for i in range(num_layers):
        n = kept.get(i, n)
        out.append((text_tokens + n,) * 2)
    return out
