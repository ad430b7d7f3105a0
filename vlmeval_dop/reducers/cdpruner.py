"""CDPruner (Zhang et al. 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
Pruning in MLLMs"; official code Theia-4869/CDPruner, `llava/model/llava_arch.py: encode_images`): keep the
visual tokens that form the MAP subset of a DPP whose kernel is conditioned on the instruction.

For one crop of N visual tokens:

- similarity  S = cosine similarity of the LLM-input features (projector outputs), in float32;
- relevance   r_i = mean_m( -cos(e_i, t_m) ) over the M text embeddings t_m, then min-max normalised as
  the official code does: r <- (r - min r + 1e-6) / (max r - min r). The *negated* cosine is the official
  convention (CLIP penultimate-layer patch embeddings are anti-aligned with the text they match);
- optional theta (the official code ships it commented out, i.e. off; default here: off):
  r <- exp(alpha * r) with alpha = theta / (2 (1 - theta));
- kernel      L = diag(r) S diag(r);
- selection   greedy MAP of the DPP for n_keep tokens (`dpp.dpp_greedy_map`, Chen et al. 2018), returned
  sorted (spatial order).

Family specifics:

- LLaVA-1.5 (as official): e_i = CLIP `visual_projection(post_layernorm(feature layer patch i))` with the
  model's own tower and CLIP's projection; t_m = CLIP text embeddings of the instruction, one per
  77-token segment (`clip_text.py`). The min-max runs over the image's tokens.
- LLaVA-NeXT (as official `vtn * 5`): every crop (base image first, then the grid crops) runs its own DPP
  with an equal share n_keep // crops (the first n_keep % crops crops take one more). The relevance
  min-max runs jointly over all crops of the image (the official code normalises over the whole batch of
  crops of its batch-size-1 eval; we normalise per image so results do not depend on batch composition).
  Deviations forced by llava-hf's packing (`llava_next_layout`): (1) the official code keeps every row
  newline token *on top of* its 5 x vtn tokens; the executor needs exactly n_keep indices of the span and
  the paper's n_v counts crop tokens only (2880 at 672x672), so newline placeholders are not kept (unless
  n_keep exceeds the image's crop tokens: then all crop tokens and the first newlines are kept). (2) For
  non-square images `unpad_image` removes some grid patches; the official code selects among all 576
  patches of a crop and unpadding then drops some picks, so it keeps fewer than vtn per crop. We run each
  crop's DPP over the patches present in the span, and a crop with fewer present patches than its share
  passes the surplus to the next crops with room, so exactly n_keep are kept.
- Qwen2.5-VL (port for the paper's Table 19 reproduction; no official code exists): no CLIP. Features =
  the merger outputs (the decoder-input visual embeddings) for both S and e_i; text = the LLM's own input
  embeddings of the instruction tokens (those after the image, up to the end of the user turn), each
  instruction token one t_m (mean of per-token negated cosines, the official formula with M = tokens). The
  sign and min-max conventions are kept from the official LLaVA code.
- InternVL3 (paper Table 13 reports CDPruner there, copied from the CDPruner paper, whose code for it is not
  released): the same port as Qwen2.5-VL on the pixel-shuffled, projected tile tokens; the `<img>` / `</img>`
  markers are not instruction tokens. Tiles are not treated separately (the span is one DPP), as for DivPrune.

The instruction text (LLaVA): the tokens of the sample after its last image placeholder, up to the last
real token, decoded with the model's tokenizer (loaded from `model.name_or_path`, or passed as
`CDPruner(tokenizer=...)`), special tokens skipped, and a trailing llava chat-template generation prompt
("ASSISTANT:") removed. With llava-hf's template ("USER: <image>\\n{question} ASSISTANT:") this is exactly
the question text the official evaluation passes as `texts`. A caller may override it with
`CDPruner(text_fn=lambda ctx, span: "...")`. An empty instruction gives r = 1 for every token (pure
diversity DPP).

`needs_vision_capture` is True by default: on the LLaVA families the executor records the CLIP feature layer
during the model's own forward, so the tower runs once (the executor attaches the recorder to CLIP towers
only; Qwen2.5-VL uses the merger outputs it already has). `CDPruner(capture=False)` makes the reducer run
the tower itself (`vision.vision_capture` fallback), e.g. when called outside the executor.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import ImageSpan, ReducerError, ReductionContext, check_n_keep
from .dpp import dpp_greedy_map
from .instruction import InstructionText, instruction_ids

_CLIP_FAMILIES = ("llava", "llava_next")


def cosine_similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """(N, N) cosine similarity of the rows of `features` in float32 (official: normalise, then matmul)."""
    f = features.float()
    f = f / f.norm(dim=-1, keepdim=True)
    return f @ f.T


def relevance_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor, theta: float | None = None) -> torch.Tensor:
    """Official CDPruner relevance of every image embedding (..., C) to the text embeddings (M, C).

    r = mean_m(-cos(e, t_m)), min-max normalised over *all* entries of `image_embeds`' leading dims:
    (r - min + 1e-6) / (max - min); then exp(alpha r), alpha = theta / (2 (1 - theta)), if `theta` is given.
    Constant r (max == min, or no text: M = 0) gives r = 1 everywhere.
    """
    e = image_embeds.float()
    e = e / e.norm(dim=-1, keepdim=True)
    if text_embeds.shape[0] == 0:
        return torch.ones(e.shape[:-1], dtype=torch.float32, device=e.device)
    t = text_embeds.float().to(e.device)
    t = t / t.norm(dim=-1, keepdim=True)
    r = (-(e @ t.T)).mean(dim=-1)
    lo, hi = r.min(), r.max()
    if not bool(hi > lo):
        r = torch.ones_like(r)
    else:
        r = (r - lo + 1e-6) / (hi - lo)
    if theta is not None:
        if not 0.0 < theta < 1.0:
            raise ReducerError(f"CDPruner theta must be in (0, 1), got {theta}")
        r = torch.exp(theta / (2 * (1 - theta)) * r)
    return r


def conditional_kernel(features: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """L = diag(r) S diag(r) with S the cosine similarity of `features` (N, D), r `relevance` (N,)."""
    S = cosine_similarity_matrix(features)
    r = relevance.float().to(S.device)
    return r[:, None] * S * r[None, :]


def cdpruner_select(features: torch.Tensor, relevance: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Sorted indices of the greedy DPP MAP subset of size `n_keep` under the conditional kernel.

    Raises:
        ReducerError: `n_keep` outside 0..N or mismatched shapes.
    """
    N = features.shape[0]
    if relevance.shape != (N,):
        raise ReducerError(f"CDPruner relevance has shape {tuple(relevance.shape)}, expected ({N},)")
    if not 0 <= n_keep <= N:
        raise ReducerError(f"CDPruner cannot keep {n_keep} of {N} tokens; valid: 0..{N}")
    picked = dpp_greedy_map(conditional_kernel(features, relevance), n_keep)
    return torch.sort(picked.cpu()).values


def crop_quotas(available: list[int], n_keep: int) -> list[int]:
    """Split `n_keep` over crops: equal shares (the first `n_keep % crops` one more), capped by each crop's
    available tokens, the surplus of full crops passed on in crop order. Sums to min(n_keep, sum(available))."""
    C = len(available)
    quota = [min(n_keep // C + (1 if c < n_keep % C else 0), available[c]) for c in range(C)]
    rest = min(n_keep, sum(available)) - sum(quota)
    for c in range(C):
        extra = min(rest, available[c] - quota[c])
        quota[c] += extra
        rest -= extra
    return quota


class CDPruner:
    """Reducer: conditional-DPP visual token selection (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, InternVL3); see module doc.

    Args:
        clip_model: CLIP checkpoint (HF id or directory) for the LLaVA families; default
            `clip_text.default_clip_source(model)` (openai/clip-vit-large-patch14-336, or the tiny CLIP for
            tiny checkpoints).
        tokenizer: the MLLM's tokenizer for decoding the instruction (default: loaded lazily from
            `model.name_or_path`).
        text_fn: `(ctx, span) -> str` overriding the instruction text (LLaVA families).
        theta: optional relevance weight (official default: off).
        capture: record the CLIP feature layer during the model's forward (LLaVA families only).
    """

    name = "cdpruner"
    families = ("llava", "llava_next", "qwen2_5_vl", "internvl")

    def __init__(
        self,
        clip_model: str | None = None,
        tokenizer: Any = None,
        text_fn: Callable[[ReductionContext, ImageSpan], str] | None = None,
        theta: float | None = None,
        capture: bool = True,
    ) -> None:
        self.clip_model = clip_model
        self._text = InstructionText(tokenizer, text_fn, who="CDPruner")
        self.theta = theta
        self.needs_vision_capture = capture

    # ------------------------------------------------------------------ text
    def instruction_ids(self, ctx: ReductionContext, span: ImageSpan) -> torch.Tensor:
        """Token ids of the sample after its last image span, up to its last real token."""
        return instruction_ids(ctx, span)

    def instruction_text(self, ctx: ReductionContext, span: ImageSpan) -> str:
        """The instruction text for `span` (LLaVA families), see vlmeval_dop.reducers.instruction."""
        return self._text(ctx, span)

    def qwen_instruction_ids(self, ctx: ReductionContext, span: ImageSpan) -> torch.Tensor:
        """Qwen2.5-VL / InternVL3 instruction tokens: after the image (image markers skipped) up to the end
        of the user turn."""
        ids = self.instruction_ids(ctx, span)
        cfg = ctx.model.config
        stop = set()
        for src in (getattr(ctx.model, "generation_config", None), cfg.get_text_config(decoder=True)):
            eos = getattr(src, "eos_token_id", None) if src is not None else None
            stop |= set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        ends = [i for i, t in enumerate(ids.tolist()) if t in stop]
        ids = ids[: ends[0]] if ends else ids
        skip = [getattr(cfg, k, None) for k in ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id")]
        if ctx.family == "internvl":  # the <img> ... </img> markers around the tile tokens (no config ids)
            tok = self._text._tokenizer(ctx.model)
            skip += [tok.convert_tokens_to_ids(t) for t in ("<img>", "</img>") if t in tok.get_vocab()]
        keep = ~torch.isin(ids, torch.tensor([s for s in skip if s is not None], dtype=ids.dtype, device=ids.device))
        return ids[keep]

    # ------------------------------------------------------------------ relevance per family
    def clip_relevance(self, ctx: ReductionContext) -> list[torch.Tensor]:
        """LLaVA families: per image, the (crops, P) official relevance of every tower patch."""
        from .clip_text import default_clip_source, load_clip_text
        from .vision import vision_capture, vision_tower

        cap = vision_capture(ctx)
        clip = load_clip_text(self.clip_model or default_clip_source(ctx.model))
        tower = vision_tower(ctx.model)
        post_ln = getattr(tower, "vision_model", tower).post_layernorm
        if len(cap.crops_per_image) != len(ctx.images):
            raise ReducerError(f"vision tower saw {len(cap.crops_per_image)} images, the sequence has {len(ctx.images)}")
        texts = [self.instruction_text(ctx, span) for span in ctx.images]
        out = []
        with torch.no_grad():
            for i, text in enumerate(texts):
                patches = cap.features[cap.image_crops(i), 1:]  # (crops, P, D): [CLS] dropped as official
                e = clip.project_image(post_ln(patches))
                out.append(relevance_scores(e, clip.encode_text(text), self.theta))
        return out

    # ------------------------------------------------------------------ select
    def select(self, ctx: ReductionContext, n_keep: int) -> list[torch.Tensor]:
        if ctx.family not in self.families:
            raise ReducerError(f"reducer 'cdpruner' does not support model family {ctx.family!r}; supported: {', '.join(self.families)}")
        check_n_keep("CDPruner", ctx, n_keep)
        if ctx.family in ("qwen2_5_vl", "internvl"):  # no CLIP: LLM-space port (module docstring)
            return [self._select_qwen(ctx, span, n_keep) for span in ctx.images]
        rel = self.clip_relevance(ctx)
        if ctx.family == "llava":
            return [self._select_llava(ctx, span, r, n_keep) for span, r in zip(ctx.images, rel)]
        return [self._select_next(ctx, k, span, r, n_keep) for k, (span, r) in enumerate(zip(ctx.images, rel))]

    def _select_llava(self, ctx, span, rel, n_keep):
        if rel.shape != (1, span.num_tokens):
            raise ReducerError(
                f"CDPruner expects one crop of {span.num_tokens} patches for this LLaVA image, the tower gave "
                f"{tuple(rel.shape)} (vision_feature_select_strategy must be 'default')"
            )
        return cdpruner_select(ctx.image_embeds(span), rel[0], n_keep)

    def _select_next(self, ctx, k, span, rel, n_keep):
        from .llava_next_layout import llava_next_layout

        sizes = ctx.model_inputs.get("image_sizes")
        if sizes is None:
            raise ReducerError("CDPruner on LLaVA-NeXT needs image_sizes in the model inputs")
        lay = llava_next_layout(ctx.model, image_size=sizes[k], num_tokens=span.num_tokens)
        if lay.num_crops != rel.shape[0]:
            raise ReducerError(f"LLaVA-NeXT layout has {lay.num_crops} crops, the vision tower gave {rel.shape[0]}")
        embeds = ctx.image_embeds(span)
        positions = [lay.crop_positions(c) for c in range(lay.num_crops)]
        quotas = crop_quotas([p.numel() for p in positions], n_keep)
        kept = []
        for c, (pos, q) in enumerate(zip(positions, quotas)):
            if q:
                sel = cdpruner_select(embeds[pos.to(embeds.device)], rel[c, lay.patch[pos]], q)
                kept.append(pos[sel])
        short = n_keep - sum(quotas)  # n_keep beyond the crop tokens: fill with the first newlines
        if short > 0:
            kept.append(torch.nonzero(lay.newline).flatten()[:short])
        return torch.sort(torch.cat(kept)).values if kept else torch.empty(0, dtype=torch.long)

    def _select_qwen(self, ctx, span, n_keep):
        feats = ctx.image_embeds(span)
        ids = self.qwen_instruction_ids(ctx, span)
        with torch.no_grad():
            text = ctx.model.get_input_embeddings()(ids.to(ctx.input_ids.device))
        return cdpruner_select(feats, relevance_scores(feats, text, self.theta), n_keep)


__all__ = ["CDPruner", "cdpruner_select", "conditional_kernel", "cosine_similarity_matrix", "crop_quotas", "relevance_scores"]
