"""LLaVA wrappers in float16 keep the CLIP tower in float32, as the official LLaVA loader behind the paper's LLaVA
numbers does (`vision_dtype="float32"`, see vlmeval_dop/models/llava.py); `vision_dtype="model"` runs it in float16.

Reference: the official composition rebuilt by hand from a separately loaded stock float16 copy of the tiny model:
pixels rounded to float16, tower in float32 (llava-hf checkpoints store the tower in float16, so its float32
weights are the float16 values; the tiny checkpoint is loaded the same way), the feature layer without [CLS] cast
to float16, then the float16 projector.
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

from vlmeval_dop.policy import DOPPolicy
from vlmeval_dop.tiny import tiny_path


def _stock(family: str, cls: str, dtype: torch.dtype):
    return getattr(transformers, cls).from_pretrained(str(tiny_path(family)), dtype=dtype).eval()


def _wrapper(family: str, **kwargs):
    from vlmeval_dop.models.llava import LLaVA15DOP, LLaVANextDOP

    cls = LLaVA15DOP if family == "llava15" else LLaVANextDOP
    return cls(tiny=family, device="cpu", dtype="float16", max_new_tokens=4, **kwargs).load()


@pytest.mark.parametrize("family,cls", [("llava15", "LlavaForConditionalGeneration"),
                                        ("llavanext", "LlavaNextForConditionalGeneration")])
def test_tower_float32_features_equal_official_composition(family, cls, lmu_root):
    wrapper = _wrapper(family)
    model = wrapper.model
    assert {p.dtype for p in model.model.vision_tower.parameters()} == {torch.float32}
    assert {p.dtype for p in model.model.multi_modal_projector.parameters()} == {torch.float16}
    assert {p.dtype for p in model.model.language_model.parameters()} == {torch.float16}

    model16 = _stock(family, cls, torch.float16)
    tower32 = copy.deepcopy(model16.model.vision_tower).float()
    torch.manual_seed(0)
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size).to(torch.float16)  # LLaVA's eval hands the tower float16 images
    with torch.no_grad():
        hidden = tower32(pixels.float(), output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
        expected = model16.model.multi_modal_projector(hidden[:, 1:].to(torch.float16))
        got = model.model.multi_modal_projector(
            model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[model.config.vision_feature_layer][:, 1:]
        )
        all16 = model16.model.multi_modal_projector(
            model16.model.vision_tower(pixels, output_hidden_states=True).hidden_states[model.config.vision_feature_layer][:, 1:]
        )
    assert got.dtype == torch.float16
    assert torch.equal(got, expected)
    assert not torch.equal(all16, expected)  # the setting is observable: a float16 tower gives other features


def _message():
    from vlmeval_dop.datasets import DOPDemoDataset

    ds = DOPDemoDataset("DOP_Demo")
    return ds.build_prompt(ds.data.iloc[0])


@pytest.mark.parametrize("kwargs", [
    {},
    {"policy": DOPPolicy(2, 1, 8), "reducer": "vispruner"},
    {"policy": DOPPolicy(4, 4, 16), "reducer": "visionzip"},
    {"baseline": "fastv", "baseline_args": {"k": 2, "keep": 16}},
])
def test_float16_generation_runs_with_a_float32_tower(kwargs, lmu_root):
    wrapper = _wrapper("llava15", **kwargs)
    answer = wrapper.generate(_message(), dataset="DOP_Demo")
    assert isinstance(answer, str)
    if "policy" in kwargs:  # the reducer ran on the float32 tower's outputs and kept n_v tokens
        prompt = wrapper.build_inputs(_message(), "DOP_Demo")["input_ids"].shape[1]
        assert wrapper.last_layer_tokens[0][0] == prompt - wrapper.last_visual_tokens + kwargs["policy"].n_v


def test_model_dtype_option_and_bad_value(lmu_root):
    wrapper = _wrapper("llava15", vision_dtype="model")
    assert {p.dtype for p in wrapper.model.parameters()} == {torch.float16}
    assert isinstance(wrapper.generate(_message(), dataset="DOP_Demo"), str)
    from vlmeval_dop.models.llava import LLaVA15DOP

    with pytest.raises(ValueError, match="valid: float32, model"):
        LLaVA15DOP(tiny="llava15", vision_dtype="fp32")
