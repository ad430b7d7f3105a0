"""CDPruner against the official code (tests/golden/cdpruner/: Theia-4869/CDPruner `encode_images` with its CLIP
text stream, and its LLaVA-NeXT packing, run on the seeded CLIP-shaped inputs of tests/golden_clip.py with the
bare question as `texts`). Product path: the `CDPruner` reducer through `apply_dop` on a LLaVA-1.5 / LLaVA-NeXT
model around the same tower, the CLIP text taken from the VQA / multiple-choice *prompt* as the VLMEvalKit
wrapper hands it over (`prompt_text`), reduced to the bare question by the reducer."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.reducers import ReplacedSpan, check_selection
from vlmeval_dop.reducers.base import reported_indices
from vlmeval_dop.reducers.cdpruner import CDPruner
from vlmeval_dop.reducers.clip_text import load_clip_text
from vlmeval_dop.reducers.instruction import prompt_text
from vlmeval_dop.reducers.llava_next_layout import llava_next_layout

import golden_clip as G  # tests/golden_clip.py

FIXTURES = json.loads((Path(__file__).parent / "golden" / "cdpruner" / "fixtures.json").read_text())
CASES = FIXTURES["cases"]
# the answer-format instruction the prompt carries (VLMEvalKit's VQA / LLaVA MCQ prompts) and the official
# scripts do not pass to CLIP
SUFFIX = {0: "\nAnswer the question using a single word or phrase.",
          1: "\nAnswer with the option's letter from the given choices directly.",
          2: "\nAnswer the question using a single word or phrase."}  # fmt: skip


def _id(c):
    size = "x".join(map(str, c["image_size_hw"])) if "image_size_hw" in c else ""
    return f"{c['family']}{size}-s{c['seed']}-T{c['T']}"


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden_clip")
    return {s: G.save_tiny_clip(s, root / f"clip{s}") for s in (0, 1, 2)}


@functools.lru_cache(maxsize=None)
def _model(seed: int, next_: bool):
    return G.tiny_llava(seed, next_=next_)


class _Spy(CDPruner):
    """The product reducer, keeping the context the executor built (to select other budgets on it)."""

    def select(self, ctx, n_keep):
        self.ctx = ctx
        return super().select(ctx, n_keep)


_GROUPS: dict = {}


def _forward(case, clip_dir):
    """One forward under apply_dop per (seed, family, size); other budgets are selected on its context."""
    key = (case["seed"], case["family"], tuple(case.get("image_size_hw", ())))
    if key not in _GROUPS:
        seed = case["seed"]
        model = _model(seed, case["family"] == "llava_next")
        if case["family"] == "llava":
            inputs = G.llava_inputs(model, G.SIDE * G.SIDE, G.pixel_values(seed, 1))
        else:
            h, w = case["image_size_hw"]
            pixels = G.pixel_values(seed, 5, pad_rows=G.next_pad_rows(h, w) if h != w else None)
            inputs = G.llava_inputs(model, llava_next_layout(model, (h, w)).crop.numel(), pixels, (h, w))
        reducer = _Spy(clip_model=clip_dir)
        with prompt_text(case["text"] + SUFFIX[seed]), apply_dop(model, DOPPolicy(1, 1, 10), reducer=reducer), torch.no_grad():
            model(**inputs)
        _GROUPS[key] = model, inputs, reducer
    return _GROUPS[key]


def _run(case, clip_dirs):
    model, inputs, reducer = _forward(case, clip_dirs[case["seed"]])
    n_v = case["T"] * (1 if case["family"] == "llava" else 5)
    with prompt_text(case["text"] + SUFFIX[case["seed"]]):
        assert reducer.instruction_text(reducer.ctx, reducer.ctx.images[0]) == case["text"]
        sel = reducer.select(reducer.ctx, n_v)
    check_selection(reducer, reducer.ctx, n_v, sel)
    return model, inputs, sel[0], reported_indices(sel[0])


def test_clip_text_tower_input(clip_dirs):
    """Our CLIP tokenisation of the bare question = the official `text_tokenizer(text=texts)` ids (one 77-token
    segment, or several for the long multiple-choice question)."""
    for case in CASES:
        ids = load_clip_text(clip_dirs[case["seed"]]).tokenizer(text=[case["text"]])["input_ids"][0]
        assert list(ids) == case["text_ids"]
    assert max(len(c["text_ids"]) for c in CASES) > 77


@pytest.mark.parametrize("case", [c for c in CASES if c["family"] == "llava"], ids=_id)
def test_llava15_equals_official(case, clip_dirs):
    _, _, _, kept = _run(case, clip_dirs)
    assert kept.tolist() == case["packed"] == case["kept"][0]


@pytest.mark.parametrize("case", [c for c in CASES if c["family"] == "llava_next"], ids=_id)
def test_llava_next_official_packing(case, clip_dirs):
    model, inputs, sel, kept = _run(case, clip_dirs)
    assert isinstance(sel, ReplacedSpan) and sel.embeds.shape[0] == 5 * case["T"]
    codes = torch.tensor(case["packed"])
    with torch.no_grad():  # independent reference rows: tower hidden_states[-2] through the projector
        hs = model.model.vision_tower(inputs["pixel_values"][0], output_hidden_states=True).hidden_states[-2]
        proj = model.model.multi_modal_projector(hs[:, 1:]).flatten(0, 1)
    torch.testing.assert_close(sel.embeds, proj[codes], atol=1e-5, rtol=0)
    lay = llava_next_layout(model, case["image_size_hw"])
    slot = {int(c) * 576 + int(p): i for i, (c, p) in enumerate(zip(lay.crop, lay.patch)) if c >= 0}
    assert kept.tolist() == [slot.get(int(c), -1) for c in codes]
