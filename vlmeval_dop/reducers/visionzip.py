"""VisionZip (Yang et al., CVPR 2025, "VisionZip: Longer is Better but Not Necessary in Vision Language
Models"; official code github.com/dvlab-research/VisionZip, `visionzip/clip_encoder.py`).

Per vision-tower crop, on the feature layer (`vision_feature_layer = -2`, the official `attentions[-2]`):

1. **Dominant tokens**: the `D` patches with the largest [CLS] attention (official: summed over heads;
   we rank the head *mean* from `VisionCapture`, the same order).
2. **Contextual tokens**: the remaining patches (in raster order) are split into `C` *targets*, taken
   uniformly (`step = max(1, R // C)`, `targets = remaining[::step][:C]`), and the rest, each assigned to
   its most similar target by cosine similarity of the layer's head-averaged keys (official `metric` =
   `key_states.mean(heads)`). A target's merged feature is `target + mean(assigned)` (the official
   formula: the target is added to the mean of its group, not averaged with it; a target that receives
   nothing keeps its own feature).
3. Merging is done on the pre-projector features (the feature layer's output, as official); merged
   tokens are then passed through the model's own projector (`model.model.multi_modal_projector`).

Official split: `visionzip(model, dominant=54, contextual=10)` for 64 tokens, 108+20 for 128, 162+30 for
192 (README / paper Table 1), i.e. contextual = n / 6.4; we use `C = round(n_keep * 10 / 64)`,
`D = n_keep - C` for every budget.

Deviations from the official code, and why:
- The official `dominant` count includes the [CLS] token, which is fed to the LLM as one of the 64
  tokens. A llava-hf image span has no placeholder for [CLS] (`vision_feature_select_strategy =
  "default"` drops it), and a token must sit at a real image position here, so we keep `D` *patch*
  tokens instead (one more patch than official, no [CLS]).
- Placement: the official code appends the contextual tokens after the dominant ones. Here a contextual
  token takes the position (RoPE index) of its target token, and all kept tokens stay in raster order
  (`KeptTokens`: indices = dominant and target patches, sorted; embeddings of the targets replaced).
- Kept tokens whose feature is unchanged (dominant tokens, targets that received nothing) keep the
  exact decoder-input embedding of the stock model instead of re-running the projector on them (same
  value up to float rounding), so `n_keep = all` reproduces the stock model exactly.
- LLaVA-NeXT: the official code gives every crop (base + grid crops) `D + C` tokens and does not unpad
  or add newline tokens to the kept grid. llava-hf's span is the base crop, then the *unpadded* grid with
  one `image_newline` per row. We split `n_keep` evenly over the crops (remainder to the first crops, a
  crop never gets more than its surviving patches, the excess goes round-robin to the others), run
  VisionZip per crop restricted to the patches that survive unpadding, and drop the newline tokens, as
  the official kept grid has none. Only if `n_keep` exceeds the span's vision-tower tokens are newline
  tokens kept (the first ones, in order), so exactly `n_keep` indices are always returned.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import KeptTokens, ReducerError, ReductionContext, check_family
from .vision import CLIP_FAMILIES, VisionCapture, vision_capture

#: official (dominant, contextual) = (54, 10) for 64 tokens: the contextual share of the budget
CONTEXTUAL_FRACTION = 10 / 64


def visionzip_split(n_keep: int) -> tuple[int, int]:
    """(dominant, contextual) counts for a budget of `n_keep` tokens: 64 -> (54, 10), 128 -> (108, 20),
    192 -> (162, 30) as the official settings."""
    contextual = int(round(n_keep * CONTEXTUAL_FRACTION))
    return n_keep - contextual, contextual


@dataclass
class Merged:
    """Result of a merging selection on one crop.

    Attributes:
        kept: (K,) sorted local indices of the kept tokens.
        features: (K, D) pre-projector features of the kept tokens (merged where `changed`).
        changed: (K,) bool, the kept tokens whose feature differs from their own (merge targets).
    """

    kept: torch.Tensor
    features: torch.Tensor
    changed: torch.Tensor


def _top_by_attention(cls_attn: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` largest attentions, ties to the lower index (deterministic, unlike topk)."""
    return torch.sort(cls_attn, descending=True, stable=True).indices[:k]


def visionzip_select(
    cls_attn: torch.Tensor, keys: torch.Tensor, features: torch.Tensor, n_dominant: int, n_contextual: int
) -> Merged:
    """VisionZip on one crop.

    Args:
        cls_attn: (M,) [CLS] attention to each patch.
        keys: (M, d) head-averaged keys of the patches (the similarity metric).
        features: (M, D) pre-projector features of the patches.
        n_dominant, n_contextual: token counts (sum <= M).

    Returns:
        `Merged` with `n_dominant + n_contextual` kept tokens.
    """
    M = cls_attn.numel()
    if n_dominant < 0 or n_contextual < 0 or n_dominant + n_contextual > M:
        raise ReducerError(
            f"VisionZip cannot keep {n_dominant} dominant + {n_contextual} contextual of {M} tokens; "
            f"valid: dominant + contextual in 0..{M}"
        )
    device = features.device
    dominant = _top_by_attention(cls_attn, n_dominant)
    rest = torch.ones(M, dtype=torch.bool, device=device)
    rest[dominant] = False
    remaining = torch.nonzero(rest, as_tuple=False).flatten()  # raster order, as official masked_select
    out_feats = features.clone()
    changed = torch.zeros(M, dtype=torch.bool, device=device)
    if n_contextual > 0:
        R = remaining.numel()
        step = max(1, R // n_contextual)
        is_target = torch.zeros(R, dtype=torch.bool, device=device)
        is_target[torch.arange(0, R, step, device=device)[:n_contextual]] = True
        targets, others = remaining[is_target], remaining[~is_target]
        if others.numel():
            wide = torch.promote_types(features.dtype, torch.float32)  # at least float32
            k = torch.nn.functional.normalize(keys.to(wide), dim=-1)
            assign = (k[others] @ k[targets].T).argmax(dim=1)  # first target on ties
            sums = torch.zeros(targets.numel(), features.shape[1], dtype=wide, device=device)
            sums.index_add_(0, assign, features[others].to(wide))
            counts = torch.bincount(assign, minlength=targets.numel())
            got = counts > 0
            merged = features[targets].to(wide) + sums / counts.clamp(min=1).unsqueeze(1)
            out_feats[targets[got]] = merged[got].to(features.dtype)
            changed[targets[got]] = True
    else:
        targets = remaining[:0]
    kept = torch.sort(torch.cat([dominant, targets])).values
    return Merged(kept=kept, features=out_feats[kept], changed=changed[kept])


# --- mapping crops onto an image span (shared with PruMerge+) -------------------------------------------


@dataclass
class CropTokens:
    """The placeholders of one image span that come from one vision-tower crop.

    Attributes:
        positions: (M,) span-local indices of those placeholders, in span order.
        row: the crop's row in `VisionCapture.features`.
        patches: (M,) patch index (0..P-1, without [CLS]) of each placeholder inside the crop.
    """

    positions: torch.Tensor
    row: int
    patches: torch.Tensor


def span_crops(ctx: ReductionContext, cap: VisionCapture, image: int) -> tuple[list[CropTokens], torch.Tensor]:
    """The crops of image number `image` (index into `ctx.images`) and its newline placeholders.

    LLaVA-1.5: one crop whose P patches are the span. LLaVA-NeXT: from `llava_next_layout` (base crop, then
    the unpadded grid crops; newline placeholders returned separately).
    """
    span = ctx.images[image]
    crops = cap.image_crops(image)
    P = cap.features.shape[1] - 1
    if getattr(ctx.model.config, "vision_feature_select_strategy", "default") != "default":
        raise ReducerError(
            "vision-side merging reducers need vision_feature_select_strategy='default' (no [CLS] token in the span)"
        )
    if ctx.family == "llava":
        if crops.stop - crops.start != 1 or span.num_tokens != P:
            raise ReducerError(f"LLaVA image span has {span.num_tokens} tokens but the vision tower produced {P} patches")
        ar = torch.arange(P)
        return [CropTokens(ar, crops.start, ar)], ar[:0]
    from .llava_next_layout import llava_next_layout

    sizes = ctx.model_inputs.get("image_sizes")
    if sizes is None:
        raise ReducerError("LLaVA-NeXT reducers need the image_sizes input")
    lay = llava_next_layout(ctx.model, image_size=sizes[image], num_tokens=span.num_tokens)
    if lay.num_crops != crops.stop - crops.start or lay.side * lay.side != P:
        raise ReducerError(f"LLaVA-NeXT layout has {lay.num_crops} crops of {lay.side}^2 patches, the tower gave "
                           f"{crops.stop - crops.start} of {P}")  # fmt: skip
    out = []
    for c in range(lay.num_crops):
        pos = lay.crop_positions(c)
        out.append(CropTokens(pos, crops.start + c, lay.patch[pos]))
    return out, torch.nonzero(lay.newline, as_tuple=False).flatten()


def split_budget(n_keep: int, sizes: list[int]) -> list[int]:
    """Split `n_keep` tokens over crops of `sizes` tokens: as equal as possible, the remainder to the first
    crops, none above its size (the excess goes on round-robin to the crops with room)."""
    if not 0 <= n_keep <= sum(sizes):
        raise ReducerError(f"cannot keep {n_keep} tokens of {sum(sizes)}; valid: 0..{sum(sizes)}")
    out = [0] * len(sizes)
    left = n_keep
    while left:
        room = [i for i, s in enumerate(sizes) if out[i] < s]
        share, extra = divmod(left, len(room))
        for j, i in enumerate(room):
            give = min(sizes[i] - out[i], share + (1 if j < extra else 0))
            out[i] += give
            left -= give
    return out


def merge_per_crop(
    reducer, ctx: ReductionContext, n_keep: int, per_crop, full_is_identity: bool = False
) -> list[KeptTokens]:
    """Run `per_crop(capture, crop, k) -> Merged` on every crop of every image and assemble `KeptTokens`:
    unchanged kept tokens keep their decoder-input embedding, merged ones get projector(merged feature).
    `full_is_identity`: an image with `n_keep` = all its tokens is returned unchanged (no merging)."""
    name = reducer.name
    check_family(reducer, ctx.family)
    cap = vision_capture(ctx)
    projector = ctx.model.model.multi_modal_projector
    out = []
    for i, span in enumerate(ctx.images):
        N = span.num_tokens
        if not 0 <= n_keep <= N:
            raise ReducerError(f"{name} cannot keep {n_keep} of the {N} visual tokens of image {i}; valid: 0..{N}")
        if full_is_identity and n_keep == N:
            out.append(KeptTokens(torch.arange(N), None))
            continue
        crops, newlines = span_crops(ctx, cap, i)
        sizes = [c.positions.numel() for c in crops]
        n_vision = sum(sizes)
        budgets = split_budget(min(n_keep, n_vision), sizes)
        kept_pos, merged_pos, merged_feats = [], [], []
        for crop, k in zip(crops, budgets):
            res = per_crop(cap, crop, k)
            pos = crop.positions[res.kept.cpu()]
            kept_pos.append(pos)
            merged_pos.append(pos[res.changed.cpu()])
            merged_feats.append(res.features[res.changed])
        kept_pos.append(newlines[: max(0, n_keep - n_vision)])  # only when n_keep exceeds the vision tokens
        idx = torch.sort(torch.cat(kept_pos)).values
        embeds = ctx.image_embeds(span)[idx.to(ctx.inputs_embeds.device)].clone()
        mpos, mfeat = torch.cat(merged_pos), torch.cat(merged_feats)
        if mpos.numel():
            proj_dtype = next(projector.parameters()).dtype
            with torch.no_grad():
                new = projector(mfeat.to(proj_dtype)[None])[0]
            rows = torch.searchsorted(idx, mpos)
            embeds[rows.to(embeds.device)] = new.to(embeds)
        out.append(KeptTokens(idx.cpu(), embeds))
    return out


class VisionZip:
    """Reducer: VisionZip dominant + contextual tokens per crop (LLaVA-1.5, LLaVA-NeXT); see module doc."""

    name = "visionzip"
    families = CLIP_FAMILIES
    needs_vision_capture = True

    def select(self, ctx: ReductionContext, n_keep: int) -> list[KeptTokens]:
        def per_crop(cap: VisionCapture, crop: CropTokens, k: int) -> Merged:
            d, c = visionzip_split(k)
            keys = cap.keys[crop.row, 1:].float().mean(dim=1)  # (P, head_dim): official head-averaged metric
            p = crop.patches.to(cap.features.device)
            return visionzip_select(cap.cls_attention[crop.row, p], keys[p], cap.features[crop.row, 1:][p], d, c)

        return merge_per_crop(self, ctx, n_keep, per_crop)
