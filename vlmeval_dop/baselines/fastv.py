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


class AttentionRankPruner:
    """Drop visual tokens by the last token's attention, after one or more layers.

    Args:
        schedule: {layer after which to prune: visual tokens kept per sample from the next layer on}.
    Scores come from the last token's attention in that layer, averaged over heads.
    """

    name = "attention_rank"

    def __init__(self, schedule: dict[int, int]):
        if not schedule or any(layer < 0 or keep < 0 for layer, keep in schedule.items()):
            raise ValueError(f"schedule must map layers >= 0 to kept token counts >= 0, got {schedule}")
        self.schedule = dict(sorted(schedule.items()))
        self.layers = tuple(self.schedule)

    def scores(self, ctx: DecoderPruneContext) -> torch.Tensor:
        """(B, N) attention of the last token in layer `ctx.layer_idx`, averaged over heads."""
        last = torch.tensor([ctx.hidden_in.shape[1] - 1], device=ctx.hidden_in.device)
        return query_attention(ctx, last)[:, 0]

    def select(self, ctx: DecoderPruneContext) -> torch.Tensor:
        keep = self.schedule[ctx.layer_idx]
        candidates = ctx.visual & ctx.alive
        score = self.scores(ctx).masked_fill(~candidates, float("-inf"))
        drop = candidates.clone()
        for b, n in enumerate(candidates.sum(1).tolist()):  # per sample: keep the top `keep` candidates
            drop[b, torch.topk(score[b], min(keep, n)).indices] = False
        return drop


class FastV(AttentionRankPruner):
    """FastV for `apply_dop(..., token_pruner=FastV(k=2, keep=288))`.

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
        super().__init__({k - 1: keep})

    @staticmethod
    def layer_tokens(num_layers: int, n_visual: int, text_tokens: int, k: int = 2, keep: int = 288) -> list[tuple[int, int]]:
        """Per-layer (n_A, n_P) for the analytic TFLOPs (used to match baselines to a budget)."""
        return fastv_layer_tokens(num_layers, k, n_visual, keep, text_tokens)


def fastv_selection_flops(spec, n_tokens: int) -> float:
    """FLOPs of recomputing the last token's attention row over `n_tokens` keys (our selection overhead).

    K projection of the tokens in the layer, Q projection of the last one, one score row per head. The
    official code reads these scores from eager attention instead, at the price of eager everywhere.
    """
    return 2.0 * n_tokens * spec.hidden_size * spec.kv_dim + 2.0 * spec.hidden_size * spec.q_dim + 2.0 * n_tokens * spec.q_dim


def fastv_layer_tokens(num_layers: int, k: int, n_visual: int, keep: int, text_tokens: int) -> list[tuple[int, int]]:
    """Per-layer (n_A, n_P) of FastV for the analytic FLOPs model (`flops.schedule_flops`)."""
    kept = min(keep, n_visual)
    return [(text_tokens + (n_visual if i < k else kept),) * 2 for i in range(num_layers)]
