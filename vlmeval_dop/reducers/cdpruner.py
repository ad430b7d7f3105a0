"""CDPruner (Zhang et al. 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
Pruning in MLLMs"; official code Theia-4869/CDPruner, `llava/model/llava_arch.py: encode_images`, its CLIP
tower `clip_encoder.py` and its eval scripts): keep the visual tokens that form the MAP subset of a DPP
whose kernel is conditioned on the instruction.

For the B crops of one image (B = 1 on LLaVA-1.5) with N visual tokens each, as the official code computes
them (same tensor operations and dtypes, so that near-ties resolve as in the official code):

- similarity  S = cosine similarity of the LLM-input features (projector outputs): normalised in their own
  dtype (float16 on GPU), then cast to float32 and multiplied;
- relevance   r_i = mean_m( -cos(e_i, t_m) ) over the M text embeddings t_m, then min-max normalised over
  all crops of the image: r <- (r - min r + 1e-6) / (max r - min r). The *negated* cosine is the official
  convention; a constant r (max = min, or no text) gives r = 1 (the official code would divide by zero);
- optional theta (the official code ships it commented out, i.e. off; default here: off):
  r <- exp(alpha * r) with alpha = theta / (2 (1 - theta));
- kernel      L = diag(r) S diag(r);
- selection   greedy MAP of the DPP for T tokens per crop in float32 (`dpp_map`, Chen et al. 2018, the
  official incremental Cholesky loop batched over crops; ties to the lowest index as `torch.argmax`). When
  the kernel's rank runs out before T picks (a pivot <= 0: more tokens than feature dimensions), the
  official code produces NaN and repeated picks; we fill the remaining picks with the unchosen tokens in
  decreasing relevance (ties to the lowest index).

Family specifics:

- LLaVA-1.5 (as official): e_i = CLIP `visual_projection(post_layernorm(feature layer patch i))` with the
  model's own tower and CLIP's projection (float32); t_m = CLIP text embeddings of the instruction, one per
  77-token segment (`clip_text.py`). The kept set is returned as a plain selection (patch order).
- LLaVA-NeXT (`next_packing="official"`, default): every crop (base image, then the 2x2 grid crops at the
  fixed 672x672 resolution of the official repo) runs its own DPP over all its 576 patches with
  T = n_keep / 5, on the projector outputs of all patches (padded-canvas patches included), and the image
  becomes the official packing (`llava_next_packing`): 5T rows, no unpadding, no newline rows, as a
  `ReplacedSpan`. The relevance min-max runs jointly over the crops of the image (the official code
  normalises over its batch, the crops of its batch-size-1 eval's one image). n_keep equal to the whole span
  keeps the image as stock llava-hf packs it.
  `next_packing="stock"` (named deviation): keep llava-hf's packing (unpadded grid, row newlines) and run each
  crop's DPP over the patches present in the span (`crop_quotas`; newlines only beyond all crop tokens).
  Measured against the official packing on the golden fixtures (kept (crop, patch) sets,
  tests/golden/cdpruner): identical rows in identical order for square images; mean Jaccard 0.996 / 0.973 /
  0.968 (T = 32 / 64 / 97, three seeds) for the 400x672 images.
- Qwen2.5-VL (port for the paper's Table 19 reproduction; no official code exists): no CLIP. Features =
  the merger outputs (the decoder-input visual embeddings) for both S and e_i; text = the LLM's own input
  embeddings of the instruction tokens (those after the image, up to the end of the user turn), each
  instruction token one t_m (mean of per-token negated cosines, the official formula with M = tokens). The
  sign and min-max conventions are kept from the official LLaVA code.
- InternVL3 (paper Table 13 reports CDPruner there, copied from the CDPruner paper, whose code for it is not
  released): the same port as Qwen2.5-VL on the pixel-shuffled, projected tile tokens; the `<img>` / `</img>`
  markers are not instruction tokens. Tiles are not treated separately (the span is one DPP), as for DivPrune.
  InternVL3.5 is the same class and port.
- Qwen2-VL and Qwen3-VL (models beyond the paper): the Qwen2.5-VL port as is. Both write the image as
  `<|vision_start|><|image_pad|>...<|vision_end|>` with the merger outputs as the placeholders' decoder inputs and
  end the user turn with `<|im_end|>` (the generation config's eos), so features, instruction tokens and markers are
  found the same way. Qwen3-VL's DeepStack features are added inside the decoder, after the selection: they play
  no part in it (the port scores the decoder-input embeddings, as for Qwen2.5-VL).
- Not ported: SmolVLM, LLaVA-OneVision and Gemma 3 (refused by name). Their decoder-input image embeddings would
  allow the same port, but each needs its own instruction-token rules (SmolVLM's tile markers, Gemma 3's
  `<start_of_image>` / `<end_of_image>` and `<end_of_turn>`), and no result for them exists to check the port
  against; `uniform` and `divprune` run there.

The CLIP text (LLaVA families) is the bare question the official evaluation passes as `texts`, *not* the
whole prompt: the eval scripts remove the answer-format instruction ("\\nAnswer the question using a single
word or phrase.", "\\nAnswer with the option's letter from the given choices directly.", MMBench's English /
Chinese instruction), see `vlmeval_dop.reducers.instruction.bare_question`. Inside VLMEvalKit the wrapper
hands over the exact prompt text (`instruction.prompt_text`); called outside it, the text after the image is
decoded with the model's tokenizer (loaded from `model.name_or_path`, or `CDPruner(tokenizer=...)`), the
chat template's "ASSISTANT:" removed, and reduced the same way. `CDPruner(text_fn=lambda ctx, span: "...")`
overrides the text. An empty instruction gives r = 1 for every token (pure diversity DPP).

`needs_vision_capture` is True by default: on the LLaVA families the executor records the CLIP feature layer
during the model's own forward, so the tower runs once (the executor attaches the recorder to CLIP towers
only; Qwen2.5-VL uses the merger outputs it already has). `CDPruner(capture=False)` makes the reducer run
the tower itself (`vision.vision_capture` fallback), e.g. when called outside the executor.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import ImageSpan, ReducerError, ReductionContext, Selection, check_n_keep
from .instruction import InstructionText, instruction_ids
from ..methods import register_method

_CLIP_FAMILIES = ("llava", "llava_next")
NEXT_PACKINGS = ("official", "stock")


def cosine_similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """(..., N, N) float32 cosine similarity of the rows of `features` (..., N, D): normalised in the
    features' own dtype, then cast to float32 and multiplied (official order of operations)."""
    unit = (features / features.norm(dim=-1, keepdim=True)).float()
    return unit @ unit.transpose(-1, -2)


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
    """L = diag(r) S diag(r) with S the cosine similarity of `features` (..., N, D), r `relevance` (..., N)."""
    S = cosine_similarity_matrix(features)
    r = relevance.float().to(S.device)
    return r.unsqueeze(-1) * S * r.unsqueeze(-2)


def dpp_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy DPP MAP of size `k` for each of B kernels (B, N, N): (B, k) picks in pick order, float32.

    Chen et al. 2018, Alg. 1, as the official loop: the pick is argmax of the remaining gains d_j^2 (first
    maximum), the new Cholesky row e = (L_j - sum_t c_tj c_t) / d_j, d^2 -= e^2, the pick's gain set to
    -inf. A kernel whose gains run out (pivot <= 0 or NaN) is completed with its unchosen items by
    decreasing diagonal L_jj (= relevance^2), lowest index first among ties.
    """
    if kernel.ndim != 3 or kernel.shape[1] != kernel.shape[2]:
        raise ReducerError(f"DPP kernels must have shape (B, N, N), got {tuple(kernel.shape)}")
    B, N, _ = kernel.shape
    if not 0 <= k <= N:
        raise ReducerError(f"DPP cannot select {k} of {N} items; valid: 0..{N}")
    L = kernel.float()
    rows = torch.arange(B, device=L.device)
    chol = torch.zeros(k, B, N, device=L.device)
    gains = torch.diagonal(L, dim1=1, dim2=2).clone()
    picks = torch.empty(k, B, dtype=torch.long, device=L.device)
    exhausted = torch.full((B,), k, dtype=torch.long, device=L.device)  # first step with a pivot <= 0 / NaN
    for i in range(k):
        j = torch.argmax(gains, dim=-1)
        picks[i] = j
        pivot = gains[rows, j]
        exhausted = torch.where(~(pivot > 0) & (exhausted == k), i, exhausted)
        row = (L[rows, j] - torch.einsum("tb,tbn->bn", chol[:i, rows, j], chol[:i])) / torch.sqrt(pivot).unsqueeze(-1)
        chol[i] = row
        gains -= row.square()
        gains[rows, j] = -float("inf")
    picks = picks.T.contiguous()
    for b in torch.nonzero(exhausted < k).flatten().tolist():  # rare: no sync in the loop above
        i0 = int(exhausted[b])
        chosen = torch.zeros(N, dtype=torch.bool, device=L.device)
        chosen[picks[b, :i0]] = True
        rest = torch.nonzero(~chosen).flatten()
        by_diag = rest[torch.sort(-torch.diagonal(L[b])[rest], stable=True).indices]
        picks[b, i0:] = by_diag[: k - i0]
    return picks


def cdpruner_select(features: torch.Tensor, relevance: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Sorted indices of the greedy DPP MAP subset of size `n_keep` under the conditional kernel of one crop
    (features (N, D), relevance (N,)).

    Raises:
        ReducerError: `n_keep` outside 0..N or mismatched shapes.
    """
    N = features.shape[0]
    if relevance.shape != (N,):
        raise ReducerError(f"CDPruner relevance has shape {tuple(relevance.shape)}, expected ({N},)")
    if not 0 <= n_keep <= N:
        raise ReducerError(f"CDPruner cannot keep {n_keep} of {N} tokens; valid: 0..{N}")
    picked = dpp_map(conditional_kernel(features[None], relevance[None]), n_keep)[0]
    return torch.sort(picked.cpu()).values


def select_crops(features: torch.Tensor, relevance: torch.Tensor, budgets: list[int]) -> torch.Tensor:
    """(C, N) bool kept mask of C crops (features (C, N, D), relevance (C, N)): crop c keeps `budgets[c]`.

    One batched DPP for all crops (as the official code), run to the largest budget: greedy picks are
    sequential, so a crop with a smaller budget keeps the prefix of its picks."""
    C, N = relevance.shape
    kept = torch.zeros(C, N, dtype=torch.bool)
    k = max(budgets, default=0)
    if k:
        picks = dpp_map(conditional_kernel(features, relevance), k).cpu()
        for c, q in enumerate(budgets):
            kept[c, picks[c, :q]] = True
    return kept


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


@register_method("cdpruner", kind="vision")
class CDPruner:
    """Reducer: conditional-DPP visual token selection (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, InternVL3); see module doc.

    Args:
        clip_model: CLIP checkpoint (HF id or directory) for the LLaVA families; default
            `clip_text.default_clip_source(model)` (openai/clip-vit-large-patch14-336, or the tiny CLIP for
            tiny checkpoints).
        tokenizer: the MLLM's tokenizer for decoding the instruction outside VLMEvalKit (default: loaded
            lazily from `model.name_or_path`).
        text_fn: `(ctx, span) -> str` overriding the CLIP text (LLaVA families).
        theta: optional relevance weight (official default: off).
        capture: record the CLIP feature layer during the model's forward (LLaVA families only).
        next_packing: LLaVA-NeXT packing, "official" (default) or "stock" (named deviation); see module doc.
    """

    name = "cdpruner"
    families = ("llava", "llava_next", "qwen2_5_vl", "internvl", "qwen2_vl", "qwen3_vl")

    def __init__(
        self,
        clip_model: str | None = None,
        tokenizer: Any = None,
        text_fn: Callable[[ReductionContext, ImageSpan], str] | None = None,
        theta: float | None = None,
        capture: bool = True,
        next_packing: str = "official",
    ) -> None:
        if next_packing not in NEXT_PACKINGS:
            raise ReducerError(f"next_packing must be one of {', '.join(NEXT_PACKINGS)}, got {next_packing!r}")
        self.clip_model = clip_model
        self._text = InstructionText(tokenizer, text_fn, who="CDPruner", official_question=True)
        self.theta = theta
        self.needs_vision_capture = capture
        self.next_packing = next_packing

    # ------------------------------------------------------------------ text
    def instruction_ids(self, ctx: ReductionContext, span: ImageSpan) -> torch.Tensor:
        """Token ids of the sample after its last image span, up to its last real token."""
        return instruction_ids(ctx, span)

    def instruction_text(self, ctx: ReductionContext, span: ImageSpan) -> str:
        """The CLIP text for `span` (LLaVA families): the official bare question, see the module docstring."""
        return self._text(ctx, span)

    def qwen_instruction_ids(self, ctx: ReductionContext, span: ImageSpan) -> torch.Tensor:
        """Qwen2-VL / Qwen2.5-VL / Qwen3-VL / InternVL3(.5) instruction tokens: after the image (image markers
        skipped) up to the end of the user turn."""
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
        clip = load_clip_text(self.clip_model or default_clip_source(ctx.model)).to(cap.features.device)
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
    def select(self, ctx: ReductionContext, n_keep: int) -> list[Selection]:
        if ctx.family not in self.families:
            raise ReducerError(f"reducer 'cdpruner' does not support model family {ctx.family!r}; supported: {', '.join(self.families)}")
        check_n_keep("CDPruner", ctx, n_keep)
        if ctx.family in ("qwen2_5_vl", "internvl", "qwen2_vl", "qwen3_vl"):  # no CLIP: LLM-space port (docstring)
            return [self._select_qwen(ctx, span, n_keep) for span in ctx.images]
        rel = self.clip_relevance(ctx)
        if ctx.family == "llava":
            return [self._select_llava(ctx, span, r, n_keep) for span, r in zip(ctx.images, rel)]
        if self.next_packing == "stock":
            return [self._select_next_stock(ctx, k, span, r, n_keep) for k, (span, r) in enumerate(zip(ctx.images, rel))]
        return [self._select_next(ctx, k, span, r, n_keep) for k, (span, r) in enumerate(zip(ctx.images, rel))]

    def _select_llava(self, ctx, span, rel, n_keep):
        if rel.shape != (1, span.num_tokens):
            raise ReducerError(
                f"CDPruner expects one crop of {span.num_tokens} patches for this LLaVA image, the tower gave "
                f"{tuple(rel.shape)} (vision_feature_select_strategy must be 'default')"
            )
        return torch.nonzero(select_crops(ctx.image_embeds(span)[None], rel, [n_keep])[0]).flatten()

    def _select_next(self, ctx, k, span, rel, n_keep) -> Selection:
        from .llava_next_packing import crop_budgets, official_span, projected_crops
        from .vision import vision_capture

        if "image_sizes" not in ctx.model_inputs:
            raise ReducerError("CDPruner on LLaVA-NeXT needs image_sizes in the model inputs")
        if n_keep >= span.num_tokens or n_keep == 0:
            return torch.arange(n_keep)  # everything (stock packing) or nothing
        feats = projected_crops(ctx)[vision_capture(ctx).image_crops(k)]  # all 576 patches of every crop
        kept = select_crops(feats, rel.to(feats.device), crop_budgets(n_keep, rel.shape[0], rel.shape[1]))
        return official_span(ctx, k, kept)

    def _select_next_stock(self, ctx, k, span, rel, n_keep):
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


__all__ = [
    "CDPruner", "cdpruner_select", "conditional_kernel", "cosine_similarity_matrix", "crop_quotas", "dpp_map",
    "relevance_scores", "select_crops",
]  # fmt: skip
