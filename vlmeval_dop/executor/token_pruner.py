"""The decoder-side hook: drop tokens inside the decoder, after chosen layers (FastV, PDrop, ...).

A `DecoderTokenPruner` is called during prefill right after each layer in `layers`, with that layer's
input and output hidden states and the tokens that took part in it; it returns the tokens to drop from
every later layer (as queries, keys/values and MLP inputs). Later layers' KV caches then hold only the
survivors, so decoding stays consistent. Dropped tokens keep their hidden state (residual pass-through)
and everyone keeps the original RoPE positions, as in FastV/PDrop. Attention scores are not handed over:
a pruner that needs them recomputes the few rows it needs from `layer.self_attn`'s q/k projections and
`position_embeddings`, so the model never has to run eager attention.

A pruner may also overwrite the hidden states of some surviving tokens for the following layers (token
merging/recycling, e.g. SparseVLM places each aggregated token at the position of one of its cluster
members): `select` then returns a `PruneDecision(drop, update_mask, update_values)`; a plain bool tensor
(drop only) keeps working.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class DecoderPruneContext:
    """What a decoder-side pruner sees after layer `layer_idx` of a prefill.

    Attributes:
        layer_idx: the layer just computed (0-based).
        layer: that decoder layer (stock module: input_layernorm, self_attn, post_attention_layernorm, mlp).
        hidden_in / hidden_out: (B, N) x H, the layer's input and output (full sequence).
        visual: (B, N) bool, visual placeholder positions.
        alive: (B, N) bool, tokens that took part in this layer's attention.
        pad_valid: (B, N) bool, real (non-padding) tokens.
        position_embeddings: (cos, sin) over the full sequence, as the layer used them.
        model: the whole multimodal model.
    """

    layer_idx: int
    layer: nn.Module
    hidden_in: torch.Tensor
    hidden_out: torch.Tensor
    visual: torch.Tensor
    alive: torch.Tensor
    pad_valid: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    model: Any


@dataclass
class PruneDecision:
    """What a pruner decides after one layer: tokens to drop, and surviving tokens to overwrite.

    Attributes:
        drop: (B, N) bool, True = leave every later layer (None = drop nothing).
        update_mask: (B, N) bool, tokens whose hidden state (this layer's output, i.e. the next layer's
            input) is replaced; they must stay in the later layers (not dropped now or before).
        update_values: (M, H) new hidden states, M = update_mask.sum(), rows in the order of
            `torch.nonzero(update_mask)` (sample by sample, ascending position).
    """

    drop: torch.Tensor | None = None
    update_mask: torch.Tensor | None = None
    update_values: torch.Tensor | None = None


@runtime_checkable
class DecoderTokenPruner(Protocol):
    """Protocol of decoder-side token pruning methods.

    `layers` lists the layers after which `select` is called (prefill only). `select` returns a (B, N)
    bool mask of tokens to drop from all later layers (True = drop), a `PruneDecision` (drop and/or
    overwrite surviving tokens' hidden states), or None to change nothing.
    """

    name: str
    layers: tuple[int, ...]

    def select(self, ctx: DecoderPruneContext) -> torch.Tensor | PruneDecision | None: ...
