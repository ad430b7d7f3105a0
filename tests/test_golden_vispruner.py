"""VisPruner against the official code (tests/golden/vispruner/: Theia-4869/VisPruner `encode_images` and its
LLaVA-NeXT packing, run on the seeded CLIP-shaped inputs of tests/golden_clip.py). Product path: the
`VisPruner` reducer through `apply_dop` on a LLaVA-1.5 / LLaVA-NeXT model around the same tower."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.reducers import ReplacedSpan, check_selection
from vlmeval_dop.reducers.base import reported_indices
from vlmeval_dop.reducers.llava_next_layout import llava_next_layout
from vlmeval_dop.reducers.vispruner import VisPruner

import golden_clip as G  # tests/golden_clip.py

FIXTURES = json.loads((Path(__file__).parent / "golden" / "vispruner" / "fixtures.json").read_text())
CASES = FIXTURES["cases"]


def _id(c):
    kind = "ties" if c["ties"] else c["family"]
    size = "x".join(map(str, c["image_size_hw"])) if "image_size_hw" in c else ""
    return f"{kind}{size}-s{c['seed']}-T{c['T']}-{c['image_dtype']}"


@functools.lru_cache(maxsize=None)
def _model(seed: int, next_: bool, ties: bool):
    return G.tiny_llava(seed, next_=next_, ties=ties)


class _Spy(VisPruner):
    """The product reducer, keeping the context the executor built (to select other budgets on it)."""

    def select(self, ctx, n_keep):
        self.ctx = ctx
        return super().select(ctx, n_keep)


def _inputs(case, model):
    fp16 = case["image_dtype"] == "float16"
    if case["family"] == "llava":
        pixels = G.pixel_values(case["seed"], 1, tiles=4 if case["ties"] else None)
        size, n_tokens = None, G.SIDE * G.SIDE
    else:
        h, w = case["image_size_hw"]
        pixels = G.pixel_values(case["seed"], 5, pad_rows=G.next_pad_rows(h, w) if h != w else None)
        size, n_tokens = (h, w), llava_next_layout(model, (h, w)).crop.numel()
    if fp16:  # the official eval feeds float16 images; its float32 tower sees them rounded
        pixels = pixels.half().float()
    return G.llava_inputs(model, n_tokens, pixels, size)


@functools.lru_cache(maxsize=None)
def _forward(seed, family, ties, image_dtype, size):
    """One forward of the model under apply_dop with VisPruner (first budget of the group); returns the model,
    inputs, the reducer and the executor's context, on which the group's other budgets are selected."""
    case = dict(seed=seed, family=family, ties=ties, image_dtype=image_dtype)
    if size:
        case["image_size_hw"] = list(size)
    model = _model(seed, family == "llava_next", ties)
    inputs = _inputs(case, model)
    reducer = _Spy(similarity_dtype=torch.float16 if image_dtype == "float16" else None)
    with apply_dop(model, DOPPolicy(1, 1, 16), reducer=reducer), torch.no_grad():
        model(**inputs)
    return model, inputs, reducer


def _run(case):
    """The kept rows of `case`: the executor's reducer call on the executor's context (selection validated
    as the executor does)."""
    size = tuple(case["image_size_hw"]) if "image_size_hw" in case else None
    model, inputs, reducer = _forward(case["seed"], case["family"], case["ties"], case["image_dtype"], size)
    n_v = case["T"] * (1 if case["family"] == "llava" else 5)
    sel = reducer.select(reducer.ctx, n_v)
    check_selection(reducer, reducer.ctx, n_v, sel)
    return model, inputs, sel[0], reported_indices(sel[0])


@pytest.mark.parametrize("case", [c for c in CASES if c["family"] == "llava" and "error" not in c], ids=_id)
def test_llava15_equals_official(case):
    _, _, sel, kept = _run(case)
    assert kept.tolist() == case["packed"] == case["kept"][0]  # patch order, as the official index mask


@pytest.mark.parametrize("case", [c for c in CASES if "error" in c], ids=_id)
def test_where_the_official_code_fails(case):
    """T = 51 (odd remainder: the paper's LLaVA-1.5 n_v) and T = 8 (r > |A|) crash the official code; ours
    keeps T tokens (surviving A tokens kept, resp. all of A dropped)."""
    assert case["error"].startswith(("IndexError", "RuntimeError"))
    _, _, _, kept = _run(case)
    assert kept.numel() == case["T"] and kept.unique().numel() == case["T"]


@functools.lru_cache(maxsize=None)
def _projected(seed, ties, size, image_dtype):
    """Independent reference rows: every crop's patches through the tower (hidden_states[-2]) and projector."""
    model, inputs, _ = _forward(seed, "llava_next", ties, image_dtype, size)
    with torch.no_grad():
        hs = model.model.vision_tower(inputs["pixel_values"][0], output_hidden_states=True).hidden_states[-2]
        return model.model.multi_modal_projector(hs[:, 1:]).flatten(0, 1)


@pytest.mark.parametrize("case", [c for c in CASES if c["family"] == "llava_next"], ids=_id)
def test_llava_next_official_packing(case):
    model, inputs, sel, kept = _run(case)
    assert isinstance(sel, ReplacedSpan) and sel.embeds.shape[0] == 5 * case["T"]
    # rows: the projected features of exactly the official patches, in the official order
    codes = torch.tensor(case["packed"])
    proj = _projected(case["seed"], case["ties"], tuple(case["image_size_hw"]), case["image_dtype"])
    torch.testing.assert_close(sel.embeds, proj[codes], atol=1e-5, rtol=0)
    # reported sources: the span placeholder of each row, -1 for patches that unpadding removed
    lay = llava_next_layout(model, case["image_size_hw"])
    slot = {int(c) * 576 + int(p): i for i, (c, p) in enumerate(zip(lay.crop, lay.patch)) if c >= 0}
    assert kept.tolist() == [slot.get(int(c), -1) for c in codes]


def test_llava_next_rows_reach_the_decoder():
    """Through the executor: the decoder's first layer sees the prompt with the image span replaced by the 5T
    official rows (tokens counted per layer), including patches of the padded canvas rows, which llava-hf's
    span does not hold (source -1)."""
    case = next(c for c in CASES if c["family"] == "llava_next" and c["image_size_hw"] == [400, 672])
    model, inputs, _ = _forward(case["seed"], "llava_next", False, "float32", (400, 672))
    with apply_dop(model, DOPPolicy(1, 1, 5 * case["T"]), reducer="vispruner") as handle, torch.no_grad():
        model(**inputs)
    n_text = int((inputs["input_ids"] != model.config.image_token_id).sum())
    assert handle.last_layer_tokens[0][0] == n_text + 5 * case["T"]
    lay = llava_next_layout(model, case["image_size_hw"])
    slot = {int(c) * 576 + int(p): i for i, (c, p) in enumerate(zip(lay.crop, lay.patch)) if c >= 0}
    assert handle.last_kept[0].tolist() == [slot.get(int(c), -1) for c in case["packed"]]
    assert (handle.last_kept[0] < 0).any()
