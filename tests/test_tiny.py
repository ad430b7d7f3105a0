"""vlmeval_dop.tiny: deterministic, offline tiny checkpoints on the real model/processor code paths."""
from __future__ import annotations

import hashlib
import json
import os
import socket

import pytest
import torch

from vlmeval_dop import tiny
from vlmeval_dop.tiny import TINY_FAMILIES, TINY_VISUAL_TOKENS, load_tiny, tiny_image, tiny_inputs, tiny_path

QUESTIONS = ["What is shown in the picture?", "Color?"]  # different lengths: the batch needs left padding

MODEL_CLASS = {
    "llava15": "LlavaForConditionalGeneration",
    "llavanext": "LlavaNextForConditionalGeneration",
    "qwen25vl": "Qwen2_5_VLForConditionalGeneration",
    "internvl3": "InternVLForConditionalGeneration",
}
PROCESSOR_CLASS = {
    "llava15": ("LlavaProcessor", "CLIPImageProcessor"),
    "llavanext": ("LlavaNextProcessor", "LlavaNextImageProcessor"),
    "qwen25vl": ("Qwen2_5_VLProcessor", "Qwen2VLImageProcessor"),
    "internvl3": ("InternVLProcessor", "GotOcr2ImageProcessor"),
}
IMAGE_TOKEN = {"llava15": "<image>", "llavanext": "<image>", "qwen25vl": "<|image_pad|>", "internvl3": "<IMG_CONTEXT>"}
# the prompt of one user turn [image, "Q?"] with the generation prompt, as the real processors render it
PROMPT = {
    "llava15": "USER: <image>\nQ? ASSISTANT:",
    "llavanext": "USER: <image>\nQ? ASSISTANT:",
    "qwen25vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n",
    "internvl3": "<|im_start|>user\n<IMG_CONTEXT>\nQ?<|im_end|>\n<|im_start|>assistant\n",
}


def _sha(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="module")
def loaded(cache):
    """family -> (model, processor), loaded once per module with no network reachable."""
    real_connect = socket.socket.connect

    def no_network(*args, **kwargs):
        raise AssertionError("tiny checkpoints must build and load without network access")

    socket.socket.connect = no_network
    try:
        return {family: load_tiny(family, cache_dir=cache) for family in TINY_FAMILIES}
    finally:
        socket.socket.connect = real_connect


def test_unknown_family_names_the_valid_ones(cache):
    valid = ", ".join(TINY_FAMILIES)
    for call in (
        lambda: tiny_path("llava", cache),
        lambda: load_tiny("qwen2_5_vl", cache_dir=cache),
        lambda: tiny_inputs("internvl", None, ["q"]),
    ):
        with pytest.raises(ValueError, match=f"valid families: {valid}"):
            call()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_build_is_deterministic(family, tmp_path, loaded):
    a = tiny_path(family, tmp_path / "a")
    b = tiny_path(family, tmp_path / "b")
    model_a, _ = load_tiny(family, cache_dir=tmp_path / "a")
    model_b, _ = load_tiny(family, cache_dir=tmp_path / "b")
    fresh, _ = tiny._build(family)  # in memory, never saved: the save/load round trip is exact
    assert _sha(model_a) == _sha(model_b) == _sha(fresh) == _sha(loaded[family][0])
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert os.path.getsize(a / "model.safetensors") < 10 * 2**20
    # the build does not consume the caller's random numbers
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    tiny._build(family)
    assert torch.equal(torch.rand(3), expected)


def test_cache_is_reused_and_replaced_atomically(tmp_path):
    path = tiny_path("llava15", tmp_path)
    assert path == tmp_path / f"llava15-v{tiny.TINY_VERSION}"
    marker = path / tiny._MARKER
    stamp = marker.stat().st_mtime_ns
    assert tiny_path("llava15", tmp_path) == path and marker.stat().st_mtime_ns == stamp  # reused, not rebuilt
    marker.unlink()  # an incomplete directory (e.g. copied by hand) is rebuilt, not trusted
    (path / "model.safetensors").write_bytes(b"garbage")
    assert tiny_path("llava15", tmp_path) == path
    assert marker.is_file()
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps({**meta, "fingerprint": "written-by-an-older-builder"}))
    assert tiny_path("llava15", tmp_path) == path
    assert json.loads(marker.read_text()) == meta  # a stale directory is rebuilt too
    load_tiny("llava15", cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary directories left


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_loaded_classes_and_shapes(family, loaded):
    model, processor = loaded[family]
    assert type(model).__name__ == MODEL_CLASS[family]
    assert (type(processor).__name__, type(processor.image_processor).__name__) == PROCESSOR_CLASS[family]
    assert not model.training and model.dtype == torch.float32
    text = model.config.get_text_config(decoder=True)
    sizes = (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.intermediate_size)
    assert sizes == (4, 64, 4, 128)
    assert model.model.language_model.layers[0].self_attn.head_dim == 16
    assert text.num_key_value_heads == (2 if family in ("qwen25vl", "internvl3") else 4)
    tok = processor.tokenizer
    assert tok.padding_side == "left" and tok.pad_token_id is not None and tok.eos_token_id is not None
    assert model.config.image_token_id == tok.convert_tokens_to_ids(IMAGE_TOKEN[family]) == processor.image_token_id
    assert text.vocab_size == len(tok) <= 1024  # every id the model can emit decodes


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_chat_template_matches_real_model(family, loaded):
    _, processor = loaded[family]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == PROMPT[family]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_visual_token_layout(family, loaded):
    model, processor = loaded[family]
    tok = processor.tokenizer
    inputs = tiny_inputs(family, processor, QUESTIONS[:1])
    ids = inputs["input_ids"][0]
    pos = torch.nonzero(ids == model.config.image_token_id).flatten()
    assert pos.numel() == TINY_VISUAL_TOKENS[family]
    assert torch.equal(pos, torch.arange(pos[0], pos[0] + pos.numel()))  # one contiguous span per image
    before, after = tok.convert_ids_to_tokens([ids[pos[0] - 1].item(), ids[pos[-1] + 1].item()])
    if family in ("llava15", "llavanext"):
        assert ids[0] == tok.bos_token_id and (before, after) == ("▁", "<0x0A>")
        crops = inputs["pixel_values"].shape[1] if family == "llavanext" else 1
        assert crops == (5 if family == "llavanext" else 1)  # LLaVA-NeXT at 2x size: base + 2x2 crops
    elif family == "qwen25vl":
        assert (before, after) == ("<|vision_start|>", "<|vision_end|>")
        assert inputs["image_grid_thw"].tolist() == [[1, 16, 16]]  # 16x16 patches, 2x2 merge -> 8x8 = 64
    else:
        assert (before, after) == ("<img>", "</img>")
        assert inputs["pixel_values"].shape == (5, 3, 112, 112)  # 2x2 tiles + thumbnail


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("n", [1, 2])
def test_forward_and_generate(family, n, loaded):
    model, processor = loaded[family]
    inputs = tiny_inputs(family, processor, QUESTIONS[:n])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ((ids == model.config.image_token_id).sum(1) == TINY_VISUAL_TOKENS[family]).all()
    if n == 2:  # left padded: the shorter second prompt starts with pad tokens, every row ends with real ones
        assert mask[1, 0] == 0 and mask[0].all() and mask[:, -1].all()
        assert (ids[~mask.bool()] == processor.tokenizer.pad_token_id).all()
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert logits.shape == (n, ids.shape[1], model.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()
    assert ids.shape[1] < out.shape[1] <= ids.shape[1] + 3 and torch.equal(out[:, : ids.shape[1]], ids)
    if n == 2:  # padding changes nothing: each row equals the sample run alone
        for b in range(n):
            single = tiny_inputs(family, processor, [QUESTIONS[b]], [tiny_image(seed=b)])
            with torch.no_grad():
                alone = model(**single).logits[0, -1]
            torch.testing.assert_close(alone, logits[b, -1], atol=1e-5, rtol=1e-5)


def test_tiny_image_is_deterministic():
    a, b, c = tiny_image(0), tiny_image(0), tiny_image(1)
    assert a.mode == "RGB" and a.size == tiny.TINY_IMAGE_SIZE == (224, 224)
    assert a.tobytes() == b.tobytes() != c.tobytes()
    assert tiny_image(3, size=(160, 96)).size == (160, 96)  # (width, height)


def test_tiny_inputs_rejects_bad_arguments(loaded):
    _, processor = loaded["llava15"]
    with pytest.raises(ValueError, match="one image per question"):
        tiny_inputs("llava15", processor, QUESTIONS, [tiny_image(0)])
    with pytest.raises(ValueError, match="at least one question"):
        tiny_inputs("llava15", processor, [])
