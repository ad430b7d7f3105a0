"""LLaVA-NeXT placeholder layout vs what the stock model actually writes into the image span."""
from __future__ import annotations

import pytest
import torch

from vlmeval_dop.reducers import ReducerError
from vlmeval_dop.reducers.llava_next_layout import llava_next_layout
from vlmeval_dop.tiny import load_tiny, tiny_image, tiny_inputs


@pytest.mark.parametrize("size", [(224, 224), (300, 150), (150, 300), (320, 200)])
def test_layout_matches_the_packed_features(size):
    model, processor = load_tiny("llavanext")
    inputs = tiny_inputs("llavanext", processor, ["What?"], [tiny_image(4, size=size)])
    ids = inputs["input_ids"][0]
    span = torch.nonzero(ids == model.config.image_token_id).flatten()
    lay = llava_next_layout(model, inputs["image_sizes"][0], num_tokens=span.numel())
    with torch.no_grad():
        # per-crop projected features (before packing) straight from the tower + projector
        mm = model.model
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        n = image_size_to_num_patches(inputs["image_sizes"][0], model.config.image_grid_pinpoints, model.config.vision_config.image_size)
        out = mm.vision_tower(inputs["pixel_values"][0, :n], output_hidden_states=True)
        crops = mm.multi_modal_projector(out.hidden_states[model.config.vision_feature_layer][:, 1:])  # (C, P, H)
        packed = mm.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]).pooler_output[0]
    assert packed.shape[0] == span.numel() == lay.crop.numel()
    assert lay.num_crops == n
    nl = lay.newline
    torch.testing.assert_close(packed[~nl], crops[lay.crop[~nl], lay.patch[~nl]])
    torch.testing.assert_close(packed[nl], mm.image_newline.expand(int(nl.sum()), -1))
    # base crop complete and first; each (crop, patch) at most once; newline closes every grid row
    assert lay.crop[: lay.side**2].tolist() == [0] * lay.side**2
    codes = (lay.crop * lay.side**2 + lay.patch)[~nl]
    assert codes.unique().numel() == codes.numel()
    assert bool(lay.newline[-1])


def test_wrong_span_length_is_refused():
    model, _ = load_tiny("llavanext")
    with pytest.raises(ReducerError, match="placeholders"):
        llava_next_layout(model, (224, 224), num_tokens=5)


def test_real_llava_next_672_accounting():
    """llava-v1.6 config at the paper's 672x672: 5 crops x 576 = 2880 tower tokens + 48 row newlines = 2928
    placeholders (README, Notes on the paper); a 640x480 image loses padded grid rows (2304 + 36)."""
    from types import SimpleNamespace

    from transformers import LlavaNextConfig

    cfg = LlavaNextConfig(image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
    lay = llava_next_layout(SimpleNamespace(config=cfg), (672, 672))
    assert (lay.crop.numel(), int(lay.newline.sum()), lay.num_crops, lay.side) == (2928, 48, 5, 24)
    assert int((lay.crop >= 0).sum()) == 2880
    lay = llava_next_layout(SimpleNamespace(config=cfg), (480, 640))  # (height, width)
    assert (lay.crop.numel(), int(lay.newline.sum())) == (2340, 36)
