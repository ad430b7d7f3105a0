"""CDPruner: relevance / kernel / selection by hand, and through the executor on the tiny models against an
independent recomputation (vision tower run separately with output_hidden_states, the question text
known rather than decoded, the crop layout and quotas written out)."""
from __future__ import annotations

import math

import pytest
import torch

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.reducers import REDUCERS, ReducerError, ReductionContext
from vlmeval_dop.reducers.cdpruner import (
    CDPruner,
    cdpruner_select,
    conditional_kernel,
    dpp_map,
    crop_quotas,
    relevance_scores,
)
from vlmeval_dop.reducers.clip_text import default_clip_source, load_clip_text
from vlmeval_dop.reducers.instruction import bare_question, prompt_text
from vlmeval_dop.reducers.llava_next_layout import llava_next_layout
from vlmeval_dop.tiny import load_tiny, tiny_image, tiny_inputs

Q = "What is the color of the dog?"
S2 = 1 / math.sqrt(2)


def test_relevance_kernel_selection_by_hand():
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    t = torch.tensor([[5.0, 0.0]])
    # -cos = -1, 0, -1/sqrt2; min -1, max 0 -> (r + 1 + 1e-6) / 1
    r = relevance_scores(e, t)
    torch.testing.assert_close(r, torch.tensor([1e-6, 1 + 1e-6, 1 - S2 + 1e-6]))
    # two text segments: mean of the two negated cosines (-1 and 0 for token 0, 0 and -1 for token 1, ...)
    r2 = relevance_scores(e, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    raw = torch.tensor([-0.5, -0.5, -S2])
    torch.testing.assert_close(r2, (raw - raw.min() + 1e-6) / (raw.max() - raw.min()))
    # theta = 0.5 -> alpha = 0.5 -> exp(r / 2)
    torch.testing.assert_close(relevance_scores(e, t, theta=0.5), torch.exp(0.5 * r))
    # no text: pure diversity
    assert relevance_scores(e, torch.zeros(0, 2)).tolist() == [1.0, 1.0, 1.0]

    S = torch.tensor([[1.0, 0.0, S2], [0.0, 1.0, S2], [S2, S2, 1.0]])
    L = conditional_kernel(e, r)
    torch.testing.assert_close(L, r[:, None] * S * r[None, :])
    # greedy: largest r^2 first (token 1); then gains 1e-12 (token 0) vs r2^2 (1 - 1/2) (token 2)
    assert cdpruner_select(e, r, 1).tolist() == [1]
    assert cdpruner_select(e, r, 2).tolist() == [1, 2]
    assert cdpruner_select(e, r, 3).tolist() == [0, 1, 2]


def test_selection_properties_and_determinism():
    g = torch.Generator().manual_seed(0)
    f, r = torch.randn(50, 16, generator=g), torch.rand(50, generator=g)
    for n in (0, 1, 7, 20, 50):
        out = cdpruner_select(f, r, n)
        assert out.numel() == n and out.tolist() == sorted(set(out.tolist()))
        assert torch.equal(out, cdpruner_select(f.clone(), r.clone(), n))
    with pytest.raises(ReducerError, match="valid: 0..50"):
        cdpruner_select(f, r, 51)


def test_dpp_map_batched_and_exhausted():
    from vlmeval_dop.reducers.dpp import dpp_greedy_map

    g = torch.Generator().manual_seed(3)
    f, r = torch.randn(3, 40, 16, generator=g), torch.rand(3, 40, generator=g) + 0.1
    L = conditional_kernel(f, r)
    picks = dpp_map(L, 12)
    for b in range(3):  # each crop of the batch = the same greedy run alone, and = the float64 reference
        assert torch.equal(picks[b], dpp_map(L[b : b + 1], 12)[0])
        assert picks[b].tolist() == dpp_greedy_map(L[b], 12).tolist()
    # rank 2 kernel, 5 picks: after two pivots the gains are <= 0 (the official loop would produce NaN and
    # repeat picks); the rest are the unchosen items by decreasing diagonal, lowest index first
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    Lr = (e @ e.T)[None]
    out = dpp_map(Lr, 5)[0].tolist()
    assert out[:2] == [4, 3] and sorted(out) == [0, 1, 2, 3, 4]
    assert out[2:] == [2, 0, 1]  # diag 2, 1, 1
    with pytest.raises(ReducerError, match="valid: 0..5"):
        dpp_map(Lr, 6)


def test_crop_quotas_by_hand():
    assert crop_quotas([576] * 5, 64) == [13, 13, 13, 13, 12]
    assert crop_quotas([64, 16, 16, 16, 16], 16) == [4, 3, 3, 3, 3]
    assert crop_quotas([10, 2, 2], 12) == [8, 2, 2]  # shares 4, 4, 4 capped at 2 -> surplus to crop 0
    assert crop_quotas([3, 3], 10) == [3, 3]


def _decoder_embeds(model, inputs):
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("e", kwargs["inputs_embeds"])

    return seen, model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)


def _run(model, inputs, n_keep, reducer="cdpruner"):
    L = model.config.get_text_config(decoder=True).num_hidden_layers
    seen, h = _decoder_embeds(model, inputs)
    try:
        with apply_dop(model, DOPPolicy(L, L, n_keep), reducer=reducer) as handle, torch.no_grad():
            logits = model(**inputs).logits
    finally:
        h.remove()
    return handle, seen["e"], logits


def _clip_relevance(model, pixel_values):
    """Independent: hidden_states[-2] of the tower (not the recorder), post_layernorm, CLIP projection."""
    clip = load_clip_text(default_clip_source(model))
    tower = model.model.vision_tower
    with torch.no_grad():
        hs = tower(pixel_values, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
        e = clip.project_image(tower.post_layernorm(hs[:, 1:]))
    return relevance_scores(e, clip.encode_text(Q))


VQA = "\nAnswer the question using a single word or phrase."
MCQ = "\nAnswer with the option's letter from the given choices directly."


def test_bare_question_as_the_official_eval_scripts():
    # model_vqa_loader.py / model_vqa_science.py strip their instruction; model_vqa_mmbench.py never adds it
    assert bare_question(Q + VQA) == Q
    mc = "Hint: a kitchen\nWhich is red?\nA. cup\nB. plate"
    assert bare_question(mc + MCQ) == mc
    assert bare_question("哪个是红色的？\nA. 杯子\nB. 盘子\n请直接回答选项字母。") == "哪个是红色的？\nA. 杯子\nB. 盘子"
    assert bare_question(Q) == Q and bare_question("") == ""


def test_instruction_text_is_the_bare_question():
    """Outside VLMEvalKit the prompt is decoded from the tokens after the image and reduced to the question;
    inside, the wrapper's exact prompt text is used (one for all samples, or one per sample)."""
    model, processor = load_tiny("llava15")
    inputs = tiny_inputs("llava15", processor, [Q + VQA, "Describe it"], [tiny_image(1), tiny_image(2)])  # left padded
    pos = (inputs["input_ids"] == model.config.image_token_id).nonzero()
    from vlmeval_dop.reducers.base import ImageSpan

    spans = [ImageSpan(b, 0, pos[pos[:, 0] == b, 1]) for b in range(2)]
    ctx = ReductionContext("llava", model, inputs["input_ids"], torch.zeros(0), inputs["attention_mask"], spans)
    red = CDPruner()
    assert [red.instruction_text(ctx, s) for s in spans] == [Q, "Describe it"]
    with prompt_text(["Which colour?" + MCQ, "How many?" + VQA]):
        assert [red.instruction_text(ctx, s) for s in spans] == ["Which colour?", "How many?"]
    with prompt_text("What is it?" + VQA):
        assert [red.instruction_text(ctx, s) for s in spans] == ["What is it?"] * 2
    assert CDPruner(text_fn=lambda c, s: "x").instruction_text(ctx, spans[0]) == "x"


def test_wrapper_hands_the_bare_question_to_clip(lmu_root, monkeypatch):
    """Through the VLMEvalKit wrapper of the DOP_CD entry: CLIP encodes the question without the VQA
    instruction the dataset's prompt carries (the official model_vqa_loader.py text)."""
    from vlmeval_dop.datasets import DOPDemoDataset
    from vlmeval_dop.reducers.clip_text import ClipText
    from vlmeval_dop.registry import load_entry

    seen = []
    encode = ClipText.encode_text
    monkeypatch.setattr(ClipText, "encode_text", lambda self, text: seen.append(text) or encode(self, text))
    wrapper = load_entry("tiny_llava15_dopcd").load()
    ds = DOPDemoDataset("DOP_Demo")
    msg = ds.build_prompt(ds.data.iloc[1])
    msg = [m if m["type"] != "text" else dict(m, value=Q + VQA) for m in msg]
    wrapper.generate(msg, dataset="TextVQA_VAL")
    assert seen == [Q]


def test_llava15_through_executor():
    model, processor = load_tiny("llava15")
    inputs = tiny_inputs("llava15", processor, [Q], [tiny_image(3)])
    handle, embeds, _ = _run(model, inputs, 12)
    pos = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    rel = _clip_relevance(model, inputs["pixel_values"])  # (1, 64)
    expect = cdpruner_select(embeds[0, pos], rel[0], 12)
    assert handle.last_kept[0].tolist() == expect.tolist()
    # the capture path (feature layer recorded in the model's own forward) picks the same tokens
    handle2, _, _ = _run(model, inputs, 12, reducer=CDPruner(capture=True))
    assert handle2.last_kept[0].tolist() == expect.tolist()


def test_llavanext_through_executor_per_crop():
    """Square image: the official packing (every crop's DPP over all its patches, base crop then the grid in
    row-major order, no newlines) keeps the span's own rows in span order; 16 = 4 + 3 + 3 + 3 + 3."""
    model, processor = load_tiny("llavanext")
    inputs = tiny_inputs("llavanext", processor, [Q], [tiny_image(4)])
    n_keep = 16
    handle, embeds, _ = _run(model, inputs, n_keep)
    pos = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    pv = inputs["pixel_values"][0]  # (5 crops, 3, 112, 112) for 224x224
    rel = _clip_relevance(model, pv)  # (5, 64) jointly min-max normalised
    lay = llava_next_layout(model, inputs["image_sizes"][0], pos.numel())
    feats = embeds[0, pos]
    expect = []
    for c, q in enumerate([4, 3, 3, 3, 3]):  # 16 over base + 4 crops
        cpos = torch.nonzero(lay.crop == c).flatten()
        expect += cpos[cdpruner_select(feats[cpos], rel[c, lay.patch[cpos]], q)].tolist()
    kept = handle.last_kept[0]
    assert kept.tolist() == sorted(expect)
    assert not bool(lay.newline[kept].any())  # row newlines are never kept below the crop-token count


def test_qwen25vl_through_executor():
    model, processor = load_tiny("qwen25vl")
    inputs = tiny_inputs("qwen25vl", processor, [Q], [tiny_image(5)])
    handle, embeds, _ = _run(model, inputs, 10)
    pos = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    ids = processor.tokenizer(Q, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    with torch.no_grad():
        text = model.get_input_embeddings()(ids)
    feats = embeds[0, pos]
    expect = cdpruner_select(feats, relevance_scores(feats, text), 10)
    assert handle.last_kept[0].tolist() == expect.tolist()


def test_internvl3_through_executor():
    """InternVL3 port: the LLM's embeddings of the question tokens only (no <img>/</img> markers, no template)."""
    model, processor = load_tiny("internvl3")
    inputs = tiny_inputs("internvl3", processor, [Q], [tiny_image(5)])
    handle, embeds, _ = _run(model, inputs, 10)
    pos = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    ids = processor.tokenizer("\n" + Q, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    with torch.no_grad():
        text = model.get_input_embeddings()(ids)
    feats = embeds[0, pos]
    expect = cdpruner_select(feats, relevance_scores(feats, text), 10)
    assert handle.last_kept[0].tolist() == expect.tolist()


@pytest.mark.parametrize("family", ["llava15", "qwen25vl"])
def test_keep_all_leaves_logits_unchanged(family):
    model, processor = load_tiny(family)
    inputs = tiny_inputs(family, processor, [Q], [tiny_image(6)])
    with torch.no_grad():
        stock = model(**inputs).logits
    n = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    handle, _, logits = _run(model, inputs, n)
    assert handle.last_kept[0].tolist() == list(range(n))
    assert torch.equal(logits, stock)


def test_bad_input():
    assert REDUCERS["cdpruner"] is CDPruner
    model, processor = load_tiny("llava15")
    inputs = tiny_inputs("llava15", processor, [Q], [tiny_image(3)])
    pos = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    from vlmeval_dop.reducers.base import ImageSpan

    ctx = ReductionContext("llava", model, inputs["input_ids"], torch.zeros(1, pos.max() + 1, 64),
                           inputs["attention_mask"], [ImageSpan(0, 0, pos)], dict(inputs))  # fmt: skip
    with pytest.raises(ReducerError, match="cannot keep 65 of the 64 .* valid: 0..64"):
        CDPruner().select(ctx, 65)
    ctx.family = "gemma3"
    with pytest.raises(ReducerError, match="does not support model family 'gemma3'.*internvl"):
        CDPruner().select(ctx, 8)
