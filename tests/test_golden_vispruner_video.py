"""VisPruner on Video-LLaVA videos against the official code (tests/golden/vispruner_video/): VisPruner's
`encode_images` run on a video's 8 frames as one batch of crops, and the same authors' Video-LLaVA path
(FasterVLM `encode_videos`: per-frame [CLS] attention of the video tower's feature layer, top-L per frame, patch
order, [CLS] rows dropped). Product path: the `VisPruner` reducer through `apply_dop` on a
VideoLlavaForConditionalGeneration around the same seeded tower, reading the executor's recording of the video
tower, its kept positions mapped back to (frame, patch)."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.reducers import ReducerError, check_selection
from vlmeval_dop.reducers.vispruner import VisPruner

import golden_video as GV  # tests/golden_video.py

FIXTURES = json.loads((Path(__file__).parent / "golden" / "vispruner_video" / "fixtures.json").read_text())
STRIDE = GV.SIDE * GV.SIDE + 1  # a frame's rows in HF's video span: [CLS], then its 256 patches


class _Spy(VisPruner):
    """The product reducer, keeping the context the executor built (to select other budgets on it)."""

    def select(self, ctx, n_keep):
        self.ctx = ctx
        return super().select(ctx, n_keep)


@functools.lru_cache(maxsize=None)
def _forward(seed: int, ties: bool, image_dtype: str, important_ratio: float = 0.5):
    """One forward under apply_dop with VisPruner (8 tokens per frame); the reducer keeps the executor's context."""
    model = GV.tiny_video_llava(seed, ties=ties)
    pixels = GV.frames(seed, tiles=4 if ties else None)
    if image_dtype == "float16":  # the official eval feeds float16 frames; its float32 tower sees them rounded
        pixels = pixels.half().float()
    inputs = GV.video_inputs(model, pixels)
    reducer = _Spy(important_ratio=important_ratio,
                   similarity_dtype=torch.float16 if image_dtype == "float16" else None)  # fmt: skip
    with apply_dop(model, DOPPolicy(1, 1, 8 * GV.FRAMES), reducer=reducer), torch.no_grad():
        model(**inputs)
    assert "video_capture" in reducer.ctx.cache  # the executor recorded the video tower during the forward
    return reducer


def _kept(reducer, per_frame: int) -> list[list[int]]:
    """Per frame, the kept patch indices of a selection of 8 x `per_frame` video tokens."""
    n = per_frame * GV.FRAMES
    (sel,) = reducer.select(reducer.ctx, n)
    check_selection(reducer, reducer.ctx, n, [sel])
    assert not bool((sel % STRIDE == 0).any())  # never a [CLS] row
    frames = [[] for _ in range(GV.FRAMES)]
    for pos in sel.tolist():
        frames[pos // STRIDE].append(pos % STRIDE - 1)
    return frames


def _id(c):
    return f"s{c['seed']}-T{c['T']}{'-ties' if c['ties'] else ''}-{c['image_dtype']}"


@pytest.mark.parametrize("case", [c for c in FIXTURES["vispruner_cases"] if "error" not in c], ids=_id)
def test_video_frames_equal_official_vispruner(case):
    got = _kept(_forward(case["seed"], case["ties"], case["image_dtype"]), case["T"])
    assert got == case["kept"]  # every frame: the official kept patches (patch order, as index_masks)


@pytest.mark.parametrize("case", [c for c in FIXTURES["vispruner_cases"] if "error" in c], ids=_id)
def test_where_the_official_code_fails(case):
    """T = 8 per frame: the official duplicate removal ends with r > |A| and raises; ours drops all of A and
    keeps T patches per frame."""
    assert case["error"].startswith("RuntimeError")
    got = _kept(_forward(case["seed"], case["ties"], case["image_dtype"]), case["T"])
    assert [len(set(f)) for f in got] == [case["T"]] * GV.FRAMES


@pytest.mark.parametrize("case", FIXTURES["fastervlm_cases"], ids=lambda c: f"s{c['seed']}-L{c['L']}")
def test_all_important_equals_official_video_path(case):
    """important_ratio = 1 (attention only) is the authors' official Video-LLaVA pruning (FasterVLM
    `encode_videos`): the same frames, [CLS] attention source, per-frame budget and order."""
    got = _kept(_forward(case["seed"], False, "float32", important_ratio=1.0), case["L"])
    assert got == case["fastervlm"]


def test_uneven_budgets_and_limits():
    """n_v not a multiple of the frames: the first frames keep one more (as LLaVA-NeXT's crop budgets); all
    tokens = the stock span ([CLS] rows included); between all patches and all tokens: every patch and [CLS]
    rows spread over the frames; more than the span: refused with the range."""
    reducer = _forward(0, False, "float32")
    (sel,) = reducer.select(reducer.ctx, 8 * 16 + 3)
    per_frame = torch.bincount(sel // STRIDE, minlength=GV.FRAMES).tolist()
    assert per_frame == [17, 17, 17] + [16] * 5
    (everything,) = reducer.select(reducer.ctx, GV.FRAMES * STRIDE)
    assert torch.equal(everything, torch.arange(GV.FRAMES * STRIDE))
    (sel,) = reducer.select(reducer.ctx, 2048 + 2)
    check_selection(reducer, reducer.ctx, 2050, [sel])
    cls_kept = sel[sel % STRIDE == 0] // STRIDE
    assert cls_kept.tolist() == [2, 6] and int((sel % STRIDE != 0).sum()) == 2048  # bin centres of 8 frames
    with pytest.raises(ReducerError, match="valid: 0..2056"):
        reducer.select(reducer.ctx, GV.FRAMES * STRIDE + 1)


def test_kept_tokens_reach_the_decoder():
    """Through the executor and generate(): the decoder's first layer sees the text plus exactly the kept video
    tokens, the ones the same selection gives (generate() encodes the video before the first forward)."""
    model = GV.tiny_video_llava(1)
    inputs = GV.video_inputs(model, GV.frames(1))
    reducer = _forward(1, False, "float32")
    want = reducer.select(reducer.ctx, 8 * 32)[0]
    with apply_dop(model, DOPPolicy(1, 1, 8 * 32), reducer="vispruner") as handle, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    n_text = int((inputs["input_ids"] != model.config.video_token_id).sum())
    assert handle.last_kept[0].tolist() == want.tolist()
    assert handle.last_layer_tokens[0][0] == n_text + 8 * 32
