"""Decoder-side pruners that rebuild the sequence (PDrop, SparseVLM): `PruneDecision(renumber=True)` and
`PruneDecision(order=...)`.

Independent reference: the sequence is physically rebuilt after each pruning layer (surviving rows gathered
in sequence order, appended rows inserted where the keys put them), the remaining stock layers run on it
with positions 0..n-1 and a plain causal mask, as the official implementations do. Decoding: greedy
tokens with the executor's cache equal recomputing the rebuilt reference on the grown sequence (the
pruning patterns here depend only on token indices, so recomputation is a valid reference and checks each
layer's decode-position shift)."""
from __future__ import annotations

import pytest
import torch

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.executor.token_pruner import PruneDecision
from vlmeval_dop.tiny import load_tiny, tiny_image, tiny_inputs

from stock_reference import stock_decoder_inputs  # tests/stock_reference.py


class StagedDrop:
    """After layer 0: drop odd visual tokens; after layer 2: drop the first half of the rest. Renumbers."""

    name = "staged_drop"
    layers = (0, 2)

    def select(self, ctx):
        vis_alive = ctx.visual & ctx.alive
        drop = torch.zeros_like(vis_alive)
        for b in range(vis_alive.shape[0]):
            idx = torch.nonzero(vis_alive[b]).flatten()
            if ctx.layer_idx == 0:
                drop[b, idx[1::2]] = True
            else:
                drop[b, idx[: idx.numel() // 2]] = True
        return PruneDecision(drop=drop, renumber=True)

    @staticmethod
    def rebuild(h, visual, layer_idx):
        """Reference: rows kept after `layer_idx`, in order (as indices into the current sequence)."""
        idx = torch.nonzero(visual).flatten()
        keep = torch.ones(h.shape[0], dtype=torch.bool)
        keep[idx[1::2] if layer_idx == 0 else idx[: idx.numel() // 2]] = False
        return h[keep], visual[keep]


class AppendRows:
    """After layer 1: drop visual tokens 0..9, append 3 rows (scaled means of the dropped ones) right after
    the kept visual tokens, reusing the slots of dropped tokens 0..2. Renumbers."""

    name = "append_rows"
    layers = (1,)

    def select(self, ctx):
        B, N = ctx.visual.shape
        drop = torch.zeros(B, N, dtype=torch.bool)
        upd = torch.zeros(B, N, dtype=torch.bool)
        order = ctx.order.clone()
        values = []
        for b in range(B):
            idx = torch.nonzero(ctx.visual[b]).flatten()
            drop[b, idx[3:10]] = True
            upd[b, idx[:3]] = True
            values.append(self.rows(ctx.hidden_out[b, idx[:10]]))
            order[b, idx[:3]] = idx[-1] + 0.5 + torch.arange(3, dtype=order.dtype) / 10
        return PruneDecision(drop=drop, update_mask=upd, update_values=torch.cat(values), renumber=True, order=order)

    @staticmethod
    def rows(dropped):
        return dropped.mean(0, keepdim=True) * torch.tensor([[1.0], [2.0], [3.0]])

    @classmethod
    def rebuild(cls, h, visual, layer_idx):
        idx = torch.nonzero(visual).flatten()
        new = cls.rows(h[idx[:10]])
        h2 = torch.cat([h[: idx[0]], h[idx[10:]], new, h[idx[-1] + 1 :]])
        v2 = torch.cat([visual[: idx[0]], visual[idx[10:]], torch.zeros(3, dtype=torch.bool), visual[idx[-1] + 1 :]])
        return h2, v2


def rebuilt_reference(model, embeds, visual, pruner):
    """Last-token logits of one sample (embeds (N, H), visual (N,)), rebuilding the sequence after each
    pruning layer; positions 0..n-1 and a causal mask on whatever sequence a layer sees."""
    lm = model.model.language_model
    h, vis = embeds, visual
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            n = h.shape[0]
            pos = torch.arange(n)[None]
            cos, sin = lm.rotary_emb(h[None], pos)
            mask = torch.zeros(1, 1, n, n).masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), torch.finfo(h.dtype).min)
            x = h[None]
            x = x + layer.self_attn(hidden_states=layer.input_layernorm(x), attention_mask=mask, position_embeddings=(cos, sin))[0]
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            h = x[0]
            if i in pruner.layers:
                h, vis = pruner.rebuild(h, vis, i)
        return model.lm_head(lm.norm(h[-1:]))[0]


@pytest.fixture(scope="module")
def llava():
    model, processor = load_tiny("llava15")
    return model, processor


def _sample(model, processor, seeds=(0,), question="What is shown in the picture?"):
    inputs = tiny_inputs("llava15", processor, [question] * len(seeds), [tiny_image(seed=s) for s in seeds])
    kwargs, _ = stock_decoder_inputs(model, inputs)
    visual = inputs["input_ids"] == model.config.image_token_id
    return inputs, kwargs["inputs_embeds"], visual


@pytest.mark.parametrize("pruner_cls", [StagedDrop, AppendRows])
def test_prefill_equals_rebuilt_sequence(llava, pruner_cls):
    model, processor = llava
    inputs, embeds, visual = _sample(model, processor, seeds=(1, 2))
    with torch.no_grad(), apply_dop(model, DOPPolicy.full(4), token_pruner=pruner_cls()) as h:
        got = model(**inputs).logits[:, -1]
    for b in range(2):
        want = rebuilt_reference(model, embeds[b], visual[b], pruner_cls())
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5)
    n = inputs["input_ids"].shape[1]
    if pruner_cls is StagedDrop:  # 64 -> 32 -> 16 visual tokens
        assert [a for a, _ in h.last_layer_tokens] == [2 * n, 2 * (n - 32), 2 * (n - 32), 2 * (n - 48)]
    else:  # 64 -> 57 slots (54 kept + 3 appended)
        assert [a for a, _ in h.last_layer_tokens] == [2 * n, 2 * n, 2 * (n - 7), 2 * (n - 7)]


@pytest.mark.parametrize("pruner_cls", [StagedDrop, AppendRows])
def test_decoding_continues_each_layers_own_positions(llava, pruner_cls):
    model, processor = llava
    inputs, embeds, visual = _sample(model, processor, seeds=(3,))
    steps = 4
    with torch.no_grad(), apply_dop(model, DOPPolicy.full(4), token_pruner=pruner_cls()):
        out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    got = out[0, inputs["input_ids"].shape[1] :].tolist()
    want, h, vis = [], embeds[0], visual[0]
    emb = model.get_input_embeddings()
    for _ in range(steps):
        nxt = int(rebuilt_reference(model, h, vis, pruner_cls()).argmax())
        want.append(nxt)
        with torch.no_grad():
            h = torch.cat([h, emb(torch.tensor([nxt]))])
        vis = torch.cat([vis, torch.zeros(1, dtype=torch.bool)])
    assert got == want


def test_renumbering_changes_the_result_and_order_alone_keeps_positions(llava):
    """Guards against a reference that cannot fail: without renumbering the logits differ (original positions),
    and `order` without `renumber` changes causality only."""
    model, processor = llava
    inputs, embeds, visual = _sample(model, processor, seeds=(4,))

    class NoRenumber(StagedDrop):
        def select(self, ctx):
            d = super().select(ctx)
            return PruneDecision(drop=d.drop)

    with torch.no_grad():
        with apply_dop(model, DOPPolicy.full(4), token_pruner=StagedDrop()):
            a = model(**inputs).logits[0, -1]
        with apply_dop(model, DOPPolicy.full(4), token_pruner=NoRenumber()):
            b = model(**inputs).logits[0, -1]
    assert not torch.allclose(a, b, atol=1e-4)
