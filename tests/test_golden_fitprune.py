"""FitPrune against the official code on golden inputs (tests/golden/fitprune/README.md), on a 16-layer
LLaVA-1.5-shaped model through `apply_dop`:

* inference: with the official delete schemes of reduction ratios 50 / 70 / 90 % (their first 16 layers,
  converted by `FitPruneSchedule.from_official_scheme`), the visual tokens dropped at every layer equal the
  official ones for 3 seeds, and so do the final logits (original positions, no renumbering);
* fitting rule: with the attention sums of the unpruned run as reference and alpha 0.02 / 0.05 / 0.1, the
  tokens the per-layer rule (`fit_deletions`, run by the fitting recorder) drops at every layer equal the
  official `fit_model`'s for each of 3 calibration samples;
* inference in float16: the official code on the float16 model (fixture `fitprune_golden_fp16.json`) drops
  the same tokens at every layer, with the same logits.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from golden_llava import SEEDS, golden_inputs, golden_model, one_thread  # noqa: F401 (tests/golden_llava.py)
from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.baselines.fitprune import FitPrune, FitPruneSchedule, _Recorder, _run

GOLDEN = json.loads((Path(__file__).parent / "golden" / "fitprune" / "fitprune_golden.json").read_text())
GOLDEN_FP16 = json.loads((Path(__file__).parent / "golden" / "fitprune" / "fitprune_golden_fp16.json").read_text())
L = GOLDEN["num_layers"]


class _Dropped:
    """Mixin: record, per (calibration batch, layer), the visual positions of sample 0 the pruner drops."""

    def select(self, ctx):
        drop = super().select(ctx)
        self.dropped[(getattr(self, "batch", 0), ctx.layer_idx)] = torch.nonzero(ctx.visual[0] & drop[0]).flatten().tolist()
        return drop


class _FitPrune(_Dropped, FitPrune):
    dropped: dict


class _Fitting(_Dropped, _Recorder):
    dropped: dict


def test_fixture_covers_the_official_settings():
    assert L == 16 and GOLDEN["sys_length"] == 35 and GOLDEN["image_token_length"] == 576
    assert {(c["seed"], c["reduction_ratio"]) for c in GOLDEN["inference"]} == {(s, r) for s in SEEDS for r in (50, 70, 90)}
    assert set(GOLDEN["fitting"]) == {"0.02", "0.05", "0.1"}


@pytest.mark.parametrize("seed", SEEDS)
def test_fitprune_inference_matches_official(seed):
    model, inputs = golden_model(seed), golden_inputs(seed)
    for case in (c for c in GOLDEN["inference"] if c["seed"] == seed):
        schedule = FitPruneSchedule.from_official_scheme(dict(enumerate(case["delete_scheme"])), n_visual=576)
        pruner = _FitPrune(schedule)
        pruner.dropped = {}
        with apply_dop(model, DOPPolicy.full(L), token_pruner=pruner) as handle, torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[0, -1]
        for layer in range(L - 1):  # official deletions inside layer l leave layer l+1 on, as ours after layer l
            assert pruner.dropped.get((0, layer), []) == case["dropped"][layer], (seed, case["reduction_ratio"], layer)
        n_text = inputs["input_ids"].shape[1] - 576
        assert [a for a, _ in handle.last_layer_tokens] == [n_text + v for v in schedule.kept]
        torch.testing.assert_close(logits, torch.tensor(case["logits"]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed", SEEDS)
def test_fitprune_inference_matches_official_in_float16(seed):
    """The official inference on the float16 model: head-max map, self and cross sums, their product and its
    sort in float16, where the float32 maps of the float32 path would rank near-ties differently."""
    model, inputs = golden_model(seed, "eager", torch.float16), golden_inputs(seed, torch.float16)
    cases = [c for c in GOLDEN_FP16["inference"] if c["seed"] == seed]
    assert GOLDEN_FP16["dtype"] == "float16" and [c["reduction_ratio"] for c in cases] == [50, 70, 90]
    for case in cases:
        pruner = _FitPrune(FitPruneSchedule.from_official_scheme(dict(enumerate(case["delete_scheme"])), n_visual=576))
        pruner.dropped = {}
        with apply_dop(model, DOPPolicy.full(L), token_pruner=pruner), torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[0, -1]
        for layer in range(L - 1):
            assert pruner.dropped.get((0, layer), []) == case["dropped"][layer], (seed, case["reduction_ratio"], layer)
        torch.testing.assert_close(logits.float(), torch.tensor(case["logits"]), atol=1e-5, rtol=0)


def test_fitprune_fitting_rule_matches_official():
    model = golden_model(0)  # the official fit runs one model over a calibration set: inputs of seeds 0, 1, 2
    calibration = [golden_inputs(s) for s in SEEDS]
    reference = _Recorder(L)
    _run(model, calibration, reference)
    for alpha, official in GOLDEN["fitting"].items():
        rule = _Fitting(L, float(alpha), reference.records)
        rule.dropped = {}
        _run(model, calibration, rule)
        for sample in range(len(SEEDS)):
            for layer in range(L - 1):
                got = rule.dropped[(sample, layer)]
                assert got == official["dropped"][str(sample)][layer], (alpha, sample, layer)
