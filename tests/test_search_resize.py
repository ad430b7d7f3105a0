"""Profiling the D_v curve of the image-side reduction DOP_R (`resize`, Qwen2.5-VL / InternVL3): each n_v point
is the stock model on the images resized by the wrapper, as the DOP_R entries evaluate them."""
from __future__ import annotations

import pytest
import torch

from vlmeval_dop.policy import DOPPolicy
from vlmeval_dop.search.batching import batched
from vlmeval_dop.search.divergence import topk_kl
from vlmeval_dop.search.profile import ProfileCounter, profile_batch, profile_naive
from vlmeval_dop.tiny import tiny_image

QUESTIONS = ["What is shown?", "Which color is the large square in the picture?", "Count?"]


def _messages(tmp_path):
    out = []
    for i, q in enumerate(QUESTIONS):
        path = tmp_path / f"img{i}.png"
        tiny_image(i, (200, 150)).save(path)
        out.append([{"type": "image", "value": str(path)}, {"type": "text", "value": q}])
    return out


@pytest.mark.parametrize("family", ["qwen25vl", "internvl3"])
def test_resize_dv_points_are_the_dopr_wrappers_inputs(family, tmp_path):
    from vlmeval_dop.registry import load_entry

    wrapper = load_entry(f"tiny_{family}", device="cpu").load()
    model, L = wrapper.model, wrapper._num_layers
    messages = _messages(tmp_path)
    visual = [32, 9]
    items = []
    for i, m in enumerate(messages):
        resized = {}
        for n in visual:
            with wrapper.resized(n):
                resized[n] = wrapper.build_inputs(m)
        items.append(([f"s{i}"], wrapper.build_inputs(m), resized))
    assert wrapper.resize_tokens is None  # the override ends with its context

    # independent reference: the DOP_R wrapper (policy n_v, reducer resize) builds the inputs of point n
    ref = {}
    for n in visual:
        dopr = load_entry(f"tiny_{family}", device="cpu", policy=DOPPolicy(L, L, n), reducer="resize").load()
        for (ids, full, _), m in zip(items, messages):
            small = dopr.build_inputs(m)
            n_small = int((small["input_ids"] == model.config.image_token_id).sum())
            n_full = int((full["input_ids"] == model.config.image_token_id).sum())
            assert n_small < n_full
            with torch.no_grad():
                p = model(**full).logits[:, -1]
                q = model(**small).logits[:, -1]
            ref[ids[0], n] = float(topk_kl(p, q, logits=True).per_sample[0])

    depths = [2, 0]
    for ids, inputs, resized in items:
        ours_c, naive_c = ProfileCounter(), ProfileCounter()
        ours = profile_batch(model, inputs, depths, visual, "resize", ours_c, resized)
        naive = profile_naive(model, inputs, depths, visual, "resize", naive_c, resized)
        for curve in ours:
            torch.testing.assert_close(ours[curve], naive[curve], atol=1e-6, rtol=0)
        for j, n in enumerate(visual):
            assert float(ours["D_v"][0, j]) == pytest.approx(ref[ids[0], n], abs=1e-6)
        assert ours_c.layer_forwards < naive_c.layer_forwards
    # batched (resized inputs collated per n_v) == one sample at a time
    alone = {ids[0]: profile_batch(model, x, depths, visual, "resize", None, r) for ids, x, r in items}
    batches = list(batched(items, 3, wrapper.processor.tokenizer.pad_token_id))
    assert sum(len(b[0]) for b in batches) == 3 and max(len(b[0]) for b in batches) > 1
    for ids, x, r in batches:
        out = profile_batch(model, x, depths, visual, "resize", None, r)
        for row, sid in enumerate(ids):
            for curve in out:
                torch.testing.assert_close(out[curve][row], alone[sid][curve][0], atol=1e-6, rtol=0)


def test_resize_needs_resized_inputs_and_a_resizing_wrapper(tmp_path):
    from vlmeval_dop.registry import load_entry
    from vlmeval_dop.tiny import load_tiny, tiny_inputs

    model, processor = load_tiny("qwen25vl")
    inputs = tiny_inputs("qwen25vl", processor, QUESTIONS[:1])
    with pytest.raises(ValueError, match="resized for every n_v"):
        profile_batch(model, inputs, [1], [8], "resize")
    with pytest.raises(ValueError, match="not implemented for LLaVA15DOP"):
        with load_entry("tiny_llava15", device="cpu").resized(8):
            pass
