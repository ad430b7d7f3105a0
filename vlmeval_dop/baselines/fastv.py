"""FastV (Chen et al., ECCV 2024, "An Image is Worth 1/2 Tokens After Layer 2"; official code
github.com/pkunlp-icler/FastV), decoder-side.

At the input of decoder layer K (official default K=2), i.e. after layer K-1, keep only the `keep` visual
tokens (official `fast_v_attention_rank`) that receive the most attention from the last token in layer K-1
(averaged over heads); the others leave every later layer. The kept tokens stay in sequence order at their
original RoPE positions (official `keep_indexs.sort()`, `position_ids = keep_indexs`). Only `keep` (and `k`)
is solved for the TFLOPs labels (eval_configs/baselines.yaml).

When the ranking happens during generation:
- default: once, at prefill; decoding then attends to the kept tokens through the KV cache. This is the
  official KV-cache implementation (`src/FastV/lmms-eval/fastv_kvcache.py`, README "Support KV Cache") and what
  the later papers the DOP paper takes its FastV numbers from ran.
- `per_step=True`: the official evaluation scripts' setting (`inference_aokvqa.py` / `inference_ocrvqa.py` call
  `generate(use_cache=False)` on the inplace `LlamaModel.forward`): every new token reruns the whole sequence
  and the newest token re-ranks the image tokens. Generation must then run without a KV cache: the VLMEvalKit
  wrapper passes `use_cache=False` for such a pruner; with `apply_dop` directly call
  `model.generate(..., use_cache=False)` (with a cache the ranking happens at prefill only). Per-step FLOPs
  are those of a full prefill per new token; the TFLOPs labels count the prefill only.

The official scripts pass `--fast-v-sys-length 36` although the LLaVA-1.5 image starts at index 35, so their
ranked window is shifted by one token (the first image token always stays, the first text token may be
dropped); `fastv_kvcache.py` uses 35:611. Ours ranks exactly the image placeholders (the 35:611 window).

Matched against the official inplace `LlamaModel.forward` (tests/golden/fastv/README.md: a 16-layer LLaMA
decoder under a LLaVA-1.5-shaped sequence, K=2, 3 seeds x keep 288 / 144 / 64): kept sets, positions and logits
identical; with `per_step=True` the greedy tokens and every step's kept set identical too. In float16 as well
(the official code on the float16 model, eager attention: 9 / 9 kept sets and positions, same logits): scores
follow the model dtype (`attention.query_attention`) and the topk runs on the visual candidates' scores alone in
that dtype, as the official `topk` on the image window, so exact float16 ties at the cut break the same way.
"""
from __future__ import annotations

import torch

from ..executor.token_pruner import DecoderPruneContext
from ..methods import register_method
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
        # in the model's dtype (exact: low-precision rows are values of that dtype), as the official topk runs
        score = self.scores(ctx).to(ctx.hidden_in.dtype)
        drop = candidates.clone()
        for b in range(drop.shape[0]):  # per sample: keep the top `keep` candidates
            idx = torch.nonzero(candidates[b]).flatten()
            # topk over the candidates' scores alone, in sequence order: the official `image_attention.topk(rank)`
            # on the image window, so exact ties (common in float16) break as there (torch.topk's order of ties
            # depends on the length and dtype of its input)
            drop[b, idx[torch.topk(score[b, idx], min(keep, idx.numel())).indices]] = False
        return drop


def _fastv_cost(spec, args: dict, counts, n_visual: int, text_tokens: int) -> float:
    """Selection FLOPs of one sample: the last token's attention row in layer k-1 (registration's cost model)."""
    return fastv_selection_flops(spec, counts[args.get("k", 2) - 1][0])


@register_method("fastv", kind="decoder", budget_knob="keep", knob_range=(0, "n_visual"), selection_cost=_fastv_cost)
class FastV(AttentionRankPruner):
    """FastV for `apply_dop(..., token_pruner=FastV(k=2, keep=288))`.

    Args:
        k: first layer (0-based) that runs without the dropped tokens; scores come from layer k-1.
        keep: visual tokens kept per sample from layer k on (official `fast_v_attention_rank`; at most the
            visual tokens present).
        per_step: re-rank at every generated token, as the official evaluation (`generate(use_cache=False)`);
            needs generation without a KV cache (see the module docstring). Default: rank once at prefill.
    """

    official_attention = "eager"  # the official fork of transformers 4.31 has eager attention only

    name = "fastv"

    def __init__(self, k: int = 2, keep: int = 288, per_step: bool = False):
        if k < 1:
            raise ValueError(f"FastV needs k >= 1 (scores come from layer k-1), got k={k}")
        if keep < 0:
            raise ValueError(f"FastV keep must be >= 0, got {keep}")
        if not isinstance(per_step, bool):
            raise ValueError(f"FastV per_step must be true or false, got {per_step!r}")
        self.k, self.keep, self.per_step = k, keep, per_step
        super().__init__({k - 1: keep})

    @staticmethod
    def layer_tokens(
        num_layers: int, n_visual: int, text_tokens: int, k: int = 2, keep: int = 288, per_step: bool = False
    ) -> list[tuple[int, int]]:
        """Per-layer (n_A, n_P) of the prefill for the analytic TFLOPs (the same with `per_step`)."""
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
