"""The executor battery of tests/test_executor.py on the families beyond the paper (issue 15).

Each test below is test_executor.py's own test function, collected here with this module's `tiny` fixture
(the new tiny families), so every family meets exactly the same references: stock transformers (full policy,
bit-identical), the independent masked reference (9 pruned policies incl. d_A=0, d_P>d_A, d_A=L), cached
decoding vs recomputation, left-padded batches vs single samples, sdpa vs eager, operation masks, a
decoder-side token pruner, and FlopCounterMode vs the analytic count. Family-specific facts (ArchSpec,
refused reducers, what is new in each family) are checked at the end.
"""
from __future__ import annotations

import pytest
import torch

import test_executor as te  # tests/test_executor.py: the battery and its references
from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.arch import ArchSpec
from vlmeval_dop.reducers import ReducerError
from vlmeval_dop.tiny import TINY_NEW_FAMILIES, TINY_VISUAL_TOKENS, load_tiny

FAMILY_KEY = {"qwen2vl": "qwen2_vl", "internvl35": "internvl", "llavaov": "llava_onevision", "smolvlm": "smolvlm", "qwen3vl": "qwen3_vl",
              "gemma3": "gemma3"}


@pytest.fixture(scope="module", params=TINY_NEW_FAMILIES)
def tiny(request):
    model, processor = load_tiny(request.param, attn_implementation="sdpa")
    return request.param, model, processor


# the battery, unchanged (pytest collects these here, with the fixture above)
te.export_battery(globals())


def test_arch_spec_and_family_facts(tiny):
    family, model, processor = tiny
    spec, text = ArchSpec.from_model(model), model.config.get_text_config(decoder=True)
    shape = (text.num_hidden_layers, text.hidden_size, text.num_attention_heads * spec.head_dim,
             text.num_key_value_heads * spec.head_dim, text.intermediate_size)  # fmt: skip
    assert (spec.family, spec.num_layers, spec.hidden_size, spec.q_dim, spec.kv_dim, spec.intermediate_size) == (
        FAMILY_KEY[family], *shape)
    assert spec.gqa and spec.kv_dim < spec.q_dim and spec.image_token_ids == (model.config.image_token_id,)
    inputs = te._inputs(family, processor, n=1)
    assert int(te._visual(model, inputs["input_ids"]).sum()) == TINY_VISUAL_TOKENS[family]
    attn = te._lm(model).layers[0].self_attn
    if family == "internvl35":  # what is new: the Qwen3 decoder's per-head q/k RMSNorm
        assert type(attn).__name__ == "Qwen3Attention" and attn.k_norm is not None and attn.q_norm is not None
    if family == "qwen2vl":  # M-RoPE: 3 position rows, image tokens share t and vary in (h, w)
        captured, _ = te.stock_decoder_inputs(model, inputs)
        pos = captured["position_ids"]
        assert pos.ndim == 3 and pos.shape[0] in (3, 4)
    if family == "llavaov":  # anyres: base tile + 2x2 crops (16x16 features) + one newline per feature row
        assert TINY_VISUAL_TOKENS[family] == 64 + 16 * 16 + 16
    if family == "qwen3vl":  # DeepStack: features added to the 49 visual tokens after decoder layers 0 and 1
        captured, _ = te.stock_decoder_inputs(model, inputs)
        deepstack, where = captured["deepstack_visual_embeds"], captured["visual_pos_masks"]
        assert len(deepstack) == 2 and int(where.sum()) == 49 and all(d.shape[0] == 49 for d in deepstack)
        kwargs = {k: v for k, v in captured.items() if k not in ("cache", "use_cache")}
        with torch.no_grad():  # the additions matter: without them the decoder computes something else
            with_ds = te._lm(model)(**kwargs).last_hidden_state
            without = te._lm(model)(**{**kwargs, "deepstack_visual_embeds": None}).last_hidden_state
        assert not torch.allclose(with_ds[:, -1], without[:, -1], atol=1e-4)
    if family == "gemma3":  # sliding windows, per-layer-type RoPE, bidirectional image attention
        _gemma3_facts(model, processor, te._inputs(family, processor, n=2))
    if family == "smolvlm":  # 2x2 tiles + global view of 16 tokens each, in 5 runs between text markers: one image
        from vlmeval_dop.executor.families import adapter_for

        visual = te._visual(model, inputs["input_ids"])
        runs = torch.nonzero(visual[0][1:] & ~visual[0][:-1]).numel() + int(visual[0][0])
        (span,) = adapter_for(model).image_spans(visual, inputs["input_ids"])
        assert runs == 5 and span.num_tokens == 80 and torch.equal(span.positions, torch.nonzero(visual[0]).flatten())
        # two images in one prompt (every image is rescaled to the 2-tile longest edge and split): two spans
        from vlmeval_dop.tiny import tiny_image

        two = processor(text=["<|im_start|>User:<image>A<image>B?<end_of_utterance>\nAssistant:"],
                        images=[[tiny_image(0), tiny_image(1, size=(100, 40))]], return_tensors="pt")  # fmt: skip
        visual = te._visual(model, two["input_ids"])
        spans = adapter_for(model).image_spans(visual, two["input_ids"])
        assert [s.num_tokens for s in spans] == [80, 48] and [s.image_index for s in spans] == [0, 1]  # 2x1 + global
        with apply_dop(model, DOPPolicy(2, 1, 8), reducer="uniform") as handle, torch.no_grad():
            model(**two)
        assert [k.numel() for k in handle.last_kept] == [8, 8]


def _gemma3_facts(model, processor, inputs):
    """Gemma 3: the window is shorter than the prompt and both layer kinds occur, each with its own RoPE table;
    the bidirectional image mask changes the stock output; DOP's cache keeps sliding layers in full; a renumbering
    decoder-side pruner and prepared masks without a padding mask are refused by name."""
    from vlmeval_dop.executor.cache import DOPCache
    from vlmeval_dop.executor.families import adapter_for

    text = model.config.get_text_config(decoder=True)
    lm = te._lm(model)
    assert text.sliding_window < inputs["input_ids"].shape[1] and set(text.layer_types) == {"sliding_attention", "full_attention"}
    adapter = adapter_for(model)
    assert [adapter.sliding_window(model, i) for i in range(4)] == [text.sliding_window if t == "sliding_attention" else None
                                                                  for t in text.layer_types]  # fmt: skip
    pos = torch.arange(20)[None]
    tables = adapter.rotary_tables(lm, torch.zeros(1, 20, 4), pos)
    local, glob = tables[text.layer_types.index("sliding_attention")], tables[text.layer_types.index("full_attention")]
    assert not torch.allclose(local[0], glob[0])  # bases 1e4 vs 1e6 (and the global layers' linear scaling)
    with torch.no_grad():  # stock without token_type_ids is causal over the image: the bidirectional mask matters
        causal = model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits[:, -1]
    assert not torch.allclose(causal, te._logits(model, inputs)[:, -1], atol=1e-4)
    assert all(type(layer).__name__ == "DynamicLayer" for layer in DOPCache(config=text).layers)

    class _Renumber:
        name, layers = "toy_renumber", (1,)

        def select(self, ctx):
            from vlmeval_dop.executor.token_pruner import PruneDecision

            return PruneDecision(drop=ctx.visual & ctx.alive, renumber=True)

    with apply_dop(model, DOPPolicy.full(4), token_pruner=_Renumber()):
        with pytest.raises(ValueError, match="sliding-window layers"):
            te._logits(model, inputs)
    captured, _ = te.stock_decoder_inputs(model, inputs)
    assert isinstance(captured["attention_mask"], dict)  # per-layer-type masks prepared by Gemma3Model
    kwargs = {k: v for k, v in captured.items() if k not in ("cache", "use_cache")}
    with apply_dop(model, DOPPolicy(2, 1)) as handle, torch.no_grad():
        with pytest.raises(ValueError, match="padding_mask"):
            handle.run_decoder(kwargs, inputs["input_ids"])
        got = handle.run_decoder(kwargs, inputs["input_ids"], model_inputs={"token_type_ids": inputs["token_type_ids"]},
                                 padding_mask=inputs["attention_mask"])  # fmt: skip
    torch.testing.assert_close(got, te.masked_reference(model, inputs, DOPPolicy(2, 1)), atol=1e-5, rtol=1e-5)


def test_only_meaningful_reducers_run(tiny):
    """`uniform` runs on every family; the CLIP-tower reducers refuse by name before anything runs, and so does
    CDPruner except where its LLM-space port applies: InternVL3.5 (the InternVL class), Qwen2-VL and Qwen3-VL (the
    Qwen2.5-VL port). There its selection equals the DPP MAP written out here from the decoder-input image
    embeddings and the instruction tokens (those after `<|vision_end|>` up to `<|im_end|>`)."""
    from vlmeval_dop.reducers.cdpruner import cdpruner_select, relevance_scores

    family, model, processor = tiny
    key = FAMILY_KEY[family]
    ported = family in ("internvl35", "qwen2vl", "qwen3vl")
    refused = ("vispruner", "visionzip", "prumergeplus", "trim") + (() if ported else ("cdpruner",))
    for name in refused:
        with pytest.raises(ReducerError, match=f"does not support model family {key!r}"):
            apply_dop(model, DOPPolicy(1, 1, 3), reducer=name)
    assert all("forward" not in layer.__dict__ for layer in te._lm(model).layers)
    if ported:
        inputs = te._inputs(family, processor, n=1)
        with apply_dop(model, DOPPolicy(2, 1, 8), reducer="cdpruner") as handle:
            out = te._logits(model, inputs)
        assert torch.isfinite(out).all() and [len(k) for k in handle.last_kept] == [8]
    if family in ("qwen2vl", "qwen3vl"):
        captured, _ = te.stock_decoder_inputs(model, inputs)
        ids = inputs["input_ids"][0]
        vis = torch.nonzero(ids == model.config.image_token_id).flatten()
        tok = processor.tokenizer
        after = ids[vis[-1] + 2:].tolist()  # past <|vision_end|>
        instruction = torch.tensor(after[: after.index(tok.convert_tokens_to_ids("<|im_end|>"))])
        feats = captured["inputs_embeds"][0, vis]
        with torch.no_grad():
            text = model.get_input_embeddings()(instruction)
        want = cdpruner_select(feats, relevance_scores(feats, text), 8)
        assert sorted(handle.last_kept[0].tolist()) == sorted(want.tolist())


def test_kv_only_keys_equal_stock_keys(tiny):
    """At layer d_A-1 visual tokens are keys/values only: `_project_kv` computes them with the layer's own
    k/v projections, k_norm (Qwen3) and its module's RoPE function on the layer's (M-)RoPE cos/sin. They must
    equal, bit for bit up to float noise, the keys/values the stock attention puts into its cache."""
    from transformers.cache_utils import DynamicCache

    from vlmeval_dop.executor.core import _gather, _project_kv

    family, model, processor = tiny
    inputs = te._inputs(family, processor, n=2)
    lm = te._lm(model)
    seen = {}

    def grab(i):
        def hook(module, args, kwargs):
            seen[i] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])
        return hook

    decoder_kwargs, _ = te.stock_decoder_inputs(model, inputs)
    decoder_kwargs = {k: v for k, v in decoder_kwargs.items() if k not in ("cache", "use_cache")}
    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(lm.layers)]
    cache = DynamicCache()  # full layers (a sliding layer, Gemma 3's local ones, keeps only its window's keys)
    try:
        with torch.no_grad():
            lm(**decoder_kwargs, cache=cache, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    vis = torch.stack([torch.nonzero(row).flatten() for row in te._visual(model, inputs["input_ids"])])
    for i, layer in enumerate(lm.layers):
        hidden, (cos, sin) = seen[i]
        cos, sin = (t.expand(hidden.shape[0], *t.shape[1:]) for t in (cos, sin))
        with torch.no_grad():
            k, v = _project_kv(layer, _gather(hidden, vis), (_gather(cos, vis), _gather(sin, vis)))
        idx = vis[:, None, :, None]
        stock_k = torch.gather(cache.layers[i].keys, 2, idx.expand(-1, k.shape[1], -1, k.shape[-1]))
        stock_v = torch.gather(cache.layers[i].values, 2, idx.expand(-1, v.shape[1], -1, v.shape[-1]))
        torch.testing.assert_close(k, stock_k, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(v, stock_v, atol=1e-6, rtol=1e-6)
