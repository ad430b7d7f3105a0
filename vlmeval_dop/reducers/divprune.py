"""DivPrune (Alvar et al., CVPR 2025, "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models"): keep the visual tokens that solve the max-min diversity problem greedily.

On the LLM-input visual features (after the projector, as in the LLaVA implementation) with cosine
distance d(i, j) = 1 - cos(f_i, f_j): the first token is the one farthest from its nearest neighbour,
then repeatedly the token whose distance to the nearest already-selected token is largest. The kept
tokens are returned in their original (spatial) order. Content-only, so it applies to every family;
on LLaVA-NeXT the span includes llava-hf's row newline placeholders, which share one learned embedding
(distance 0 to each other), so at most one of them is ever kept.
"""
from __future__ import annotations

import torch

from .base import ReducerError, ReductionContext


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """(N, N) matrix 1 - cos(f_i, f_j) in float32."""
    f = torch.nn.functional.normalize(features.float(), dim=-1)
    return 1.0 - f @ f.T


def divprune_select(features: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Greedy max-min diverse subset of `n_keep` rows of `features` (N, D); sorted indices.

    Ties go to the lowest index (torch.argmax returns the first maximum).
    """
    N = features.shape[0]
    if not 0 <= n_keep <= N:
        raise ReducerError(f"DivPrune cannot keep {n_keep} of {N} tokens; valid: 0..{N}")
    if n_keep == 0:
        return torch.empty(0, dtype=torch.long, device=features.device)
    dist = cosine_distances(features)
    if N == 1:
        return torch.zeros(1, dtype=torch.long, device=features.device)
    # nearest-neighbour distance of every token (the diagonal 0 is its own distance, skip it)
    nearest = dist.masked_fill(torch.eye(N, dtype=torch.bool, device=dist.device), float("inf")).min(0).values
    chosen = [int(torch.argmax(nearest))]
    to_selected = dist[chosen[0]].clone()  # distance of every token to its nearest selected token
    for _ in range(1, n_keep):
        to_selected[chosen] = -1.0  # never pick a selected token again (distances are >= 0 up to rounding)
        nxt = int(torch.argmax(to_selected))
        chosen.append(nxt)
        to_selected = torch.minimum(to_selected, dist[nxt])
    return torch.tensor(sorted(chosen), dtype=torch.long, device=features.device)


class DivPrune:
    """Reducer: greedy max-min diversity over each image's decoder-input visual features."""

    name = "divprune"
    families = None  # content-only: every family

    def select(self, ctx: ReductionContext, n_keep: int) -> list[torch.Tensor]:
        return [divprune_select(ctx.image_embeds(span), min(n_keep, span.num_tokens)).cpu() for span in ctx.images]
