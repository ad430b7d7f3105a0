"""VisionZip (Yang et al., CVPR 2025, "VisionZip: Longer is Better but Not Necessary in Vision Language
Models"; official code github.com/dvlab-research/VisionZip, `CLIPVisionTower_VisionZip.forward` in
`visionzip/clip_encoder.py`, configured by `visionzip(model, dominant, contextual)` in `visionzip/main.py`).

Official method, per vision-tower crop, on the feature layer (`vision_feature_layer = -2`: the official
`attentions[-2]`, `hidden_states[-2]` and that layer's keys):

1. **Dominant tokens**: `visionzip(model, dominant=54, ...)` keeps `dominant - 1` patches with the largest
   [CLS] attention (official: summed over heads; we rank the head *mean* from `VisionCapture`, the same
   order) **plus the [CLS] token itself**: `dominant` tokens, [CLS] first, the patches in raster order.
2. **Contextual tokens**: the remaining patches (raster order) are split into `contextual` *targets*,
   taken uniformly (`step = max(1, R // contextual)`, targets = every `step`-th remaining patch, the first
   `contextual` of them), and the rest, each assigned to its most similar target by cosine similarity of
   the layer's head-averaged keys (official `metric`, first target on ties). A contextual token is
   `target + mean(assigned)` (a target that receives nothing keeps its own feature).
3. The crop's output is `[CLS, dominant..., contextual...]` (`dominant + contextual` rows) on the
   pre-projector features; every row then goes through the model's projector
   (`model.model.multi_modal_projector`), the [CLS] row included, and the LLM sees the rows in that order
   at contiguous positions (`ReplacedSpan`; `handle.last_kept` reports each row's patch, -1 for [CLS]).

Budget: the official settings are `(dominant, contextual)` = (54, 10) for 64 tokens, (108, 20) for 128,
(162, 30) for 192 (README / paper Table 1): contextual = n / 6.4. `n_keep` tokens use
`visionzip_split(n_keep)`: `contextual = round(n_keep * 10 / 64)`, `dominant = n_keep - contextual`
([CLS] counted among the dominant tokens as official), exactly the official pairs at 64/128/192. The
official code cannot run `contextual = 0` (division by zero); here that keeps [CLS] + dominant patches.

Computation follows the official dtypes: keys averaged over heads, similarities and the merge in the
features' own dtype, i.e. the CLIP tower's. The official code runs on LLaVA's loader, whose tower stays in
float32 under a float16 model; the LLaVA wrappers do the same by default (`vision_dtype="float32"`,
vlmeval_dop/models/llava.py), so features, [CLS] attention (`VisionCapture`, softmax in float32) and merge are
float32 as official. With `vision_dtype="model"` (a float16 tower) the features are float16 while the [CLS]
attention is still float32, where the official eager layer would be float16: near-ties may rank differently
(not measured against an fp16 run of the official code).

LLaVA-NeXT (official `prepare_inputs_labels_for_multimodal_visionzip` + `restore_image_features_sorted`,
for `mm_patch_merge_type` containing `unpad`, as the LLaVA-NeXT checkpoints): every crop (base + grid
crops) gets the same `(dominant, contextual)`; the image becomes the base crop's rows, then the grid crops'
dominant patches in raster order of the stitched (rows*24, cols*24) grid, then the grid crops' [CLS] rows
(crop order), then their contextual rows (crop order). No unpadding and no newline rows (the official code
drops both). With `n_keep` for the whole image, each of its `k` crops keeps `n_keep // k` tokens
(`visionzip_split` of that), so 640 on a 5-crop image is the official 128-token setting per crop.
Rows whose patch lies in llava-hf's unpadded-away border report -1 in `handle.last_kept`.

Golden test: `tests/test_golden_visionzip.py` against outputs of the official code
(`tests/golden/visionzip/README.md`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ReducerError, ReductionContext, ReplacedSpan, check_family, check_n_keep
from .vision import CLIP_FAMILIES, VisionCapture, vision_capture
from ..methods import register_method

#: official (dominant, contextual) = (54, 10) for 64 tokens: the contextual share of the budget
CONTEXTUAL_FRACTION = 10 / 64


def visionzip_split(n_keep: int) -> tuple[int, int]:
    """Official `(dominant, contextual)` knobs for `n_keep` tokens ([CLS] counts as a dominant token):
    64 -> (54, 10), 128 -> (108, 20), 192 -> (162, 30) as the official settings."""
    contextual = int(round(n_keep * CONTEXTUAL_FRACTION))
    return n_keep - contextual, contextual


@dataclass
class VisionZipRows:
    """Official VisionZip output of one crop: rows `[CLS, dominant..., contextual...]`.

    Attributes:
        dominant: (dominant - 1,) patch indices (0-based, [CLS] excluded) of the dominant patches, ascending.
        targets: (contextual,) patch indices of the contextual tokens' targets, in output order.
        rows: (dominant + contextual, D) pre-projector features in output order.
    """

    dominant: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor

    @property
    def sources(self) -> torch.Tensor:
        """(dominant + contextual,) patch index of each row, -1 for [CLS]."""
        cls = torch.full((1,), -1, dtype=torch.long, device=self.dominant.device)
        return torch.cat([cls, self.dominant, self.targets])


def _top_by_attention(cls_attn: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` largest attentions, ties to the lower index (deterministic, unlike topk)."""
    return torch.sort(cls_attn, descending=True, stable=True).indices[:k]


def visionzip_select(
    cls_attn: torch.Tensor, metric: torch.Tensor, features: torch.Tensor, dominant: int, contextual: int
) -> VisionZipRows:
    """Official VisionZip on one crop.

    Args:
        cls_attn: (P,) [CLS] attention to each patch (any positive multiple of the official head sum).
        metric: (1+P, d) the feature layer's keys averaged over heads, [CLS] first (official `metric`).
        features: (1+P, D) the feature layer's output, [CLS] first (pre-projector features).
        dominant: official `dominant` knob, [CLS] included (>= 1).
        contextual: official `contextual` knob (>= 0).

    Returns:
        `VisionZipRows` with `dominant + contextual` rows.
    """
    P = cls_attn.numel()
    if dominant < 1 or contextual < 0 or dominant - 1 + contextual > P or features.shape[0] != P + 1:
        raise ReducerError(
            f"VisionZip cannot keep dominant={dominant} ([CLS] included) + contextual={contextual} tokens of a "
            f"crop with {P} patches; valid: dominant >= 1, dominant - 1 + contextual <= {P}"
        )
    device = features.device
    dom = torch.sort(_top_by_attention(cls_attn, dominant - 1)).values  # raster order, as official
    rest = torch.ones(P, dtype=torch.bool, device=device)
    rest[dom] = False
    remaining = torch.nonzero(rest, as_tuple=False).flatten()  # patch indices, raster order
    ctx_rows = features[:0]
    targets = remaining[:0]
    if contextual:
        R = remaining.numel()
        pick = torch.zeros(R, dtype=torch.bool, device=device)
        pick[torch.arange(0, R, max(1, R // contextual), device=device)[:contextual]] = True
        targets, others = remaining[pick], remaining[~pick]
        m = metric[1:][remaining]
        m = m / m.norm(dim=-1, keepdim=True)
        assign = (m[~pick] @ m[pick].T).argmax(dim=1)  # first target on ties, as official argmax
        one_hot = torch.zeros(others.numel(), contextual, dtype=features.dtype, device=device)
        one_hot[torch.arange(others.numel(), device=device), assign] = 1
        counts = one_hot.sum(dim=0).clamp(min=1).unsqueeze(1)
        patches = features[1:]
        ctx_rows = patches[targets] + (one_hot.T @ patches[others]) / counts
    rows = torch.cat([features[:1], features[1:][dom], ctx_rows])
    return VisionZipRows(dominant=dom, targets=targets, rows=rows)


def _crop_rows(cap: VisionCapture, row: int, n: int) -> VisionZipRows:
    """VisionZip with `n` tokens on crop `row` of the capture."""
    d, c = visionzip_split(n)
    metric = cap.keys[row].mean(dim=1)  # (1+P, head_dim): official head-averaged keys, features' dtype
    return visionzip_select(cap.cls_attention[row], metric.to(cap.features.dtype), cap.features[row], d, c)


def next_official_order(parts: list[VisionZipRows], grid_rows: int, grid_cols: int, side: int):
    """Official LLaVA-NeXT packing of per-crop VisionZip outputs (base crop first, grid crops row-major):
    `(rows, (crop, patch) of each row)` with patch -1 for [CLS] rows.

    Order: base crop's rows; the grid crops' dominant patches in raster order of the stitched
    (grid_rows*side, grid_cols*side) grid; the grid crops' [CLS] rows; their contextual rows (crop order).
    """
    base = parts[0]
    crop_of = [torch.zeros(base.rows.shape[0], dtype=torch.long)]
    patch_of = [base.sources.cpu()]
    rows = [base.rows]
    grid = parts[1:]
    if len(grid) != grid_rows * grid_cols:
        raise ReducerError(f"LLaVA-NeXT image has {len(grid)} grid crops, its grid is {grid_rows}x{grid_cols}")
    keys, dom_rows, dom_crop, dom_patch = [], [], [], []
    for g, part in enumerate(grid):
        p = part.dominant.cpu()
        y = (g // grid_cols) * side + p // side
        x = (g % grid_cols) * side + p % side
        keys.append(y * grid_cols * side + x)
        dom_rows.append(part.rows[1 : 1 + p.numel()])
        dom_crop.append(torch.full_like(p, g + 1))
        dom_patch.append(p)
    if grid:
        order = torch.argsort(torch.cat(keys))
        rows.append(torch.cat(dom_rows)[order.to(base.rows.device)])
        crop_of.append(torch.cat(dom_crop)[order])
        patch_of.append(torch.cat(dom_patch)[order])
        rows.append(torch.stack([part.rows[0] for part in grid]))
        crop_of.append(torch.arange(1, len(grid) + 1))
        patch_of.append(torch.full((len(grid),), -1, dtype=torch.long))
        for g, part in enumerate(grid):
            n_dom = part.dominant.numel()
            rows.append(part.rows[1 + n_dom :])
            crop_of.append(torch.full((part.targets.numel(),), g + 1, dtype=torch.long))
            patch_of.append(part.targets.cpu())
    return torch.cat(rows), torch.cat(crop_of), torch.cat(patch_of)


# --- per-crop budget split (PruMerge+'s LLaVA-NeXT path) ------------------------------------------------


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


@register_method("visionzip", kind="vision")
class VisionZip:
    """Reducer: official VisionZip, `[CLS, dominant, contextual]` per crop (LLaVA-1.5; LLaVA-NeXT with the
    official packing); see module doc. Returns `ReplacedSpan`s."""

    name = "visionzip"
    families = CLIP_FAMILIES
    needs_vision_capture = True

    def select(self, ctx: ReductionContext, n_keep: int) -> list[torch.Tensor | ReplacedSpan]:
        check_family(self, ctx.family)
        check_n_keep("VisionZip", ctx, n_keep)
        cap = vision_capture(ctx)
        if getattr(ctx.model.config, "vision_feature_select_strategy", "default") != "default":
            raise ReducerError("VisionZip needs vision_feature_select_strategy='default' ([CLS] not in the span)")
        projector = ctx.model.model.multi_modal_projector
        P = cap.features.shape[1] - 1
        out: list[torch.Tensor | ReplacedSpan] = []
        for i, span in enumerate(ctx.images):
            if n_keep == 0:
                out.append(torch.empty(0, dtype=torch.long))
                continue
            crops = cap.image_crops(i)
            if ctx.family == "llava":
                if crops.stop - crops.start != 1 or span.num_tokens != P:
                    raise ReducerError(
                        f"LLaVA image span has {span.num_tokens} tokens but the vision tower produced {P} patches"
                    )
                part = _crop_rows(cap, crops.start, n_keep)
                rows, sources = part.rows, part.sources.cpu()  # span index = patch index
            else:
                rows, sources = self._next(ctx, cap, i, span.num_tokens, n_keep)
            with torch.no_grad():
                embeds = projector(rows.to(next(projector.parameters()).dtype)[None])[0]
            out.append(ReplacedSpan(embeds.to(ctx.inputs_embeds.dtype), sources))
        return out

    @staticmethod
    def _next(ctx: ReductionContext, cap: VisionCapture, image: int, num_tokens: int, n_keep: int):
        """LLaVA-NeXT: official packing of all crops, `n_keep // crops` tokens each; (rows, sources)."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        from .llava_next_layout import llava_next_layout

        sizes = ctx.model_inputs.get("image_sizes")
        if sizes is None:
            raise ReducerError("VisionZip on LLaVA-NeXT needs the image_sizes input")
        crops = cap.image_crops(image)
        k = crops.stop - crops.start
        per_crop = n_keep // k
        if per_crop < 1:
            raise ReducerError(f"VisionZip keeps the same count in each of the image's {k} crops (official); "
                               f"n_keep={n_keep} is below {k}")  # fmt: skip
        cfg = ctx.model.config
        size = [int(v) for v in (sizes[image].tolist() if isinstance(sizes[image], torch.Tensor) else sizes[image])]
        grid_rows, grid_cols = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        lay = llava_next_layout(ctx.model, size, num_tokens=num_tokens)
        if lay.num_crops != k:
            raise ReducerError(f"LLaVA-NeXT layout has {lay.num_crops} crops, the vision tower gave {k}")
        parts = [_crop_rows(cap, crops.start + c, per_crop) for c in range(k)]
        rows, crop_of, patch_of = next_official_order(parts, grid_rows, grid_cols, lay.side)
        # span placeholder of each (crop, patch); -1 where unpadding removed it or for [CLS] rows
        where = torch.full((k, lay.side * lay.side), -1, dtype=torch.long)
        real = ~lay.newline
        where[lay.crop[real], lay.patch[real]] = torch.nonzero(real).flatten()
        sources = torch.where(patch_of >= 0, where[crop_of, patch_of.clamp(min=0)], -1)
        return rows, sources
