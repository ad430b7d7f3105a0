"""DART (Wen et al., 2025, "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More"; official code github.com/ZichenWen1/DART), decoder-side.

After decoder layer K-1 (so from layer K on; official default K=2, `--pruned_layer 2`), DART picks a few
pivot tokens and keeps the visual tokens that duplicate them least:

1. pivots: the `pivot_image` visual tokens and the `pivot_text` instruction tokens (tokens after the
   image) with the largest L1 norm of their layer-(K-1) key states (post-RoPE, all heads concatenated);
   official defaults `pivot_image_token=4`, `pivot_text_token=4`.
2. similarity space: the layer-(K-1) output passed through the decoder's final norm; cosine similarity.
3. for each pivot in turn, the not yet chosen visual tokens least similar to it join the kept set; the
   image pivots are kept, the text pivots only steer the selection.

Deviations from the official code (all because this executor must keep exactly `keep` tokens and run
batches):
- The official per-pivot quota is `max_num_trunction // (pivots)` (default 128 // 8 = 16), so it keeps
  4 + 8 x 16 = 132 tokens for "128". Here `keep - image pivots` is split over the pivots as evenly as
  possible (the first pivots in sequence order take the remainder), so exactly `keep` visual tokens survive.
- The official loop visits the pivots in Python-set order (hash order); here in sequence order, image pivots
  first. Fewer text tokens than `pivot_text` (or `keep` below `pivot_image`) uses what there is.
- Per sample in a batch (the official code reads sample 0 at fixed offsets); text pivots are the real
  non-visual tokens after the sample's first visual token; padding and dropped tokens are never chosen.
- Dropped tokens keep their original RoPE positions (the official LLaVA code does the same:
  `position_ids = keep_indexs`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..executor.families import adapter_for
from ..executor.token_pruner import DecoderPruneContext


def dart_select(
    key_norms_image: torch.Tensor,
    key_norms_text: torch.Tensor,
    feats_image: torch.Tensor,
    feats_text: torch.Tensor,
    keep: int,
    pivot_image: int = 4,
    pivot_text: int = 4,
) -> torch.Tensor:
    """DART's selection for one sample; returns the sorted kept indices into the visual tokens.

    Args:
        key_norms_image / key_norms_text: (V,) / (T,) pivot scores (L1 norms of the key states).
        feats_image / feats_text: (V, H) / (T, H) vectors of the similarity space (final-normed states).
        keep: visual tokens to keep (clamped to V).
        pivot_image / pivot_text: pivot counts (official defaults 4 and 4).
    """
    V, T = key_norms_image.shape[0], key_norms_text.shape[0]
    keep = min(keep, V)
    if keep == V:
        return torch.arange(V, device=feats_image.device)
    p_img = min(pivot_image, keep)
    p_txt = min(pivot_text, T)
    img_piv = torch.topk(key_norms_image, p_img).indices.sort().values
    txt_piv = torch.topk(key_norms_text, p_txt).indices.sort().values
    pivots = torch.cat([feats_image[img_piv], feats_text[txt_piv]])
    kept = torch.zeros(V, dtype=torch.bool, device=feats_image.device)
    kept[img_piv] = True
    rest, P = keep - p_img, p_img + p_txt
    if rest == 0 or P == 0:
        return torch.nonzero(kept).flatten()
    # one (P, V) cosine matrix (a matmul of unit vectors) instead of one similarity call per pivot
    sim = F.normalize(pivots.float(), dim=-1) @ F.normalize(feats_image.float(), dim=-1).T
    for j in range(P):
        quota = rest // P + (1 if j < rest % P else 0)
        if quota == 0:
            continue
        score = sim[j].masked_fill(kept, float("inf"))  # chosen tokens cannot be picked again
        kept[torch.topk(-score, quota).indices] = True
    return torch.nonzero(kept).flatten()


def _keys(ctx: DecoderPruneContext, b: int, positions: torch.Tensor) -> torch.Tensor:
    """(S, kv_heads * head_dim) post-RoPE key states of layer `ctx.layer_idx` at `positions` of sample b."""
    layer, attn = ctx.layer, ctx.layer.self_attn
    x = layer.input_layernorm(ctx.hidden_in[b : b + 1, positions])
    k = attn.k_proj(x).view(1, positions.numel(), -1, attn.head_dim).transpose(1, 2)
    cos, sin = ctx.position_embeddings
    cos, sin = cos[min(b, cos.shape[0] - 1)][None, positions], sin[min(b, sin.shape[0] - 1)][None, positions]
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k.transpose(1, 2).reshape(positions.numel(), -1)


class DART:
    """DART for `apply_dop(model, DOPPolicy.full(L), token_pruner=DART(k=2, keep=128))`.

    Args:
        k: first layer (0-based) without the dropped tokens; pivots and similarities come from layer k-1
            (official default 2).
        keep: visual tokens kept per sample from layer k on (official default budget: 128 of 576).
        pivot_image / pivot_text: pivot counts (official defaults 4 / 4).
    """

    name = "dart"

    def __init__(self, k: int = 2, keep: int = 128, pivot_image: int = 4, pivot_text: int = 4):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"DART needs an integer k >= 1 (pivots come from layer k-1), got k={k!r}")
        if not isinstance(keep, int) or keep < 0:
            raise ValueError(f"DART keep must be an integer >= 0, got {keep!r}")
        for label, v in (("pivot_image", pivot_image), ("pivot_text", pivot_text)):
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"DART {label} must be an integer >= 0, got {v!r}")
        if pivot_image + pivot_text == 0 and keep > 0:
            raise ValueError("DART needs at least one pivot (pivot_image + pivot_text >= 1) to keep tokens")
        self.k, self.keep, self.pivot_image, self.pivot_text = k, keep, pivot_image, pivot_text
        self.layers = (k - 1,)

    def select(self, ctx: DecoderPruneContext) -> torch.Tensor:
        """Drop mask after layer k-1: every live visual token outside DART's kept set."""
        lm = adapter_for(ctx.model).language_model(ctx.model)
        feats = lm.norm(ctx.hidden_out)  # the official similarity space: final norm of layer k-1's output
        usable = ctx.alive & ctx.pad_valid
        drop = torch.zeros_like(ctx.visual)
        for b in range(ctx.visual.shape[0]):
            vis = torch.nonzero(ctx.visual[b] & usable[b]).flatten()
            if vis.numel() <= self.keep:
                continue
            after = torch.arange(ctx.visual.shape[1], device=vis.device) > vis[0]
            txt = torch.nonzero(~ctx.visual[b] & usable[b] & after).flatten()
            keys = _keys(ctx, b, torch.cat([vis, txt]))
            norms = keys.float().abs().sum(-1)  # L1 norm, the official pivot score
            kept = dart_select(norms[: vis.numel()], norms[vis.numel() :], feats[b, vis], feats[b, txt],
                               self.keep, self.pivot_image, self.pivot_text)  # fmt: skip
            drop[b, vis] = True
            drop[b, vis[kept]] = False
        return drop

    @staticmethod
    def layer_tokens(
        num_layers: int, n_visual: int, text_tokens: int, k: int = 2, keep: int = 128, pivot_image: int = 4, pivot_text: int = 4
    ) -> list[tuple[int, int]]:
        """Per-layer (n_A, n_P) for the analytic TFLOPs (used to match baselines to a budget; pivots do not change it)."""
        return dart_layer_tokens(num_layers, k, n_visual, keep, text_tokens)


def dart_layer_tokens(num_layers: int, k: int, n_visual: int, keep: int, text_tokens: int) -> list[tuple[int, int]]:
    """Per-layer (n_A, n_P) of DART for the analytic FLOPs model (`flops.schedule_flops`)."""
    kept = min(keep, n_visual)
    return [(text_tokens + (n_visual if i < k else kept),) * 2 for i in range(num_layers)]


def dart_selection_flops(spec, n_visual: int, n_text_after: int, keep: int, pivot_image: int = 4, pivot_text: int = 4) -> float:
    """FLOPs of our DART selection for one sample (what FlopCounterMode sees in layer k-1).

    Key projection of the visual and instruction tokens, plus the (pivots x visual) cosine matmul. The
    official code reuses the layer's key states instead (a hacked attention module returns them).
    """
    if n_visual <= keep:
        return 0.0
    p = min(pivot_image, keep) + min(pivot_text, n_text_after)
    sim = 2.0 * p * n_visual * spec.hidden_size if keep > min(pivot_image, keep) and p else 0.0
    return 2.0 * (n_visual + n_text_after) * spec.hidden_size * spec.kv_dim + sim
