"""Batching validation samples for profiling: left padding of the text, concatenation of the images.

Each validation sample comes out of its VLMEvalKit wrapper as one processor output (batch of 1). Profiling
runs B of them at once where their image tensors can be concatenated: every family here takes a batch's
images concatenated along dim 0 (LLaVA-1.5 `(B, 3, H, W)`, InternVL tiles `(sum tiles, 3, H, W)`, Qwen2.5-VL
patches `(sum patches, D)` with `image_grid_thw`, LLaVA-NeXT `(B, patches, 3, H, W)` with `image_sizes`), so two
samples can share a batch when all their non-sequence tensors agree in every dim but the first (LLaVA-NeXT:
the same number of crops). Sequence tensors (`input_ids`, `attention_mask`, Qwen's `mm_token_type_ids`) are
left-padded, as generation does; padded positions are masked, so a sample's divergences do not depend on
its batch (tests: batched == one at a time).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

Item = tuple[list[str], dict[str, Any]]


def _is_sequence(value: Any, input_ids: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == tuple(input_ids.shape)


def batch_key(inputs: dict[str, Any]) -> tuple:
    """Samples with equal keys can be concatenated: the keys present and every non-sequence tensor's
    shape without its first dim."""
    ids = inputs["input_ids"]
    key = []
    for name in sorted(inputs):
        value = inputs[name]
        if _is_sequence(value, ids):
            key.append((name, "seq", str(value.dtype)))
        elif isinstance(value, torch.Tensor):
            key.append((name, tuple(value.shape[1:]), str(value.dtype)))
        else:
            key.append((name, repr(value)))
    return tuple(key)


def collate(samples: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """One left-padded batch from single-sample processor outputs with equal `batch_key`s.

    `input_ids` are padded with `pad_token_id` (must not be the image token), every other sequence tensor
    with 0 (attention mask: padded positions are not attended).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    keys = {batch_key(s) for s in samples}
    if len(keys) > 1:
        raise ValueError(f"samples cannot share a batch (different image tensor shapes): {sorted(keys)}")
    if any(s["input_ids"].shape[0] != 1 for s in samples):
        raise ValueError("collate takes single-sample inputs (batch dim 1)")
    width = max(s["input_ids"].shape[1] for s in samples)
    out: dict[str, Any] = {}
    for name, first in samples[0].items():
        if _is_sequence(first, samples[0]["input_ids"]):
            fill = pad_token_id if name == "input_ids" else 0
            rows = []
            for s in samples:
                v = s[name]
                pad = v.new_full((1, width - v.shape[1], *v.shape[2:]), fill)
                rows.append(torch.cat([pad, v], dim=1))
            out[name] = torch.cat(rows, dim=0)
        elif isinstance(first, torch.Tensor):
            out[name] = torch.cat([s[name] for s in samples], dim=0)
        else:
            out[name] = first
    return out


def _item_key(item) -> tuple:
    # an item may carry per-n_v resized inputs (image-side reducers): those must concatenate as well
    key = batch_key(item[1])
    if len(item) > 2:
        key = (key, tuple((n, batch_key(x)) for n, x in sorted(item[2].items())))
    return key


def batched(items: Sequence[Item], batch_size: int, pad_token_id: int) -> Iterator[Item]:
    """Pack `(ids, single-sample inputs)` items into batches of at most `batch_size` compatible samples.

    Items may be `(ids, inputs, {n_v: resized inputs})` (the `resize` reduction); the resized inputs are
    collated per `n_v` alongside. Items are grouped by their batch keys in order of first appearance and,
    within a group, kept in their original order; `batch_size=1` yields the items unchanged.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size == 1:
        yield from items
        return
    groups: dict[tuple, list] = {}
    for item in items:
        groups.setdefault(_item_key(item), []).append(item)
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            ids = [sid for item in chunk for sid in item[0]]
            inputs = collate([item[1] for item in chunk], pad_token_id)
            if len(chunk[0]) > 2:
                resized = {n: collate([item[2][n] for item in chunk], pad_token_id) for n in chunk[0][2]}
                yield ids, inputs, resized
            else:
                yield ids, inputs


def num_batches(items: Sequence[Item], batch_size: int) -> int:
    """How many batches `batched` yields (for progress bars)."""
    if batch_size == 1:
        return len(items)
    sizes: dict[tuple, int] = {}
    for item in items:
        k = _item_key(item)
        sizes[k] = sizes.get(k, 0) + 1
    return sum(-(-n // batch_size) for n in sizes.values())
