"""TRIM: CLIP text-similarity selection + mean token, by hand and against an independent recomputation.
Golden comparisons with the official code: tests/test_golden_trim.py."""
from __future__ import annotations

import math

import pytest
import torch

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.reducers import ReducerError
from vlmeval_dop.reducers.clip_text import default_clip_source, load_clip_text
from vlmeval_dop.reducers.trim import iqr_outlier_count, trim_scores, trim_select
from vlmeval_dop.tiny import load_tiny, tiny_image, tiny_inputs

from stock_reference import replaced_span_logits  # tests/stock_reference.py

Q = "Which colour is the square?"


def test_scores_outliers_and_selection_by_hand():
    # -<e, t> = [-1, 0, -1]; softmax: e^-1 / (2 e^-1 + 1) = 0.2119, 1 / (2 e^-1 + 1) = 0.5761
    s = trim_scores(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([1.0, 0.0]))
    z = 2 * math.exp(-1) + 1
    torch.testing.assert_close(s, torch.tensor([math.exp(-1) / z, 1 / z, math.exp(-1) / z]))
    # quartiles of [1, 1, 1, 1, 10] are 1 and 1: bound 1, one outlier; [1..8] has none
    assert iqr_outlier_count(torch.tensor([1.0, 1, 1, 1, 10])) == 1
    assert iqr_outlier_count(torch.arange(1.0, 9.0)) == 0
    scores = torch.tensor([0.1, 0.5, 0.3, 0.5, 0.2])
    # n_keep=3: top 2 = {1, 3} (tie -> lower index first) + the mean token of {0, 2, 4}
    assert trim_select(scores, 3).tolist() == [1, 3]
    assert trim_select(scores, 1).tolist() == []  # only the mean token of everything
    assert trim_select(scores, 5).tolist() == [0, 1, 2, 3, 4]  # all patches, no mean token
    with pytest.raises(ReducerError, match="valid: 0..5"):
        trim_select(scores, 6)


def _reference(model, inputs, n_keep):
    """Independent LLaVA-1.5 recomputation: stock tower hidden states, CLIP projections, plain loops."""
    clip = load_clip_text(default_clip_source(model))
    mm = model.model
    with torch.no_grad():
        hs = mm.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        feats = hs[model.config.vision_feature_layer][0, 1:]  # (P, D)
        e = clip.visual_projection(mm.vision_tower.post_layernorm(feats))
        enc = clip.tokenizer(text=[Q], return_tensors="pt", truncation=True, max_length=77)
        t = clip.text_projection(clip.text_model(**enc).pooler_output)[0]
        sim = [-(float(e[i] @ t)) for i in range(feats.shape[0])]
        m = max(sim)
        w = [math.exp(x - m) for x in sim]
        scores = [x / sum(w) for x in w]
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        top = sorted(order[: n_keep - 1])
        rest = [i for i in range(len(scores)) if i not in top]
        merged = mm.multi_modal_projector(feats[rest].mean(0, keepdim=True))[0]
    return top, merged


@pytest.mark.parametrize("seed", [6, 8])  # seed 8 keeps the last patch (63): the mean token comes after it
def test_through_the_executor_equals_rebuilt_sequence(seed):
    """The official sequence: the kept patches in raster order, then the mean token (appended after them)."""
    model, processor = load_tiny("llava15")
    inputs = tiny_inputs("llava15", processor, [Q], [tiny_image(seed)])
    n_keep = 9
    with apply_dop(model, DOPPolicy(4, 4, n_keep), reducer="trim") as h, torch.no_grad():
        got = model(**inputs).logits[0, -1]
    top, merged = _reference(model, inputs, n_keep)
    assert h.last_kept[0].tolist() == top + [-1]
    ids = inputs["input_ids"][0]
    vis = torch.nonzero(ids == model.config.image_token_id).flatten()
    with torch.no_grad():
        emb = model.model.get_input_embeddings()(ids[None])
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        img = torch.cat(list(feats)).to(emb) if isinstance(feats, (list, tuple)) else feats.reshape(-1, emb.shape[-1])
    ref = replaced_span_logits(model, emb, vis, torch.cat([img[top], merged[None]]))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_all_tokens_is_stock_and_llavanext_per_crop():
    model, processor = load_tiny("llava15")
    inputs = tiny_inputs("llava15", processor, [Q])
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        stock = model(**inputs).logits
        with apply_dop(model, DOPPolicy(4, 4, n), reducer="trim"):
            same = model(**inputs).logits
    assert torch.equal(stock, same)

    model, processor = load_tiny("llavanext")
    inputs = tiny_inputs("llavanext", processor, [Q], [tiny_image(2, size=(224, 160))])
    with apply_dop(model, DOPPolicy(4, 4, 40), reducer="trim") as h, torch.no_grad():
        out = model(**inputs).logits
    assert torch.isfinite(out).all() and h.last_kept[0].numel() == 40
    from vlmeval_dop.reducers.llava_next_layout import llava_next_layout

    vis = int((inputs["input_ids"] == model.config.image_token_id).sum())
    lay = llava_next_layout(model, inputs["image_sizes"][0], num_tokens=vis)
    assert not bool(lay.newline[h.last_kept[0]].any())  # row newlines are not vision tokens: never kept
    counts = torch.bincount(lay.crop[h.last_kept[0]], minlength=lay.num_crops)
    assert counts.tolist() == [8] * lay.num_crops  # 40 split evenly over base + 4 crops


def test_bad_input():
    model, processor = load_tiny("qwen25vl")
    inputs = tiny_inputs("qwen25vl", processor, [Q])
    with pytest.raises(ReducerError, match="supported: llava, llava_next"):
        with apply_dop(model, DOPPolicy(2, 2, 8), reducer="trim"), torch.no_grad():
            model(**inputs)
    model, processor = load_tiny("llava15")
    inputs = tiny_inputs("llava15", processor, [Q])
    with pytest.raises(Exception, match="valid: 1..64"):
        with apply_dop(model, DOPPolicy(4, 4, 65), reducer="trim"), torch.no_grad():
            model(**inputs)
