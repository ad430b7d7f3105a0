"""Batching validation samples for profiling (search/batching.py): a sample's divergences do not depend on
the batch it is profiled in (reference: the same sample profiled alone)."""
from __future__ import annotations

import pytest
import torch

from vlmeval_dop.search.batching import batch_key, batched, collate, num_batches
from vlmeval_dop.search.profile import profile_batch
from vlmeval_dop.tiny import load_tiny, tiny_image, tiny_inputs

QUESTIONS = ["What is shown?", "Which color is the large square in the picture?", "Count?"]


def test_collate_left_pads_sequences_and_concatenates_images():
    a = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
         "pixel_values": torch.zeros(2, 4)}
    b = {"input_ids": torch.tensor([[8]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
         "pixel_values": torch.ones(3, 4)}
    out = collate([a, b], pad_token_id=99)
    assert out["input_ids"].tolist() == [[5, 6, 7], [99, 99, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert out["pixel_values"].shape == (5, 4) and out["pixel_values"][2:].eq(1).all()
    c = {**b, "pixel_values": torch.ones(3, 5)}  # trailing dims differ: cannot be concatenated
    assert batch_key(c) != batch_key(a)
    with pytest.raises(ValueError, match="cannot share a batch"):
        collate([a, c], pad_token_id=99)
    items = [(["a"], a), (["c"], c), (["b"], b)]
    batches = list(batched(items, 2, 99))
    assert [ids for ids, _ in batches] == [["a", "b"], ["c"]] and num_batches(items, 2) == 2
    assert list(batched(items, 1, 99)) == items
    with pytest.raises(ValueError, match="batch_size"):
        list(batched(items, 0, 99))


@pytest.mark.parametrize("family", ["llava15", "llavanext", "qwen25vl", "internvl3"])
def test_batched_profile_equals_one_sample_at_a_time(family):
    model, processor = load_tiny(family)
    # LLaVA-NeXT: a wide image has another crop count, so it must land in a batch of its own
    sizes = [None, None, (224, 112) if family == "llavanext" else None]
    items = [([f"s{i}"], tiny_inputs(family, processor, [QUESTIONS[i]], [tiny_image(i, sizes[i])])) for i in range(3)]
    n_vis = int((items[0][1]["input_ids"][0] == model.config.image_token_id).sum())
    depths, visual = [3, 1, 0], [n_vis // 2, 4]
    alone = {ids[0]: profile_batch(model, inputs, depths, visual, "uniform") for ids, inputs in items}
    batches = list(batched(items, 3, processor.tokenizer.pad_token_id))
    expected_sizes = [2, 1] if family == "llavanext" else [3]
    assert [len(ids) for ids, _ in batches] == expected_sizes
    assert max(b["input_ids"].shape[0] for _, b in batches) > 1
    assert any(bool((b["attention_mask"] == 0).any()) for _, b in batches)  # padding is exercised
    for ids, inputs in batches:
        out = profile_batch(model, inputs, depths, visual, "uniform")
        for row, sid in enumerate(ids):
            for curve, values in out.items():
                torch.testing.assert_close(values[row], alone[sid][curve][0], atol=1e-6, rtol=0)
