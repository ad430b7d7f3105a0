"""DART (Wen et al., EMNLP 2025, "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More"; official code github.com/ZichenWen1/DART), decoder-side.

At the input of decoder layer K (official default K=2, `--pruned_layer 2`), i.e. after layer K-1, DART
picks pivot tokens and keeps the visual tokens that duplicate them least (official
`get_retained_image_token`):

1. pivots: the `pivot_image` visual tokens and the `pivot_text` tokens after the image with the largest L1
   norm of their layer-(K-1) key states (post-RoPE, all heads concatenated); official defaults 4 and 4.
2. similarity space: layer K-1's output passed through the decoder's final norm; cosine similarity.
3. the pivots are visited in the iteration order of the Python set of their sequence indices
   (`for item in list(indices_set)`: deterministic in CPython for ints, so reproduced here exactly by
   building the same set from the same indices in the same order); each pivot adds the
   `keep // (pivot_image + pivot_text)` not yet chosen visual tokens least similar to it (official
   `TOKEN_TOPK = ceil(max_num_trunction // 8)`). The image pivots are kept, the text pivots only steer.

So `keep` is the official knob `max_num_trunction` (the evaluation scripts' second argument), not the kept
count: "128" keeps 4 + 8 x 16 = 132 visual tokens (`dart_retained`). The official LLaVA-NeXT path caps it at
`n_visual - pivot_image` first (`retain_token_num_for_llava_next`); that cap is applied everywhere (on
LLaVA-1.5 it changes nothing wherever the official code runs: beyond it the official topk fails).
The kept tokens stay in sequence order at their original RoPE positions (official `keep_indexs.sort()`,
`position_ids = keep_indexs`): no renumbering. Only `keep` (and, below the budgets K=2 can reach, `k`) is
solved for the TFLOPs labels (eval_configs/baselines.yaml).

Matched against `get_retained_image_token` run out of tree on golden inputs (tests/golden/dart/README.md says
which copy of the official code; a 16-layer LLaMA decoder under a LLaVA-1.5-shaped sequence, 3 seeds x 5
settings of K and max_num_trunction): kept sets, positions and logits identical.

Beyond the official code (which runs batch size 1 at fixed offsets and fails where noted):
- per sample in a batch: text pivots are the real non-visual tokens after the sample's first visual token,
  pivot indices are counted in the sample's own sequence without padding (the official coordinates);
  padding and tokens dropped earlier are never chosen;
- fewer tokens after the image than `pivot_text` (official: topk error) uses the ones there are, with the
  same per-pivot quota.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..executor.families import adapter_for
from ..executor.token_pruner import DecoderPruneContext
from .attention import project_keys, rope_function
from ..methods import register_method


def dart_quota(keep: int, n_visual: int, pivot_image: int = 4, pivot_text: int = 4) -> int:
    """Visual tokens each pivot adds: official `TOKEN_TOPK`, `min(keep, n_visual - pivot_image) // (pivots)`."""
    if pivot_image + pivot_text == 0:
        return 0
    return max(0, min(keep, n_visual - min(pivot_image, n_visual))) // (pivot_image + pivot_text)


def dart_retained(keep: int, n_visual: int, pivot_image: int = 4, pivot_text: int = 4) -> int:
    """Visual tokens DART keeps (with at least `pivot_text` tokens after the image): the image pivots plus
    one quota per pivot, e.g. 4 + 8 x (128 // 8) = 132 for `keep=128`."""
    p_img = min(pivot_image, n_visual)
    return min(n_visual, p_img + (pivot_image + pivot_text) * dart_quota(keep, n_visual, pivot_image, pivot_text))


def dart_select(
    key_norms_image: torch.Tensor,
    key_norms_text: torch.Tensor,
    feats_image: torch.Tensor,
    feats_text: torch.Tensor,
    keep: int,
    pivot_image: int = 4,
    pivot_text: int = 4,
    image_positions: Sequence[int] | None = None,
    text_positions: Sequence[int] | None = None,
) -> torch.Tensor:
    """DART's selection for one sample; returns the sorted kept indices into the visual tokens.

    Args:
        key_norms_image / key_norms_text: (V,) / (T,) pivot scores (L1 norms of the key states).
        feats_image / feats_text: (V, H) / (T, H) vectors of the similarity space (final-normed states).
        keep: the official `max_num_trunction`; each pivot adds `dart_quota(keep, V, ...)` tokens.
        pivot_image / pivot_text: pivot counts (official defaults 4 and 4).
        image_positions / text_positions: the tokens' indices in the sample's sequence (default: the image
            at 0..V-1, the text right after). They only set the order in which the pivots are visited, which
            follows the official Python set of these indices.
    """
    V, T = key_norms_image.shape[0], key_norms_text.shape[0]
    img_pos = list(range(V)) if image_positions is None else [int(p) for p in image_positions]
    txt_pos = list(range(V, V + T)) if text_positions is None else [int(p) for p in text_positions]
    if len(img_pos) != V or len(txt_pos) != T:
        raise ValueError(f"dart_select: {len(img_pos)} image / {len(txt_pos)} text positions for {V} / {T} tokens")
    quota = dart_quota(keep, V, pivot_image, pivot_text)
    # topk order (largest first) is the official insertion order of the pivot set
    img_piv = torch.topk(key_norms_image, min(pivot_image, V)).indices.tolist()
    txt_piv = torch.topk(key_norms_text, min(pivot_text, T)).indices.tolist()
    vector = {img_pos[i]: feats_image[i] for i in img_piv} | {txt_pos[j]: feats_text[j] for j in txt_piv}
    local = {p: i for i, p in enumerate(img_pos)}
    kept = torch.zeros(V, dtype=torch.bool, device=feats_image.device)
    kept[img_piv] = True
    pivots = set([img_pos[i] for i in img_piv] + [txt_pos[j] for j in txt_piv])
    candidates = set(img_pos)  # built like the official `set(range(start, start + length))`
    candidates.difference_update(img_pos[i] for i in img_piv)
    for item in list(pivots):
        if quota == 0 or not candidates:
            break
        order = list(candidates)  # the official candidate order (it only matters for exact ties)
        rows = torch.tensor([local[p] for p in order], device=feats_image.device)
        dissim = -F.cosine_similarity(vector[item], feats_image[rows], dim=-1)
        chosen = [order[i] for i in dissim.topk(min(quota, len(order))).indices.tolist()]
        candidates.difference_update(chosen)
        kept[[local[p] for p in chosen]] = True
    return torch.nonzero(kept).flatten()


def _keys(ctx: DecoderPruneContext, b: int, positions: torch.Tensor) -> torch.Tensor:
    """(S, kv_heads * head_dim) post-RoPE key states of layer `ctx.layer_idx` at `positions` of sample b."""
    layer, attn = ctx.layer, ctx.layer.self_attn
    x = layer.input_layernorm(ctx.hidden_in[b : b + 1, positions])
    k = project_keys(attn, x)
    cos, sin = ctx.position_embeddings
    cos, sin = cos[min(b, cos.shape[0] - 1)][None, positions], sin[min(b, sin.shape[0] - 1)][None, positions]
    _, k = rope_function(attn)(k, k, cos, sin)
    return k.transpose(1, 2).reshape(positions.numel(), -1)


def _dart_cost(spec, args: dict, counts, n_visual: int, text_tokens: int) -> float:
    """Selection FLOPs of one sample (registration's cost model): `dart_selection_flops`."""
    return dart_selection_flops(spec, n_visual, text_tokens)


@register_method("dart", kind="decoder", budget_knob="keep", knob_range=(0, "n_visual"), selection_cost=_dart_cost)
class DART:
    """DART for `apply_dop(model, DOPPolicy.full(L), token_pruner=DART(k=2, keep=128))`.

    Args:
        k: first layer (0-based) without the dropped tokens; pivots and similarities come from layer k-1
            (official default 2).
        keep: the official `max_num_trunction` (default 128, which keeps 132 of 576; `dart_retained`).
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
        if pivot_image + pivot_text == 0:
            raise ValueError("DART needs at least one pivot (pivot_image + pivot_text >= 1)")
        self.k, self.keep, self.pivot_image, self.pivot_text = k, keep, pivot_image, pivot_text
        self.layers = (k - 1,)

    def select(self, ctx: DecoderPruneContext) -> torch.Tensor:
        """Drop mask after layer k-1: every live visual token outside DART's kept set."""
        lm = adapter_for(ctx.model).language_model(ctx.model)
        feats = lm.norm(ctx.hidden_out)  # the official similarity space: final norm of layer k-1's output
        usable = ctx.alive & ctx.pad_valid
        index = torch.cumsum(usable.long(), dim=1) - 1  # a token's index in its sample's own sequence
        drop = torch.zeros_like(ctx.visual)
        for b in range(ctx.visual.shape[0]):
            vis = torch.nonzero(ctx.visual[b] & usable[b]).flatten()
            if vis.numel() == 0:
                continue
            after = torch.arange(ctx.visual.shape[1], device=vis.device) > vis[0]
            txt = torch.nonzero(~ctx.visual[b] & usable[b] & after).flatten()
            keys = _keys(ctx, b, torch.cat([vis, txt]))
            norms = torch.norm(keys, p=1, dim=-1)  # the official pivot score
            kept = dart_select(
                norms[: vis.numel()], norms[vis.numel() :], feats[b, vis], feats[b, txt], self.keep,
                self.pivot_image, self.pivot_text, index[b, vis].tolist(), index[b, txt].tolist(),
            )  # fmt: skip
            drop[b, vis] = True
            drop[b, vis[kept]] = False
        return drop

    @staticmethod
    def layer_tokens(
        num_layers: int, n_visual: int, text_tokens: int, k: int = 2, keep: int = 128, pivot_image: int = 4, pivot_text: int = 4
    ) -> list[tuple[int, int]]:
        """Per-layer (n_A, n_P) for the analytic TFLOPs (used to match baselines to a budget)."""
        return dart_layer_tokens(num_layers, k, n_visual, keep, text_tokens, pivot_image, pivot_text)


def dart_layer_tokens(
    num_layers: int, k: int, n_visual: int, keep: int, text_tokens: int, pivot_image: int = 4, pivot_text: int = 4
) -> list[tuple[int, int]]:
    """Per-layer (n_A, n_P) of DART for the analytic FLOPs model (`flops.schedule_flops`)."""
    kept = dart_retained(keep, n_visual, pivot_image, pivot_text)
    return [(text_tokens + (n_visual if i < k else kept),) * 2 for i in range(num_layers)]


def dart_selection_flops(spec, n_visual: int, n_text_after: int) -> float:
    """Matmul FLOPs of our DART selection for one sample (what FlopCounterMode sees in layer k-1).

    The key projection of the visual and instruction tokens (the official code reuses the layer's key states,
    returned by a hacked attention module). The cosine similarities (about 3 x pivots x n_visual x hidden,
    elementwise, under 0.5 % of the projection at LLaVA shapes) and norms are not counted.
    """
    return 2.0 * (n_visual + n_text_after) * spec.hidden_size * spec.kv_dim
