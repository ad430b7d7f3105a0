"""VisionZip against outputs of the official code (tests/golden/visionzip/README.md): the kept tokens ([CLS]
included), their order `[CLS, dominant, contextual]` and the merged rows, on tiny LLaVA-1.5 / LLaVA-NeXT models
whose vision tower is the fixtures' golden tower; through the reducer and through `apply_dop`."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.reducers import ImageSpan, ReductionContext, ReplacedSpan
from vlmeval_dop.reducers.llava_next_layout import llava_next_layout
from vlmeval_dop.reducers.vision import vision_capture
from vlmeval_dop.reducers.visionzip import VisionZip, visionzip_select, visionzip_split

from stock_reference import (  # tests/stock_reference.py
    golden_checksum, golden_inputs, golden_llava, golden_next_pixels, golden_pixels, replaced_span_logits,
    stock_embeds,
)  # fmt: skip

GOLDEN = Path(__file__).parent / "golden" / "visionzip"
LLAVA15 = torch.load(GOLDEN / "llava15.pt", weights_only=True)
NEXT = torch.load(GOLDEN / "llava_next.pt", weights_only=True)
CASES = sorted(k for k in LLAVA15 if k.startswith("seed"))
NEXT_CASES = sorted(NEXT)
#: LLaVA-NeXT image sizes (height, width) giving the fixtures' grids: 2x2 with unpadding (rows cut), 1x2
NEXT_SIZES = {(2, 2): (400, 672), (1, 2): (300, 672)}

_MODELS: dict = {}


def _model(seed: int, next_: bool = False):
    if (seed, next_) not in _MODELS:
        _MODELS[seed, next_] = golden_llava(seed, next_)
    return _MODELS[seed, next_]


_CTX: dict = {}


def _ctx(family: str, model, inputs) -> ReductionContext:
    """Reduction context of the stock decoder inputs (also the text rows of the rebuilt sequence); one per
    model and image, so its `cache` (the vision capture) is shared by the budgets of a seed."""
    key = (id(model), tuple(inputs["pixel_values"].shape))
    if key not in _CTX:
        emb, _ = stock_embeds(model, inputs)
        vis = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
        _CTX[key] = ReductionContext(
            family=family, model=model, input_ids=inputs["input_ids"], inputs_embeds=emb, attention_mask=None,
            images=[ImageSpan(0, 0, vis)], model_inputs=dict(inputs),
        )  # fmt: skip
    return _CTX[key]


def _official_logits(model, ctx: ReductionContext, rows: torch.Tensor) -> torch.Tensor:
    """Stock model on the official sequence: text, projector(official pre-projector rows), text."""
    with torch.no_grad():
        image_rows = model.model.multi_modal_projector(rows[None])[0]
    return replaced_span_logits(model, ctx.inputs_embeds, ctx.images[0].positions, image_rows)


def test_fixture_coverage():
    """Official settings 64/128/192 (and 32), 3 seeds; [CLS] first in every official output."""
    assert {(LLAVA15[k]["dominant"], LLAVA15[k]["contextual"]) for k in CASES} == {(27, 5), (54, 10), (108, 20), (162, 30)}
    assert {LLAVA15[k]["seed"] for k in CASES} == {0, 1, 2}
    for k in CASES:
        fx = LLAVA15[k]
        assert visionzip_split(fx["dominant"] + fx["contextual"]) == (fx["dominant"], fx["contextual"])
        assert fx["kept"][0] == 0


@pytest.mark.parametrize("case", CASES)
def test_llava15_selection_equals_official(case):
    fx = LLAVA15[case]
    model = _model(fx["seed"])
    inputs = golden_inputs(model, 576, golden_pixels(fx["seed"]))
    ctx = _ctx("llava", model, inputs)
    cap = vision_capture(ctx)
    torch.testing.assert_close(golden_checksum(cap.features[0]).float(), fx["feature_checksum"], rtol=1e-6, atol=0)
    n = fx["dominant"] + fx["contextual"]
    # the selection function on the captured feature layer: kept tokens, order, merged rows
    part = visionzip_select(cap.cls_attention[0], cap.keys[0].mean(1), cap.features[0], fx["dominant"], fx["contextual"])
    assert (part.sources + 1).tolist() == fx["kept"].tolist()  # official token index = patch + 1, [CLS] = 0
    torch.testing.assert_close(part.rows, fx["rows"], atol=1e-5, rtol=1e-5)
    # the reducer: the same rows through the projector, in the official order
    sel = VisionZip().select(ctx, n)[0]
    assert isinstance(sel, ReplacedSpan)
    assert sel.sources.tolist() == (fx["kept"] - 1).tolist()
    with torch.no_grad():
        want = model.model.multi_modal_projector(fx["rows"][None])[0]
    torch.testing.assert_close(sel.embeds, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["seed0_n64", "seed1_n128", "seed2_n192"])
def test_llava15_through_the_executor_equals_official_sequence(case):
    fx = LLAVA15[case]
    model = _model(fx["seed"])
    inputs = golden_inputs(model, 576, golden_pixels(fx["seed"]))
    ctx = _ctx("llava", model, inputs)
    n = fx["dominant"] + fx["contextual"]
    L = model.config.text_config.num_hidden_layers
    with apply_dop(model, DOPPolicy(L, L, n), reducer="visionzip") as handle, torch.no_grad():
        got = model(**inputs).logits[0, -1]
    assert handle.last_kept[0].tolist() == (fx["kept"] - 1).tolist()
    torch.testing.assert_close(got, _official_logits(model, ctx, fx["rows"]), atol=1e-5, rtol=1e-5)


def _next_inputs(model, fx):
    grid = tuple(fx["grid"].tolist())
    size = NEXT_SIZES[grid]
    crops = 1 + grid[0] * grid[1]
    lay = llava_next_layout(model, size)
    pixels = golden_next_pixels(fx["seed"], crops)[None]  # (1, crops, 3, 336, 336)
    return golden_inputs(model, lay.crop.numel(), pixels, image_sizes=torch.tensor([size])), lay


@pytest.mark.parametrize("case", NEXT_CASES)
def test_llava_next_official_packing(case):
    """Official NeXT packing: base crop rows, grid dominant patches in stitched raster order, grid [CLS] rows,
    grid contextual rows; no unpadding, no newline rows. Through the reducer and through `apply_dop`."""
    fx = NEXT[case]
    model = _model(fx["seed"], next_=True)
    inputs, lay = _next_inputs(model, fx)
    ctx = _ctx("llava_next", model, inputs)
    cap = vision_capture(ctx)
    torch.testing.assert_close(golden_checksum(cap.features).float(), fx["feature_checksum"], rtol=1e-6, atol=0)
    crops = cap.features.shape[0]
    n_keep = crops * (fx["dominant"] + fx["contextual"]) + crops - 1  # per crop: n_keep // crops
    assert n_keep < lay.crop.numel()
    sel = VisionZip().select(ctx, n_keep)[0]
    assert isinstance(sel, ReplacedSpan)
    # sources: the placeholder of (crop, patch), -1 for [CLS] rows and patches llava-hf unpadded away
    where = {(int(c), int(p)): i for i, (c, p) in enumerate(zip(lay.crop, lay.patch)) if c >= 0}
    want = [-1 if t == 0 else where.get((int(c), int(t) - 1), -1) for c, t in zip(fx["crop"], fx["token"])]
    assert sel.sources.tolist() == want
    with torch.no_grad():
        proj = model.model.multi_modal_projector(fx["rows"][None])[0]
    torch.testing.assert_close(sel.embeds, proj, atol=1e-5, rtol=1e-5)
    L = model.config.text_config.num_hidden_layers
    with apply_dop(model, DOPPolicy(L, L, n_keep), reducer="visionzip") as handle, torch.no_grad():
        got = model(**inputs).logits[0, -1]
    assert handle.last_kept[0].tolist() == want
    torch.testing.assert_close(got, _official_logits(model, ctx, fx["rows"]), atol=1e-5, rtol=1e-5)
