"""VLMEvalKit wrappers of the families beyond the paper (issue 15): the model inputs equal those VLMEvalKit's own
wrapper of each model builds (its methods run here with a stub model that records what it is given), and the
tiny entries run end to end through run.py, offline, unpruned, DOP and DOP_R.
"""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from test_plugin_e2e import N_DEMO, _outputs, built  # noqa: F401  (the run.py fixture)


class _Captured(Exception):
    pass


class _Recorder:
    """Stands in for VLMEvalKit's loaded model: records the call, then stops the method."""

    def __init__(self):
        self.kwargs = None

    def _record(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        raise _Captured

    generate = chat = _record


@pytest.fixture()
def no_cuda_moves(monkeypatch):
    """VLMEvalKit's methods move inputs to 'cuda' (fp16); on this CPU run the move is a no-op."""
    from transformers import BatchFeature

    monkeypatch.setattr(BatchFeature, "to", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self if a and a[0] == "cuda" else _to(self, *a, **k))


_to = torch.Tensor.to


def _demo_message(i=0):
    from vlmeval_dop.datasets import DOPDemoDataset

    ds = DOPDemoDataset("DOP_Demo")
    return ds.build_prompt(ds.data.iloc[i])


def test_qwen2vl_inputs_are_vlmevalkits(lmu_root, no_cuda_moves):
    from vlmeval.vlm.qwen2_vl.model import Qwen2VLChat

    from vlmeval_dop.registry import load_entry

    wrapper = load_entry("tiny_qwen2vl").load()
    assert wrapper._use_custom_prompt and wrapper.use_custom_prompt("MMBench_DEV_EN")  # as VLMEvalKit's entry
    msg = _demo_message()
    ours = wrapper.build_inputs(msg, "DOP_Demo")
    stub = Qwen2VLChat.__new__(Qwen2VLChat)
    stub.__dict__.update(
        model_path="tiny", processor=wrapper.processor, model=_Recorder(), system_prompt=None, verbose=False,
        min_pixels=wrapper.min_pixels, max_pixels=wrapper.max_pixels, total_pixels=None, fps=2, nframe=128,
        generate_kwargs={},
    )  # fmt: skip
    with pytest.raises(_Captured):
        stub.generate_inner_transformers(msg, dataset="DOP_Demo")
    theirs = stub.model.kwargs
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    assert torch.equal(ours["image_grid_thw"], theirs["image_grid_thw"])
    # OCRBench's own minimum resolution comes with VLMEvalKit's content builder
    content = wrapper.messages(msg, "OCRBench")[-1]["content"]
    assert content[0]["min_pixels"] == 10 * 10 * 28 * 28


def test_llavaov_inputs_are_vlmevalkits(lmu_root, no_cuda_moves):
    from vlmeval.vlm.llava.llava import LLaVA_OneVision_HF

    from vlmeval_dop.registry import load_entry

    wrapper = load_entry("tiny_llavaov").load()
    msg = _demo_message(2)
    ours = wrapper.build_inputs(msg, "DOP_Demo")
    stub = LLaVA_OneVision_HF.__new__(LLaVA_OneVision_HF)
    stub.__dict__.update(processor=wrapper.processor, model=_Recorder())
    with pytest.raises(_Captured):
        stub.generate_inner_image(msg, dataset="DOP_Demo")
    theirs = stub.model.kwargs
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
        assert torch.equal(ours[key], theirs[key]), key
    with pytest.raises(ValueError, match="resize reduction .* not meaningful for LLaVA-OneVision"):
        load_entry("tiny_llavaov", reducer="resize")


def test_internvl35_inputs_are_vlmevalkits(lmu_root, no_cuda_moves):
    """Pixel values (tiles) and question are those VLMEvalKit hands InternVL's own `chat()`; the prompt is that
    question with each `<image>` expanded as `chat()` expands it, in the checkpoint's chat template."""
    from vlmeval.vlm.internvl.internvl_chat import InternVLChat

    from vlmeval_dop.registry import load_entry

    wrapper = load_entry("tiny_internvl35").load()
    proc = wrapper.processor
    for dataset, n_tiles in (("DOP_Demo", 5), ("OCRBench", 5)):
        msg = _demo_message(1)
        text, pixels = wrapper.prompt(msg, dataset)
        stub = InternVLChat.__new__(InternVLChat)
        stub.__dict__.update(
            model=_Recorder(), tokenizer=None, device="cpu", use_mpo_prompt=False, use_cot=False, best_of_n=1,
            use_lmdeploy=False, system_prompt=None, kwargs={}, screen_parse=True,
        )  # fmt: skip
        stub.set_max_num(dataset)
        # VLMEvalKit tiles with its default 448 px input size; the tiny tower's tile is 112 px
        import vlmeval.vlm.internvl.internvl_chat as ic

        real = ic.load_image
        ic.load_image = lambda path, max_num=6, upscale=False: real(path, input_size=wrapper._tile, max_num=max_num,
                                                                    upscale=upscale)  # fmt: skip
        try:
            with pytest.raises(_Captured):
                stub.generate_v2(msg, dataset=dataset)
        finally:
            ic.load_image = real
        kw = stub.model.kwargs
        assert pixels.shape[0] == n_tiles and kw["num_patches_list"] == [n_tiles]
        assert torch.equal(pixels.to(torch.bfloat16), kw["pixel_values"])
        expanded = proc.start_image_token + proc.image_token * (16 * n_tiles) + proc.end_image_token
        question = kw["question"].replace("<image>", expanded, 1)
        assert text == proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": question}]}], add_generation_prompt=True,
            tokenize=False,
        )  # fmt: skip


FAMILIES = {"qwen2vl": 64, "internvl35": 80, "llavaov": 336, "smolvlm": 80, "qwen3vl": 49,
            "gemma3": 64}  # of a 224x224 image
DOPR = {"tiny_qwen2vl_dopr": 16, "tiny_internvl35_dopr": 9, "tiny_qwen3vl_dopr": 16}


def test_qwen3vl_inputs_are_vlmevalkits(lmu_root):
    """Qwen3-VL's inputs come from VLMEvalKit's own `Qwen3VLChat.generate_inner_transformers` (run with a
    stand-in model): no system message, 32 px per token, dataset prompts (custom prompts off, as its entry)."""
    from vlmeval_dop.registry import load_entry

    wrapper = load_entry("tiny_qwen3vl").load()
    assert not wrapper.use_custom_prompt("MMBench_DEV_EN")
    inputs = wrapper.build_inputs(_demo_message(), "DOP_Demo")
    ids = inputs["input_ids"][0]
    text = wrapper.processor.tokenizer.decode(ids[ids != wrapper.model.config.image_token_id])
    assert text.startswith("<|im_start|>user\n<|vision_start|><|vision_end|>What") and "system" not in text
    assert inputs["image_grid_thw"].tolist() == [[1, 14, 14]] and int((ids == wrapper.model.config.image_token_id).sum()) == 49
    with wrapper.resized(16):  # DOP_R: 16 x 32^2 pixels
        assert wrapper.build_inputs(_demo_message(), "DOP_Demo")["image_grid_thw"].tolist() == [[1, 8, 8]]


def test_gemma3_inputs_are_vlmevalkits(lmu_root, monkeypatch):
    """Gemma 3's inputs are those VLMEvalKit's own `Gemma3.generate_inner_transformers` hands its model: its system
    prompt and message layout, the checkpoint's chat template, the processor's fixed resolution (pan-and-scan off,
    64 tokens for the tiny 224 px tower), token_type_ids (the bidirectional image mask), pixels cast to bfloat16.
    VLMEvalKit's call is run here with PIL decoding the demo PNG (torchvision's libpng clashes with decord's zlib in
    this environment; the wrapper falls back the same way, lossless for PNG)."""
    import transformers.image_utils as iu
    from PIL import Image
    from vlmeval.vlm.gemma import Gemma3

    from vlmeval_dop.registry import load_entry

    wrapper = load_entry("tiny_gemma3").load()
    msg = _demo_message()
    ours = wrapper.build_inputs(msg, "DOP_Demo")
    monkeypatch.setattr(iu, "load_image_as_tensor", lambda path, **k: torch.from_numpy(
        __import__("numpy").asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1).contiguous())
    stub = Gemma3.__new__(Gemma3)
    stub.__dict__.update(processor=wrapper.processor, model=_Recorder(), device="cpu",
                         system_prompt="You are a helpful assistant. ", kwargs={})  # fmt: skip
    with pytest.raises(_Captured):
        stub.generate_inner_transformers(msg, dataset="DOP_Demo")
    theirs = stub.model.kwargs
    for key in ("input_ids", "attention_mask", "token_type_ids", "pixel_values"):
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["pixel_values"].dtype == torch.bfloat16
    ids = ours["input_ids"][0]
    image = wrapper.model.config.image_token_id
    assert torch.equal(ours["token_type_ids"][0].bool(), ids == image) and int((ids == image).sum()) == 64
    text = wrapper.processor.tokenizer.decode(ids[ids != image])
    assert text.startswith("<bos><start_of_turn>user\nYou are a helpful assistant. \n\n\n\n<start_of_image><end_of_image>")
    assert text.endswith("<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(ValueError, match="resize reduction .* not meaningful for Gemma 3"):
        load_entry("tiny_gemma3", reducer="resize")


def test_smolvlm_inputs_are_vlmevalkits(lmu_root):
    """SmolVLM's inputs come from VLMEvalKit's own `SmolVLM.generate_inner` (run with a stand-in model): its
    prompt per dataset (here TextVQA's and the default), the tiles' markers from the processor."""
    from vlmeval_dop.registry import load_entry

    wrapper = load_entry("tiny_smolvlm").load()
    tok = wrapper.processor.tokenizer
    msg = _demo_message()
    for dataset, tail in (("DOP_Demo", "Answer the question using a single word or phrase.<end_of_utterance>\nAssistant:"),
                          ("TextVQA_VAL", "Assistant:")):  # fmt: skip
        ids = wrapper.build_inputs(msg, dataset)["input_ids"][0]
        text = tok.decode(ids)
        assert text.startswith("<|im_start|>User:<fake_token_around_image><row_1_col_1><image>") and text.endswith(tail)
        assert int((ids == wrapper.model.config.image_token_id).sum()) == 80
    with pytest.raises(ValueError, match="resize reduction .* not meaningful for SmolVLM"):
        load_entry("tiny_smolvlm", reducer="resize")


def test_tiny_entries_end_to_end(built, tmp_path):  # noqa: F811
    """`python run.py --model tiny_<family> tiny_<family>_dop [tiny_<family>_dopr]` offline: predictions and
    scores written; the DOP entries ran pruned ((2, 1, 8) with `uniform`; DOP_R on the resized image)."""
    entries = [e for f in FAMILIES for e in (f"tiny_{f}", f"tiny_{f}_dop")] + list(DOPR)
    models = built("--model", *entries, "--data", "DOP_Demo", "--work-dir", str(tmp_path))
    for entry in entries:
        pred, acc = _outputs(tmp_path, entry)
        assert pred.exists() and acc.exists(), entry
        assert len(pd.read_excel(pred)) == N_DEMO
    for family, n_vis in FAMILIES.items():
        full, dop = models[f"tiny_{family}"][0], models[f"tiny_{family}_dop"][0]
        assert full.last_visual_tokens == n_vis and full.last_layer_tokens is None
        (a0, p0), (a1, p1), (a2, p2), (a3, p3) = dop.last_layer_tokens
        assert dop.pruned_samples == N_DEMO and (a0, p0, a1, p1) == (a2 + 8, a2 + 8, a2 + 8, a2) == (a3 + 8,) * 3 + (p3,)
    for entry, n_v in DOPR.items():
        m = models[entry][0]
        assert m.last_visual_tokens == n_v
        counts = m.last_layer_tokens
        assert counts[0][0] - counts[3][0] == n_v and counts[1][0] - counts[1][1] == n_v
