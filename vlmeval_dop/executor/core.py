"""`apply_dop`: run a stock transformers MLLM with depth-wise operation pruning.

How it works (no vendored model code, nothing global):
- a forward pre-hook on the multimodal model records `input_ids` (visual positions = image token ids);
- a forward pre-hook on the decoder stack builds a per-call plan: which tokens the reducer drops
  (never computed anywhere), which tokens each layer's MHA and MLP process, RoPE positions, and swaps
  in a `DOPCache` so per-layer KV caches may hold different token subsets;
- each decoder layer's `forward` is overridden on the instance: layers that process every token call
  the original forward unchanged (bit-identical to stock); the others gather the kept tokens, run the
  layer's own submodules (`input_layernorm`, `self_attn`, `post_attention_layernorm`, `mlp`; the family
  adapter's `attention_branch` / `mlp_branch` say how they combine) on them with an explicit mask in original
  coordinates (with the family's sliding windows and bidirectional groups, see `_attention_mask`), and scatter
  the results back. Tokens a layer skips pass through unchanged (the residual), which is the paper's definition
  of a pruned operation.
Leaving the context (or `handle.remove()`) deletes the instance overrides and hooks: the model is
restored exactly.
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from .._compat import check_transformers_version
from ..arch import ArchSpec
from ..policy import DOPPolicy, OperationMask, PolicyError
from ..reducers import ReductionContext, VisualTokenReducer, check_family, check_selection, get_reducer
from ..reducers.base import ReducerError, ReplacedSpan, reported_indices, selection_embeds, selection_indices
from ..reducers.vision import RECORDED_TOWERS, VisionRecorder
from .cache import DOPCache
from .families import FamilyAdapter, adapter_for
from .token_pruner import DecoderPruneContext, DecoderTokenPruner, PruneDecision

check_transformers_version()

SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class _TokenSet:
    """Tokens one module of one layer processes: (B, K) indices into the call's sequence."""

    index: torch.Tensor
    valid: torch.Tensor  # False for filler slots (samples with fewer kept tokens than K)
    counts: list[int]  # kept tokens per sample (host copy: no device sync in the layers)
    everything: bool  # all N tokens, all valid

    @property
    def all_valid(self) -> bool:
        return min(self.counts, default=0) == self.index.shape[1]

    @classmethod
    def from_mask(cls, keep: torch.Tensor, order: torch.Tensor | None = None) -> "_TokenSet":
        """The tokens of (B, N) bool `keep`, in index order, or in the order of the (B, N) sequence-order
        keys `order` of a decoder-side pruner (ties: index), so that gathered rows lie in the rebuilt
        sequence's order and reductions over them (attention, the cache) add in the official order."""
        B, N = keep.shape
        counts = keep.sum(1).tolist()  # the one host sync per distinct token set and call
        K = max(counts, default=0)
        if order is not None:
            keys = order.to(torch.float64).masked_fill(~keep, float("-inf"))
            index = torch.sort(keys, dim=1, stable=True).indices[:, N - K :]  # fillers first, then by key
            return cls(index, torch.gather(keep, 1, index), counts, False)
        if all(c == N for c in counts):
            index = torch.arange(N, device=keep.device).expand(B, N)
            return cls(index, torch.ones(B, N, dtype=torch.bool, device=keep.device), counts, True)
        # stable sort puts skipped tokens first, kept tokens last in original order; the last K slots
        # hold every kept token, preceded (left, like left padding) by fillers where a sample has fewer.
        order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, N - K :]
        return cls(order, torch.gather(keep, 1, order), counts, False)


@dataclass
class _Groups:
    """Token groups of one call: visual and (optional, Eq. 14) system tokens, with host-side flags."""

    visual: torch.Tensor  # (B, N) bool
    system: torch.Tensor | None
    any_visual: bool
    any_system: bool

    def keep(self, alive: torch.Tensor, visual_in: bool, system_in: bool) -> torch.Tensor:
        keep = alive if visual_in else alive & ~self.visual
        if not system_in and self.system is not None:
            keep = keep & ~self.system
        return keep


@dataclass
class _MLPBeyondAttn:
    """An MLP token set (full-sequence coordinates) that is not a subset of the layer's attention set."""

    tokens: "_TokenSet"

    @property
    def counts(self) -> list[int]:
        return self.tokens.counts


@dataclass
class FrozenTokens:
    """Tokens whose states equal a reference run's in every layer, handed to `DOPHandle.run_decoder` as their
    per-layer keys/values: they are no query and no MLP token of any layer, only keys/values.

    The policy search uses it for the tokens before the first image: under causal attention nothing before
    them changes in any variant of a sample, so their keys/values are the unpruned run's, computed once per
    sample. Their own outputs are never computed (the search reads the last position only).

    Attributes:
        index: (B, K) positions in the call's sequence; valid: (B, K) bool, False for filler slots.
        kv: per decoder layer `(keys, values)`, each (B, kv_heads, K, head_dim) with RoPE applied (as the
            layer's cache holds them), slot k for position index[:, k].
    """

    index: torch.Tensor
    valid: torch.Tensor
    kv: list

    @property
    def counts(self) -> list[int]:
        return self.valid.sum(1).tolist()

    @classmethod
    def from_mask(cls, mask: torch.Tensor, kv: list) -> "FrozenTokens":
        """The tokens of (B, N) bool `mask`, their keys/values gathered from per-layer full-sequence
        `(keys, values)` (B, kv_heads, N, head_dim), e.g. the layers of an unpruned run's cache."""
        tokens = _TokenSet.from_mask(mask)
        idx = tokens.index[:, None, :, None]

        def take(t: torch.Tensor) -> torch.Tensor:
            return torch.gather(t, 2, idx.to(t.device).expand(-1, t.shape[1], -1, t.shape[3]))

        return cls(tokens.index, tokens.valid, [(take(k), take(v)) for k, v in kv])


@dataclass
class _CallPlan:
    """Everything layers need for one forward call of the decoder stack."""

    past: int  # tokens seen before this call (original coordinates)
    length: int  # tokens in this call
    pad_valid: torch.Tensor  # (B, past+N) bool, 1 = real token
    no_padding: bool  # pad_valid is all True (host flag)
    attn: list[_TokenSet]  # per layer: the tokens that are queries (and keys/values) of its attention
    # per layer: tokens that take part as keys/values only (visual at d_A-1, system at d_A_sys-1), or None
    kv_only: list["_TokenSet | None"]
    # per layer: MLP subset as indices into the attn set (None = same), or `_MLPBeyondAttn` when the MLP
    # also runs tokens that skip this layer's attention (single-layer MHA pruning, OperationMask)
    mlp_in_attn: list["_TokenSet | _MLPBeyondAttn | None"]
    # overrides the model's (remapped RoPE): per layer, (cos, sin) (`FamilyAdapter.rotary_tables`)
    position_embeddings: list[tuple[torch.Tensor, torch.Tensor]] | None
    position_ids: torch.Tensor | None
    cache: DOPCache | None
    replay: dict[int, torch.Tensor] | None = None  # layer -> output to reuse instead of computing
    groups: _Groups | None = None
    alive: torch.Tensor | None = None  # (B, N) tokens not dropped (by the reducer or a token pruner)
    stats: list[list[tuple[int, int]]] = field(default_factory=list)  # per layer, per sample (n_attn, n_mlp)
    # 1D-RoPE families: the model's own positions of this call and the positions layers use now (after the
    # reducer's and any decoder-side renumbering); None for M-RoPE
    orig_positions: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    # (B, N) float sequence-order keys set by a decoder-side pruner (None = index order); prefill only
    order: torch.Tensor | None = None
    # decoding: per layer renumbered by a decoder-side pruner at prefill, its own (cos, sin)
    layer_position_embeddings: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # prefill: per layer, the (B,) decode-position shift a renumbering pruner set (stored in the cache)
    layer_pos_shift: dict[int, torch.Tensor] = field(default_factory=dict)
    # run_decoder only: keys/values handed in for tokens that are never computed; replayed layers used as
    # given (the caller vouches for them); per layer, per sample (queries, K/V projected, keys, MLP tokens)
    frozen: FrozenTokens | None = None
    frozen_counts: list[int] | None = None
    check_replay: bool = True
    last_only: bool = False
    work: list[list[tuple[int, int, int, int]]] = field(default_factory=list)
    # (B, N) group ids of tokens attending to each other in both directions (-1: none; Gemma 3's images)
    groups_bidir: torch.Tensor | None = None

    def custom_positions(self, i: int) -> bool:
        """Layer i cannot use the stock layer call: its positions or its sequence order are not the model's."""
        return self.position_embeddings is not None or i in self.layer_position_embeddings or self.order is not None


class DOPHandle:
    """Installed DOP state on one model. Use as a context manager or call `remove()`.

    Attributes:
        policy: the policy as given; `executed_policy` is its `effective()` form.
        last_layer_tokens: per layer `(tokens in MHA, tokens in MLP)` of the last prefill, summed over
            the batch (filler slots excluded): evidence of what actually ran. `(0, 0)` marks a layer
            replayed from a cached unpruned run (`run_decoder(replay=...)`).
        last_sample_layer_tokens: the same per layer and per sample.
        last_sample_layer_work: per layer and per sample `(queries, tokens whose keys/values were projected,
            keys attended over, MLP tokens)` of the last prefill: the FLOPs-relevant counts, keys/values-only
            and frozen tokens included (`(0, 0, 0, 0)` for a replayed layer).
        last_kept: per image of the last prefill, the kept local visual indices (None without reducer; for a
            `ReplacedSpan`, the source index of each row, -1 for synthetic rows).
    """

    def __init__(
        self,
        model: nn.Module,
        policy: DOPPolicy,
        reducer: str | VisualTokenReducer | None = None,
        token_pruner: DecoderTokenPruner | None = None,
        op_mask: OperationMask | None = None,
    ):
        self.model = model
        self.adapter: FamilyAdapter = adapter_for(model)
        self.spec = ArchSpec.from_model(model)
        self.policy = policy.validate(self.spec.num_layers)
        self.op_mask = (op_mask or OperationMask()).validate(self.spec.num_layers)
        # effective() still holds with an operation mask: after d_A no layer attends to visual tokens again
        self.executed_policy = policy.effective(self.spec.num_layers)
        self.kv_only_layers = policy.kv_only_layers(self.spec.num_layers)
        self.reducer = get_reducer(reducer)
        self.token_pruner = token_pruner
        if token_pruner is not None:
            bad = [i for i in token_pruner.layers if not 0 <= i < self.spec.num_layers - 1]
            if bad:
                raise ValueError(
                    f"token pruner {token_pruner.name!r} acts after layers {bad}; valid: 0..{self.spec.num_layers - 2}"
                )
        if self.reducer is not None:
            check_family(self.reducer, self.adapter.family)
        if policy.n_v is not None and self.reducer is None:
            raise ReducerError(
                f"policy keeps n_v={policy.n_v} visual tokens but no reducer was given; "
                "pass reducer=<name> (see vlmeval_dop.reducers.REDUCERS)"
            )
        attn_impl = model.config.get_text_config(decoder=True)._attn_implementation or "eager"
        if attn_impl not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"attention implementation {attn_impl!r} is not supported by the DOP executor; "
                f"load the model with attn_implementation in {SUPPORTED_ATTENTION}"
            )
        self.attn_impl = attn_impl
        self.image_token_ids = torch.tensor(self.adapter.image_token_ids(model))
        self.last_layer_tokens: list[tuple[int, int]] = []
        self.last_sample_layer_tokens: list[list[tuple[int, int]]] = []
        self.last_sample_layer_work: list[list[tuple[int, int, int, int]]] = []
        self.last_layer_kv_only: list[int] = []
        self.last_kept: list[torch.Tensor] | None = None
        self._pending: dict[str, Any] | None = None
        self._plan: _CallPlan | None = None
        self._removers: list[Callable[[], None]] = []
        self._vision: dict[str, VisionRecorder] = {}  # reducer-cache key -> recorder of one tower
        self._encoder_inputs: dict[str, Any] = {}  # what the last image-encoder call got (see _install)
        self._encoder_round = False  # True between generate()'s encoder calls and the forward that uses them
        self._install()

    # ------------------------------------------------------------------ install / remove
    def _install(self) -> None:
        mm = self.adapter.multimodal_model(self.model)
        lm = self.adapter.language_model(self.model)
        self._lm = lm
        layers = self.adapter.decoder_layers(self.model)
        h1 = mm.register_forward_pre_hook(self._multimodal_pre_hook, with_kwargs=True)
        h2 = lm.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True)
        h3 = lm.register_forward_hook(self._decoder_post_hook, with_kwargs=True, always_call=True)
        self._removers += [h1.remove, h2.remove, h3.remove]
        for i, layer in enumerate(layers):
            if "forward" in layer.__dict__:
                self.remove()
                raise RuntimeError(f"decoder layer {i} already has an instance forward (is DOP applied twice?)")
            layer.forward = self._make_layer_forward(i, layer, layer.forward)
            self._removers.append(lambda layer=layer: layer.__dict__.pop("forward", None))
        if (
            self.reducer is not None
            and self.policy.n_v is not None
            and getattr(self.reducer, "needs_vision_capture", False)
            and self.adapter.family in RECORDED_TOWERS  # the recorder reads CLIP towers; others compute their own
        ):
            # record the vision towers' feature layer during the model's own forward (no second tower run)
            for key, tower in RECORDED_TOWERS[self.adapter.family]:
                self._vision[key] = VisionRecorder(tower).attach(self.model)
                self._removers.append(self._vision[key].detach)
        if self.reducer is not None and self.policy.n_v is not None:
            self._record_encoder_inputs(mm)

    def _record_encoder_inputs(self, mm: nn.Module) -> None:
        """Remember the inputs of the image encoder call (instance-level wrapper, removed on exit).

        transformers' `generate` encodes the images *before* the first forward
        (`_prepare_multimodal_encoder_kwargs_for_generation`) and then calls the model with
        `mm_encoder_outputs` and without `pixel_values` / `image_sizes` / `image_grid_thw`. Reducers that
        look at the image or the crop layout still need those, so we keep what `get_image_features` got.
        """
        # Video-LLaVA encodes videos with `get_video_features(pixel_values_videos)`: generate() runs both
        # encoders before the first forward, so both calls are remembered (merged: a prompt may hold both)
        encoders = {"get_image_features": ("pixel_values", "image_sizes", "image_grid_thw"),
                    "get_video_features": ("pixel_values_videos",)}  # fmt: skip
        for fn_name, names in encoders.items():
            if fn_name == "get_video_features" and self.adapter.family != "video_llava":
                continue  # other families' video paths are not run under DOP
            if fn_name in mm.__dict__:
                raise RuntimeError(f"{fn_name} already has an instance override (is DOP applied twice?)")
            original = getattr(mm, fn_name)

            def wrapped(*args, _original=original, _names=names, **kwargs):
                got = {**dict(zip(_names, args)), **{k: v for k, v in kwargs.items() if k in _names}}
                # the first encoder call after a forward starts a new sample's record
                base = self._encoder_inputs if self._encoder_round else {}
                self._encoder_inputs, self._encoder_round = {**base, **got}, True
                return _original(*args, **kwargs)

            setattr(mm, fn_name, functools.wraps(original)(wrapped))  # generate() reads the encoder's signature
            self._removers.append(lambda fn_name=fn_name: mm.__dict__.pop(fn_name, None))

    def remove(self) -> None:
        """Restore the model exactly (idempotent)."""
        while self._removers:
            self._removers.pop()()
        self._pending = self._plan = None

    def __enter__(self) -> "DOPHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def run_decoder(
        self,
        decoder_kwargs: dict[str, Any],
        input_ids: torch.Tensor,
        *,
        replay: dict[int, torch.Tensor] | None = None,
        model_inputs: dict[str, Any] | None = None,
        reducer_cache: dict[str, Any] | None = None,
        check_replay: bool = True,
        frozen: FrozenTokens | None = None,
        last_position_only: bool = False,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run only the decoder stack under this policy and return last-position logits (no cache).

        For policy search: the vision tower runs once per sample (capture the decoder's keyword inputs
        with `vlmeval_dop.search.profile.capture_full_run`), and layers below the pruning depth can be
        replayed from the unpruned run (`replay={layer: output}`) since they compute the same thing.

        Args:
            decoder_kwargs: the keyword arguments the multimodal model passed to its decoder stack
                (inputs_embeds, attention_mask, position_ids, ...).
            input_ids: (B, N) ids of the same sequence (locates the visual tokens).
            replay: outputs of unpruned layers to reuse; a pruned layer in it raises ValueError.
            model_inputs: pixel_values etc., for reducers that look at the vision tower.
            reducer_cache: dict a reducer may use to keep scores across calls on the same sample.
            check_replay: False uses replayed layers as given, pruned ones too: the caller guarantees each holds
                this policy's output of that layer at every token a later layer reads (e.g. an earlier run of
                the same policy prefix, or a layer whose pruned outputs are known from the unpruned run).
            frozen: `FrozenTokens` taking part as keys/values only, with the keys/values given (no token pruner).
            last_position_only: the last layer runs queries and MLP for each sample's last position only (the
                other tokens are keys/values only): exactly the returned logits, for less work.
            padding_mask: (B, N) 2D padding mask, needed when `decoder_kwargs["attention_mask"]` holds masks the
                multimodal model prepared per layer type (Gemma 3) rather than the 2D mask.
        """
        kwargs = {k: v for k, v in decoder_kwargs.items() if k not in ("cache", "use_cache")}
        if frozen is not None and self.token_pruner is not None:
            raise ValueError("frozen tokens cannot be combined with a decoder-side token pruner")
        self._pending = {
            "input_ids": input_ids,
            "model_inputs": model_inputs or {},
            "replay": replay,
            "reducer_cache": reducer_cache,
            "check_replay": check_replay,
            "frozen": frozen,
            "last_only": last_position_only,
        }
        if padding_mask is not None or not isinstance(decoder_kwargs.get("attention_mask"), dict):
            self._pending["padding_mask"] = padding_mask
        out = self._lm(**kwargs, use_cache=False)
        return self.adapter.lm_head(self.model)(out.last_hidden_state[:, -1])

    # ------------------------------------------------------------------ hooks
    def _multimodal_pre_hook(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        model_inputs = dict(kwargs)
        outputs = kwargs.get("mm_encoder_outputs") or {}
        encoded = any(outputs.get(m) is not None for m in ("image", "video"))
        if encoded and kwargs.get("pixel_values") is None and kwargs.get("pixel_values_videos") is None:
            # generate() ran the image encoder before this forward: its recording belongs to this forward
            model_inputs = {**self._encoder_inputs, **{k: v for k, v in kwargs.items() if v is not None}}
            self._encoder_round = False
        else:
            for rec in self._vision.values():
                rec.clear()  # a new forward: whatever was recorded belongs to an earlier one
            self._encoder_inputs, self._encoder_round = {}, False
        self._pending = {"input_ids": input_ids, "model_inputs": model_inputs,
                         "padding_mask": kwargs.get("attention_mask")}
        return None

    def _decoder_pre_hook(self, module, args, kwargs):
        pending, self._pending = self._pending or {}, None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            embeds = module.embed_tokens(ids)
            kwargs["inputs_embeds"], kwargs["input_ids"] = embeds, None
            pending.setdefault("input_ids", ids)
        B, N = embeds.shape[:2]
        device = embeds.device

        cache = kwargs.get("cache")
        if cache is None and kwargs.get("use_cache"):
            cache = DOPCache(config=module.config)
        elif cache is not None and not isinstance(cache, DOPCache):
            # generate() hands over an empty DynamicCache; per-layer subsets need our subclass instead
            if type(cache) is not DynamicCache:
                raise ValueError(
                    f"apply_dop needs a dynamic cache (per-layer token subsets), got {type(cache).__name__}; "
                    "do not set cache_implementation for DOP generation"
                )
            if cache.get_seq_length() != 0:
                raise ValueError("a non-empty cache built without DOP cannot be continued under apply_dop")
            cache = DOPCache(config=module.config)
        if cache is not None:
            kwargs["cache"] = cache
            if getattr(self.token_pruner, "per_step", False):
                # a per-step method re-ranks at every generated token, which only a cache-free run does
                raise ValueError(
                    f"token pruner {self.token_pruner.name!r} has per_step=True and re-ranks at every step; "
                    "generate with use_cache=False (a cache would freeze its prefill ranking)"
                )
        past = cache.dop_seen if cache is not None else 0

        input_ids = pending.get("input_ids")
        if input_ids is not None and input_ids.shape[:2] == (B, N):
            visual = torch.isin(input_ids, self.image_token_ids.to(input_ids.device))
        else:
            visual = torch.zeros(B, N, dtype=torch.bool, device=device)
            if self.policy.n_v is not None and past == 0 and not self.policy.is_full(self.spec.num_layers):
                raise ValueError("apply_dop needs input_ids to locate visual tokens (got inputs_embeds only)")

        mask2d = kwargs.get("attention_mask")
        if isinstance(mask2d, dict):
            # per-layer-type masks the multimodal model prepared (Gemma 3): the executor needs the 2D padding mask
            # that model got (or run_decoder's `padding_mask`), and builds its own masks where layers are pruned
            if "padding_mask" not in pending:
                raise ValueError("the decoder got prepared per-layer masks; pass the 2D padding mask "
                                 "(run_decoder(padding_mask=...)) so that the executor can build its own")
            mask2d = pending["padding_mask"]
        if isinstance(mask2d, torch.Tensor) and mask2d.ndim == 2:
            pad_valid = mask2d.to(device=device, dtype=torch.bool)
            if pad_valid.shape[1] != past + N:
                raise ValueError(f"2D attention_mask has length {pad_valid.shape[1]}, expected {past + N}")
        elif mask2d is None:
            pad_valid = torch.ones(B, past + N, dtype=torch.bool, device=device)
        else:
            raise ValueError("apply_dop needs a 2D padding attention_mask (or None), not a prepared 4D mask")

        # --- token reduction (prefill with images only)
        dropped = torch.zeros(B, N, dtype=torch.bool, device=device)
        if self.reducer is not None and self.policy.n_v is not None and bool(visual.any()):
            spans = self.adapter.image_spans(visual, input_ids=input_ids)
            for span in spans:
                if self.policy.n_v > span.num_tokens:
                    raise PolicyError(
                        f"n_v={self.policy.n_v} exceeds the {span.num_tokens} visual tokens of image "
                        f"{span.image_index} in sample {span.batch_index}; valid: 1..{span.num_tokens}"
                    )
            reducer_cache = pending.get("reducer_cache") if pending.get("reducer_cache") is not None else {}
            for key, rec in self._vision.items():
                if rec.recorded:
                    reducer_cache[key] = rec.take(self.model, pending.get("model_inputs", {}))
            ctx = ReductionContext(
                family=self.adapter.family,
                model=self.model,
                input_ids=input_ids,
                inputs_embeds=embeds,
                attention_mask=pad_valid[:, past:],
                images=spans,
                model_inputs=pending.get("model_inputs", {}),
                cache=reducer_cache,
            )
            kept = self.reducer.select(ctx, self.policy.n_v)
            check_selection(self.reducer, ctx, self.policy.n_v, kept)
            if not self.adapter.contiguous_positions and any(isinstance(k, ReplacedSpan) for k in kept):
                raise ReducerError(
                    f"reducer {self.reducer.name!r} replaced an image span by new rows, which needs renumbered 1D "
                    f"positions; family {self.adapter.family!r} keeps each placeholder's own (M-RoPE) position"
                )
            merged = None
            for span, sel in zip(spans, kept):
                idx = selection_indices(sel).to(device)
                drop = torch.ones(span.num_tokens, dtype=torch.bool, device=device)
                drop[idx] = False
                dropped[span.batch_index, span.positions.to(device)] = drop
                rows = selection_embeds(sel)
                if rows is not None:
                    if merged is None:  # never write into the caller's / the model's tensor
                        merged = embeds.clone()
                    # ReplacedSpan: rows fill the first m slots; with renumbered positions that is the
                    # rebuilt sequence with m image tokens
                    merged[span.batch_index, span.positions.to(device)[idx]] = rows.to(merged)
            if merged is not None:
                embeds = kwargs["inputs_embeds"] = merged
            self.last_kept = [reported_indices(k).cpu() for k in kept]

        # --- RoPE positions: model's own, or renumbered as if dropped tokens had never been there
        position_ids = kwargs.get("position_ids")
        position_embeddings = None
        orig_positions = positions = None
        layer_position_embeddings: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.adapter.contiguous_positions:
            if isinstance(position_ids, torch.Tensor) and position_ids.ndim == 2:
                orig_positions = position_ids.to(device).expand(B, N)
            else:
                orig_positions = (torch.arange(N, device=device) + past).unsqueeze(0).expand(B, N)
            positions = orig_positions
            prior = cache.dop_pos_shift if cache is not None and cache.dop_pos_shift is not None else None
            if bool(dropped.any()) or prior is not None:
                if position_ids is None:
                    position_ids = orig_positions
                base = prior.to(device)[:, None] if prior is not None else torch.zeros(B, 1, dtype=torch.long, device=device)
                shift_before = base + torch.cumsum(dropped.long(), dim=1) - dropped.long()
                positions = orig_positions - shift_before
                position_embeddings = self.adapter.rotary_tables(module, embeds, positions)
                if cache is not None:
                    cache.dop_pos_shift = base[:, 0] + dropped.long().sum(1)
            if cache is not None and cache.dop_layer_pos_shift and past > 0:
                # layers a decoder-side pruner renumbered at prefill continue from their own sequence length
                by_shift: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
                for layer_idx, shift in cache.dop_layer_pos_shift.items():
                    if id(shift) not in by_shift:
                        by_shift[id(shift)] = self.adapter.rotary_tables(
                            module, embeds, orig_positions - shift.to(device)[:, None])
                    layer_position_embeddings[layer_idx] = by_shift[id(shift)][layer_idx]

        # --- per-layer token sets
        sys_mask = self._system_mask(visual, pad_valid[:, past:]) if self.policy.has_system_depths and past == 0 else None
        groups = _Groups(visual, sys_mask, bool(visual.any()), sys_mask is not None and bool(sys_mask.any()))
        alive = ~dropped
        frozen, frozen_counts = pending.get("frozen"), None
        if frozen is not None:
            fmask = torch.zeros(B, N, dtype=torch.bool, device=device)
            fmask.scatter_(1, frozen.index.to(device), frozen.valid.to(device))
            if bool((fmask & (visual | dropped)).any()) or bool(fmask[:, -1].any()):
                raise ValueError("frozen tokens must be kept, non-visual tokens before each sample's last position")
            if len(frozen.kv) != self.spec.num_layers:
                raise ValueError(f"frozen tokens need keys/values for all {self.spec.num_layers} layers, got {len(frozen.kv)}")
            alive, frozen_counts = alive & ~fmask, frozen.counts
        last_only = bool(pending.get("last_only"))
        attn_sets, kv_sets, mlp_sets = self._layer_sets(alive, groups, 0, last_only)
        # bidirectional groups (stock: prefill only, from the multimodal model's own inputs)
        bidir = self.adapter.attention_groups(self.model, pending.get("model_inputs", {}), (B, N)) if past == 0 else None
        self._plan = _CallPlan(
            past=past,
            length=N,
            pad_valid=pad_valid,
            no_padding=bool(pad_valid.all()),
            attn=attn_sets,
            kv_only=kv_sets,
            mlp_in_attn=mlp_sets,
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            cache=cache,
            replay=pending.get("replay"),
            groups=groups,
            alive=alive,
            orig_positions=orig_positions,
            positions=positions,
            layer_position_embeddings=layer_position_embeddings,
            frozen=frozen,
            frozen_counts=frozen_counts,
            check_replay=pending.get("check_replay", True),
            last_only=last_only,
            groups_bidir=None if bidir is None else bidir.to(device),
        )
        return args, kwargs

    def _layer_sets(self, alive: torch.Tensor, groups: "_Groups", start: int,
                    last_only: bool = False, order: torch.Tensor | None = None) -> tuple[list, list, list]:
        """Token sets of layers `start..L-1` given the tokens still alive (not dropped before the decoder
        or by a decoder-side pruner): attention queries, keys/values-only tokens, MLP. `last_only`: the last
        layer's queries and MLP are each sample's last position only, its other tokens keys/values only.
        `order`: a pruner's sequence-order keys; attention and keys/values-only sets follow them."""
        p, L = self.executed_policy, self.spec.num_layers
        kv_vis_layer, kv_sys_layer = self.kv_only_layers
        sets: dict[tuple[bool, bool], _TokenSet] = {}
        attn_sets: list[_TokenSet] = []
        kv_sets: list[_TokenSet | None] = []
        mlp_sets: list[_TokenSet | _MLPBeyondAttn | None] = []
        for layer in range(start, L):
            a_in, m_in = self.op_mask.visual_in(layer)
            a_vis = (layer < p.d_A and a_in) or not groups.any_visual
            m_vis = (layer < p.d_P and m_in) or not groups.any_visual
            a_sys = p.d_A_sys is None or layer < p.d_A_sys or not groups.any_system
            m_sys = p.d_P_sys is None or layer < p.d_P_sys or not groups.any_system
            # the last layer a group attends in: its outputs there are read by nobody, so it is only keys/values
            kv_vis = a_vis and groups.any_visual and layer == kv_vis_layer
            kv_sys = a_sys and groups.any_system and layer == kv_sys_layer
            q_vis, q_sys = a_vis and not kv_vis, a_sys and not kv_sys
            if last_only and layer == L - 1:
                q = groups.keep(alive, q_vis, q_sys)
                if bool(q[:, -1].all()):  # else (a pruned last position) the layer runs as the policy says
                    last = torch.zeros_like(q)
                    last[:, -1] = True
                    attn = _TokenSet.from_mask(last)
                    attn_sets.append(attn)
                    kv_sets.append(_TokenSet.from_mask(groups.keep(alive, a_vis, a_sys) & ~last, order))
                    m = groups.keep(alive, m_vis, m_sys)[:, -1:]
                    mlp_sets.append(None if bool(m.all()) else _TokenSet.from_mask(m))
                    continue
            if (q_vis, q_sys) not in sets:
                sets[(q_vis, q_sys)] = _TokenSet.from_mask(groups.keep(alive, q_vis, q_sys), order)
            attn = sets[(q_vis, q_sys)]
            attn_sets.append(attn)
            if kv_vis or kv_sys:
                kv_sets.append(_TokenSet.from_mask(groups.keep(alive, a_vis, a_sys) & ~groups.keep(alive, q_vis, q_sys), order))
            else:
                kv_sets.append(None)
            a_vis, a_sys = q_vis, q_sys  # the MLP set below relates to the query set
            if (a_vis, a_sys) == (m_vis, m_sys):
                mlp_sets.append(None)
            elif (m_vis and not a_vis) or (m_sys and not a_sys):  # MLP runs tokens the MHA skipped
                mlp_sets.append(_MLPBeyondAttn(_TokenSet.from_mask(groups.keep(alive, m_vis, m_sys))))
            else:
                within = torch.gather(groups.keep(alive, m_vis, m_sys), 1, attn.index) & attn.valid
                mlp_sets.append(_TokenSet.from_mask(within))
        return attn_sets, kv_sets, mlp_sets

    def _decoder_post_hook(self, module, args, kwargs, output):
        plan, self._plan = self._plan, None
        if plan is None:
            return None
        if plan.cache is not None:
            plan.cache.dop_seen = plan.past + plan.length
            if plan.positions is not None:  # the window positions of later calls' keys
                prev = plan.cache.dop_positions
                plan.cache.dop_positions = plan.positions if prev is None else torch.cat([prev, plan.positions], 1)
            if plan.past == 0:
                plan.cache.dop_layer_pos_shift = dict(plan.layer_pos_shift)
        if plan.past == 0:
            self.last_sample_layer_tokens = plan.stats
            self.last_layer_tokens = [
                (sum(a for a, _ in layer), sum(m for _, m in layer)) for layer in plan.stats
            ]
            self.last_layer_kv_only = [0 if kv is None else sum(kv.counts) for kv in plan.kv_only]
            self.last_sample_layer_work = plan.work
        return None

    @staticmethod
    def _system_mask(visual: torch.Tensor, pad_valid: torch.Tensor) -> torch.Tensor:
        """System group (Eq. 14): the real tokens before each sample's first visual token."""
        before_first = torch.cumsum(visual.long(), dim=1) == 0
        has_visual = visual.any(1, keepdim=True)
        return before_first & pad_valid & has_visual

    # ------------------------------------------------------------------ layers
    def _make_layer_forward(self, layer_idx: int, layer: nn.Module, original: Callable) -> Callable:
        def forward(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            plan = self._plan
            if plan is None:  # called outside the decoder stack: nothing to prune
                return original(hidden_states, *args, **kwargs)
            out = self._layer_forward(layer_idx, layer, original, plan, hidden_states, args, kwargs)
            pruner = self.token_pruner
            if pruner is not None and plan.past == 0 and layer_idx in pruner.layers:
                self._run_token_pruner(layer_idx, layer, plan, hidden_states, out, kwargs)
            return out

        return forward

    def _run_token_pruner(self, i, layer, plan: _CallPlan, hidden_in, hidden_out, kwargs) -> None:
        """Let the decoder-side pruner drop tokens from layers i+1.. (prefill only).

        A `PruneDecision` may also overwrite surviving tokens' hidden states: written in place into
        `hidden_out`, the tensor layer i returns (a fresh tensor of this call), so layer i+1 reads them.
        """
        attn = plan.attn[i]
        took_part = torch.zeros_like(plan.alive)
        took_part.scatter_(1, attn.index, attn.valid)
        if plan.kv_only[i] is not None:  # keys/values-only tokens took part too
            kv = plan.kv_only[i]
            took_part |= torch.zeros_like(took_part).scatter_(1, kv.index, kv.valid)
        layers = self.adapter.decoder_layers(self.model)
        B, N = plan.alive.shape
        order = plan.order if plan.order is not None else _index_order(B, N, plan.alive.device)
        ctx = DecoderPruneContext(
            layer_idx=i,
            layer=layer,
            hidden_in=hidden_in,
            hidden_out=hidden_out,
            visual=plan.groups.visual,
            alive=took_part,
            pad_valid=plan.pad_valid[:, plan.past :],
            position_embeddings=plan.position_embeddings[i] if plan.position_embeddings is not None
            else kwargs.get("position_embeddings"),
            model=self.model,
            position_ids=plan.positions,
            order=order,
            next_layer=layers[i + 1] if i + 1 < len(layers) else None,
        )
        result = self.token_pruner.select(ctx)
        if result is None:
            return
        renumber, new_order = False, None
        if isinstance(result, PruneDecision):
            drop, upd, values = result.drop, result.update_mask, result.update_values
            renumber, new_order = result.renumber, result.order
        elif isinstance(result, torch.Tensor):
            drop, upd, values = result, None, None
        else:
            raise TypeError(
                f"token pruner {self.token_pruner.name!r} returned {type(result).__name__}; "
                "valid: None, a (B, N) bool tensor or a PruneDecision"
            )
        shape = tuple(plan.alive.shape)
        for what, mask in (("drop", drop), ("update_mask", upd)):
            if mask is not None and (tuple(mask.shape) != shape or mask.dtype != torch.bool):
                raise ValueError(f"token pruner {self.token_pruner.name!r}: {what} must be a {shape} bool tensor")
        if upd is not None and bool(upd.any()):
            upd = upd.to(plan.alive.device)
            stays = took_part & (~drop.to(upd.device) if drop is not None else True)
            if bool((upd & ~stays).any()):
                raise ValueError(
                    f"token pruner {self.token_pruner.name!r} overwrites tokens that leave the later layers; "
                    "valid: tokens that took part in this layer and are not dropped"
                )
            count = int(upd.sum())
            if values is None or tuple(values.shape) != (count, hidden_out.shape[-1]):
                got = None if values is None else tuple(values.shape)
                raise ValueError(f"update_values must have shape {(count, hidden_out.shape[-1])}, got {got}")
            if plan.replay is not None and i in plan.replay:
                raise ValueError(f"layer {i} is replayed from a cached run; its output cannot be overwritten")
            b, n = torch.nonzero(upd, as_tuple=True)
            hidden_out[b, n] = values.to(device=hidden_out.device, dtype=hidden_out.dtype)
        if new_order is not None:
            if tuple(new_order.shape) != shape or new_order.is_complex() or new_order.dtype == torch.bool:
                raise ValueError(f"token pruner {self.token_pruner.name!r}: order must be a {shape} real tensor")
            plan.order = new_order.to(device=plan.alive.device, dtype=torch.float64)
        if drop is not None or new_order is not None:
            if drop is not None:
                plan.alive = plan.alive & ~drop.to(plan.alive.device)
            attn_sets, kv_sets, mlp_sets = self._layer_sets(plan.alive, plan.groups, i + 1, plan.last_only, plan.order)
            plan.attn[i + 1 :] = attn_sets
            plan.kv_only[i + 1 :] = kv_sets
            plan.mlp_in_attn[i + 1 :] = mlp_sets
        if renumber:
            self._renumber(i, plan, hidden_out)

    def _renumber(self, i: int, plan: _CallPlan, hidden_out: torch.Tensor) -> None:
        """Contiguous positions for the survivors from layer i+1 on, in sequence order (the official
        `position_ids = arange(len)` of a rebuilt sequence), and the matching decode-position shift."""
        if plan.positions is None:
            raise ValueError(
                f"token pruner {self.token_pruner.name!r} renumbers positions, which needs 1D RoPE; family "
                f"{self.adapter.family!r} uses M-RoPE"
            )
        if any(self.adapter.sliding_window(self.model, j) is not None for j in range(self.spec.num_layers)):
            # windows are measured in one position numbering per call and cache; a per-layer renumbering has its own
            raise ValueError(
                f"token pruner {self.token_pruner.name!r} renumbers positions per layer, which family "
                f"{self.adapter.family!r} (sliding-window layers) does not support; valid: pruners without renumber"
            )
        B, N = plan.alive.shape
        dev = plan.alive.device
        # padding occupies positions as in the model's own numbering; dropped tokens do not
        counted = plan.alive | ~plan.pad_valid[:, plan.past :]
        keys = plan.order if plan.order is not None else _index_order(B, N, dev)
        keys = keys.masked_fill(~counted, float("inf"))
        perm = torch.sort(keys, dim=1, stable=True).indices  # ties keep index order
        rank = torch.empty_like(perm).scatter_(1, perm, torch.arange(N, device=dev).expand(B, N))
        first = plan.positions.masked_fill(~counted, torch.iinfo(torch.long).max).min(1, keepdim=True).values
        new_pos = first + rank
        plan.positions = new_pos
        plan.position_embeddings = self.adapter.rotary_tables(self._lm, hidden_out, new_pos)
        # decoding: the next token follows the last token of this layer's (rebuilt) sequence
        last = torch.gather(perm, 1, (counted.sum(1, keepdim=True) - 1).clamp(min=0))
        shift = (torch.gather(plan.orig_positions, 1, last) - torch.gather(new_pos, 1, last))[:, 0]
        for layer in range(i + 1, self.spec.num_layers):
            plan.layer_pos_shift[layer] = shift

    def _layer_forward(self, i, layer, original, plan: _CallPlan, hidden, args, kwargs) -> torch.Tensor:
        attn = plan.attn[i]
        kv_only = plan.kv_only[i]
        mlp_sub = plan.mlp_in_attn[i]
        cache = plan.cache
        B = hidden.shape[0]
        n_attn = attn.counts if kv_only is None else [a + k for a, k in zip(attn.counts, kv_only.counts)]
        n_mlp = attn.counts if mlp_sub is None else mlp_sub.counts
        plan.stats.append(list(zip(n_attn, n_mlp)))
        n_keys = n_attn if plan.frozen_counts is None else [a + f for a, f in zip(n_attn, plan.frozen_counts)]
        plan.work.append(list(zip(attn.counts, n_attn, n_keys, n_mlp)))
        cache_full = cache is None or cache.is_full_layer(i)
        if plan.replay is not None and i in plan.replay:
            if plan.check_replay:
                # a keys/values-only layer may be replayed too: its other tokens' outputs equal the unpruned
                # run's, and the keys/values-only (or frozen) tokens' outputs are read by nobody
                unpruned = all(k == hidden.shape[1] for k in n_keys)  # every token a query, keys-only or frozen
                if not (unpruned and mlp_sub is None and plan.position_embeddings is None and cache is None):
                    raise ValueError(f"layer {i} is pruned under {self.policy}; only an unpruned prefix can be replayed")
            plan.stats[-1] = [(0, 0)] * B  # nothing computed
            plan.work[-1] = [(0, 0, 0, 0)] * B
            return plan.replay[i]
        if attn.everything and kv_only is None and mlp_sub is None and not plan.custom_positions(i) and cache_full:
            out = original(hidden, *args, **kwargs)
            if cache is not None and kwargs.get("use_cache", True):
                self._record(cache, i, plan, attn)
            return out

        if args:
            raise TypeError("DOP layer forward expects keyword arguments after hidden_states")
        kwargs = dict(kwargs)
        kwargs.pop("attention_mask", None)
        pos_emb = plan.layer_position_embeddings.get(i) or (
            plan.position_embeddings[i] if plan.position_embeddings is not None else kwargs.pop("position_embeddings"))
        kwargs.pop("position_embeddings", None)
        position_ids = kwargs.pop("position_ids", None)
        use_cache = kwargs.pop("use_cache", False)
        kwargs.pop("cache", None)

        idx = attn.index
        x = _gather(hidden, idx)
        cos, sin = (_gather(t.expand(B, *t.shape[1:]) if t.shape[0] != B else t, idx) for t in pos_emb)
        if isinstance(position_ids, torch.Tensor) and position_ids.ndim == 2:
            position_ids = torch.gather(position_ids.expand(B, -1), 1, idx)
        else:
            position_ids = None
        attn_cache = cache
        prefix = None
        given: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (k, v, positions, valid)
        if plan.frozen is not None:  # keys/values handed in (run_decoder), placed before everything else
            fk, fv = plan.frozen.kv[i]
            given.append((fk.to(x), fv.to(x), plan.frozen.index.to(x.device) + plan.past, plan.frozen.valid.to(x.device)))
        if kv_only is not None:
            # keys/values of the keys-only tokens, placed before this call's queries' own in the layer's cache
            k, v = _project_kv(
                layer,
                _gather(hidden, kv_only.index),
                tuple(_gather(t.expand(B, *t.shape[1:]) if t.shape[0] != B else t, kv_only.index) for t in pos_emb),
            )
            if cache is not None:
                cache.update(k, v, i)
                cache.record(i, kv_only.index + plan.past, kv_only.valid, kv_only.all_valid, ordered=False)
            else:
                given.append((k, v, kv_only.index + plan.past, kv_only.valid))
        prefix_all_valid = True
        if given:
            attn_cache = _PrefixKV(torch.cat([g[0] for g in given], dim=2), torch.cat([g[1] for g in given], dim=2))
            prefix = (torch.cat([g[2] for g in given], dim=1), torch.cat([g[3] for g in given], dim=1))
            prefix_all_valid = (kv_only is None or kv_only.all_valid) and (
                plan.frozen_counts is None or min(plan.frozen_counts) == plan.frozen.index.shape[1])
        mask = self._attention_mask(i, plan, attn, x.dtype, prefix=prefix, prefix_all_valid=prefix_all_valid)

        residual = x
        h = self.adapter.attention_branch(
            layer,
            x,
            attention_mask=mask,
            position_ids=position_ids,
            cache=attn_cache,
            use_cache=use_cache,
            position_embeddings=(cos, sin),
            **kwargs,
        )
        x = residual + h
        if cache is not None:
            self._record(cache, i, plan, attn)

        if isinstance(mlp_sub, _MLPBeyondAttn):  # attention on its set, then the MLP on a larger one
            full = _scatter(hidden, attn, x)
            y = _gather(full, mlp_sub.tokens.index)
            y = y + self.adapter.mlp_branch(layer, y)
            return _scatter(full, mlp_sub.tokens, y)
        if mlp_sub is None:
            x = x + self.adapter.mlp_branch(layer, x)
        else:
            y = _gather(x, mlp_sub.index)
            y = y + self.adapter.mlp_branch(layer, y)
            x = _scatter(x, mlp_sub, y)
        return _scatter(hidden, attn, x)

    def _record(self, cache: DOPCache, i: int, plan: _CallPlan, attn: _TokenSet) -> None:
        cache.record(i, attn.index + plan.past, attn.valid, attn.all_valid, ordered=plan.order is None)

    def _attention_mask(
        self,
        i: int,
        plan: _CallPlan,
        attn: _TokenSet,
        dtype: torch.dtype,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
        prefix_all_valid: bool = True,
    ) -> torch.Tensor | None:
        """Mask over (this call's kept queries) x (cached or `prefix` keys + current kept keys), in original
        coordinates. `prefix`: (positions, valid) of keys-only tokens handed to attention without a cache
        (`prefix_all_valid`: host flag, no filler slot among them).

        Family rules (`FamilyAdapter`), composed as transformers composes them for Gemma 3: a key is visible if it
        is valid (real, not a filler) and `(causal OR same bidirectional group) AND inside the layer's window`. The
        window compares RoPE positions (`key > query - window`): the positions of the sequence the layer sees,
        i.e. renumbered after a reducer's drop as in a rebuilt sequence, equal to transformers' index distance
        for an unreduced sequence (left padding shifts both alike)."""
        cache = plan.cache
        q_pos = attn.index + plan.past
        q_valid = attn.valid
        if cache is not None and i in cache.dop_key_index:
            k_pos = torch.cat([cache.dop_key_index[i], q_pos], dim=1)
            k_slot = torch.cat([cache.dop_key_valid[i], q_valid], dim=1)
        elif prefix is not None:
            k_pos = torch.cat([prefix[0], q_pos], dim=1)
            k_slot = torch.cat([prefix[1], q_valid], dim=1)
        else:
            k_pos, k_slot = q_pos, q_valid
        past_ok = cache is None or cache.dop_layer_all_valid.get(i, True)
        window = self.adapter.sliding_window(self.model, i)
        groups = plan.groups_bidir
        if self.attn_impl == "sdpa" and plan.no_padding and attn.all_valid and past_ok and plan.order is None \
                and prefix_all_valid and window is None and groups is None:
            # causal order survives gathering, so sdpa's own causal path (and fast kernels) apply
            if k_pos.shape[1] == q_pos.shape[1] or q_pos.shape[1] == 1:
                return None
        k_valid = k_slot & torch.gather(plan.pad_valid, 1, k_pos)
        if plan.order is not None:  # a pruner reordered the sequence (prefill: keys are this call's tokens)
            q_ord = torch.gather(plan.order, 1, attn.index)
            k_ord = torch.gather(plan.order, 1, k_pos - plan.past)
            before = (k_ord[:, None, :] < q_ord[:, :, None]) | (
                (k_ord[:, None, :] == q_ord[:, :, None]) & (k_pos[:, None, :] <= q_pos[:, :, None])
            )
            allowed = k_valid[:, None, :] & before
        else:
            allowed = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
        if groups is not None:  # prefill (past = 0): positions index this call's tokens
            q_grp, k_grp = torch.gather(groups, 1, q_pos), torch.gather(groups, 1, k_pos)
            same = (q_grp[:, :, None] == k_grp[:, None, :]) & (q_grp[:, :, None] >= 0)
            allowed = allowed | (k_valid[:, None, :] & same)
        if window is not None:
            if plan.positions is None:
                raise ValueError(f"family {self.adapter.family!r}: sliding windows need 1D positions")
            prior = cache.dop_positions if cache is not None and cache.dop_positions is not None else None
            pos = plan.positions if prior is None else torch.cat([prior.to(plan.positions.device), plan.positions], 1)
            if pos.shape[1] != plan.past + plan.length:
                raise ValueError("sliding windows need the positions of every cached token (cache built without DOP?)")
            q_rope, k_rope = torch.gather(pos, 1, q_pos), torch.gather(pos, 1, k_pos)
            allowed = allowed & (k_rope[:, None, :] > q_rope[:, :, None] - window)
        # a row with no visible key (left padding, filler) would give NaNs that leak through V; let it see all
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        allowed = allowed[:, None]
        if self.attn_impl == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )


class _PrefixKV:
    """Stands in for a cache in one attention call without cache: the stock attention's
    `cache.update(k, v, ...)` returns the keys-only tokens' keys/values followed by the queries' own."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        self.key, self.value = key, value

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.key, key_states], dim=2), torch.cat([self.value, value_states], dim=2)


def _project_kv(layer: nn.Module, x: torch.Tensor, pos_emb: tuple[torch.Tensor, torch.Tensor]):
    """Keys/values (B, kv_heads, K, head_dim) of tokens `x` (B, K, H) in `layer`'s attention, computed with
    the layer's own modules and its family's RoPE function, exactly as its stock forward computes them."""
    attn = layer.self_attn
    B, K, _ = x.shape
    h = layer.input_layernorm(x)
    shape = (B, K, -1, attn.head_dim)
    k = attn.k_proj(h).view(shape)
    if getattr(attn, "k_norm", None) is not None:  # Qwen3-style per-head key norm
        k = attn.k_norm(k)
    k = k.transpose(1, 2)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    cos, sin = pos_emb
    _, k = rope(k, k, cos, sin)
    return k, v


def _index_order(B: int, N: int, device) -> torch.Tensor:
    """Sequence-order keys of an unreordered call: the token index."""
    return torch.arange(N, device=device, dtype=torch.float64).expand(B, N)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b]] for (B, N, D) x and (B, K) index."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


def _scatter(base: torch.Tensor, tokens: _TokenSet, values: torch.Tensor) -> torch.Tensor:
    """Out-of-place: base with base[b, index[b, k]] = values[b, k] for valid slots."""
    if tokens.all_valid:
        return base.scatter(1, tokens.index[..., None].expand(-1, -1, base.shape[-1]), values)
    out = base.clone()
    b, k = torch.nonzero(tokens.valid, as_tuple=True)
    out[b, tokens.index[b, k]] = values[b, k]
    return out


def apply_dop(
    model: nn.Module,
    policy: DOPPolicy,
    reducer: str | VisualTokenReducer | None = None,
    token_pruner: DecoderTokenPruner | None = None,
    op_mask: OperationMask | None = None,
) -> DOPHandle:
    """Make `model` (a stock transformers MLLM of a supported family) run `policy` in forward/generate.

    Usable as a context manager (`with apply_dop(model, policy, reducer="uniform"): model.generate(...)`)
    or as a plain call returning a handle whose `remove()` restores the model.

    Args:
        model: a stock transformers MLLM of a class in `vlmeval_dop.arch.SUPPORTED_CLASSES` (LLaVA(-NeXT,
            -OneVision), Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL, SmolVLM / Idefics3, Gemma 3).
        policy: `DOPPolicy(d_A, d_P, n_v)`; depths are validated against the decoder depth now, `n_v`
            against each image's visual token count at the first forward.
        reducer: name in `vlmeval_dop.reducers.REDUCERS` or a `VisualTokenReducer`; required when
            `policy.n_v` is set.
        token_pruner: optional decoder-side method (`executor.token_pruner.DecoderTokenPruner`) that
            drops tokens after chosen layers during prefill, combined with the policy.
        op_mask: `OperationMask` of single visual MHA/MLP operations pruned at given layers on top of the
            depths (the paper's redundancy analysis and policy perturbations).
    """
    return DOPHandle(model, policy, reducer, token_pruner, op_mask)
