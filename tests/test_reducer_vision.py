"""Vision-tower capture for attention-based reducers, and the merged-embeddings (KeptTokens) protocol."""
from __future__ import annotations

import pytest
import torch

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.reducers import KeptTokens, ReducerError, ReductionContext
from vlmeval_dop.reducers.vision import VISION_CAPTURE_KEY, encoder_layers, feature_layer_index, vision_capture, vision_tower
from vlmeval_dop.tiny import load_tiny, tiny_image, tiny_inputs


def _eager_reference(family):
    """The feature layer's attention weights from transformers' own eager attention (output_attentions)."""
    model, processor = load_tiny(family, attn_implementation="eager")
    inputs = tiny_inputs(family, processor, ["What?", "Which colour is it?"], [tiny_image(1), tiny_image(2)])
    tower = vision_tower(model)
    pv = inputs["pixel_values"]
    if family == "llavanext":  # the crops exactly as the model feeds them (padding crops dropped)
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        n = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, model.config.vision_config.image_size) for s in inputs["image_sizes"]]
        pv = torch.cat([p[:k] for p, k in zip(pv, n)])
    with torch.no_grad():
        out = tower(pv, output_attentions=True, output_hidden_states=True)
    return model, inputs, out


@pytest.mark.parametrize("family", ["llava15", "llavanext"])
def test_recomputed_cls_attention_equals_eager(family):
    model, inputs, out = _eager_reference(family)
    idx = feature_layer_index(model)
    assert idx == len(encoder_layers(model)) - 2  # vision_feature_layer = -2
    ctx = ReductionContext(family={"llava15": "llava", "llavanext": "llava_next"}[family], model=model,
                           input_ids=inputs["input_ids"], inputs_embeds=torch.zeros(1), attention_mask=None,
                           images=[], model_inputs=dict(inputs))  # fmt: skip
    cap = vision_capture(ctx)
    eager = out.attentions[idx]  # (C, heads, 1+P, 1+P)
    torch.testing.assert_close(cap.cls_attention, eager[:, :, 0, 1:].mean(1).float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cap.features, out.hidden_states[idx + 1])  # LLaVA's hidden_states[-2]
    assert sum(cap.crops_per_image) == eager.shape[0]
    assert ctx.cache[VISION_CAPTURE_KEY] is cap  # computed once per sample


class _Spy:
    """A reducer that records what the executor recorded of the vision tower."""

    name, families, needs_vision_capture = "spy", ("llava", "llava_next"), True

    def select(self, ctx, n_keep):
        self.seen = ctx.cache.get(VISION_CAPTURE_KEY)
        cap = vision_capture(ctx)
        return [torch.topk(cap.cls_attention[i], n_keep).indices.sort().values for i in range(len(ctx.images))]


def test_executor_records_the_tower_once():
    model, inputs, out = _eager_reference("llava15")
    spy = _Spy()
    calls = []
    hook = vision_tower(model).register_forward_hook(lambda *a: calls.append(1))
    try:
        with apply_dop(model, DOPPolicy(4, 4, 10), reducer=spy), torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    assert len(calls) == 1  # the reducer did not run the tower a second time
    assert spy.seen is not None
    idx = feature_layer_index(model)
    torch.testing.assert_close(spy.seen.cls_attention, out.attentions[idx][:, :, 0, 1:].mean(1))
    assert not vision_tower(model)._forward_hooks  # nothing left behind after the context


class _MergeFirst:
    """Keeps tokens 0..n-1 and replaces token 0 with the mean of all dropped tokens (a toy merger)."""

    name, families = "merge_first", None

    def select(self, ctx, n_keep):
        out = []
        for span in ctx.images:
            emb = ctx.image_embeds(span)
            new = emb[:n_keep].clone()
            new[0] = emb[n_keep:].mean(0)
            out.append(KeptTokens(torch.arange(n_keep), new))
        return out


def test_merged_embeddings_equal_a_rebuilt_sequence():
    """Merging reducer == running the stock model on inputs_embeds where the replaced rows are written in
    and the dropped tokens are removed (LLaVA: contiguous positions, as a rebuilt sequence)."""
    model, processor = load_tiny("llava15")
    inputs = tiny_inputs("llava15", processor, ["What is it?"], [tiny_image(5)])
    n_keep = 6
    with apply_dop(model, DOPPolicy(4, 4, n_keep), reducer=_MergeFirst()), torch.no_grad():
        got = model(**inputs).logits[0, -1]
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        emb = model.model.get_input_embeddings()(ids[None]).clone()
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats.reshape(-1, emb.shape[-1])
        vis = torch.nonzero(ids == model.config.image_token_id).flatten()
        emb[0, vis] = feats.to(emb)
        merged = emb[0, vis[:n_keep]].clone()
        merged[0] = emb[0, vis[n_keep:]].mean(0)
        emb[0, vis[:n_keep]] = merged
        keep = torch.ones(ids.numel(), dtype=torch.bool)
        keep[vis[n_keep:]] = False
        ref = model(inputs_embeds=emb[:, keep]).logits[0, -1]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_vision_capture_refuses_other_families():
    model, processor = load_tiny("qwen25vl")
    ctx = ReductionContext(family="qwen2_5_vl", model=model, input_ids=torch.zeros(1, 1, dtype=torch.long),
                           inputs_embeds=torch.zeros(1), attention_mask=None, images=[])  # fmt: skip
    with pytest.raises(ReducerError, match="llava, llava_next"):
        vision_capture(ctx)


def test_bad_merged_shape_is_refused():
    class Bad(_MergeFirst):
        def select(self, ctx, n_keep):
            return [KeptTokens(torch.arange(n_keep), torch.zeros(n_keep + 1, 3)) for _ in ctx.images]

    model, processor = load_tiny("llava15")
    inputs = tiny_inputs("llava15", processor, ["What is it?"])
    with apply_dop(model, DOPPolicy(4, 4, 6), reducer=Bad()), torch.no_grad(), pytest.raises(ReducerError, match="shape"):
        model(**inputs)
