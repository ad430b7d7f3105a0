"""PruMerge+: the official rules by hand (outlier ratio, top patches + spatial samples, kNN merging, extra
row, the ratio solved for a row budget), against a naive loop (numpy percentiles), and through the executor
against the stock model on the sequence rebuilt by hand from the vision tower's own hidden states (LLaVA-1.5
and LLaVA-NeXT). The official code's own outputs are checked in tests/test_golden_prumerge.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.reducers import ImageSpan, ReducerError, ReductionContext, get_reducer
from vlmeval_dop.reducers.llava_next_layout import llava_next_layout
from vlmeval_dop.reducers.prumerge import (
    PruMergePlus,
    budget_ratio,
    kept_patches,
    max_rows,
    outlier_ratio,
    prumerge_plus_select,
)
from vlmeval_dop.reducers.vision import encoder_layers, vision_tower
from vlmeval_dop.reducers.visionzip import split_budget
from vlmeval_dop.tiny import load_tiny, tiny_image, tiny_inputs

from stock_reference import replaced_span_logits, stock_embeds  # tests/stock_reference.py


def test_by_hand():
    # one outlier (.9 at 4; Q1 = Q3 = .1, bound .1): r = 1/12 -> top int(12/12) = 1 patch, step int(12/3) = 4:
    # samples arange(0, 11, 4) = 0, 4, 8 without 4
    attn = torch.full((12,), 0.1)
    attn[4] = 0.9
    assert outlier_ratio(attn) == 1 / 12
    assert kept_patches(attn, 1 / 12).tolist() == [4, 0, 8]
    assert max_rows(12, 1 / 12) == 5  # 1 top + 3 samples + extra, if no sample were a top patch
    # above 1/12 the step drops to 3 (4 samples: 6 rows) before the top count grows
    assert budget_ratio(12, 5) == 1 / 12 and max_rows(12, budget_ratio(12, 6)) == 6
    assert kept_patches(attn, 0.25).tolist() == [4, 0, 1, 2, 3, 5, 6, 7, 8, 9, 10]  # step 1; never P - 1
    # merging, k=1, P=6: outlier 5 -> r = 1/6, top [5], samples arange(0, 5, 2) = 0, 2, 4, pruned 1, 3.
    # Keys on a circle: the nearest other key of 5 -> 4, 0 -> 1, 2 -> 3, 4 -> 5.
    attn = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.9])
    ang = torch.tensor([0.0, 10, 100, 108, 200, 205]).deg2rad()
    keys = torch.stack([ang.cos(), ang.sin()], 1)
    x = torch.arange(6.0)[:, None] * torch.tensor([[1.0, -1.0]]) + torch.tensor([[0.5, 2.0]])
    kept, rows = prumerge_plus_select(attn, keys, x, outlier_ratio(attn), k=1)
    assert kept.tolist() == [5, 0, 2, 4]
    want = torch.stack([x[5] + 0.1 * x[4], x[0] + 0.1 * x[1], x[2] + 0.1 * x[3], x[4] + 0.9 * x[5],
                        0.1 * x[1] + 0.1 * x[3]])  # fmt: skip  (last: the extra row of the pruned 1, 3)
    torch.testing.assert_close(rows, want)


def _naive(attn, keys, feats, ratio, k):
    """Independent reference: Python loops over the official rules."""
    a = attn.tolist()
    P = len(a)
    top = sorted(range(P), key=lambda i: (-a[i], i))[: int(P * ratio)]
    kept = top + [x for x in range(0, P - 1, int(int(1 / ratio) / 3)) if x not in top]
    rows = []
    for i in kept:
        cos = {j: float(keys[i] @ keys[j] / (keys[i].norm() * keys[j].norm())) for j in range(P) if j != i}
        nb = sorted(cos, key=lambda j: (-cos[j], j))[:k]
        rows.append(feats[i] + sum(a[j] * feats[j] for j in nb))
    rows.append(sum((a[j] * feats[j] for j in range(P) if j not in kept), torch.zeros_like(feats[0])))
    return kept, torch.stack(rows)


@pytest.mark.parametrize("seed", range(3))
def test_equals_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    P = 60
    attn = torch.rand(P, generator=g, dtype=torch.float64) ** 6  # heavy tail: a few outliers
    keys = torch.randn(P, 6, generator=g, dtype=torch.float64)
    feats = torch.randn(P, 5, generator=g, dtype=torch.float64)
    a = attn.float().numpy()
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    adaptive = float((a > q3 + 1.5 * (q3 - q1)).sum()) / P
    assert outlier_ratio(attn) == adaptive > 0
    for ratio, k in ((adaptive, 32), (0.05, 4), (0.2, 59), (1 / 3, 10), (0.001, 32)):
        kept, rows = prumerge_plus_select(attn, keys, feats, ratio, k)
        want_kept, want = _naive(attn, keys, feats, ratio, k)
        assert kept.tolist() == want_kept
        torch.testing.assert_close(rows, want)
        assert len(kept) + 1 <= max_rows(P, ratio)


@pytest.mark.parametrize("P", [64, 576])
def test_budget_ratio_is_the_largest_feasible(P):
    """Every ratio above the solved one (a grid finer than the narrowest piece of max_rows) needs more rows
    or makes the same selection (same top count and step: the solved ratio's piece is open at the top)."""
    grid = np.linspace(1e-6, 1 / 3, 40000)
    rows = np.array([max_rows(P, float(r)) for r in grid])
    for n in (2, 3, 10, 32, 64, 128, 192, 576):
        r = budget_ratio(P, n)
        assert max_rows(P, r) <= n
        same = [(int(P * x), int(1 / x)) == (int(P * r), int(1 / r)) for x in grid]
        assert ((rows > n) | same)[grid > r].all()
    with pytest.raises(ReducerError, match="the fewest it gives is 2"):
        budget_ratio(P, 1)


# --- through the executor ---------------------------------------------------------------------------------


def _reference(family, model, inputs, n_keep):
    """Sources and decoder rows from the tower's hidden states and the last layer's weights, written out as
    the official single-head formula softmax((W_q x_cls + b_q)(W_k x + b_k)^T / sqrt(D)); every crop on all
    its patches, its budget share as its row bound."""
    N = int((inputs["input_ids"] == model.config.image_token_id).sum())
    pv = inputs["pixel_values"]
    if family == "llavanext":
        lay = llava_next_layout(model, inputs["image_sizes"][0], N)
        pv = pv[0, : lay.num_crops]
        where = {(int(c), int(p)): i for i, (c, p) in enumerate(zip(lay.crop, lay.patch)) if c >= 0}
    with torch.no_grad():
        hs = vision_tower(model)(pv, output_hidden_states=True).hidden_states[-2]  # LLaVA's features
        last = encoder_layers(model)[-1]
        ln = last.layer_norm1
        x = torch.nn.functional.layer_norm(hs, hs.shape[-1:], ln.weight, ln.bias, ln.eps)
        q = x[:, 0] @ last.self_attn.q_proj.weight.T + last.self_attn.q_proj.bias
        k = x @ last.self_attn.k_proj.weight.T + last.self_attn.k_proj.bias
        s = torch.einsum("cd,ctd->ct", q, k) / hs.shape[-1] ** 0.5
        attn = (s.exp() / s.exp().sum(-1, keepdim=True))[:, 1:]
    C, P = attn.shape
    sources, rows = [], []
    for c, share in enumerate(split_budget(min(n_keep, C * P), [P] * C)):
        kept, r = prumerge_plus_select(attn[c], k[c, 1:], hs[c, 1:], budget_ratio(P, share))
        rows.append(r)
        sources += [p if family == "llava15" else where.get((c, p), -1) for p in kept.tolist()] + [-1]
    with torch.no_grad():
        return sources, model.model.multi_modal_projector(torch.cat(rows))


@pytest.mark.parametrize("family,size,n_keep", [
    ("llava15", None, 20),
    ("llava15", None, 64),  # all tokens: still merged, as official (43 rows)
    ("llavanext", (224, 160), 42),  # 5 crops of 64 patches (2 grid crops cut by unpadding), shares 9,9,8,8,8
])  # fmt: skip
def test_through_the_executor_equals_rebuilt_sequence(family, size, n_keep):
    model, processor = load_tiny(family)
    inputs = tiny_inputs(family, processor, ["What is shown?"], [tiny_image(5, size)])
    emb, stock = stock_embeds(model, inputs)
    with apply_dop(model, DOPPolicy(4, 4, n_keep), reducer="prumergeplus") as handle, torch.no_grad():
        got = model(**inputs).logits[0, -1]
    sources, rows = _reference(family, model, inputs, n_keep)
    assert handle.last_kept[0].tolist() == sources and len(sources) <= n_keep
    assert sources[-1] == -1 and sources.count(-1) >= (1 if family == "llava15" else 5)  # an extra row per crop
    vis = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    torch.testing.assert_close(got, replaced_span_logits(model, emb, vis, rows), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, stock[0, -1], atol=1e-4)


def test_bad_input():
    model, processor = load_tiny("llava15")
    inputs = tiny_inputs("llava15", processor, ["What?"])
    emb, _ = stock_embeds(model, inputs)
    vis = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    ctx = ReductionContext(family="llava", model=model, input_ids=inputs["input_ids"], inputs_embeds=emb,
                           attention_mask=None, images=[ImageSpan(0, 0, vis)], model_inputs=dict(inputs))  # fmt: skip
    with pytest.raises(ReducerError, match="valid: 1..64"):
        get_reducer("prumergeplus").select(ctx, 65)
    with pytest.raises(ReducerError, match="the fewest it gives is 2"):
        get_reducer("prumergeplus").select(ctx, 1)
    # this tiny tower's [CLS] attention has no IQR outliers: the official code divides by zero
    with pytest.raises(ReducerError, match="no attention outliers"):
        PruMergePlus(adaptive=True).select(ctx, 64)
    qmodel, qproc = load_tiny("qwen25vl")
    qin = tiny_inputs("qwen25vl", qproc, ["What?"], [tiny_image(1)])
    with pytest.raises(ReducerError, match="supported: llava, llava_next"):
        with apply_dop(qmodel, DOPPolicy(4, 4, 8), reducer="prumergeplus"), torch.no_grad():
            qmodel(**qin)
