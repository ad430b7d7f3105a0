"""TRIM (Song et al., COLING 2025, "Less is More: A Simple yet Effective Token Reduction Method for
Efficient Multi-modal LLMs"; official code FreedomIntelligence/TRIM, `CLIPVisionTower.token_reduction`,
variant "TextSim+"), vision side, LLaVA-1.5 and LLaVA-NeXT.

Official procedure, per image:
1. CLIP image embeddings of the patch tokens: the LLaVA feature layer ([CLS] dropped) through the tower's
   `post_layernorm` and CLIP's `visual_projection`; the instruction's CLIP text embedding
   (`CLIPTextModelWithProjection`, tokenizer truncation at 77 tokens).
2. score = softmax over patches of the *negated* dot product (unnormalised embeddings), exactly as the
   official code (`similarities = -similarities; softmax`); the top-scored patches are kept.
3. Adaptive count (`TRIM:-1`): the patches whose score is an IQR outlier (> Q3 + 1.5 IQR) are kept.
4. "+": every patch not kept is averaged into one extra token (pre-projector features), so no image
   region is lost entirely; the LLM sees `[kept patches in raster order] + [mean token]`, all rows through
   the projector.

Budget: the official knob is the kept fraction `k` (`TRIM:k` keeps `int(576 k)` patches, then the mean
token). `n_keep` tokens = `n_keep - 1` top-scored patches + the mean token, i.e. the official output at
`int(576 k) = n_keep - 1` (ties: lower index first; the official `topk` has no tie rule). The IQR outliers
are the top of the same ranking, so `iqr_outlier_count` gives the count the adaptive variant keeps.
`n_keep` = all patches returns the image unchanged (the official code cannot run `k = 1`: its mean token
would index past the end).

LLaVA-1.5: the reducer returns a `ReplacedSpan` with the kept patches' rows in raster order and the mean
token's row appended after them, the official sequence (`handle.last_kept` reports the patches, then -1
for the mean token). Golden test: `tests/test_golden_trim.py` against outputs of the official
`token_reduction` (`tests/golden/trim/README.md`).

LLaVA-NeXT (our per-crop extension): the official repo's anyres path does not work with TRIM (it views the
compacted, zero-padded 576-row outputs as spatial grids and then truncates the whole image to the first
crop's `int(576 k) + 1` rows, i.e. keeps only the base crop's tokens); the paper copies CDPruner's numbers.
Here, per crop as the other reducers, `n_keep` is split evenly over the base image and the grid crops
(`crop_quotas`), each crop keeping its top `q - 1` patches plus its own mean token, which takes the
position of the crop's highest-index patch not kept; llava-hf's row newlines are not kept (they are not
vision-tower tokens; the paper counts 2880 crop tokens).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .base import ImageSpan, KeptTokens, ReducerError, ReductionContext, ReplacedSpan, check_n_keep
from .cdpruner import crop_quotas
from .instruction import InstructionText
from .vision import CLIP_FAMILIES, vision_capture, vision_tower
from ..methods import register_method


def trim_scores(image_embeds: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
    """Official TRIM score of each patch: softmax_i(-<e_i, t>) over the patches (float32)."""
    return torch.softmax(-(image_embeds.float() @ text_embed.float().to(image_embeds.device)), dim=-1)


def iqr_outlier_count(scores: torch.Tensor) -> int:
    """How many scores exceed Q3 + 1.5 IQR (numpy's linear percentiles, as the official code)."""
    s = scores.detach().float().cpu().numpy().ravel()
    q1, q3 = np.percentile(s, 25), np.percentile(s, 75)
    return int((s > q3 + 1.5 * (q3 - q1)).sum())


def trim_select(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Sorted indices of the patches TRIM keeps as themselves for a budget of `n_keep` tokens: the
    `n_keep - 1` top-scored ones (ties to the lower index; the mean token of the rest is the n_keep-th
    token), or all patches (no mean token) when `n_keep` covers them all."""
    N = scores.numel()
    if not 0 <= n_keep <= N:
        raise ReducerError(f"TRIM cannot keep {n_keep} of {N} tokens; valid: 0..{N}")
    if n_keep == N:
        return torch.arange(N)
    if n_keep == 0:
        return torch.empty(0, dtype=torch.long)
    order = sorted(range(N), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[: n_keep - 1]), dtype=torch.long)


@register_method("trim", kind="vision")
class TRIM:
    """Reducer: CLIP text-similarity selection plus one mean token per image/crop (see module doc).

    Args:
        clip_model: CLIP checkpoint with the text tower (default as CDPruner: the tower LLaVA was built on,
            or the tiny CLIP for tiny checkpoints).
        tokenizer / text_fn: how the instruction text is obtained (vlmeval_dop.reducers.instruction).
        capture: record the CLIP feature layer during the model's own forward (no second tower run).
    """

    name = "trim"
    families = CLIP_FAMILIES

    def __init__(
        self,
        clip_model: str | None = None,
        tokenizer: Any = None,
        text_fn: Callable[[ReductionContext, ImageSpan], str] | None = None,
        capture: bool = True,
    ) -> None:
        self.clip_model = clip_model
        self._text = InstructionText(tokenizer, text_fn, who="TRIM")
        self.needs_vision_capture = capture

    @torch.no_grad()
    def text_embedding(self, clip, text: str) -> torch.Tensor:
        """(C,) CLIP text embedding of `text`, truncated to CLIP's context as the official tokenizer call."""
        enc = clip.tokenizer(text=[text], return_tensors="pt", truncation=True, max_length=clip.max_positions)
        device = next(clip.text_model.parameters()).device
        out = clip.text_model(**{k: v.to(device) for k, v in enc.items()})
        return clip.text_projection(out.pooler_output)[0].float()

    def select(self, ctx: ReductionContext, n_keep: int) -> list[torch.Tensor | KeptTokens | ReplacedSpan]:
        if ctx.family not in self.families:
            raise ReducerError(f"reducer 'trim' does not support model family {ctx.family!r}; supported: {', '.join(self.families)}")
        check_n_keep("TRIM", ctx, n_keep)
        from .clip_text import default_clip_source, load_clip_text

        cap = vision_capture(ctx)
        clip = load_clip_text(self.clip_model or default_clip_source(ctx.model))
        tower = vision_tower(ctx.model)
        post_ln = getattr(tower, "vision_model", tower).post_layernorm
        projector = ctx.model.model.multi_modal_projector
        out = []
        for i, span in enumerate(ctx.images):
            text = self.text_embedding(clip, self._text(ctx, span))
            crops = cap.features[cap.image_crops(i), 1:]  # (C, P, D) pre-projector patches, [CLS] dropped
            with torch.no_grad():
                scores = trim_scores(clip.project_image(post_ln(crops)), text)  # (C, P)
            embeds = ctx.image_embeds(span)
            if ctx.family == "llava":
                if crops.shape[:2] != (1, span.num_tokens):
                    raise ReducerError(
                        f"LLaVA image span has {span.num_tokens} tokens, the vision tower gave {tuple(crops.shape[:2])}"
                    )
                out.append(self._official_llava(crops[0], scores[0], embeds, n_keep, projector))
                continue
            from .llava_next_layout import llava_next_layout

            lay = llava_next_layout(ctx.model, ctx.model_inputs["image_sizes"][i], num_tokens=span.num_tokens)
            groups = [(lay.crop_positions(c), c, lay.patch[lay.crop_positions(c)]) for c in range(lay.num_crops)]
            newline = torch.nonzero(lay.newline).flatten()
            quotas = crop_quotas([g[0].numel() for g in groups], n_keep)
            kept, rows = [], {}
            for (positions, crop, patches), q in zip(groups, quotas):
                if not q:
                    continue
                local = trim_select(scores[crop, patches], q)
                if local.numel() == q:  # every patch of the crop: no mean token
                    kept.append(positions[local])
                    continue
                rest = torch.ones(patches.numel(), dtype=torch.bool)
                rest[local] = False
                slot = int(torch.nonzero(rest).max())  # the mean token sits at the last patch not kept
                kept.append(positions[torch.cat([local, torch.tensor([slot])])])
                with torch.no_grad():
                    rows[int(positions[slot])] = projector(crops[crop, patches[rest]].mean(0)[None].to(embeds.dtype))[0]
            short = n_keep - sum(quotas)  # n_keep beyond the crop tokens: the first newlines
            if short > 0:
                kept.append(newline[:short])
            idx = torch.sort(torch.cat(kept)).values if kept else torch.empty(0, dtype=torch.long)
            new = embeds[idx.to(embeds.device)].clone()
            for r, pos in enumerate(idx.tolist()):
                if pos in rows:
                    new[r] = rows[pos].to(new)
            out.append(KeptTokens(idx, new))
        return out

    @staticmethod
    def _official_llava(feats: torch.Tensor, scores: torch.Tensor, embeds: torch.Tensor, n_keep: int, projector):
        """LLaVA-1.5, official order: the kept patches' rows (raster order), then projector(mean of the rest)."""
        local = trim_select(scores, n_keep)
        if local.numel() == n_keep:  # all patches (n_keep = N) or none: no mean token
            return local
        rest = torch.ones(scores.numel(), dtype=torch.bool)
        rest[local] = False
        with torch.no_grad():  # official: the mean in float32 (its eval casts the fp16 features up), then projected
            mean = projector(feats[rest.to(feats.device)].float().mean(0)[None].to(embeds.dtype))[0]
        rows = torch.cat([embeds[local.to(embeds.device)], mean[None].to(embeds)])
        return ReplacedSpan(rows, torch.cat([local, torch.tensor([-1])]))


__all__ = ["TRIM", "iqr_outlier_count", "trim_scores", "trim_select"]
