"""The official LLaVA-NeXT packing of VisPruner and CDPruner (Theia-4869/VisPruner, Theia-4869/CDPruner,
`LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal`).

Both repos select T tokens in every crop of an image (the base image and the anyres grid crops, 5 at their
fixed 672x672 resolution) among *all* side x side (576) patches of the crop, and then pack them after
`mm_patch_merge_type.replace('_unpad', '')`: the "spatial" branch without unpadding, so

- no patch is removed by unpadding (patches of the padded canvas area stay candidates and can be kept);
- no `image_newline` row is inserted;
- the image becomes exactly T x crops rows: the base crop's kept patches in patch order, then the grid
  crops' kept patches in row-major order of the stitched (rows*side) x (cols*side) grid map.

llava-hf's image span instead holds the unpadded grid plus one newline placeholder per grid row (2928
placeholders for a square 672 image, fewer for other aspect ratios), so this packing cannot be expressed as
a subset of the span: the reducers return a `ReplacedSpan` whose rows are the projected features of the
kept patches in the official order. Those features are the model's own projector applied to the vision
tower's recorded feature layer (`projected_crops`): the tower runs once, in the model's forward; only the
projector (a small MLP) runs again, on all crops, to provide the rows of patches that unpadding removed
from the span.

Budget: `crop_budgets` gives every crop `n_keep // crops` and the first `n_keep % crops` crops (base first)
one more, so the decoder sees exactly `n_keep` rows; the official code has one T for every crop, which this
is whenever `n_keep` is a multiple of the crop count (all the paper's LLaVA-NeXT budgets are).
"""
from __future__ import annotations

import torch

from .base import ReducerError, ReductionContext, ReplacedSpan
from .llava_next_layout import llava_next_layout

PROJECTED_KEY = "llava_next_projected_crops"


def crop_grid(model, image_size) -> tuple[int, int]:
    """(rows, cols) of the anyres grid crops of an image of `image_size` = (height, width) on `model`."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    cfg = model.config
    size = [int(v) for v in (image_size.tolist() if isinstance(image_size, torch.Tensor) else image_size)]
    return tuple(get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size))


def crop_budgets(n_keep: int, crops: int, patches: int) -> list[int]:
    """Tokens per crop: `n_keep // crops`, the first `n_keep % crops` crops one more, at most `patches`."""
    if n_keep < 0 or crops < 1:
        raise ReducerError(f"cannot split {n_keep} tokens over {crops} crops")
    return [min(patches, n_keep // crops + (1 if c < n_keep % crops else 0)) for c in range(crops)]


def official_order(kept: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Codes `crop * P + patch` of the kept patches in the order of the official packing.

    Args:
        kept: (1 + rows*cols, P) bool, the kept patches of the base crop (row 0) and the grid crops (row-major).
        rows, cols: the grid shape.
    """
    C, P = kept.shape
    side = int(round(P**0.5))
    if C != 1 + rows * cols or side * side != P:
        raise ReducerError(f"{C} crops of {P} patches do not form a base crop plus a {rows}x{cols} grid")
    codes = torch.arange(C * P, device=kept.device).view(C, P)
    base = codes[0][kept[0]]
    # stitched map (rows*side, cols*side): crop (r, c), patch (y, x) at (r*side + y, c*side + x)
    grid_codes = codes[1:].view(rows, cols, side, side).permute(0, 2, 1, 3).reshape(-1)
    grid_kept = kept[1:].view(rows, cols, side, side).permute(0, 2, 1, 3).reshape(-1)
    return torch.cat([base, grid_codes[grid_kept]])


def projected_crops(ctx: ReductionContext) -> torch.Tensor:
    """(crops of all images, P, H) projector outputs of every patch of every crop (cached per forward).

    The model's own `multi_modal_projector` on the recorded feature layer without [CLS] (what llava-hf
    projects before packing, `vision_feature_select_strategy='default'`), one call for all crops as the model
    makes it."""
    cached = ctx.cache.get(PROJECTED_KEY)
    if cached is not None:
        return cached
    from .vision import vision_capture

    if ctx.model.config.vision_feature_select_strategy != "default":
        raise ReducerError("the official LLaVA-NeXT packing needs vision_feature_select_strategy='default'")
    cap = vision_capture(ctx)
    with torch.no_grad():
        out = ctx.model.model.multi_modal_projector(cap.features[:, 1:])
    ctx.cache[PROJECTED_KEY] = out
    return out


def official_span(ctx: ReductionContext, image: int, kept: torch.Tensor) -> ReplacedSpan:
    """The `ReplacedSpan` of image number `image` (its span `ctx.images[image]`) for the kept patches `kept`
    ((crops, P) bool): projected rows in the official order; `sources` = the span placeholder of each row,
    -1 for patches that llava-hf's unpadding removed from the span."""
    from .vision import vision_capture

    span = ctx.images[image]
    size = ctx.model_inputs["image_sizes"][image]
    rows, cols = crop_grid(ctx.model, size)
    codes = official_order(kept, rows, cols)
    feats = projected_crops(ctx)[vision_capture(ctx).image_crops(image)]
    P = feats.shape[1]
    c, p = (codes // P).to(feats.device), (codes % P).to(feats.device)
    lay = llava_next_layout(ctx.model, size, num_tokens=span.num_tokens)
    slot = torch.full((kept.shape[0] * P,), -1, dtype=torch.long)
    present = ~lay.newline
    slot[(lay.crop[present] * P + lay.patch[present])] = torch.nonzero(present).flatten()
    return ReplacedSpan(feats[c, p], slot[codes.cpu()])


__all__ = ["PROJECTED_KEY", "crop_budgets", "crop_grid", "official_order", "official_span", "projected_crops"]
