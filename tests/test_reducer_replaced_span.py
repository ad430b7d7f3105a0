"""`ReplacedSpan`: a reducer replaces an image span by new rows in its own order (kept [CLS] rows, appended
tokens, official NeXT packing). Reference: the stock model on the sequence rebuilt by hand with those rows
in place of the image, positions 0..n-1 (what the official LLaVA code builds), for forward and greedy decoding."""
from __future__ import annotations

import pytest
import torch

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.reducers import ReducerError, ReplacedSpan
from vlmeval_dop.tiny import load_tiny, tiny_image, tiny_inputs

from stock_reference import stock_embeds  # tests/stock_reference.py


class _Rows:
    """Test reducer: the image's last row, a synthetic row (mean of all), then rows 0..k-3 reversed."""

    name = "test_rows"
    families = None

    def __init__(self, sources: bool = True):
        self.sources = sources

    def select(self, ctx, n_keep):
        out = []
        for span in ctx.images:
            e = ctx.image_embeds(span)
            src = torch.tensor([span.num_tokens - 1, -1] + list(range(n_keep - 2))[::-1])
            rows = torch.stack([e[s] if s >= 0 else e.mean(0) for s in src.tolist()]) * 1.5
            out.append(ReplacedSpan(rows, src if self.sources else None))
        return out


def _rebuilt(model, inputs, reducer, n_keep):
    emb, _ = stock_embeds(model, inputs)
    vis = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    span_rows = reducer.select(_Ctx(emb[0, vis]), n_keep)[0].embeds
    seq = torch.cat([emb[0, : vis[0]], span_rows, emb[0, vis[-1] + 1 :]])[None]
    return seq


class _Ctx:
    """Minimal context for calling the test reducer on one span by hand."""

    def __init__(self, rows):
        self.rows = rows
        self.images = [type("S", (), {"num_tokens": rows.shape[0]})()]

    def image_embeds(self, span):
        return self.rows


@pytest.fixture(scope="module")
def llava():
    model, processor = load_tiny("llava15")
    inputs = tiny_inputs("llava15", processor, ["What is shown?"], [tiny_image(seed=3)])
    return model, inputs


def test_replaced_span_equals_rebuilt_sequence(llava):
    model, inputs = llava
    n_keep = 9
    seq = _rebuilt(model, inputs, _Rows(), n_keep)
    with torch.no_grad():
        want = model(inputs_embeds=seq).logits[0, -1]
        with apply_dop(model, DOPPolicy(4, 4, n_keep), reducer=_Rows()) as h:
            got = model(**inputs).logits[0, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert h.last_kept[0].tolist() == [63, -1] + list(range(n_keep - 2))[::-1]
    assert [a for a, _ in h.last_layer_tokens] == [seq.shape[1]] * 4


def test_replaced_span_generate_and_depth_pruning(llava):
    """Greedy decoding with cache equals recomputing the rebuilt sequence; depth pruning applies to the rows."""
    model, inputs = llava
    n_keep = 7
    seq = _rebuilt(model, inputs, _Rows(sources=False), n_keep)
    with torch.no_grad():
        want, cur = [], seq
        for _ in range(4):
            nxt = model(inputs_embeds=cur).logits[0, -1].argmax()
            want.append(int(nxt))
            cur = torch.cat([cur, model.get_input_embeddings()(nxt)[None, None]], dim=1)
        with apply_dop(model, DOPPolicy(4, 4, n_keep), reducer=_Rows(sources=False)) as h:
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert h.last_kept[0].tolist() == [-1] * n_keep
        with apply_dop(model, DOPPolicy(2, 1, n_keep), reducer=_Rows()) as h:
            model(**inputs)
    assert out[0, inputs["input_ids"].shape[1] :].tolist() == want
    n_text = seq.shape[1] - n_keep
    assert [a for a, _ in h.last_layer_tokens] == [seq.shape[1]] * 2 + [n_text] * 2
    assert [m for _, m in h.last_layer_tokens] == [seq.shape[1]] + [n_text] * 3


def test_replaced_span_refused_for_mrope_and_bad_counts():
    model, processor = load_tiny("qwen25vl")
    inputs = tiny_inputs("qwen25vl", processor, ["What?"], [tiny_image(seed=0)])
    with pytest.raises(ReducerError, match="M-RoPE"), apply_dop(model, DOPPolicy(4, 4, 8), reducer=_Rows()):
        model(**inputs)

    class TooMany(_Rows):
        def select(self, ctx, n_keep):
            return [ReplacedSpan(torch.zeros(span.num_tokens + 1, ctx.inputs_embeds.shape[-1])) for span in ctx.images]

    model, processor = load_tiny("llava15")
    inputs = tiny_inputs("llava15", processor, ["What?"], [tiny_image(seed=0)])
    with pytest.raises(ReducerError, match=r"valid: 1\.\.64"), apply_dop(model, DOPPolicy(4, 4, 8), reducer=TooMany()):
        model(**inputs)
