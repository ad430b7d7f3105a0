"""PruMerge+ (Shang et al., 2024, "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large
Multimodal Models"; official code github.com/42Shawn/LLaVA-PruMerge @ 097c041,
`llava/model/multimodal_encoder/clip_encoder.py: CLIPVisionTower.token_prune_merge_advanced_plus`, the
function its `forward` calls at inference).

The official method, per crop of P patches (P = 576 for CLIP ViT-L/14 at 336 px):

1. Attention: the encoder layer after LLaVA's feature layer (`layers[23]`, feature layer -2), recomputed from
   its `q_proj` / `k_proj` outputs as one single head over the full width D: `softmax(q k^T * D^-0.5)`;
   `a` = the [CLS] row over the P patches.
2. Ratio `r` (`reduction_ratio`, the official knob): by default *adaptive*, the fraction of IQR outliers
   `a > Q3 + 1.5 * IQR` (numpy percentiles of `a` in float32, as `outlier_dectection`).
3. Kept patches, in this order: the `int(P * r)` largest attentions (`topk`, descending), then the
   arithmetic sequence `arange(0, P - 1, int(int(1 / r) / 3))` of absolute patch indices (patch P - 1 is
   never sampled: the official upper bound is the literal 575) without the patches already kept.
4. Merging: every kept patch `i` becomes `x_i + sum_j a_j x_j` over its 32 most similar *other* patches
   (kept or not) by cosine similarity of the full-width keys (not normalised: the official
   `/ torch.sum(weights)` is commented out), on the pre-projector features (`hidden_states[-2]` without
   [CLS]).
5. One extra row is appended: `sum_j a_j x_j` over all patches that were not kept.

The LLM sees `K + 1` rows (K kept patches + the extra row) in exactly this order at contiguous positions:
the reducer returns a `ReplacedSpan` of `projector(row)` for every row (`sources`: the patch's placeholder
index, -1 for the extra row). Every kept row is merged, whatever the count.

Budget. The official operating point is adaptive (about 32 outliers + 3 samples per outlier on LLaVA-1.5,
so ~144 rows). For a TFLOPs label only the knob `r` is solved: `n_keep` (the policy's `n_v`) is the number
of rows the LLM may see, and `r` is the largest ratio whose largest possible row count
(`max_rows(P, r)` = `int(P r)` + samples + 1, i.e. no sample coinciding with a top patch) is at most
`n_keep` (`budget_ratio`). The rows actually seen are `max_rows` minus the samples that coincide with a
top patch (a few), so the policy's FLOPs are an upper bound; `max_rows` is a step function of `r`, so
some budgets cannot be filled exactly (e.g. 144 -> at most 129 rows on 576 patches).
`PruMergePlus(adaptive=True)` runs the official adaptive ratio instead (`n_keep` then only bounds the
row count: more rows than `n_keep` is an error).

Details, and choices where the official code has no answer (it crashes, or leaves the order open):
- Ties in attention (official `topk`) and in similarity are broken towards the lower patch index.
- Zero outliers (official: division by zero) or `r > 1/3` (official: `arange` step 0) raise
  `ReducerError`; so does a budget below 2 rows per crop (one sample + the extra row).
- `k = min(32, P - 1)` neighbours on crops with fewer than 33 patches (the tiny test models; the official
  `topk(k=32)` would fail).
- On a crop of P patches the sequence bound is `P - 1` (575 on 576 patches, the official literal) and the
  top count `int(P r)` (official `int(N * r)`, N = 576).
- The quartiles use the installed numpy's `np.percentile` on float32 attention, as the official code;
  the official environment (torch 2.0.1) had numpy 1.x, whose scalar promotion may round the outlier bound
  differently, by about one float32 ulp (no fixture attention lies that close to its bound).
- Compute dtype: attention, similarity and merging run in the vision tower's dtype, as the official code
  (fp16 models: fp16).
- LLaVA-NeXT (the official repo is LLaVA-1.5 only, its function takes one crop): every crop (base image,
  then the grid crops) runs the official per-crop method on all its P patches, like the official packing
  of VisPruner / CDPruner for LLaVA-NeXT (no unpadding, no newline rows): the rows of all crops, each crop
  followed by its extra row, replace the image span. `n_keep` rows are split evenly over the crops
  (`split_budget`) and each crop solves its own `r`; a kept patch cut away by llava-hf's unpadding has no
  placeholder and reports source -1.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .base import ReducerError, ReductionContext, ReplacedSpan, check_family
from .vision import CLIP_FAMILIES, VisionCapture, encoder_layers, feature_layer_index, vision_capture
from .visionzip import split_budget
from ..methods import register_method

#: official `torch.topk(cos_sim_matrix, k=int(32))`
NEIGHBOURS = 32
#: official IQR rule `Q3 + 1.5 * IQR`
IQR_FACTOR = 1.5
#: official spacing `int(step_length / 3)`: about three spatial samples per top token
SAMPLES_PER_TOP = 3

_ATTN_KEY = "prumerge_last_layer"


def outlier_ratio(attn: torch.Tensor) -> float:
    """The official adaptive ratio: the fraction of patches with `attn > Q3 + 1.5 IQR`.

    Quartiles as the official `outlier_dectection`: numpy's default (linear) `np.percentile` on the float32
    attention.
    """
    a = attn.detach().to(torch.float32).cpu().numpy().ravel()
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    return int((a > q3 + IQR_FACTOR * (q3 - q1)).sum()) / a.size


def _check_ratio(ratio: float) -> None:
    if not 0 < ratio or int(int(1 / ratio) / SAMPLES_PER_TOP) < 1:
        raise ReducerError(
            f"PruMerge+ ratio {ratio!r}: valid 0 < r <= 1/3 (the official sequence step int(int(1/r)/3) must be "
            "positive; an adaptive ratio of 0 means no attention outliers, where the official code divides by zero)"
        )


def sample_step(ratio: float) -> int:
    """The official spacing of the spatial samples, `int(int(1 / r) / 3)`."""
    _check_ratio(ratio)
    return int(int(1 / ratio) / SAMPLES_PER_TOP)


def kept_patches(attn: torch.Tensor, ratio: float) -> torch.Tensor:
    """The kept patches of PruMerge+ in the official order.

    Args:
        attn: (P,) [CLS] attention to each patch.
        ratio: the official `reduction_ratio` r (adaptive: `outlier_ratio(attn)`).

    Returns:
        (K,) long: the `int(P r)` patches of largest attention (descending, ties to the lower index), then
        `arange(0, P - 1, sample_step(r))` without those, ascending.
    """
    P = attn.numel()
    step = sample_step(ratio)
    top = torch.sort(attn, descending=True, stable=True).indices[: int(P * ratio)]
    is_top = torch.zeros(P, dtype=torch.bool, device=attn.device)
    is_top[top] = True
    grid = torch.arange(0, P - 1, step, device=attn.device)
    return torch.cat([top, grid[~is_top[grid]]])


def max_rows(num_patches: int, ratio: float) -> int:
    """The most rows PruMerge+ gives on `num_patches` patches at ratio `r`: top + all samples + the extra row
    (fewer when a sample is also a top patch)."""
    return int(num_patches * ratio) + len(range(0, num_patches - 1, sample_step(ratio))) + 1


@lru_cache(maxsize=4096)
def budget_ratio(num_patches: int, n_rows: int) -> float:
    """The largest ratio r whose `max_rows(num_patches, r)` is at most `n_rows` (the budget's only knob).

    The selection depends on r only through the top count `int(P r)` and `int(1 / r)`, which change at
    r = T / P and r = 1 / k; `max_rows` is non-decreasing in r. Every piece between two consecutive such
    points holds one of them or their midpoint; the largest feasible of those is returned (a midpoint when
    the highest feasible piece is open at the top: larger ratios in it make the same selection).
    """
    P = num_patches
    points = sorted({t / P for t in range(1, P + 1) if 3 * t <= P} | {1 / k for k in range(3, 3 * P + 4)})
    candidates = points + [(a + b) / 2 for a, b in zip(points, points[1:])] + [points[0] / 2]
    feasible = [r for r in candidates if 3 * r <= 1 and max_rows(P, r) <= n_rows]
    if not feasible:
        raise ReducerError(
            f"PruMerge+ cannot give at most {n_rows} rows for a crop of {P} patches: the fewest it gives is "
            f"{max_rows(P, candidates[-1])} (one sample and the extra row)"
        )
    return max(feasible)


def prumerge_plus_select(
    attn: torch.Tensor, keys: torch.Tensor, features: torch.Tensor, ratio: float, k: int = NEIGHBOURS
) -> tuple[torch.Tensor, torch.Tensor]:
    """PruMerge+ on one crop, as the official `token_prune_merge_advanced_plus`.

    Args:
        attn: (P,) [CLS] attention to each patch (single head over the full width, last layer).
        keys: (P, D) full-width keys of the patches (the similarity metric).
        features: (P, D') pre-projector features of the patches.
        ratio: the official `reduction_ratio` (adaptive: `outlier_ratio(attn)`; budget: `budget_ratio`).
        k: neighbours merged into each kept patch (capped at P - 1).

    Returns:
        (kept, rows): kept (K,) patch indices in the official order; rows (K + 1, D') the merged kept
        patches `x_i + sum_{j in kNN(i)} a_j x_j`, then the extra row `sum_{j not kept} a_j x_j`. Computed in
        the features' dtype, as the official code.
    """
    P = attn.numel()
    kept = kept_patches(attn, ratio)
    dtype = features.dtype
    kn = torch.nn.functional.normalize(keys.to(dtype), dim=-1)
    sim = kn[kept] @ kn.T  # (K, P)
    sim[torch.arange(kept.numel(), device=sim.device), kept] = float("-inf")  # the others, not itself
    nb = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, : min(k, P - 1)]  # (K, k)
    a = attn.to(dtype)
    merged = features[kept] + (a[nb].unsqueeze(-1) * features[nb]).sum(dim=1)
    pruned = torch.ones(P, dtype=torch.bool, device=features.device)
    pruned[kept] = False
    extra = (a[pruned].unsqueeze(-1) * features[pruned]).sum(dim=0, keepdim=True)  # zeros if nothing pruned
    return kept, torch.cat([merged, extra])


@torch.no_grad()
def last_layer_attention(model, cap: VisionCapture) -> tuple[torch.Tensor, torch.Tensor]:
    """Official PruMerge attention and keys for every crop: the encoder layer after the feature layer,
    single head over the full width, recomputed from the feature layer's output (its input), in the tower's
    dtype.

    Returns (C, P) [CLS] attention to the patches and (C, P, D) patch keys.
    """
    layers = encoder_layers(model)
    nxt = feature_layer_index(model) + 1
    if nxt >= len(layers):
        raise ReducerError("PruMerge+ reads the encoder layer after the feature layer; the feature layer is the last one")
    layer = layers[nxt]
    x = layer.layer_norm1(cap.features)
    q = layer.self_attn.q_proj(x[:, :1])  # (C, 1, D)
    kk = layer.self_attn.k_proj(x)  # (C, 1+P, D)
    scores = (q @ kk.transpose(1, 2)) * cap.features.shape[-1] ** -0.5
    return torch.softmax(scores, dim=-1)[:, 0, 1:], kk[:, 1:]


def _crop_sources(ctx: ReductionContext, image: int, num_crops: int, P: int) -> torch.Tensor:
    """(num_crops, P) span-local placeholder index of every crop patch, -1 where it has none (unpadding)."""
    span = ctx.images[image]
    if ctx.family == "llava":
        if num_crops != 1 or span.num_tokens != P:
            raise ReducerError(f"LLaVA image span has {span.num_tokens} tokens but the vision tower produced {P} patches")
        return torch.arange(P)[None]
    from .llava_next_layout import llava_next_layout

    sizes = ctx.model_inputs.get("image_sizes")
    if sizes is None:
        raise ReducerError("LLaVA-NeXT reducers need the image_sizes input")
    lay = llava_next_layout(ctx.model, image_size=sizes[image], num_tokens=span.num_tokens)
    if lay.num_crops != num_crops or lay.side * lay.side != P:
        raise ReducerError(f"LLaVA-NeXT layout has {lay.num_crops} crops of {lay.side}^2 patches, the tower gave "
                           f"{num_crops} of {P}")  # fmt: skip
    out = torch.full((num_crops, P), -1, dtype=torch.long)
    pos = torch.nonzero(~lay.newline, as_tuple=False).flatten()
    out[lay.crop[pos], lay.patch[pos]] = pos
    return out


@register_method("prumergeplus", kind="vision")
class PruMergePlus:
    """Reducer: official PruMerge+ per crop (top-attention patches + spatial samples, kNN attention-weighted
    merging, one extra row), replacing the image span by its rows; see the module doc.

    Args:
        adaptive: the official adaptive ratio (IQR outlier fraction) instead of the ratio solved for
            `n_keep` rows; `n_keep` then only bounds the row count.
        k: neighbours merged into each kept patch (official 32).
    """

    name = "prumergeplus"
    families = CLIP_FAMILIES
    needs_vision_capture = True

    def __init__(self, adaptive: bool = False, k: int = NEIGHBOURS) -> None:
        self.adaptive = adaptive
        self.k = k

    def select(self, ctx: ReductionContext, n_keep: int) -> list[ReplacedSpan]:
        check_family(self, ctx.family)
        if getattr(ctx.model.config, "vision_feature_select_strategy", "default") != "default":
            raise ReducerError("PruMerge+ needs vision_feature_select_strategy='default' (patches without [CLS])")
        cap = vision_capture(ctx)
        if _ATTN_KEY not in ctx.cache or ctx.cache[_ATTN_KEY][0] is not cap:
            ctx.cache[_ATTN_KEY] = (cap, *last_layer_attention(ctx.model, cap))
        _, attn, keys = ctx.cache[_ATTN_KEY]
        projector = ctx.model.model.multi_modal_projector
        proj_dtype = next(projector.parameters()).dtype
        P = attn.shape[1]
        out = []
        for i, span in enumerate(ctx.images):
            if not 1 <= n_keep <= span.num_tokens:
                raise ReducerError(f"PruMerge+ cannot give {n_keep} rows for the {span.num_tokens} placeholders of "
                                   f"image {i}; valid: 1..{span.num_tokens}")  # fmt: skip
            crops = cap.image_crops(i)
            C = crops.stop - crops.start
            sources = _crop_sources(ctx, i, C, P)
            shares = split_budget(min(n_keep, C * P), [P] * C)
            rows, src = [], []
            for c, share in enumerate(shares):
                row = crops.start + c
                ratio = outlier_ratio(attn[row]) if self.adaptive else budget_ratio(P, share)
                kept, merged = prumerge_plus_select(attn[row], keys[row], cap.features[row, 1:], ratio, self.k)
                rows.append(merged)
                src += [sources[c, kept.cpu()], torch.tensor([-1])]
            rows_all = torch.cat(rows)
            if rows_all.shape[0] > n_keep:  # only in adaptive mode: the budget mode never exceeds it
                raise ReducerError(f"adaptive PruMerge+ gave {rows_all.shape[0]} rows for image {i}, more than "
                                   f"n_v={n_keep}; raise n_v (at most {span.num_tokens})")  # fmt: skip
            with torch.no_grad():
                embeds = projector(rows_all.to(proj_dtype)[None])[0]
            out.append(ReplacedSpan(embeds.to(ctx.inputs_embeds.dtype), torch.cat(src)))
        return out
