"""The visual-token reducer protocol: which visual tokens survive before the decoder (`n_v`).

A reducer looks at one image at a time (its placeholder span in the sequence, the embeddings the LLM
receives there, and the full model/inputs for anything else it needs, e.g. vision-tower attention or
the instruction text) and returns the sorted local indices of the tokens to keep. The executor then
never computes the dropped tokens: they are excluded from every decoder layer and from every KV cache.

For 1D-RoPE families (LLaVA, LLaVA-NeXT, InternVL) the kept tokens and everything after them get
contiguous positions, exactly as if the sequence had been rebuilt with `n_v` placeholders (what the
official VisPruner/CDPruner LLaVA code does). For Qwen2.5-VL the kept tokens keep their original M-RoPE
(t, h, w) positions, which a rebuilt 1D sequence cannot express.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


class ReducerError(ValueError):
    """A reducer asked for something it cannot do (too many tokens, unsupported family, ...)."""


@dataclass
class ImageSpan:
    """One image's visual placeholders in sample `batch_index`: sequence positions `[start, end)`.

    `positions` lists the placeholder positions (contiguous for every family but SmolVLM, whose tiles are
    separated by text markers).
    """

    batch_index: int
    image_index: int
    positions: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())


@dataclass
class ReductionContext:
    """Everything a reducer may look at for one forward pass.

    Attributes:
        family: model family key (see vlmeval_dop.arch).
        model: the full multimodal model (vision tower, projector, language model).
        input_ids: (B, N) token ids of the prompt.
        inputs_embeds: (B, N, H) embeddings the decoder receives (image features already in place).
        attention_mask: (B, N) padding mask (1 = real token) or None.
        images: one ImageSpan per image, in sequence order.
        model_inputs: the remaining keyword inputs of the multimodal forward (pixel_values,
            image_sizes, image_grid_thw, ...), for reducers that need the vision tower.
        cache: free-form storage shared by reducers within one forward (e.g. vision attentions).
    """

    family: str
    model: Any
    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor | None
    images: list[ImageSpan]
    model_inputs: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)

    def image_embeds(self, span: ImageSpan) -> torch.Tensor:
        """(n_tokens, H) decoder-input embeddings of one image."""
        return self.inputs_embeds[span.batch_index, span.positions]


@dataclass
class KeptTokens:
    """A selection that also replaces the kept tokens' embeddings (token *merging* methods).

    `indices`: sorted unique local indices as for a plain selection; `embeds`: (len(indices), H) decoder
    inputs that replace the embeddings at those positions (e.g. VisionZip's merged contextual tokens,
    re-projected by the model's own projector). The merged token sits at the position of the token it
    was merged into, so RoPE positions stay those of real image locations.
    """

    indices: torch.Tensor
    embeds: torch.Tensor | None = None


@dataclass
class ReplacedSpan:
    """A selection that replaces the whole image span by `m` new rows, in the given order.

    The decoder then sees exactly the sequence the official LLaVA-style code builds with `m` image tokens:
    `embeds[0], ..., embeds[m-1]` at contiguous 1D positions right after the tokens before the image. Use it
    when the official output is not "a sorted subset of the patches with some rows replaced": a kept [CLS]
    row (VisionZip), appended synthetic rows (TRIM's mean token, PruMerge+'s extra token), an order other
    than patch order ([CLS, dominant, contextual]), or rows taken from features the span does not hold
    (LLaVA-NeXT's official packing without unpadding or newline rows).

    Only for families whose positions are renumbered 1D RoPE (`FamilyAdapter.contiguous_positions`):
    M-RoPE (Qwen2.5-VL) gives every placeholder a fixed (t, h, w) position that a new row has no claim to.
    Internally the rows occupy the first `m` placeholder slots and the rest are dropped, which under
    renumbered positions is the rebuilt sequence itself.

    Attributes:
        embeds: (m, H) decoder-input rows, 1 <= m <= the span's placeholder count.
        sources: optional (m,) long, the local placeholder index each row stands for (-1 for synthetic
            rows: CLS, mean, extra, or features that have no placeholder); reported in `handle.last_kept`.
    """

    embeds: torch.Tensor
    sources: torch.Tensor | None = None

    @property
    def indices(self) -> torch.Tensor:
        """The placeholder slots the rows occupy (the first `m`)."""
        return torch.arange(self.embeds.shape[0])

    @property
    def reported(self) -> torch.Tensor:
        """What `handle.last_kept` shows: `sources`, or -1 for every row when none were given."""
        if self.sources is not None:
            return self.sources.to(torch.long)
        return torch.full((self.embeds.shape[0],), -1, dtype=torch.long)


Selection = torch.Tensor | KeptTokens | ReplacedSpan


def selection_indices(sel: Selection) -> torch.Tensor:
    """The placeholder slots a selection keeps (for `ReplacedSpan`, the first `m` slots)."""
    return sel.indices if isinstance(sel, (KeptTokens, ReplacedSpan)) else sel


def selection_embeds(sel: Selection) -> torch.Tensor | None:
    """The rows a selection writes into its kept slots (None = the original embeddings stay)."""
    return sel.embeds if isinstance(sel, (KeptTokens, ReplacedSpan)) else None


def reported_indices(sel: Selection) -> torch.Tensor:
    """What a selection kept, as reported in `handle.last_kept` (sources for `ReplacedSpan`)."""
    return sel.reported if isinstance(sel, ReplacedSpan) else selection_indices(sel)


@runtime_checkable
class VisualTokenReducer(Protocol):
    """Protocol every reducer implements.

    `families` lists the supported model families (None = all). `select` returns, for each image span
    of `ctx.images` in order, a sorted, unique LongTensor of local indices (0 .. span.num_tokens-1) of
    length exactly `min(n_keep, span.num_tokens)`, a `KeptTokens` carrying those indices plus the
    embeddings that replace them (merging methods), or a `ReplacedSpan` of 1..span.num_tokens new rows in
    the official order (1D-RoPE families only; its count is the method's own, e.g. n_keep + 1 with an
    appended token, and is what the decoder sees).

    Optional attribute `needs_vision_capture = True`: the executor then records the vision tower's
    feature layer during the model's own forward (`vlmeval_dop.reducers.vision`) and hands it over in
    `ctx.cache[VISION_CAPTURE_KEY]`, so the reducer does not run the tower a second time.
    """

    name: str
    families: tuple[str, ...] | None

    def select(self, ctx: ReductionContext, n_keep: int) -> list[Selection]: ...


def check_selection(reducer: VisualTokenReducer, ctx: ReductionContext, n_keep: int, kept: list[Selection]) -> None:
    """Validate a reducer's output (count, sortedness, uniqueness, range, merged embedding shapes);
    raise ReducerError if wrong."""
    if len(kept) != len(ctx.images):
        raise ReducerError(f"reducer {reducer.name!r} returned {len(kept)} selections for {len(ctx.images)} images")
    for span, sel in zip(ctx.images, kept):
        if isinstance(sel, ReplacedSpan):
            _check_replaced(reducer, ctx, span, sel)
            continue
        idx = selection_indices(sel)
        if isinstance(sel, KeptTokens) and sel.embeds is not None:
            want_shape = (idx.numel(), ctx.inputs_embeds.shape[-1])
            if tuple(sel.embeds.shape) != want_shape:
                raise ReducerError(
                    f"reducer {reducer.name!r} returned merged embeddings of shape {tuple(sel.embeds.shape)}, "
                    f"expected {want_shape}"
                )
        want = min(n_keep, span.num_tokens)
        if idx.ndim != 1 or idx.numel() != want:
            raise ReducerError(f"reducer {reducer.name!r} kept {idx.numel()} tokens, expected {want}")
        if want and (idx.min() < 0 or idx.max() >= span.num_tokens or not bool((idx[1:] > idx[:-1]).all())):
            raise ReducerError(f"reducer {reducer.name!r} must return sorted unique indices in [0, {span.num_tokens})")


def _check_replaced(reducer: VisualTokenReducer, ctx: ReductionContext, span: ImageSpan, sel: ReplacedSpan) -> None:
    hidden = ctx.inputs_embeds.shape[-1]
    if sel.embeds.ndim != 2 or sel.embeds.shape[1] != hidden:
        raise ReducerError(
            f"reducer {reducer.name!r} returned replacement rows of shape {tuple(sel.embeds.shape)}, expected (m, {hidden})"
        )
    m = sel.embeds.shape[0]
    if not 1 <= m <= span.num_tokens:
        raise ReducerError(
            f"reducer {reducer.name!r} replaced image {span.image_index} of sample {span.batch_index} by {m} rows; "
            f"valid: 1..{span.num_tokens} (its placeholder count)"
        )
    if sel.sources is not None and tuple(sel.sources.shape) != (m,):
        raise ReducerError(f"reducer {reducer.name!r}: sources must have shape ({m},), got {tuple(sel.sources.shape)}")


def check_n_keep(label: str, ctx: ReductionContext, n_keep: int) -> None:
    """Raise ReducerError naming the valid range if an image of `ctx` has fewer than `n_keep` tokens."""
    for span in ctx.images:
        if not 0 <= n_keep <= span.num_tokens:
            raise ReducerError(
                f"{label} cannot keep {n_keep} of the {span.num_tokens} visual tokens of image "
                f"{span.image_index} in sample {span.batch_index}; valid: 0..{span.num_tokens}"
            )


def check_family(reducer: VisualTokenReducer, family: str) -> None:
    """Raise ReducerError if `reducer` does not support `family`."""
    if reducer.families is not None and family not in reducer.families:
        raise ReducerError(
            f"reducer {reducer.name!r} does not support model family {family!r}; supported: {', '.join(reducer.families)}"
        )
