"""PruMerge+: IQR outliers, uniform fill and kNN merging by hand, against a naive loop (numpy percentiles),
and through the executor against a rebuilt sequence built from the vision tower's own hidden states."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.reducers import ImageSpan, ReducerError, ReductionContext, get_reducer
from vlmeval_dop.reducers.llava_next_layout import llava_next_layout
from vlmeval_dop.reducers.prumerge import iqr_outliers, prumerge_plus_choose, prumerge_plus_select
from vlmeval_dop.reducers.vision import encoder_layers, vision_tower
from vlmeval_dop.tiny import load_tiny, tiny_image, tiny_inputs

from stock_reference import assert_all_tokens_is_stock, assert_matches_rebuilt, merged_rows, stock_embeds  # tests/stock_reference.py


def test_by_hand():
    # attn sorted = [.1]*6 + [.5, .9]: Q1 = .1, Q3 at rank 5.25 = .1 + .25 * (.5 - .1) = .2, IQR = .1,
    # bound .35 -> outliers .9 (token 6), .5 (token 7), ranked by attention
    attn = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9, 0.5])
    assert iqr_outliers(attn).tolist() == [6, 7]
    assert prumerge_plus_choose(attn, 1).tolist() == [6]  # the strongest outlier
    # 4 slots: outliers 6, 7 + 2 uniform among rest [0..5] (R=6): rest[0], rest[3]
    assert prumerge_plus_choose(attn, 4).tolist() == [0, 3, 6, 7]
    assert prumerge_plus_choose(attn, 8).tolist() == list(range(8))
    assert prumerge_plus_choose(torch.ones(6), 3).tolist() == [0, 2, 4]  # no outlier: uniform only
    # merging, k=1: keys on a circle; kept {0, 3, 6, 7} (n_keep=4). Nearest other key of
    # 0 -> 1, 3 -> 2, 6 -> 7, 7 -> 6. merged_i = x_i + attn_j * x_j
    ang = torch.tensor([0.0, 10, 40, 45, 90, 120, 200, 205]).deg2rad()
    keys = torch.stack([ang.cos(), ang.sin()], 1)
    feats = torch.arange(8.0)[:, None] * torch.tensor([[1.0, -1.0]])
    res = prumerge_plus_select(attn, keys, feats, 4, k=1)
    assert res.kept.tolist() == [0, 3, 6, 7] and res.changed.all()
    want = torch.stack([feats[0] + 0.1 * feats[1], feats[3] + 0.1 * feats[2],
                        feats[6] + 0.5 * feats[7], feats[7] + 0.9 * feats[6]])  # fmt: skip
    torch.testing.assert_close(res.features, want)


def _naive(attn, keys, feats, n_keep, k):
    """Independent reference: numpy percentiles and Python loops."""
    a = attn.numpy()
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    outl = sorted([i for i in range(len(a)) if a[i] > q3 + 1.5 * (q3 - q1)], key=lambda i: (-a[i], i))[:n_keep]
    rest = [i for i in range(len(a)) if i not in outl]
    n_fill = n_keep - len(outl)
    kept = sorted(outl + [rest[j * len(rest) // n_fill] for j in range(n_fill)])
    rows = []
    for i in kept:
        cos = {j: float(keys[i] @ keys[j] / (keys[i].norm() * keys[j].norm())) for j in range(len(a)) if j != i}
        nb = sorted(cos, key=lambda j: (-cos[j], j))[:k]
        rows.append(feats[i] + sum(attn[j] * feats[j] for j in nb))
    return kept, torch.stack(rows)


@pytest.mark.parametrize("seed", range(4))
def test_equals_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    M = 50
    attn = torch.rand(M, generator=g, dtype=torch.float64) ** 6  # heavy tail: a few outliers
    keys = torch.randn(M, 6, generator=g, dtype=torch.float64)
    feats = torch.randn(M, 5, generator=g, dtype=torch.float64)
    for n_keep, k in ((1, 32), (3, 4), (12, 32), (30, 49), (50, 10)):
        res = prumerge_plus_select(attn, keys, feats, n_keep, k)
        kept, want = _naive(attn, keys, feats, n_keep, k)
        assert res.kept.tolist() == kept
        torch.testing.assert_close(res.features.double(), want)
    with pytest.raises(ReducerError, match="valid: 0..50"):
        prumerge_plus_choose(attn, 51)


# --- through the executor ---------------------------------------------------------------------------------


def _reference(family, model, inputs, budgets):
    """Kept indices and decoder inputs from the tower's hidden states and the last layer's weights,
    written out as the official single-head formula softmax((W_q x_cls + b_q)(W_k x + b_k)^T / sqrt(D))."""
    N = int((inputs["input_ids"] == model.config.image_token_id).sum())
    pv = inputs["pixel_values"]
    if family == "llavanext":
        lay = llava_next_layout(model, inputs["image_sizes"][0], N)
        pv = pv[0, : lay.num_crops]
        groups = [torch.nonzero(lay.crop == c).flatten() for c in range(lay.num_crops)]
        groups = [(pos, c, lay.patch[pos]) for c, pos in enumerate(groups)]
    else:
        groups = [(torch.arange(N), 0, torch.arange(N))]
    with torch.no_grad():
        hs = vision_tower(model)(pv, output_hidden_states=True).hidden_states[-2]  # LLaVA's features
        last = encoder_layers(model)[-1]
        ln = last.layer_norm1
        x = torch.nn.functional.layer_norm(hs, hs.shape[-1:], ln.weight, ln.bias, ln.eps)
        q = x[:, 0] @ last.self_attn.q_proj.weight.T + last.self_attn.q_proj.bias
        k = x @ last.self_attn.k_proj.weight.T + last.self_attn.k_proj.bias
        s = torch.einsum("cd,ctd->ct", q, k) / hs.shape[-1] ** 0.5
        attn = (s.exp() / s.exp().sum(-1, keepdim=True))[:, 1:]
    kept, feats = [], []
    for (pos, c, patch), n in zip(groups, budgets):
        res = prumerge_plus_select(attn[c, patch], k[c, 1:][patch], hs[c, 1:][patch], n)
        kept.append(pos[res.kept])
        feats.append(res.features)
    return merged_rows(model, kept, feats)


@pytest.mark.parametrize("family,size,n_keep,budgets", [
    ("llava15", None, 20, [20]),
    ("llavanext", (224, 160), 42, [9, 9, 8, 8, 8]),  # base 64 + 4 unpadded crops of 48 + 12 newlines
])  # fmt: skip
def test_through_the_executor_equals_rebuilt_sequence(family, size, n_keep, budgets):
    model, processor = load_tiny(family)
    inputs = tiny_inputs(family, processor, ["What is shown?"], [tiny_image(5, size)])
    emb, stock = stock_embeds(model, inputs)
    with apply_dop(model, DOPPolicy(4, 4, n_keep), reducer="prumergeplus") as handle, torch.no_grad():
        got = model(**inputs).logits[0, -1]
    kept, rows = _reference(family, model, inputs, budgets)
    assert_matches_rebuilt(model, inputs, handle, got, emb, stock, kept, rows)


@pytest.mark.parametrize("family", ["llava15", "llavanext"])
def test_all_tokens_is_the_stock_model(family):
    model, processor = load_tiny(family)
    inputs = tiny_inputs(family, processor, ["Which colour?"], [tiny_image(2, (224, 160))])
    assert_all_tokens_is_stock(model, inputs, "prumergeplus")


def test_bad_input():
    model, processor = load_tiny("llava15")
    inputs = tiny_inputs("llava15", processor, ["What?"])
    emb, _ = stock_embeds(model, inputs)
    vis = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    ctx = ReductionContext(family="llava", model=model, input_ids=inputs["input_ids"], inputs_embeds=emb,
                           attention_mask=None, images=[ImageSpan(0, 0, vis)], model_inputs=dict(inputs))  # fmt: skip
    with pytest.raises(ReducerError, match="valid: 0..64"):
        get_reducer("prumergeplus").select(ctx, 65)
    qmodel, qproc = load_tiny("qwen25vl")
    qin = tiny_inputs("qwen25vl", qproc, ["What?"], [tiny_image(1)])
    with pytest.raises(ReducerError, match="supported: llava, llava_next"):
        with apply_dop(qmodel, DOPPolicy(4, 4, 8), reducer="prumergeplus"), torch.no_grad():
            qmodel(**qin)
