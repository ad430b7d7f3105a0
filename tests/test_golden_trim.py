"""TRIM against outputs of the official `CLIPVisionTower.token_reduction` (tests/golden/trim/README.md): kept
patches, the mean token appended after them, and the rows, on a tiny LLaVA-1.5 whose vision tower is the fixtures'
golden tower; through the reducer and through `apply_dop`."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.reducers import ImageSpan, ReductionContext, ReplacedSpan
from vlmeval_dop.reducers import clip_text
from vlmeval_dop.reducers.trim import TRIM, iqr_outlier_count, trim_scores
from vlmeval_dop.reducers.vision import vision_capture

from stock_reference import (  # tests/stock_reference.py
    GOLDEN_VISION, golden_checksum, golden_inputs, golden_llava, golden_pixels, replaced_span_logits, stock_embeds,
)  # fmt: skip

GOLDEN = Path(__file__).parent / "golden" / "trim"
FIXTURES = torch.load(GOLDEN / "llava15.pt", weights_only=True)
CASES = sorted(FIXTURES)


def golden_visual_projection_weight(seed: int) -> torch.Tensor:
    """CLIP `visual_projection` weight (projection_dim, width) of golden seed `seed` (as the generator)."""
    g = torch.Generator().manual_seed(2000 + seed)
    width = GOLDEN_VISION["hidden_size"]
    return torch.randn(GOLDEN_VISION["projection_dim"], width, generator=g) / width**0.5


def golden_text_embed(seed: int) -> torch.Tensor:
    """The CLIP text embedding (official `text_tower(...).text_embeds`) the fixtures were made with."""
    return torch.randn(GOLDEN_VISION["projection_dim"], generator=torch.Generator().manual_seed(3000 + seed))


class GoldenTRIM(TRIM):
    """TRIM with the fixture's CLIP side: its visual projection (registered as a CLIP source) and its text
    embedding (the CLIP text tower is stock transformers, covered by test_reducer_trim)."""

    def __init__(self, seed: int):
        source = f"golden:trim/{seed}"
        projection = nn.Linear(GOLDEN_VISION["hidden_size"], GOLDEN_VISION["projection_dim"], bias=False)
        with torch.no_grad():
            projection.weight.copy_(golden_visual_projection_weight(seed))
        clip_text._LOADED[source] = clip_text.ClipText(None, None, None, projection, 77)  # test-only registration
        super().__init__(clip_model=source, text_fn=lambda ctx, span: "unused")
        self.seed = seed

    def text_embedding(self, clip, text: str) -> torch.Tensor:
        return golden_text_embed(self.seed)


_SETUP: dict = {}


def _setup(fx):
    """(model, inputs, reduction context on the stock decoder inputs) of a fixture's seed, built once per seed
    (the context's cache then holds the vision capture for all its budgets)."""
    seed = fx["seed"]
    if seed not in _SETUP:
        model = golden_llava(seed)
        inputs = golden_inputs(model, 576, golden_pixels(seed))
        emb, _ = stock_embeds(model, inputs)
        vis = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
        ctx = ReductionContext(family="llava", model=model, input_ids=inputs["input_ids"], inputs_embeds=emb,
                               attention_mask=None, images=[ImageSpan(0, 0, vis)], model_inputs=dict(inputs))  # fmt: skip
        _SETUP[seed] = model, inputs, ctx
    return _SETUP[seed]


def test_fixture_coverage():
    """3 seeds x (32, 64, 128 tokens, the adaptive IQR count); the order case: the last patch kept."""
    assert {FIXTURES[k]["seed"] for k in CASES} == {0, 1, 2}
    assert {len(FIXTURES[k]["kept"]) for k in CASES} >= {32, 64, 128}
    assert all(FIXTURES[k]["kept"][-1] == -1 for k in CASES)
    assert any(FIXTURES[k]["kept"][-2] == 575 for k in CASES)  # where a mean at max(rest) would change order


@pytest.mark.parametrize("case", CASES)
def test_selection_equals_official(case):
    fx = FIXTURES[case]
    model, _, ctx = _setup(fx)
    cap = vision_capture(ctx)
    torch.testing.assert_close(golden_checksum(cap.features[0, 1:]).float(), fx["feature_checksum"], rtol=1e-6, atol=0)
    n_keep = len(fx["kept"])
    if case.endswith("iqr"):  # the official adaptive count (TRIM:-1) is the IQR outlier count of the scores
        reducer = GoldenTRIM(fx["seed"])
        proj = clip_text._LOADED[reducer.clip_model].visual_projection
        post_ln = model.model.vision_tower.post_layernorm
        with torch.no_grad():
            scores = trim_scores(proj(post_ln(cap.features[0, 1:])), golden_text_embed(fx["seed"]))
        assert iqr_outlier_count(scores) == n_keep - 1
    sel = GoldenTRIM(fx["seed"]).select(ctx, n_keep)[0]
    assert isinstance(sel, ReplacedSpan)
    assert sel.sources.tolist() == fx["kept"].tolist()
    with torch.no_grad():
        want = model.model.multi_modal_projector(fx["rows"][None])[0]
    torch.testing.assert_close(sel.embeds, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["seed0_n128", "seed1_n32", "seed2_n64"])
def test_through_the_executor_equals_official_sequence(case):
    fx = FIXTURES[case]
    model, inputs, ctx = _setup(fx)
    n_keep = len(fx["kept"])
    L = model.config.text_config.num_hidden_layers
    with apply_dop(model, DOPPolicy(L, L, n_keep), reducer=GoldenTRIM(fx["seed"])) as handle, torch.no_grad():
        got = model(**inputs).logits[0, -1]
    assert handle.last_kept[0].tolist() == fx["kept"].tolist()
    with torch.no_grad():
        image_rows = model.model.multi_modal_projector(fx["rows"][None])[0]
    want = replaced_span_logits(model, ctx.inputs_embeds, ctx.images[0].positions, image_rows)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
