"""The decoder-side hook: drop tokens inside the decoder, after chosen layers (FastV, PDrop, ...).

A `DecoderTokenPruner` is called during prefill right after each layer in `layers`, with that layer's
input and output hidden states and the tokens that took part in it; it returns the tokens to drop from
every later layer (as queries, keys/values and MLP inputs). Later layers' KV caches then hold only the
survivors, so decoding stays consistent. Dropped tokens keep their hidden state (residual pass-through)
and everyone keeps the original RoPE positions, as in FastV/PDrop. Attention scores are not handed over:
a pruner that needs them recomputes the few rows it needs from `layer.self_attn`'s q/k projections and
`position_embeddings`, so the model never has to run eager attention.

A pruner may also overwrite the hidden states of some surviving tokens for the following layers (token
merging/recycling): `select` then returns a `PruneDecision(drop, update_mask, update_values)`; a plain
bool tensor (drop only) keeps working.

Methods whose official code rebuilds the sequence after a drop (PDrop, SparseVLM) are expressed with two
more fields of `PruneDecision`:
- `renumber=True`: from the next layer on, the surviving tokens get contiguous RoPE positions in sequence
  order (what `position_ids = arange(len)` on the rebuilt sequence gives). During decoding each later
  layer continues from its own sequence length (the new token's position there is the renumbered
  position of the prompt's last token + 1, + t), which is what PDrop's official decoding shift computes.
- `order`: sort keys that define the sequence order of the surviving tokens for later layers (causal
  masking and renumbered positions follow them). A method that appends new tokens (SparseVLM's recycled
  tokens after the kept visual tokens) reuses the slots of tokens it drops at this layer: it keeps those
  slots, writes the new rows there with `update_mask/update_values`, and gives them keys that sort them
  where the official code inserts them.
Without these fields tokens keep their original positions and order (FastV, FitPrune).
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
        position_embeddings: (cos, sin) over the full sequence, as the layer used them (renumbered ones
            after a renumbering drop).
        model: the whole multimodal model.
        position_ids: (B, N) long 1D RoPE positions the layer used (None for M-RoPE families).
        order: (B, N) float sequence-order keys in force for this layer (original index unless a pruner set
            `PruneDecision.order` earlier); causal attention follows them.
        next_layer: decoder layer `layer_idx + 1` (PDrop scores with the next layer's projections).
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
    position_ids: torch.Tensor | None = None
    order: torch.Tensor | None = None
    next_layer: nn.Module | None = None


@dataclass
class PruneDecision:
    """What a pruner decides after one layer: tokens to drop, and surviving tokens to overwrite.

    Attributes:
        drop: (B, N) bool, True = leave every later layer (None = drop nothing).
        update_mask: (B, N) bool, tokens whose hidden state (this layer's output, i.e. the next layer's
            input) is replaced; they must stay in the later layers (not dropped now or before).
        update_values: (M, H) new hidden states, M = update_mask.sum(), rows in the order of
            `torch.nonzero(update_mask)` (sample by sample, ascending position).
        renumber: renumber the survivors' RoPE positions contiguously (in `order`) from the next layer on,
            in prefill and for the decoded tokens (1D-RoPE families only).
        order: (B, N) float sort keys of the sequence order from the next layer on (None = unchanged); ties
            keep index order. Only the keys of surviving tokens matter.
    """

    drop: torch.Tensor | None = None
    update_mask: torch.Tensor | None = None
    update_values: torch.Tensor | None = None
    renumber: bool = False
    order: torch.Tensor | None = None


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
