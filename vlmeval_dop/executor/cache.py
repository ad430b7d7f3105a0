"""A DynamicCache whose layers may hold different token subsets, with positions kept in original coordinates.

Under DOP a layer caches only the tokens it attended to, so layer lengths differ and no layer's length
equals the number of tokens the model has seen. transformers sizes masks and infers positions from
`get_seq_length()` / `get_mask_sizes()`; this cache answers them in the original sequence coordinates
(what an unpruned cache would say), and records, per layer, which original positions its entries are.

Sliding-window layers (Gemma 3's local layers) are cached in full here: transformers' sliding layers evict keys by
count (the last `window - 1` entries), which would desynchronise the per-layer bookkeeping below when a layer holds
a subset of the tokens. The window is applied by masks instead (the executor's, and transformers' own, which size
these layers as global ones through `get_mask_sizes`): the same keys are visible, more are stored.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class DOPCache(DynamicCache):
    """DynamicCache + per-layer bookkeeping of which original token indices each layer holds.

    Attributes:
        dop_seen: tokens the model has processed so far (original coordinates, padding included).
        dop_key_index: per layer, (B, K_l) original indices of the cached entries.
        dop_key_valid: per layer, (B, K_l) False for filler slots of heterogeneous batches.
        dop_pos_shift: (B,) tokens removed by the reducer before the current end of each sample; later
            tokens' RoPE positions are shifted down by it (contiguous positions, 1D-RoPE families).
        dop_layer_pos_shift: per layer renumbered by a decoder-side pruner (`PruneDecision.renumber`), the
            (B,) shift of that layer's positions for later tokens; it replaces `dop_pos_shift` there.
        dop_positions: (B, dop_seen) 1D RoPE positions of every token seen (after the reducer's renumbering;
            None for M-RoPE families): the coordinates of sliding windows.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # full layers only (module docstring): a sliding layer would evict entries the bookkeeping still lists
        self.layers = [DynamicLayer() if getattr(layer, "is_sliding", False) else layer for layer in self.layers]
        self.dop_positions: torch.Tensor | None = None
        self.dop_seen: int = 0
        self.dop_key_index: dict[int, torch.Tensor] = {}
        self.dop_key_valid: dict[int, torch.Tensor] = {}
        self.dop_pos_shift: torch.Tensor | None = None
        self.dop_layer_pos_shift: dict[int, torch.Tensor] = {}
        self.dop_layer_all_valid: dict[int, bool] = {}  # host flag: no filler slot cached in the layer
        self.dop_layer_unordered: set[int] = set()  # layers whose entries are not in position order

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.dop_seen

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.dop_seen + query_length, 0

    def record(self, layer_idx: int, index: torch.Tensor, valid: torch.Tensor, all_valid: bool, ordered: bool = True) -> None:
        """Append the original indices of the entries layer `layer_idx` just cached.

        `ordered=False`: these entries precede later ones out of position order (keys/values-only tokens
        cached before the queries of the same call), so the stock position-ordered masks no longer fit.
        """
        self.dop_layer_all_valid[layer_idx] = self.dop_layer_all_valid.get(layer_idx, True) and all_valid
        if not ordered:
            self.dop_layer_unordered.add(layer_idx)
        if layer_idx in self.dop_key_index:
            self.dop_key_index[layer_idx] = torch.cat([self.dop_key_index[layer_idx], index], dim=1)
            self.dop_key_valid[layer_idx] = torch.cat([self.dop_key_valid[layer_idx], valid], dim=1)
        else:
            self.dop_key_index[layer_idx] = index
            self.dop_key_valid[layer_idx] = valid

    def is_full_layer(self, layer_idx: int) -> bool:
        """True if layer `layer_idx` cached every token seen so far, in position order (stock masks fit it)."""
        if layer_idx not in self.dop_key_index:
            return self.dop_seen == 0
        if layer_idx in self.dop_layer_unordered:
            return False
        return self.dop_key_index[layer_idx].shape[1] == self.dop_seen and self.dop_layer_all_valid[layer_idx]
