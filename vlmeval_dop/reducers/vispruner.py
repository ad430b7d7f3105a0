"""VisPruner (Zhang et al., ICCV 2025, "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective
Token Pruning in VLMs"; official code github.com/Theia-4869/VisPruner, `LlavaMetaForCausalLM.encode_images`):
the visual-token reduction of the paper's DOP_V.

Per vision-tower crop, with budget T:

1. **important tokens**: the `T_imp = int(T * important_ratio)` patches with the largest [CLS] attention of the
   tower's feature layer (`attentions[-2]`, CLS query row, mean over heads; the official default
   `--important_ratio 0.5`);
2. **diverse tokens**: from the remaining patches, in descending-attention order, duplicates are removed
   iteratively until `T_div = T - T_imp` remain. Each iteration splits the ordered remainder into
   alternating sets A (even positions) and B (odd positions), scores every token of A by its largest cosine
   similarity to B, and drops the `r = min(8, R - T_div)` highest-scoring A tokens; the next remainder is the
   surviving A tokens in descending-score order followed by B. Similarity is computed on the feature
   layer's patch features (`hidden_states[-2][:, 1:]`, before the projector), as the official code does.

The kept set is returned in spatial order (the official code builds a boolean mask).

LLaVA-NeXT: the official code runs steps 1-2 on every crop (base image and grid crops) independently with
the same T, i.e. `n_v = T x crops` ("32 * 5 = 160 visual tokens" in its README; consistently, the paper's
LLaVA-NeXT budgets in Table 15, 965/485/240 and 960/480/240, are multiples of 5), and then packs the
surviving tokens as stock LLaVA-NeXT does: the grid crops are unpadded to the aspect ratio and one
`image_newline` is appended to every row; all newline tokens are always kept.

llava-hf's image span of LLaVA-NeXT contains those newline placeholders (672x672: 2880 vision-tower
tokens + 48 newlines = 2928 placeholders), and the DOP executor counts every placeholder of the span, so
`n_keep` placeholders must be returned exactly. We follow the paper's count, in which `n_v` counts
vision-tower tokens (2880 = 5 x 576 at 100%):

- `n_keep <= V` (V = vision-tower tokens in the span, 2880 for a square 672 image): `n_keep` vision tokens,
  split as evenly as possible over the crops (remainder to the lowest crop numbers, base first; a crop
  whose unpadded size is smaller than its share gives the rest to the others), and no newline. The
  paper's n_v = 2560 is then exactly the official T = 512 per crop, and the decoder sees n_v tokens, which
  is what the paper's FLOPs accounting (and ours, `arch.visual_tokens`) charges. Deviation: the official
  code would feed the 48 newlines on top of the budget (uncounted by the paper).
- `V < n_keep <= N`: all vision tokens plus `n_keep - V` newlines, evenly spaced over the rows;
  `n_keep = N` keeps the whole span, i.e. the stock model.

`VisPruner(keep_newlines=True)` instead reserves the budget for the newlines first (all of them if
`n_keep` allows, as the official code keeps them) and selects `n_keep - newlines` vision tokens.

Deviations from the official code (all where it is undefined or cannot apply):

- ties (equal attention or equal similarity scores) go to the lower index / earlier position (stable sort);
  the official `torch.argsort` on GPU leaves their order unspecified;
- similarities in float32 and taken from one P x P cosine matrix computed up front (the official multiplies
  the A and B subsets in the model dtype, fp16, every iteration), so near-ties may resolve differently;
- when the remainder R is odd, or `r` exceeds the size of A, the official indexing raises a shape error
  (e.g. LLaVA-1.5 at the paper's n_v = 51: R = 576 - 25 = 551, "shape mismatch: indexing tensors could not
  be broadcast"); we keep all surviving A tokens, resp. drop all of A (the evident intent);
- LLaVA-NeXT grid crops: candidates are only the patches that survive unpadding (those present in the
  span), so every crop yields exactly its share; the official code ranks all 576 patches of a crop and
  then loses the selected ones that unpadding removes (fewer tokens than budgeted for non-square images).
"""
from __future__ import annotations

import torch

from .base import ReducerError, ReductionContext, check_family, check_n_keep
from .llava_next_layout import llava_next_layout
from .uniform import uniform_indices
from .vision import vision_capture

IMPORTANT_RATIO = 0.5  # official default: `--important_ratio 0.5` (llava/eval/model_vqa*.py)
REMOVE_PER_STEP = 8  # official: at most 8 duplicates removed per iteration (`r = min(8, R - T_div)`)


def _stable_desc(values: torch.Tensor) -> torch.Tensor:
    """Indices sorting `values` descending; ties keep their current order (lowest position first)."""
    return torch.sort(values, descending=True, stable=True).indices


def vispruner_select(
    cls_attention: torch.Tensor,
    features: torch.Tensor,
    n_keep: int,
    important_ratio: float = IMPORTANT_RATIO,
    remove_per_step: int = REMOVE_PER_STEP,
) -> torch.Tensor:
    """VisPruner on one crop: sorted indices of the `n_keep` kept patches.

    Args:
        cls_attention: (P,) [CLS] attention to each patch (feature layer, mean over heads).
        features: (P, D) patch features of the same layer (similarity of the diverse step).
        n_keep: tokens to keep, 0..P.
        important_ratio: fraction of `n_keep` taken by attention (`int(n_keep * ratio)`), the rest by
            diversity; official default 0.5.
        remove_per_step: most duplicates dropped per iteration; official 8.
    """
    if cls_attention.ndim != 1 or features.ndim != 2 or features.shape[0] != cls_attention.shape[0]:
        raise ReducerError(
            f"VisPruner needs cls_attention (P,) and features (P, D), got {tuple(cls_attention.shape)} and "
            f"{tuple(features.shape)}"
        )
    P = cls_attention.shape[0]
    if not 0 <= n_keep <= P:
        raise ReducerError(f"VisPruner cannot keep {n_keep} of {P} tokens; valid: 0..{P}")
    if not 0.0 <= important_ratio <= 1.0:
        raise ReducerError(f"important_ratio must be in [0, 1], got {important_ratio}")
    if remove_per_step < 1:
        raise ReducerError(f"remove_per_step must be >= 1, got {remove_per_step}")
    device = cls_attention.device
    n_imp = int(n_keep * important_ratio)
    n_div = n_keep - n_imp

    order = _stable_desc(cls_attention.float())
    important, residual = order[:n_imp], order[n_imp:]
    sim = None
    while n_div > 0:
        R = residual.numel()
        r = min(remove_per_step, R - n_div)
        if r <= 0:
            break
        if sim is None:  # all cosines once (one P x P product instead of a product per iteration)
            unit = torch.nn.functional.normalize(features.float(), dim=-1)
            sim = unit @ unit.T
        a, b = residual[0::2], residual[1::2]  # b is non-empty: R > n_div >= 1
        scores = sim[a[:, None], b[None, :]].max(dim=-1).values
        survivors = a[_stable_desc(scores)[r:]]  # drop the r most duplicated (all of A if r > |A|)
        residual = torch.cat([survivors, b])
    kept = torch.cat([important, residual]) if n_div > 0 else important
    return torch.sort(kept).values.to(device=device, dtype=torch.long)


def split_budget(n_keep: int, capacities: list[int]) -> list[int]:
    """Split `n_keep` over crops as evenly as possible, never above a crop's capacity.

    Water filling: every crop gets `min(capacity, level)` for the largest level that fits, and the few
    tokens left go one each to the lowest-numbered crops that still have room (the result of dealing the
    tokens out one at a time, crop 0, 1, 2, ... in turn, skipping full crops). Official: the same T for every
    crop, `n_v = T x crops`, which this gives whenever `n_keep` divides evenly and no crop is too small.
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


class VisPruner:
    """Reducer: VisPruner per vision-tower crop (LLaVA-1.5, LLaVA-NeXT); see the module docstring.

    Args:
        important_ratio: share of each crop's budget chosen by [CLS] attention (official default 0.5).
        keep_newlines: LLaVA-NeXT only; False (default) counts `n_keep` as vision tokens as the paper
            does (newlines only beyond them), True keeps the row newlines first as the official code.
    """

    name = "vispruner"
    families = ("llava", "llava_next")
    needs_vision_capture = True  # the executor records the tower's feature layer; no second tower run

    def __init__(self, important_ratio: float = IMPORTANT_RATIO, keep_newlines: bool = False) -> None:
        if not 0.0 <= important_ratio <= 1.0:
            raise ReducerError(f"important_ratio must be in [0, 1], got {important_ratio}")
        self.important_ratio = important_ratio
        self.keep_newlines = keep_newlines

    def select(self, ctx: ReductionContext, n_keep: int) -> list[torch.Tensor]:
        check_family(self, ctx.family)
        check_n_keep("VisPruner", ctx, n_keep)
        cap = vision_capture(ctx)
        if len(cap.crops_per_image) != len(ctx.images):
            raise ReducerError(
                f"the vision tower saw {len(cap.crops_per_image)} images but the prompt has {len(ctx.images)}"
            )
        out = []
        # spans are in sequence order, batch-major: the same order as the images fed to the tower
        for g, span in enumerate(ctx.images):
            rows = cap.image_crops(g)
            attn, feats = cap.cls_attention[rows], cap.features[rows, 1:]  # patches only ([CLS] first)
            if ctx.family == "llava":
                out.append(self._select_llava(attn, feats, span.num_tokens, n_keep))
            else:
                size = ctx.model_inputs["image_sizes"][g]
                out.append(self._select_llava_next(ctx.model, size, attn, feats, span.num_tokens, n_keep))
        return out

    def _select_llava(self, attn: torch.Tensor, feats: torch.Tensor, num_tokens: int, n_keep: int) -> torch.Tensor:
        if attn.shape[0] != 1 or attn.shape[1] != num_tokens:
            raise ReducerError(
                f"LLaVA image span has {num_tokens} tokens but the tower gave {attn.shape[0]} crop(s) of "
                f"{attn.shape[1]} patches; VisPruner needs vision_feature_select_strategy='default'"
            )
        return vispruner_select(attn[0], feats[0], n_keep, self.important_ratio).cpu()

    def _select_llava_next(self, model, image_size, attn, feats, num_tokens: int, n_keep: int) -> torch.Tensor:
        lay = llava_next_layout(model, image_size, num_tokens=num_tokens)
        if lay.num_crops != attn.shape[0]:
            raise ReducerError(f"LLaVA-NeXT layout has {lay.num_crops} crops, the vision tower saw {attn.shape[0]}")
        newlines = torch.nonzero(lay.newline).flatten()
        W = newlines.numel()
        V = num_tokens - W
        n_nl = min(W, n_keep) if self.keep_newlines else max(0, n_keep - V)
        positions = [lay.crop_positions(c) for c in range(lay.num_crops)]
        quota = split_budget(n_keep - n_nl, [p.numel() for p in positions])
        kept = [newlines[uniform_indices(W, n_nl)]]
        for c, (pos, q) in enumerate(zip(positions, quota)):
            patches = lay.patch[pos].to(attn.device)  # the crop's patches present in the span (unpadded)
            local = vispruner_select(attn[c, patches], feats[c, patches], q, self.important_ratio).cpu()
            kept.append(pos[local])
        return torch.sort(torch.cat(kept)).values
