"""VisionZip: the official selection and merging by hand and against a naive loop, and through the executor
(LLaVA-1.5 and LLaVA-NeXT, processor-made inputs) against a rebuilt sequence built from transformers' own eager
vision-tower outputs. Golden comparisons with the official code: tests/test_golden_visionzip.py."""
from __future__ import annotations

import pytest
import torch

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.reducers import ImageSpan, ReducerError, ReductionContext, ReplacedSpan, get_reducer
from vlmeval_dop.reducers.llava_next_layout import llava_next_layout
from vlmeval_dop.reducers.visionzip import next_official_order, split_budget, visionzip_select, visionzip_split
from vlmeval_dop.reducers.vision import encoder_layers, feature_layer_index, vision_tower
from vlmeval_dop.tiny import load_tiny, tiny_image, tiny_inputs

from stock_reference import replaced_span_logits, stock_embeds  # tests/stock_reference.py

FAMILY = {"llava15": "llava", "llavanext": "llava_next"}


# --- the algorithm on hand-built inputs ------------------------------------------------------------------


def test_by_hand():
    # 8 patches + [CLS]; dominant=3 = [CLS] + the 2 patches of largest attention: 1 (0.5) and 3 (0.3).
    # remaining (raster order) = [0, 2, 4, 5, 6, 7], R=6, C=2 -> step 3 -> targets remaining[0], remaining[3]
    # = patches 0 and 5. Keys: 2 and 4 point along patch 0's key (x axis), 6 and 7 along patch 5's (y axis):
    # cos(2,0)=0.995 > cos(2,5)=0.10; cos(4,0)=0.97; cos(6,5)=0.995; cos(7,5)=0.998.
    # rows [CLS, f1, f3, f0 + (f2 + f4)/2, f5 + (f6 + f7)/2] (official: target + mean of its group)
    attn = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.02, 0.01, 0.01, 0.01])
    keys = torch.tensor([[9.0, 9], [1, 0], [5, 5], [1, 0.1], [-3, 1], [2, 0.5], [0, 1], [0.1, 1], [0.2, 3.0]])
    feats = torch.tensor([[-1.0, -1], [1, 0], [2, 0], [3, 0], [4, 0], [5, 0], [0, 6], [0, 7], [0, 8]])
    res = visionzip_select(attn, keys, feats, 3, 2)
    assert res.sources.tolist() == [-1, 1, 3, 0, 5]
    want = torch.tensor([[-1.0, -1], [2, 0], [4, 0], [1 + (3 + 5) / 2, 0], [0, 6 + (7 + 8) / 2]])
    torch.testing.assert_close(res.rows, want)
    # C=0: [CLS] + the 3 strongest patches (0.5, 0.3, 0.1) in raster order, nothing merged
    res = visionzip_select(attn, keys, feats, 4, 0)
    assert res.sources.tolist() == [-1, 0, 1, 3]
    torch.testing.assert_close(res.rows, feats[[0, 1, 2, 4]])
    # a target that receives nothing keeps its own feature: C=3 -> step 2 -> targets 0, 4, 6;
    # 2 -> 0 (x axis), 5 -> 6 (y axis), 7 -> 6; target 4 gets nothing
    res = visionzip_select(attn, keys, feats, 3, 3)
    assert res.sources.tolist() == [-1, 1, 3, 0, 4, 6]
    torch.testing.assert_close(res.rows[3:], torch.tensor([[1.0 + 3, 0], [5, 0], [0, 7 + (6 + 8) / 2]]))
    # dominant=1: [CLS] only, then contextual tokens over all patches
    res = visionzip_select(attn, keys, feats, 1, 2)
    assert res.sources.tolist() == [-1, 0, 4]


def _naive(attn, keys, feats, D, C):
    """Independent reference: plain Python loops over the official recipe ([CLS] counted in D)."""
    P = len(attn)
    order = sorted(range(P), key=lambda i: (-float(attn[i]), i))
    dominant = sorted(order[: D - 1])
    remaining = [i for i in range(P) if i not in dominant]
    sources = [-1] + dominant
    rows = [feats[0].double()] + [feats[1 + i].double() for i in dominant]
    if C:
        step = max(1, len(remaining) // C)
        targets = remaining[::step][:C]
        groups = {t: [] for t in targets}
        for i in remaining:
            if i in targets:
                continue
            ki = keys[1 + i].double()
            cos = [float(ki @ keys[1 + t].double() / (ki.norm() * keys[1 + t].double().norm())) for t in targets]
            groups[targets[cos.index(max(cos))]].append(i)
        for t, g in groups.items():
            sources.append(t)
            rows.append(feats[1 + t].double() + (sum(feats[1 + j].double() for j in g) / len(g) if g else 0))
    return sources, torch.stack(rows)


@pytest.mark.parametrize("seed", range(4))
def test_equals_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    P = 40
    attn = torch.rand(P, generator=g, dtype=torch.float64)
    keys = torch.randn(P + 1, 6, generator=g, dtype=torch.float64)
    feats = torch.randn(P + 1, 5, generator=g, dtype=torch.float64)
    for D, C in ((1, 1), (6, 3), (11, 7), (1, 40), (35, 6), (21, 0), (2, 39)):
        res = visionzip_select(attn, keys, feats, D, C)
        sources, want = _naive(attn, keys, feats, D, C)
        assert res.sources.tolist() == sources
        torch.testing.assert_close(res.rows.double(), want)


def test_split_and_budget():
    assert [visionzip_split(n) for n in (64, 128, 192, 32, 1)] == [(54, 10), (108, 20), (162, 30), (27, 5), (1, 0)]
    assert split_budget(10, [4, 4, 4]) == [4, 3, 3]  # (PruMerge+'s per-crop split, kept here)
    assert split_budget(42, [64, 48, 48, 48, 48]) == [9, 9, 8, 8, 8]
    with pytest.raises(ReducerError, match="valid: 0..6"):
        split_budget(7, [3, 3])
    with pytest.raises(ReducerError, match="valid: dominant >= 1"):
        visionzip_select(torch.rand(4), torch.rand(5, 2), torch.rand(5, 2), 3, 3)
    with pytest.raises(ReducerError, match="valid: dominant >= 1"):
        visionzip_select(torch.rand(4), torch.rand(5, 2), torch.rand(5, 2), 0, 1)


def test_next_official_order_by_hand():
    # 2x2 patches per crop (side 2), grid 1x2: base crop, then grid crops A (left) and B (right).
    # Stitched grid is 2 rows x 4 columns; A's patch p sits at (p // 2, p % 2), B's at (p // 2, 2 + p % 2).
    # A keeps dominant patches [1, 2], B keeps [0, 3] -> raster order (0,1)A1, (0,2)B0, (1,0)A2, (1,3)B3.
    from vlmeval_dop.reducers.visionzip import VisionZipRows

    def part(tag, dom, tgt):
        n = 1 + len(dom) + len(tgt)
        rows = torch.full((n, 1), float(tag)) + torch.arange(n)[:, None] / 10  # crop tag + row / 10
        return VisionZipRows(torch.tensor(dom), torch.tensor(tgt), rows)

    base, a, b = part(0, [3], [0]), part(1, [1, 2], [0]), part(2, [0, 3], [1])
    rows, crop, patch = next_official_order([base, a, b], 1, 2, 2)
    assert crop.tolist() == [0, 0, 0, 1, 2, 1, 2, 1, 2, 1, 2]
    assert patch.tolist() == [-1, 3, 0, 1, 0, 2, 3, -1, -1, 0, 1]
    assert rows[:, 0].tolist() == pytest.approx([0, 0.1, 0.2, 1.1, 2.1, 1.2, 2.2, 1.0, 2.0, 1.3, 2.3])


# --- through the executor ---------------------------------------------------------------------------------


def _reference(family, model, inputs, n_keep):
    """Official-order rows and their sources, from the eager tower's attentions (head sum, as official),
    hidden states and the feature layer's keys."""
    idx = feature_layer_index(model)
    pv = inputs["pixel_values"]
    N = int((inputs["input_ids"] == model.config.image_token_id).sum())
    lay = None
    if family == "llavanext":
        lay = llava_next_layout(model, inputs["image_sizes"][0], N)
        pv = pv[0, : lay.num_crops]
    with torch.no_grad():
        out = vision_tower(model)(pv, output_attentions=True, output_hidden_states=True)
        layer = encoder_layers(model)[idx]
        x = layer.layer_norm1(out.hidden_states[idx])
        heads = layer.self_attn.num_heads
        keys = layer.self_attn.k_proj(x).view(x.shape[0], x.shape[1], heads, -1).mean(2)  # head-averaged
    crops = pv.shape[0]
    parts = [visionzip_select(out.attentions[idx][c, :, 0, 1:].sum(0), keys[c], out.hidden_states[idx + 1][c],
                              *visionzip_split(n_keep // crops)) for c in range(crops)]  # fmt: skip
    if lay is None:
        rows, sources = parts[0].rows, parts[0].sources
    else:
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        cfg = model.config
        size = inputs["image_sizes"][0].tolist()
        gr, gc = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        rows, crop, patch = next_official_order(parts, gr, gc, lay.side)
        pos = {(int(c), int(p)): i for i, (c, p) in enumerate(zip(lay.crop, lay.patch)) if c >= 0}
        sources = torch.tensor([-1 if p < 0 else pos.get((int(c), int(p)), -1) for c, p in zip(crop, patch)])
    with torch.no_grad():
        return sources, model.model.multi_modal_projector(rows[None])[0]


@pytest.mark.parametrize("family,size,n_keep", [
    ("llava15", None, 20),
    ("llavanext", (224, 160), 42),  # 5 crops of 64 patches: 8 each ([CLS] + 6 dominant + 1 contextual)
])  # fmt: skip
def test_through_the_executor_equals_rebuilt_sequence(family, size, n_keep):
    model, processor = load_tiny(family, attn_implementation="eager")
    inputs = tiny_inputs(family, processor, ["What is shown?"], [tiny_image(7, size)])
    emb, stock = stock_embeds(model, inputs)
    with apply_dop(model, DOPPolicy(4, 4, n_keep), reducer="visionzip") as handle, torch.no_grad():
        got = model(**inputs).logits[0, -1]
    sources, rows = _reference(family, model, inputs, n_keep)
    assert handle.last_kept[0].tolist() == sources.tolist()
    vis = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    torch.testing.assert_close(got, replaced_span_logits(model, emb, vis, rows), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, stock[0, -1], atol=1e-4)  # the reduction did change something


def _ctx(family, model, inputs):
    emb, _ = stock_embeds(model, inputs)
    vis = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    return ReductionContext(family=family, model=model, input_ids=inputs["input_ids"], inputs_embeds=emb,
                            attention_mask=None, images=[ImageSpan(0, 0, vis)], model_inputs=dict(inputs))  # fmt: skip


def test_budget_edges():
    """All tokens: official still keeps [CLS] (one patch is merged instead); 1 token: [CLS] only; 0: none.
    LLaVA-NeXT: n_keep // crops per crop, never a newline row, and fewer tokens than crops is refused."""
    model, processor = load_tiny("llava15")
    inputs = tiny_inputs("llava15", processor, ["What?"])
    ctx = _ctx("llava", model, inputs)
    reducer = get_reducer("visionzip")
    sel = reducer.select(ctx, 64)[0]
    assert isinstance(sel, ReplacedSpan) and sel.sources[0] == -1 and len(set(sel.sources[1:].tolist())) == 63
    assert reducer.select(ctx, 1)[0].sources.tolist() == [-1]
    assert reducer.select(ctx, 0)[0].numel() == 0

    model, processor = load_tiny("llavanext")
    inputs = tiny_inputs("llavanext", processor, ["What?"], [tiny_image(2, (224, 160))])
    ctx = _ctx("llava_next", model, inputs)
    lay = llava_next_layout(model, inputs["image_sizes"][0], ctx.images[0].num_tokens)
    sel = reducer.select(ctx, 104)[0]  # 5 crops -> 20 each
    assert sel.embeds.shape[0] == 100
    assert not bool(lay.newline[sel.sources[sel.sources >= 0]].any())
    assert int((sel.sources == -1).sum()) >= 5  # one [CLS] row per crop
    with pytest.raises(ReducerError, match="below 5"):
        reducer.select(ctx, 4)


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
