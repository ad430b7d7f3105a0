"""VisionZip: selection and merging by hand, against a naive loop, and through the executor (LLaVA-1.5 and
LLaVA-NeXT) against a rebuilt sequence built from transformers' own eager vision-tower outputs."""
from __future__ import annotations

import pytest
import torch

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.reducers import ImageSpan, KeptTokens, ReducerError, ReductionContext, get_reducer
from vlmeval_dop.reducers.llava_next_layout import llava_next_layout
from vlmeval_dop.reducers.visionzip import split_budget, visionzip_select, visionzip_split
from vlmeval_dop.reducers.vision import encoder_layers, feature_layer_index, vision_tower
from vlmeval_dop.tiny import load_tiny, tiny_image, tiny_inputs

from stock_reference import assert_all_tokens_is_stock, assert_matches_rebuilt, merged_rows, stock_embeds  # tests/stock_reference.py

FAMILY = {"llava15": "llava", "llavanext": "llava_next"}


# --- the algorithm on hand-built inputs ------------------------------------------------------------------


def test_by_hand():
    # 8 tokens; D=2 dominant by attention: tokens 1 (0.5) and 3 (0.3).
    # remaining (raster order) = [0, 2, 4, 5, 6, 7], R=6, C=2 -> step 3 -> targets remaining[0], remaining[3]
    # = tokens 0 and 5. Keys: 2 and 4 point along token 0's key (x axis), 6 and 7 along token 5's (y axis):
    # cos(2,0)=0.995 > cos(2,5)=0.10; cos(4,0)=0.97; cos(6,5)=0.995; cos(7,5)=0.998.
    # merged 0 = f0 + (f2 + f4)/2 ; merged 5 = f5 + (f6 + f7)/2 (official: target + mean of its group)
    attn = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.02, 0.01, 0.01, 0.01])
    keys = torch.tensor([[1, 0], [5, 5], [1, 0.1], [-3, 1], [2, 0.5], [0, 1], [0.1, 1], [0.2, 3.0]])
    feats = torch.tensor([[1.0, 0], [2, 0], [3, 0], [4, 0], [5, 0], [0, 6], [0, 7], [0, 8]])
    res = visionzip_select(attn, keys, feats, 2, 2)
    assert res.kept.tolist() == [0, 1, 3, 5]
    assert res.changed.tolist() == [True, False, False, True]
    want = torch.tensor([[1 + (3 + 5) / 2, 0], [2, 0], [4, 0], [0, 6 + (7 + 8) / 2]])
    torch.testing.assert_close(res.features, want)
    # C=0: dominant only, nothing merged
    res = visionzip_select(attn, keys, feats, 3, 0)
    assert res.kept.tolist() == [0, 1, 3] and not res.changed.any()
    # a target that receives nothing keeps its own feature: D=2, C=3 -> step 2 -> targets 0, 4, 6;
    # 2 -> 0 (x axis), 5 -> 6 (y axis), 7 -> 6; target 4 gets nothing
    res = visionzip_select(attn, keys, feats, 2, 3)
    assert res.kept.tolist() == [0, 1, 3, 4, 6]
    assert res.changed.tolist() == [True, False, False, False, True]
    torch.testing.assert_close(res.features[0], torch.tensor([1.0 + 3, 0]))
    torch.testing.assert_close(res.features[3], feats[4])
    torch.testing.assert_close(res.features[4], torch.tensor([0.0, 7 + (6 + 8) / 2]))


def _naive(attn, keys, feats, D, C):
    """Independent reference: plain Python loops over the official recipe."""
    M = len(attn)
    order = sorted(range(M), key=lambda i: (-float(attn[i]), i))
    dominant = order[:D]
    remaining = [i for i in range(M) if i not in dominant]
    new = {i: feats[i].double().clone() for i in dominant}
    if C:
        step = max(1, len(remaining) // C)
        targets = remaining[::step][:C]
        groups = {t: [] for t in targets}
        for i in remaining:
            if i in targets:
                continue
            ki = keys[i].double()
            cos = [float(ki @ keys[t].double() / (ki.norm() * keys[t].double().norm())) for t in targets]
            groups[targets[cos.index(max(cos))]].append(i)
        for t, g in groups.items():
            new[t] = feats[t].double() + (sum(feats[j].double() for j in g) / len(g) if g else 0)
    kept = sorted(new)
    return kept, torch.stack([new[i] for i in kept])


@pytest.mark.parametrize("seed", range(4))
def test_equals_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    M = 40
    attn = torch.rand(M, generator=g, dtype=torch.float64)
    keys = torch.randn(M, 6, generator=g, dtype=torch.float64)
    feats = torch.randn(M, 5, generator=g, dtype=torch.float64)
    for D, C in ((0, 1), (5, 3), (10, 7), (1, 39), (34, 6), (20, 0)):
        res = visionzip_select(attn, keys, feats, D, C)
        kept, want = _naive(attn, keys, feats, D, C)
        assert res.kept.tolist() == kept
        torch.testing.assert_close(res.features.double(), want)


def test_split_and_budget():
    assert [visionzip_split(n) for n in (64, 128, 192, 1, 0)] == [(54, 10), (108, 20), (162, 30), (1, 0), (0, 0)]
    assert split_budget(10, [4, 4, 4]) == [4, 3, 3]
    assert split_budget(10, [2, 8, 8]) == [2, 4, 4]
    assert split_budget(5, [1, 1, 10]) == [1, 1, 3]
    assert split_budget(42, [64, 48, 48, 48, 48]) == [9, 9, 8, 8, 8]
    with pytest.raises(ReducerError, match="valid: 0..6"):
        split_budget(7, [3, 3])
    with pytest.raises(ReducerError, match="valid: dominant"):
        visionzip_select(torch.rand(4), torch.rand(4, 2), torch.rand(4, 2), 3, 2)


# --- through the executor ---------------------------------------------------------------------------------


def _reference(family, model, inputs, n_keep, budgets=None):
    """Kept indices and their decoder inputs, from the eager tower's attentions/hidden states."""
    idx = feature_layer_index(model)
    pv = inputs["pixel_values"]
    N = int((inputs["input_ids"] == model.config.image_token_id).sum())
    if family == "llavanext":
        lay = llava_next_layout(model, inputs["image_sizes"][0], N)
        pv = pv[0, : lay.num_crops]
        groups = [(torch.nonzero(lay.crop == c).flatten(), c) for c in range(lay.num_crops)]
        groups = [(pos, c, lay.patch[pos]) for pos, c in groups]
    else:
        groups = [(torch.arange(N), 0, torch.arange(N))]
        budgets = [n_keep]
    with torch.no_grad():
        out = vision_tower(model)(pv, output_attentions=True, output_hidden_states=True)
        layer = encoder_layers(model)[idx]
        x = layer.layer_norm1(out.hidden_states[idx])
        heads = layer.self_attn.num_heads
        keys = layer.self_attn.k_proj(x).view(x.shape[0], x.shape[1], heads, -1).mean(2)  # head-averaged
    kept, feats = [], []
    for (pos, c, patch), k in zip(groups, budgets):
        D, C = visionzip_split(k)
        res = visionzip_select(out.attentions[idx][c, :, 0, 1:].sum(0)[patch], keys[c, 1:][patch],
                               out.hidden_states[idx + 1][c, 1:][patch], D, C)  # fmt: skip
        kept.append(pos[res.kept])
        feats.append(res.features)
    return merged_rows(model, kept, feats)


@pytest.mark.parametrize("family,size,n_keep,budgets", [
    ("llava15", None, 20, None),
    ("llavanext", (224, 160), 42, [9, 9, 8, 8, 8]),  # base 64 + 4 unpadded crops of 48 + 12 newlines
])  # fmt: skip
def test_through_the_executor_equals_rebuilt_sequence(family, size, n_keep, budgets):
    model, processor = load_tiny(family, attn_implementation="eager")
    inputs = tiny_inputs(family, processor, ["What is shown?"], [tiny_image(7, size)])
    emb, stock = stock_embeds(model, inputs)
    with apply_dop(model, DOPPolicy(4, 4, n_keep), reducer="visionzip") as handle, torch.no_grad():
        got = model(**inputs).logits[0, -1]
    kept, rows = _reference(family, model, inputs, n_keep, budgets)
    assert_matches_rebuilt(model, inputs, handle, got, emb, stock, kept, rows)


@pytest.mark.parametrize("family", ["llava15", "llavanext"])
def test_all_tokens_is_the_stock_model(family):
    model, processor = load_tiny(family)
    inputs = tiny_inputs(family, processor, ["Which colour?"], [tiny_image(2, (224, 160))])
    assert_all_tokens_is_stock(model, inputs, "visionzip")


def _ctx(family, model, inputs):
    emb, _ = stock_embeds(model, inputs)
    vis = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    return ReductionContext(family=family, model=model, input_ids=inputs["input_ids"], inputs_embeds=emb,
                            attention_mask=None, images=[ImageSpan(0, 0, vis)], model_inputs=dict(inputs))  # fmt: skip


def test_newlines_only_beyond_the_vision_tokens():
    model, processor = load_tiny("llavanext")
    inputs = tiny_inputs("llavanext", processor, ["What?"], [tiny_image(2, (224, 160))])
    ctx = _ctx("llava_next", model, inputs)
    N = ctx.images[0].num_tokens
    lay = llava_next_layout(model, inputs["image_sizes"][0], N)
    newline = torch.nonzero(lay.newline).flatten().tolist()
    sel = get_reducer("visionzip").select(ctx, N - len(newline) + 2)[0]
    assert isinstance(sel, KeptTokens)
    assert sel.indices.tolist() == sorted(set(range(N)) - set(newline[2:]))  # all vision tokens + 2 newlines
    sel = get_reducer("visionzip").select(ctx, 100)[0]
    assert not set(sel.indices.tolist()) & set(newline)
    assert sel.indices.numel() == 100 and bool((sel.indices[1:] > sel.indices[:-1]).all())


def test_bad_input():
    model, processor = load_tiny("llava15")
    inputs = tiny_inputs("llava15", processor, ["What?"])
    ctx = _ctx("llava", model, inputs)
    with pytest.raises(ReducerError, match="valid: 0..64"):
        get_reducer("visionzip").select(ctx, 65)
    qmodel, qproc = load_tiny("qwen25vl")
    qin = tiny_inputs("qwen25vl", qproc, ["What?"], [tiny_image(1)])
    with pytest.raises(ReducerError, match="supported: llava, llava_next"):
        with apply_dop(qmodel, DOPPolicy(4, 4, 8), reducer="visionzip"), torch.no_grad():
            qmodel(**qin)
