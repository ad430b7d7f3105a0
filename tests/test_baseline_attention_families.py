"""Attention rows and keys that decoder-side baselines recompute equal the stock layers' own, on every family.

FastV/SparseVLM (`attention.query_attention`), PDrop (`pdrop_scores`: the next layer's attention), FitPrune
(`visual_attention`) and DART (`_keys`) recompute q/k from a layer's modules instead of asking for eager attention.
The reference is the stock model run with eager attention (`output_attentions`, the KV cache): it includes each
family's per-head q/k norms (Qwen3 decoders, Gemma 3), RoPE function and scaling, sliding windows (the tiny
Gemma 3's window is smaller than the prompt) and bidirectional image blocks. Methods whose rows cannot model
bidirectional image queries or windows refuse such families by name instead.
"""
from __future__ import annotations

import pytest
import torch

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.baselines.attention import query_attention
from vlmeval_dop.baselines.dart import _keys
from vlmeval_dop.baselines.fitprune import visual_attention
from vlmeval_dop.baselines.pdrop import PDrop, pdrop_scores
from vlmeval_dop.tiny import TINY_FAMILIES, TINY_NEW_FAMILIES, TINY_VIDEO_FAMILIES, load_tiny, tiny_image, tiny_inputs

FAMILY_KEY = {"qwen25vl": "qwen2_5_vl", "qwen2vl": "qwen2_vl", "qwen3vl": "qwen3_vl"}
LAYER = 1  # a local (sliding-window) layer on the tiny Gemma 3


class _Probe:
    """A pruner that drops nothing and records `fn(ctx)` after one layer."""

    name = "probe"

    def __init__(self, fn, layer: int = LAYER):
        self.fn, self.layers, self.seen, self.error = fn, (layer,), None, None

    def select(self, ctx):
        self.seen = self.fn(ctx)
        return None


@pytest.fixture(scope="module", params=TINY_FAMILIES + TINY_NEW_FAMILIES + TINY_VIDEO_FAMILIES)
def run(request):
    family = request.param
    model, processor = load_tiny(family, attn_implementation="eager")
    inputs = tiny_inputs(family, processor, ["What is shown in the picture?", "Color?"], [tiny_image(0), tiny_image(1)])
    L = model.config.get_text_config(decoder=True).num_hidden_layers
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, use_cache=True)

    def probe(fn, layer=LAYER):
        p = _Probe(fn, layer)
        with apply_dop(model, DOPPolicy.full(L), token_pruner=p), torch.no_grad():
            model(**inputs)
        return p.seen

    return family, model, inputs, out, probe


def _stock_row(out, layer):  # (B, N): the last token's attention, mean over heads
    return out.attentions[layer][:, :, -1, :].mean(1).float()


def test_query_attention_equals_eager(run):
    family, model, inputs, out, probe = run
    seen = probe(lambda ctx: query_attention(ctx, torch.tensor([ctx.hidden_in.shape[1] - 1]))[:, 0])
    torch.testing.assert_close(seen, _stock_row(out, LAYER), atol=1e-5, rtol=1e-4)


def test_pdrop_scores_equal_next_layer_eager(run):
    family, model, inputs, out, probe = run
    L = model.config.get_text_config(decoder=True).num_hidden_layers
    try:  # PDrop itself (it renumbers positions) is refused on M-RoPE and sliding-window families
        with apply_dop(model, DOPPolicy.full(L), token_pruner=PDrop(boundaries=[LAYER + 1], ratio=0.5)), torch.no_grad():
            model(**inputs)
    except ValueError as exc:
        assert family in ("qwen25vl", "qwen2vl", "qwen3vl", "gemma3") and repr(FAMILY_KEY.get(family, family)) in str(exc)
        return
    seen = probe(pdrop_scores)
    torch.testing.assert_close(seen.float(), _stock_row(out, LAYER + 1), atol=1e-5, rtol=1e-4)


def test_dart_keys_equal_stock_cache(run):
    family, model, inputs, out, probe = run
    N = inputs["input_ids"].shape[1]
    seen = probe(lambda ctx: _keys(ctx, 0, torch.arange(N)))
    stock = out.past_key_values.layers[LAYER].keys[0]  # (kv_heads, n, hd); a sliding layer keeps the last n only
    n = stock.shape[1]
    torch.testing.assert_close(seen[N - n :], stock.transpose(0, 1).reshape(n, -1), atol=1e-5, rtol=1e-4)


def test_fitprune_maps_equal_eager_or_refuse(run):
    family, model, inputs, out, probe = run
    if family == "gemma3":
        with pytest.raises(ValueError, match="FitPrune does not support family 'gemma3'"):
            probe(visual_attention)
        return
    seen = probe(visual_attention)
    amax = out.attentions[LAYER].amax(1).float()  # (B, N, N) head-wise max, the official "mix attention map"
    mask = inputs["attention_mask"].bool()
    for b, got in enumerate(seen):
        vis, n_text = got.positions, got.n_text
        txt = torch.nonzero(mask[b] & (torch.arange(mask.shape[1]) > vis[0]) & ~torch.isin(torch.arange(mask.shape[1]), vis)).flatten()
        assert n_text == txt.numel()
        torch.testing.assert_close(got.cross, amax[b][txt][:, vis].sum(0) / n_text, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.self_, amax[b][vis][:, vis].sum(0) / vis.numel(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("entry,method,family", [
    ("tiny_qwen25vl_pdrop90", "pdrop", "qwen2_5_vl"),
    ("tiny_gemma3_sparsevlm90", "sparsevlm", "gemma3"),
    ("tiny_gemma3_fitprune90", "fitprune", "gemma3"),
])
def test_unsupported_families_are_refused_when_the_entry_is_made(entry, method, family):
    from vlmeval_dop.registry import EntryError, get_entry

    with pytest.raises(EntryError, match=f"baseline '{method}' does not support model family '{family}'"):
        get_entry(entry)
    assert get_entry("tiny_gemma3_fastv90").baseline == "fastv"  # FastV's rows are exact on every family


def _half_llava():
    """The tiny eager LLaVA-1.5 in float16, a padded batch of two and its decoder depth."""
    model, processor = load_tiny("llava15", attn_implementation="eager")
    model = model.half()
    inputs = tiny_inputs("llava15", processor, ["What is shown in the picture?", "Color?"], [tiny_image(0), tiny_image(1)])
    inputs["pixel_values"] = inputs["pixel_values"].half()
    return model, inputs, model.config.get_text_config(decoder=True).num_hidden_layers


def test_half_precision_rows_are_the_eager_weights_in_that_dtype():
    """float16 models: the recomputed row is what the official code ranks, eager attention weights in float16
    (softmax in float32 cast back) averaged over heads in float16, not a float32 recomputation."""
    model, inputs, L = _half_llava()
    with torch.no_grad():
        eager = model(**inputs, output_attentions=True).attentions[LAYER][:, :, -1, :].mean(1)
    p = _Probe(lambda ctx: query_attention(ctx, torch.tensor([ctx.hidden_in.shape[1] - 1]))[:, 0])
    with apply_dop(model, DOPPolicy.full(L), token_pruner=p), torch.no_grad():
        model(**inputs)
    assert eager.dtype == torch.float16 and p.seen.dtype == torch.float32
    assert torch.equal(p.seen.half().float(), p.seen)  # float16 values, rounded as the eager weights are
    torch.testing.assert_close(p.seen, eager.float(), atol=0, rtol=0)


def test_half_precision_fitprune_maps_are_the_official_float16_arithmetic():
    """float16 models: FitPrune's ranking score is the official one on eager float16 weights: head max, self =
    ([vis, vis] / c).sum(0) and the undivided cross = [txt, vis].sum(0) in float16, their product in float16."""
    model, inputs, L = _half_llava()
    with torch.no_grad():
        amax = model(**inputs, output_attentions=True).attentions[LAYER].amax(1)  # (B, N, N) float16
    p = _Probe(visual_attention)
    with apply_dop(model, DOPPolicy.full(L), token_pruner=p), torch.no_grad():
        model(**inputs)
    mask = inputs["attention_mask"].bool()
    for b, got in enumerate(p.seen):
        vis = got.positions
        txt = torch.nonzero(mask[b] & (torch.arange(mask.shape[1]) > vis[0]) & ~torch.isin(torch.arange(mask.shape[1]), vis)).flatten()
        self_ = (amax[b][vis][:, vis] / vis.numel()).sum(0)
        cross = amax[b][txt][:, vis].sum(0)
        assert got.rank.dtype == torch.float16 and txt.numel() == got.n_text > 0
        assert torch.equal(got.rank, cross * self_) and torch.equal(got.self_, self_.float())
        torch.testing.assert_close(got.cross, cross.float() / txt.numel(), atol=0, rtol=0)


def test_baselines_load_the_attention_their_official_code_ran(lmu_root):
    """FastV, SparseVLM, FitPrune read eager attention weights in their official code: their entries load the
    decoder with eager attention (float16 sums round as there); everything else keeps sdpa; explicit wins."""
    from vlmeval_dop.registry import load_entry

    assert load_entry("tiny_llava15_fastv").attn_implementation == "eager"
    assert load_entry("tiny_llava15_sparsevlm").attn_implementation == "eager"
    assert load_entry("tiny_llava15_dart").attn_implementation == "sdpa"
    assert load_entry("tiny_llava15_dop").attn_implementation == "sdpa"
    assert load_entry("tiny_llava15_fastv", attn_implementation="sdpa").attn_implementation == "sdpa"
