"""VisPruner (Zhang et al., ICCV 2025, "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective
Token Pruning in VLMs"; official code github.com/Theia-4869/VisPruner, `LlavaMetaForCausalLM.encode_images`):
the visual-token reduction of the paper's DOP_V.

Per vision-tower crop, with budget T (the official `--visual_token_num`):

1. **important tokens**: the `T_imp = int(T * important_ratio)` patches with the largest [CLS] attention of the
   tower's feature layer (`attentions[-2]`, CLS query row, mean over heads; official `--important_ratio 0.5`);
2. **diverse tokens**: from the remaining patches, in descending-attention order, duplicates are removed
   iteratively until `T_div = T - T_imp` remain. Each iteration splits the ordered remainder into
   alternating sets A (even positions) and B (odd positions), scores every token of A by its largest cosine
   similarity to B, and drops the `r = min(8, R - T_div)` highest-scoring A tokens; the next remainder is the
   surviving A tokens in descending-score order followed by B. Similarity is computed on the feature
   layer's patch features (`hidden_states[-2][:, 1:]`, before the projector).

`vispruner_select_batch` performs exactly the official tensor operations, batched over the crops of an image
as the official code batches them, so that it also breaks ties as the official code does: both rankings use
the same non-stable `torch.argsort(descending=True)` on the same values in the same order (ties are frequent
in fp16 and between duplicate patches, and a different tie order cascades through the iterations).

Compute dtypes (as the official evaluation): the [CLS] attention is ranked in float32 (LLaVA's builder loads
the CLIP tower with `device_map='auto'` and no dtype, i.e. in float32, so its attentions are float32; ours is
the softmax in float32 of the recorded layer); the features are cast to the dtype of the images before
normalising and multiplying (official `image_features.to(images.dtype)`, float16 in the official eval
scripts). `similarity_dtype=None` (default) uses the dtype of `pixel_values`, i.e. the model dtype the
VLMEvalKit wrapper feeds: float16 on GPU as the official runs, float32 for a float32 model on CPU (where
the official code would also compute in float32 given float32 images); `similarity_dtype=torch.float16`
reproduces the official scripts' float16 similarities on a float32 model.

Where the official code fails (documented, not reachable at the official operating points 64/128/192 or
the paper's LLaVA-NeXT budgets; reachable at the paper's LLaVA-1.5 DOP_V n_v = 51 and 58):

- an odd remainder R (e.g. T = 51: R = 576 - 25 = 551) makes its re-indexing raise "shape mismatch: indexing
  tensors could not be broadcast together"; we keep the ceil(R/2) - r surviving A tokens (the evident intent);
- r larger than |A| (tiny budgets, e.g. T = 8 at R = 12) makes `expand` fail; we drop all of A.

LLaVA-1.5: one crop per image; the kept set is returned as a plain selection (the official code keeps the
patches in patch order: `image_features[index_masks]`).

LLaVA-NeXT (`next_packing="official"`, the default): every crop (base image and 2x2 grid crops at the fixed
672x672 resolution of both official repos) selects T = n_keep / 5 patches among all its 576 patches, and
the image becomes the official packing (`llava_next_packing`): T x 5 rows, no unpadding, no newline rows,
base crop first, then the grid in stitched row-major order, returned as a `ReplacedSpan`. n_keep equal to the
whole span keeps the image as stock llava-hf packs it.

Video-LLaVA (`video_llava`; DOP App. E.7 / Table 18): the official VisPruner repository has no Video-LLaVA
path; the same authors' Video-LLaVA code (FasterVLM, branch `video`: `encode_videos`) prunes every frame on its
own with the same per-frame budget, the [CLS] attention of the video tower's feature layer, [CLS] rows dropped,
patches in patch order. We apply VisPruner's selection within each frame that way: a video's 8 frames are its
crops (`crop_budgets`: n_keep / 8 per frame, 32 of 256 for 256 of 2048, the first frames one more when uneven),
batched as the official code batches crops; HF's video span holds each frame's [CLS] row, which the official
path never keeps: beyond all 2048 patches (n_keep up to the span's 2056, reachable by the search only) [CLS]
rows are added uniformly over the frames, the whole span being the stock sequence. Images: one crop of 256
patches, as LLaVA-1.5.
Both pieces match their official code on golden fixtures (tests/golden/vispruner_video).

`next_packing="stock"` (named deviation, not the paper's): keep llava-hf's packing (unpadded grid plus row
newlines) and select, per crop, among the patches present in the span (`split_budget` over the crops,
newlines only beyond all vision tokens). Measured against the official packing on the golden fixtures
(kept (crop, patch) sets, tests/golden/vispruner): identical rows in identical order for square images;
mean Jaccard 0.55 / 0.61 / 0.64 (T = 32 / 64 / 97, three seeds) for the 400x672 images, whose padded rows
the official code can keep and often does.
"""
from __future__ import annotations

import torch

from .base import ReducerError, ReductionContext, Selection, check_family, check_n_keep
from .llava_next_layout import llava_next_layout
from .llava_next_packing import crop_budgets, official_span
from .uniform import uniform_indices
from .vision import VisionCapture, encoder_layers, feature_layer_index, vision_capture

IMPORTANT_RATIO = 0.5  # official default: `--important_ratio 0.5` (llava/eval/model_vqa*.py)
REMOVE_PER_STEP = 8  # official: at most 8 duplicates removed per iteration (`r = min(8, R - T_div)`)
NEXT_PACKINGS = ("official", "stock")


def _descending(values: torch.Tensor) -> torch.Tensor:
    """Descending order along the last dim with the official call (non-stable argsort: its tie order)."""
    return values.argsort(dim=-1, descending=True)


@torch.no_grad()
def official_cls_attention(model, cap: VisionCapture, rows: slice) -> torch.Tensor:
    """(C, P) [CLS] -> patch attention of the feature layer, mean over heads, in float32, computed as the eager
    CLIP attention of the official code's transformers (4.37) computes `attentions[-2]`: queries scaled
    before a batched product of all queries and keys, softmax over all 1+P keys, then `[:, :, 0, 1:]` and the
    mean over heads. Same operations as the official float32 tower, so that exact ties (duplicate patches)
    stay exact: a one-row product can round the last key differently. Falls back to the capture's own
    [CLS] row when the attention input was not recorded."""
    if cap.attn_input is None:
        return cap.cls_attention[rows].float()
    attn = encoder_layers(model, cap.tower)[feature_layer_index(model, cap.tower)].self_attn
    x = cap.attn_input[rows].float()
    C, T, _ = x.shape
    h, hd = attn.num_heads, attn.head_dim

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(C, T, h, hd).transpose(1, 2).contiguous().view(C * h, T, hd)

    def proj(lin: torch.nn.Linear) -> torch.Tensor:
        return torch.nn.functional.linear(x, lin.weight.float(), None if lin.bias is None else lin.bias.float())

    q, k = heads(proj(attn.q_proj) * attn.scale), heads(proj(attn.k_proj))
    probs = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
    return probs.view(C, h, T, T)[:, :, 0, 1:].mean(dim=1)


def vispruner_select_batch(
    cls_attention: torch.Tensor,
    features: torch.Tensor,
    n_keep: int,
    important_ratio: float = IMPORTANT_RATIO,
    remove_per_step: int = REMOVE_PER_STEP,
    similarity_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """VisPruner on B crops with the same budget: (B, n_keep) kept patch indices per crop, in the official
    order (important tokens by attention, then the surviving diverse tokens).

    Args:
        cls_attention: (B, P) [CLS] attention to each patch (feature layer, mean over heads); ranked as given.
        features: (B, P, D) patch features of the same layer.
        n_keep: tokens to keep per crop, 0..P.
        important_ratio: fraction of `n_keep` taken by attention (`int(n_keep * ratio)`); official 0.5.
        remove_per_step: most duplicates dropped per iteration; official 8.
        similarity_dtype: dtype of the normalisation and similarity products (default: `features.dtype`).
    """
    if cls_attention.ndim != 2 or features.ndim != 3 or features.shape[:2] != cls_attention.shape:
        raise ReducerError(
            f"VisPruner needs cls_attention (B, P) and features (B, P, D), got {tuple(cls_attention.shape)} and "
            f"{tuple(features.shape)}"
        )
    B, P = cls_attention.shape
    if not 0 <= n_keep <= P:
        raise ReducerError(f"VisPruner cannot keep {n_keep} of {P} tokens; valid: 0..{P}")
    if not 0.0 <= important_ratio <= 1.0:
        raise ReducerError(f"important_ratio must be in [0, 1], got {important_ratio}")
    if remove_per_step < 1:
        raise ReducerError(f"remove_per_step must be >= 1, got {remove_per_step}")
    n_imp = int(n_keep * important_ratio)
    n_div = n_keep - n_imp

    order = _descending(cls_attention)
    important, residual = order[:, :n_imp], order[:, n_imp:]
    f = features.to(similarity_dtype or features.dtype)
    unit = f / f.norm(dim=-1, keepdim=True)
    batch = torch.arange(B, device=unit.device)[:, None]
    while n_div > 0:
        R = residual.shape[1]
        r = min(remove_per_step, R - n_div)
        if r <= 0:
            break
        tokens = unit[batch, residual.to(unit.device)]  # (B, R, D) in remainder order
        scores = (tokens[:, ::2] @ tokens[:, 1::2].transpose(-1, -2)).max(dim=-1).values  # A vs B (B non-empty)
        survivors = _descending(scores)[:, r:].to(residual.device)  # empty when r > |A|
        residual = torch.cat([residual[:, ::2].gather(1, survivors), residual[:, 1::2]], dim=1)
    return torch.cat([important, residual], dim=1) if n_div > 0 else important


def vispruner_select(cls_attention: torch.Tensor, features: torch.Tensor, n_keep: int, **kw) -> torch.Tensor:
    """VisPruner on one crop: sorted indices of the `n_keep` kept patches (cls_attention (P,), features
    (P, D); keyword options as `vispruner_select_batch`)."""
    if cls_attention.ndim != 1 or features.ndim != 2:
        raise ReducerError(
            f"VisPruner needs cls_attention (P,) and features (P, D), got {tuple(cls_attention.shape)} and "
            f"{tuple(features.shape)}"
        )
    kept = vispruner_select_batch(cls_attention[None], features[None], n_keep, **kw)[0]
    return torch.sort(kept).values.to(dtype=torch.long)


def split_budget(n_keep: int, capacities: list[int]) -> list[int]:
    """Split `n_keep` over crops as evenly as possible, never above a crop's capacity (`next_packing="stock"`).

    Water filling: every crop gets `min(capacity, level)` for the largest level that fits, and the few
    tokens left go one each to the lowest-numbered crops that still have room (the result of dealing the
    tokens out one at a time, crop 0, 1, 2, ... in turn, skipping full crops).
    """
    total = sum(capacities)
    if not 0 <= n_keep <= total:
        raise ReducerError(f"VisPruner cannot keep {n_keep} vision tokens of {total}; valid: 0..{total}")

    def filled(level: int) -> int:
        return sum(min(cap, level) for cap in capacities)

    lo, hi = 0, max(capacities, default=0)  # largest level with filled(level) <= n_keep
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if filled(mid) <= n_keep else (lo, mid - 1)
    quota = [min(cap, lo) for cap in capacities]
    left = n_keep - sum(quota)
    for c, cap in enumerate(capacities):
        if left and cap > lo:
            quota[c] += 1
            left -= 1
    return quota


def select_crops(attn: torch.Tensor, feats: torch.Tensor, budgets: list[int], **kw) -> torch.Tensor:
    """(C, P) bool kept mask: crop c keeps `budgets[c]` patches; crops with equal budgets run as one batch
    (the official code runs all crops of an image together with one T)."""
    kept = torch.zeros(attn.shape, dtype=torch.bool, device=attn.device)
    for T in sorted(set(budgets)):
        crops = [c for c, b in enumerate(budgets) if b == T]
        if T:
            idx = vispruner_select_batch(attn[crops], feats[crops], T, **kw)
            kept[torch.tensor(crops, device=attn.device)[:, None], idx.to(attn.device)] = True
    return kept


class VisPruner:
    """Reducer: VisPruner per vision-tower crop (LLaVA-1.5, LLaVA-NeXT) or video frame (Video-LLaVA); see the
    module docstring.

    Args:
        important_ratio: share of each crop's budget chosen by [CLS] attention (official default 0.5).
        next_packing: LLaVA-NeXT packing, "official" (default: T per crop from all 576 patches, no unpadding,
            no newlines, `ReplacedSpan`) or "stock" (named deviation: llava-hf's unpadded packing).
        similarity_dtype: dtype of the duplicate-removal similarities (default: the images' dtype, as the
            official `image_features.to(images.dtype)`).
    """

    name = "vispruner"
    families = ("llava", "llava_next", "video_llava")
    needs_vision_capture = True  # the executor records the tower's feature layer; no second tower run

    def __init__(self, important_ratio: float = IMPORTANT_RATIO, next_packing: str = "official",
                 similarity_dtype: torch.dtype | None = None) -> None:  # fmt: skip
        if not 0.0 <= important_ratio <= 1.0:
            raise ReducerError(f"important_ratio must be in [0, 1], got {important_ratio}")
        if next_packing not in NEXT_PACKINGS:
            raise ReducerError(f"next_packing must be one of {', '.join(NEXT_PACKINGS)}, got {next_packing!r}")
        self.important_ratio = important_ratio
        self.next_packing = next_packing
        self.similarity_dtype = similarity_dtype

    def _kw(self, ctx: ReductionContext) -> dict:
        pv = ctx.model_inputs.get("pixel_values")
        dtype = self.similarity_dtype or (pv.dtype if isinstance(pv, torch.Tensor) and pv.is_floating_point() else None)
        return dict(important_ratio=self.important_ratio, similarity_dtype=dtype)

    def select(self, ctx: ReductionContext, n_keep: int) -> list[Selection]:
        check_family(self, ctx.family)
        check_n_keep("VisPruner", ctx, n_keep)
        if ctx.family == "video_llava":
            return self._select_video_llava(ctx, n_keep)
        cap = vision_capture(ctx)
        if len(cap.crops_per_image) != len(ctx.images):
            raise ReducerError(
                f"the vision tower saw {len(cap.crops_per_image)} images but the prompt has {len(ctx.images)}"
            )
        kw = self._kw(ctx)
        out: list[Selection] = []
        # spans are in sequence order, batch-major: the same order as the images fed to the tower
        for g, span in enumerate(ctx.images):
            rows = cap.image_crops(g)
            attn, feats = official_cls_attention(ctx.model, cap, rows), cap.features[rows, 1:]  # patches only
            if ctx.family == "llava":
                if attn.shape != (1, span.num_tokens):
                    raise ReducerError(
                        f"LLaVA image span has {span.num_tokens} tokens but the tower gave {attn.shape[0]} crop(s) "
                        f"of {attn.shape[1]} patches; VisPruner needs vision_feature_select_strategy='default'"
                    )
                out.append(torch.nonzero(select_crops(attn, feats, [n_keep], **kw)[0]).flatten().cpu())
            elif self.next_packing == "stock":
                out.append(self._select_next_stock(ctx, g, attn, feats, span.num_tokens, n_keep, kw))
            elif n_keep >= span.num_tokens or n_keep == 0:
                out.append(torch.arange(n_keep))  # everything (stock packing) or nothing
            else:
                kept = select_crops(attn, feats, crop_budgets(n_keep, attn.shape[0], attn.shape[1]), **kw)
                out.append(official_span(ctx, g, kept))
        return out

    def _select_next_stock(self, ctx, g, attn, feats, num_tokens: int, n_keep: int, kw) -> torch.Tensor:
        lay = llava_next_layout(ctx.model, ctx.model_inputs["image_sizes"][g], num_tokens=num_tokens)
        if lay.num_crops != attn.shape[0]:
            raise ReducerError(f"LLaVA-NeXT layout has {lay.num_crops} crops, the vision tower saw {attn.shape[0]}")
        newlines = torch.nonzero(lay.newline).flatten()
        W = newlines.numel()
        n_nl = max(0, n_keep - (num_tokens - W))  # newlines only beyond all vision tokens
        positions = [lay.crop_positions(c) for c in range(lay.num_crops)]
        quota = split_budget(n_keep - n_nl, [p.numel() for p in positions])
        kept = [newlines[uniform_indices(W, n_nl)]]
        for c, (pos, q) in enumerate(zip(positions, quota)):
            if q:
                patches = lay.patch[pos].to(attn.device)  # the crop's patches present in the span (unpadded)
                local = vispruner_select_batch(attn[c, patches][None], feats[c, patches][None], q, **kw)[0].cpu()
                kept.append(pos[local])
        return torch.sort(torch.cat(kept)).values

    def _select_video_llava(self, ctx: ReductionContext, n_keep: int) -> list[Selection]:
        """Video-LLaVA: an image is one crop of 256 patches (as LLaVA-1.5); a video's frames are its crops, each
        keeping `crop_budgets(n_keep, frames, patches)` of its own patches (32 per frame for 256 of 2048), the
        frames batched as the official code batches an image's crops. The span holds every frame's [CLS] row
        before its patches (HF keeps them); VisPruner keeps patches only (FasterVLM's Video-LLaVA tower drops
        the [CLS] rows, `select_feature='patch'`), in frame order and patch order within a frame."""
        video_id = int(ctx.model.config.video_token_id)
        kw = self._kw(ctx)
        images = videos = 0
        out: list[Selection] = []
        for span in ctx.images:  # sequence order, batch-major: the order the towers saw them
            is_video = int(ctx.input_ids[span.batch_index, span.positions[0]]) == video_id
            cap = vision_capture(ctx, video=is_video)
            g = videos if is_video else images
            if g >= len(cap.crops_per_image):
                raise ReducerError(f"the {cap.tower} saw {len(cap.crops_per_image)} inputs but the prompt has more")
            rows = cap.image_crops(g)
            attn, feats = official_cls_attention(ctx.model, cap, rows), cap.features[rows, 1:]  # patches only
            frames, patches = attn.shape
            stride = patches + (1 if is_video else 0)  # a video frame's rows: [CLS], then its patches
            if frames * stride != span.num_tokens:
                raise ReducerError(
                    f"Video-LLaVA span of {span.num_tokens} tokens does not match {frames} tower input(s) of "
                    f"{patches} patches{' + [CLS]' if is_video else ''}; VisPruner needs vision_feature_select_strategy='default'"
                )  # fmt: skip
            if n_keep > frames * patches:  # all patches, and [CLS] rows (uniformly over the frames) beyond them
                cls_rows = uniform_indices(frames, n_keep - frames * patches) * stride
                keep = torch.ones(span.num_tokens, dtype=torch.bool)
                keep[torch.arange(frames) * stride] = False
                keep[cls_rows] = True
                out.append(torch.nonzero(keep).flatten())
            else:
                kept = select_crops(attn, feats, crop_budgets(n_keep, frames, patches), **kw)  # (frames, patches)
                f_idx, p_idx = torch.nonzero(kept, as_tuple=True)  # row-major: frame order, then patch order
                out.append((f_idx * stride + p_idx + (1 if is_video else 0)).cpu())
            images, videos = images + (not is_video), videos + is_video
        return out
