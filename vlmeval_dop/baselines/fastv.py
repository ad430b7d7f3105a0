"""FastV (Chen et al., ECCV 2024, "An Image is Worth 1/2 Tokens After Layer 2"), decoder-side.

After decoder layer K-1 (so from layer K on), keep only the `keep` visual tokens that receive the most
attention from the last prompt token in layer K-1 (averaged over heads); the others leave every later
layer. Dropped tokens keep their original RoPE positions, as in the official implementation, which
rebuilds the sequence at layer K with the kept tokens' position ids. The official default is K=2,
R=50 % (keep = N_v / 2); the paper's budgets set K and `keep` to match TFLOPs (eval_configs).
"""
from __future__ import annotations

import torch

from ..executor.token_pruner import DecoderPruneContext
from .attention import query_attention


class FastV:
    """Decoder-side FastV pruner for `apply_dop(..., token_pruner=FastV(k=2, keep=288))`.

    Args:
        k: first layer (0-based) that runs without the dropped tokens; scores come from layer k-1.
        keep: visual tokens kept per sample from layer k on (at most the visual tokens present).
    """

    name = "fastv"

    def __init__(self, k: int = 2, keep: int = 288):
        if k < 1:
            raise ValueError(f"FastV needs k >= 1 (scores come from layer k-1), got k={k}")
        if keep < 0:
            raise ValueError(f"FastV keep must be >= 0, got {keep}")
        self.k, self.keep = k, keep
        self.layers = (k - 1,)

    def scores(self, ctx: DecoderPruneContext) -> torch.Tensor:
        """(B, N) attention of the last token in layer k-1, averaged over heads."""
        last = torch.tensor([ctx.hidden_in.shape[1] - 1], device=ctx.hidden_in.device)
        return query_attention(ctx, last)[:, 0]

    def select(self, ctx: DecoderPruneContext) -> torch.Tensor:
        candidates = ctx.visual & ctx.alive
        score = self.scores(ctx).masked_fill(~candidates, float("-inf"))
        drop = candidates.clone()
        for b in range(score.shape[0]):  # per sample: keep the top `keep` candidates
            n = int(candidates[b].sum())
            top = torch.topk(score[b], min(self.keep, n)).indices
            drop[b, top] = False
        return drop


def fastv_selection_flops(spec, n_tokens: int) -> float:
    """FLOPs of recomputing the last token's attention row in layer k-1 (our selection overhead).

    K projection of all tokens, Q projection of the last one, one (1 x N) score row per head. The
    official code reads these scores from eager attention instead, at the price of eager everywhere.
    """
    return 2.0 * n_tokens * spec.hidden_size * spec.kv_dim + 2.0 * spec.hidden_size * spec.q_dim + 2.0 * n_tokens * spec.q_dim


def fastv_layer_tokens(num_layers: int, k: int, n_visual: int, keep: int, text_tokens: int) -> list[tuple[int, int]]:
    """Per-layer (n_A, n_P) of FastV for the analytic FLOPs model (`flops.schedule_flops`)."""
    kept = min(keep, n_visual)
    return [(text_tokens + (n_visual if i < k else kept),) * 2 for i in range(num_layers)]
