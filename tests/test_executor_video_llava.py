"""The executor battery of tests/test_executor.py on Video-LLaVA (issue 14), for image inputs and for video inputs.

Each test below is test_executor.py's own test function, collected here with this module's `tiny` fixture, so
Video-LLaVA meets exactly the references every family meets: stock transformers (full policy, bit-identical),
the independent masked reference (9 pruned policies incl. d_A=0, d_P>d_A, d_A=L), cached decoding vs
recomputation, left-padded batches vs single samples, sdpa vs eager, operation masks, a decoder-side token
pruner and FlopCounterMode vs the analytic count. In the `video` runs the battery's input helpers give one
tiny_video() per sample (8 frames, 520 `<video>` placeholders in one span) instead of one image, and the visual
tokens are the `<video>` ones.
"""
from __future__ import annotations

import pytest
import torch

import test_executor as te  # tests/test_executor.py: the battery and its references
from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.arch import ArchSpec
from vlmeval_dop.tiny import TINY_VIDEO_TOKENS, TINY_VISUAL_TOKENS, load_tiny, tiny_inputs, tiny_video

FAMILY = "videollava"
_IMAGE_VISUAL = te._visual  # the battery's own helper: the `image` runs keep it


def _video_inputs(family, processor, questions, images=None):
    """tiny_inputs with videos: the battery passes `tiny_image(seed=b)`, patched to `tiny_video(seed=b)`."""
    videos = images if images is not None else [tiny_video(seed=i) for i in range(len(questions))]
    return tiny_inputs(family, processor, questions, videos=videos)


@pytest.fixture(scope="module", params=["image", "video"])
def tiny(request):
    model, processor = load_tiny(FAMILY, attn_implementation="sdpa")
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "video":
            mp.setattr(te, "_inputs", lambda family, processor, n=1: _video_inputs(family, processor, te.QUESTIONS[:n]))
            mp.setattr(te, "tiny_inputs", _video_inputs)
            mp.setattr(te, "tiny_image", lambda seed=0, size=None: tiny_video(seed=seed))
            mp.setattr(te, "_visual", lambda model, ids: ids == model.config.video_token_id)
        yield FAMILY, model, processor


# the battery, unchanged (pytest collects these here, with the fixture above)
te.export_battery(globals())


def test_arch_spec_and_family_facts(tiny):
    """Vicuna-shaped MHA decoder; both placeholder ids are visual; an image is 64 `<image>` ([CLS] dropped), a
    video one run of 8 x (1 + 64) `<video>` ([CLS] kept per frame, as HF's get_video_features does)."""
    family, model, processor = tiny
    spec, text = ArchSpec.from_model(model), model.config.get_text_config(decoder=True)
    assert (spec.family, spec.num_layers, spec.hidden_size, spec.intermediate_size) == (
        "video_llava", text.num_hidden_layers, text.hidden_size, text.intermediate_size)
    assert not spec.gqa and spec.kv_dim == spec.q_dim
    assert spec.image_token_ids == (model.config.image_token_id, model.config.video_token_id)
    assert (spec.visual_tokens, spec.visual_extra_tokens) == (8 * 64, 8)  # the class default: a video of 8 frames
    inputs = te._inputs(family, processor, n=1)
    ids = inputs["input_ids"][0]
    n_image, n_video = int((ids == model.config.image_token_id).sum()), int((ids == model.config.video_token_id).sum())
    if te._visual is not _IMAGE_VISUAL:  # the `video` runs: the battery's inputs are videos
        assert "pixel_values_videos" in inputs and (n_image, n_video) == (0, TINY_VIDEO_TOKENS[family])
        from vlmeval_dop.executor.families import adapter_for

        visual = torch.isin(inputs["input_ids"], torch.tensor(spec.image_token_ids))
        (span,) = adapter_for(model).image_spans(visual, inputs["input_ids"])
        assert span.num_tokens == 520
        # HF keeps each frame's [CLS] feature: the span's rows are the projected hidden_states[-2] of all 65 tokens
        captured, _ = te.stock_decoder_inputs(model, inputs)
        with torch.no_grad():
            frames = inputs["pixel_values_videos"][0]
            hs = model.model.video_tower(frames, output_hidden_states=True).hidden_states[-2]
            rows = model.model.multi_modal_projector(hs).flatten(0, 1)
        torch.testing.assert_close(captured["inputs_embeds"][0, span.positions], rows, atol=1e-5, rtol=1e-5)
    else:
        assert "pixel_values" in inputs and (n_image, n_video) == (TINY_VISUAL_TOKENS[family], 0)


def test_image_and_video_in_one_batch(tiny):
    """A batch with a video sample and an image sample (left-padded): every span is reduced on its own and the
    result equals each sample alone under the same policy."""
    family, model, processor = tiny
    video = _video_inputs(family, processor, [te.QUESTIONS[0]])
    image = tiny_inputs(family, processor, [te.QUESTIONS[1]])
    L = te._num_layers(model)
    policy = DOPPolicy(L // 2, 1, 32)
    width = max(video["input_ids"].shape[1], image["input_ids"].shape[1])
    pad = processor.tokenizer.pad_token_id

    def left(t, fill):
        return torch.cat([t.new_full((1, width - t.shape[1]), fill), t], 1)

    batch = {"input_ids": torch.cat([left(video["input_ids"], pad), left(image["input_ids"], pad)]),
             "attention_mask": torch.cat([left(video["attention_mask"], 0), left(image["attention_mask"], 0)]),
             "pixel_values_videos": video["pixel_values_videos"], "pixel_values": image["pixel_values"]}  # fmt: skip
    with apply_dop(model, policy, reducer="uniform") as handle:
        both = te._logits(model, batch)[:, -1]
        assert [k.numel() for k in handle.last_kept] == [32, 32]
        alone = [te._logits(model, x)[:, -1] for x in (video, image)]
    torch.testing.assert_close(both, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_real_config_shapes_and_table18_labels():
    """The Video-LLaVA-7B-hf config (VideoLlavaConfig's CLIP-L/14 224 px towers, Vicuna-7B decoder, ids 32000 /
    32001 as transformers' conversion script adds them) gives models.yaml's arch; Table 18's 16 % / 11 % labels
    are 256 / 128 video tokens (32 / 16 per frame) within 0.3 pt under Eq. 11 at the entry's text tokens."""
    from transformers import LlamaConfig, VideoLlavaConfig

    from vlmeval_dop.flops import policy_tflops
    from vlmeval_dop.models_config import load_models

    vicuna = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32064)  # fmt: skip
    spec = ArchSpec.from_config(VideoLlavaConfig(text_config=vicuna.to_dict()))
    entry = load_models()["videollava_7b"]
    assert spec == entry.arch
    assert (spec.visual_tokens, spec.visual_extra_tokens, spec.image_token_ids) == (2048, 8, (32000, 32001))
    for label, tokens in entry.budgets.items():
        ratio = policy_tflops(spec, DOPPolicy(32, 32, tokens), entry.text_tokens)["ratio"]
        assert abs(ratio - label) <= 0.003, (label, tokens, ratio)
    assert entry.budgets == {0.16: 256, 0.11: 128}
