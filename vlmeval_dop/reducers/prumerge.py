"""PruMerge+ (Shang et al., 2024, "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large
Multimodal Models"; official code github.com/42Shawn/LLaVA-PruMerge,
`llava/model/multimodal_encoder/clip_encoder.py: token_prune_merge_advanced_plus`).

Official method, per crop:

1. Attention: the last CLIP layer (`layers[23]`, the layer *after* LLaVA's feature layer -2) recomputed
   from its `q_proj` / `k_proj` outputs as one single head over the full width:
   `softmax(q k^T * D^-0.5)` with D the vision hidden size; `a` = the [CLS] row over the patches.
2. Outliers (PruMerge): patches with `a > Q3 + 1.5 * IQR` (quartiles of `a`, numpy's linear
   percentile); they are the kept tokens, ranked by attention.
3. Spatial sampling (the "+"): an arithmetic sequence of patches (`arange(0, 575, int(int(1/ratio)/3))`,
   ratio = outlier fraction, about three samples per outlier) not already kept is added.
4. Merging: every kept token `i` takes its `k = 32` most similar *other* tokens (kept or pruned) by cosine
   similarity of the full-width keys and becomes `x_i + sum_j a_j x_j` (attention-weighted sum, not
   normalised: the official `/ torch.sum(weights)` is commented out), on the pre-projector features
   (`hidden_states[-2]` without [CLS]); the projector runs afterwards.

The official token count is adaptive (outliers + samples, about 32 * 4.5 = 144 on average for LLaVA-1.5).
Here the budget fixes it to exactly `n_keep`:

- the outliers, ranked by attention (ties to the lower index), fill the budget first (if there are more
  outliers than `n_keep`, the `n_keep` strongest);
- the remaining `n_keep - n_outliers` slots are spatially uniform samples among the non-outlier patches
  in raster order: `rest[j * R // n_fill]`, j = 0..n_fill-1 (R = non-outlier count). This keeps the
  official rule "outliers, then an arithmetic sequence that skips the outliers, starting at patch 0",
  with the stride chosen to hit the budget instead of `int(1/ratio)/3`. At the official operating point
  (`n_keep` = outliers + its sample count) this keeps all outliers and the same number of samples.

Other deviations, and why:
- The official appends one extra token, the attention-weighted sum of all pruned tokens, after the kept
  ones. It has no image position to sit at (every kept token here occupies a real placeholder), so it is
  dropped; `n_keep` tokens are the outliers + samples.
- `k = min(32, M - 1)` neighbours on crops with fewer than 33 tokens (the tiny test models).
- Float32 attention and merging (the official runs in the model's fp16).
- Kept tokens are placed at their own positions in raster order (the official keeps the outliers in
  attention order, then the samples); their embeddings are projector(merged feature).
- `n_keep` >= all tokens of the image returns the image unchanged (no pruning, so no merging): `n_v =
  all` is the unreduced model. With fewer tokens every kept token is merged, as official.
- LLaVA-NeXT (the official repo is LLaVA-1.5 only): per crop as VisionZip's LLaVA-NeXT code, the budget
  split evenly over the base and grid crops, each restricted to the patches that survive llava-hf's
  unpadding (neighbours too); newline tokens are dropped unless `n_keep` exceeds the vision-tower tokens
  (see `vlmeval_dop.reducers.visionzip`).
"""
from __future__ import annotations

import torch

from .base import KeptTokens, ReducerError, ReductionContext
from .vision import CLIP_FAMILIES, VisionCapture, encoder_layers, feature_layer_index
from .visionzip import CropTokens, Merged, merge_per_crop

#: official `torch.topk(cos_sim_matrix, k=int(32))`
NEIGHBOURS = 32
#: official IQR rule `Q3 + 1.5 * IQR`
IQR_FACTOR = 1.5

_ATTN_KEY = "prumerge_last_layer"


def iqr_outliers(attn: torch.Tensor) -> torch.Tensor:
    """Indices of the upper outliers `attn > Q3 + 1.5 (Q3 - Q1)`, ranked by attention (ties: lower index).

    Quartiles by linear interpolation, as numpy's default `np.percentile` of the official code.
    """
    a = attn.double()
    q1, q3 = torch.quantile(a, 0.25), torch.quantile(a, 0.75)
    out = torch.nonzero(a > q3 + IQR_FACTOR * (q3 - q1), as_tuple=False).flatten()
    return out[torch.sort(a[out], descending=True, stable=True).indices]


def prumerge_plus_choose(attn: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The kept tokens of PruMerge+ at a fixed budget: ranked outliers, then uniform fill (sorted)."""
    M = attn.numel()
    if not 0 <= n_keep <= M:
        raise ReducerError(f"PruMerge+ cannot keep {n_keep} of {M} tokens; valid: 0..{M}")
    outl = iqr_outliers(attn)[:n_keep]
    rest = torch.ones(M, dtype=torch.bool, device=attn.device)
    rest[outl] = False
    rest_idx = torch.nonzero(rest, as_tuple=False).flatten()
    n_fill = n_keep - outl.numel()
    fill = rest_idx[torch.arange(n_fill, device=attn.device) * rest_idx.numel() // max(n_fill, 1)]
    return torch.sort(torch.cat([outl, fill])).values


def prumerge_plus_select(
    attn: torch.Tensor, keys: torch.Tensor, features: torch.Tensor, n_keep: int, k: int = NEIGHBOURS
) -> Merged:
    """PruMerge+ on one crop.

    Args:
        attn: (M,) [CLS] attention to each patch (official single-head last-layer attention).
        keys: (M, d) keys of the patches (full width), for the cosine similarity.
        features: (M, D) pre-projector features.
        n_keep: tokens to keep (0..M).
        k: neighbours merged into each kept token (capped at M - 1).

    Returns:
        `Merged`: every kept token is `x_i + sum_{j in kNN(i)} attn_j x_j` (marked changed).
    """
    M = attn.numel()
    kept = prumerge_plus_choose(attn, n_keep)
    if kept.numel() == 0 or M < 2:
        return Merged(kept, features[kept], torch.zeros(kept.numel(), dtype=torch.bool, device=features.device))
    wide = torch.promote_types(features.dtype, torch.float32)  # at least float32 (official: model fp16)
    kn = torch.nn.functional.normalize(keys.to(wide), dim=-1)
    sim = kn[kept] @ kn.T  # (K, M)
    sim[torch.arange(kept.numel(), device=sim.device), kept] = float("-inf")  # not itself
    nb = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, : min(k, M - 1)]  # (K, k)
    f = features.to(wide)
    merged = f[kept] + (attn.to(wide)[nb].unsqueeze(-1) * f[nb]).sum(dim=1)
    return Merged(kept, merged.to(features.dtype), torch.ones(kept.numel(), dtype=torch.bool, device=features.device))


@torch.no_grad()
def last_layer_attention(model, cap: VisionCapture) -> tuple[torch.Tensor, torch.Tensor]:
    """Official PruMerge attention and keys for every crop: the encoder layer after the feature layer,
    single head over the full width, recomputed from the feature layer's output (its input).

    Returns (C, P) float32 [CLS] attention to the patches and (C, P, D) patch keys.
    """
    layers = encoder_layers(model)
    nxt = feature_layer_index(model) + 1
    if nxt >= len(layers):
        raise ReducerError("PruMerge+ reads the encoder layer after the feature layer; the feature layer is the last one")
    layer = layers[nxt]
    x = layer.layer_norm1(cap.features)
    q = layer.self_attn.q_proj(x[:, :1]).float()  # (C, 1, D)
    kk = layer.self_attn.k_proj(x).float()  # (C, 1+P, D)
    scores = (q @ kk.transpose(1, 2)) * cap.features.shape[-1] ** -0.5
    return torch.softmax(scores, dim=-1)[:, 0, 1:], kk[:, 1:]


class PruMergePlus:
    """Reducer: PruMerge+ (IQR outliers + uniform samples, kNN attention-weighted merging) per crop."""

    name = "prumergeplus"
    families = CLIP_FAMILIES
    needs_vision_capture = True

    def __init__(self, k: int = NEIGHBOURS) -> None:
        self.k = k

    def select(self, ctx: ReductionContext, n_keep: int) -> list[KeptTokens]:
        def per_crop(cap: VisionCapture, crop: CropTokens, n: int) -> Merged:
            if _ATTN_KEY not in ctx.cache or ctx.cache[_ATTN_KEY][0] is not cap:
                ctx.cache[_ATTN_KEY] = (cap, *last_layer_attention(ctx.model, cap))
            _, attn, keys = ctx.cache[_ATTN_KEY]
            p = crop.patches.to(cap.features.device)
            return prumerge_plus_select(attn[crop.row, p], keys[crop.row, p], cap.features[crop.row, 1:][p], n, self.k)

        return merge_per_crop(self, ctx, n_keep, per_crop, full_is_identity=True)
