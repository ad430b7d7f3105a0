"""FastV against the official inplace `LlamaModel.forward` on golden inputs (tests/golden/fastv/README.md): on a
16-layer LLaVA-1.5-shaped model, through `apply_dop`, the visual tokens kept after layer K-1 = 1 equal the
official ones for 3 seeds x keep 288 / 144 / 64, at their original positions, with the official logits; and
with `per_step=True` greedy generation without a cache re-ranks at every token exactly as the official
evaluation does (same tokens, same kept set at every step), which an independent loop (pruned forward on the
growing sequence, argmax) reproduces too. In float16 too: the official code run on the float16 model (fixture
`fastv_golden_fp16.json`) keeps the same sets at the same positions, with the same logits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from golden_llava import SEEDS, SameContext, golden_inputs, golden_model, one_thread  # noqa: F401 (tests/golden_llava.py)
from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.baselines.fastv import FastV

GOLDEN = json.loads((Path(__file__).parent / "golden" / "fastv" / "fastv_golden.json").read_text())
GOLDEN_FP16 = json.loads((Path(__file__).parent / "golden" / "fastv" / "fastv_golden_fp16.json").read_text())
K = GOLDEN["K"]


@pytest.fixture(scope="module", params=SEEDS)
def seeded(request):
    seed = request.param
    return seed, golden_model(seed), golden_inputs(seed), [c for c in GOLDEN["cases"] if c["seed"] == seed]


def test_fixture_covers_the_official_settings():
    assert K == 2 and GOLDEN["sys_length"] == 35 and GOLDEN["image_token_length"] == 576
    assert {(c["seed"], c["rank"]) for c in GOLDEN["cases"]} == {(s, r) for s in SEEDS for r in (288, 144, 64)}


def test_fastv_matches_official(seeded):
    seed, model, inputs, cases = seeded
    pruners = {c["rank"]: FastV(k=K, keep=c["rank"]) for c in cases}
    shown = cases[seed % len(cases)]  # the model runs this one (logits compared); every budget is selected
    spy = SameContext(pruners[shown["rank"]], pruners)
    with apply_dop(model, DOPPolicy.full(16), token_pruner=spy) as handle, torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[0, -1]
    for c in cases:
        assert spy.kept[c["rank"]] == [c["kept"]], (seed, c["rank"])
    survivors = torch.nonzero(~spy.drops[shown["rank"]][0][0]).flatten().tolist()
    assert survivors == shown["positions"]  # original positions, as the official keep_indexs
    assert handle.last_layer_tokens[K][0] == len(survivors)
    torch.testing.assert_close(logits, torch.tensor(shown["logits"]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed", SEEDS)
def test_fastv_matches_official_in_float16(seed):
    """The official code on the float16 model (eager attention, as `output_attentions=True` runs it): scores,
    softmax, head mean and topk in float16, where exact ties are common at the cut (torch.topk's tie order is
    the official one only on the image window's scores in that dtype)."""
    model, inputs = golden_model(seed, "eager", torch.float16), golden_inputs(seed, torch.float16)
    cases = [c for c in GOLDEN_FP16["cases"] if c["seed"] == seed]
    assert GOLDEN_FP16["dtype"] == "float16" and [c["rank"] for c in cases] == [288, 144, 64]
    pruners = {c["rank"]: FastV(k=K, keep=c["rank"]) for c in cases}
    shown = cases[seed % len(cases)]
    spy = SameContext(pruners[shown["rank"]], pruners)
    with apply_dop(model, DOPPolicy.full(16), token_pruner=spy), torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[0, -1]
    for c in cases:
        assert spy.kept[c["rank"]] == [c["kept"]], (seed, c["rank"])
    assert torch.nonzero(~spy.drops[shown["rank"]][0][0]).flatten().tolist() == shown["positions"]
    torch.testing.assert_close(logits.float(), torch.tensor(shown["logits"]), atol=1e-5, rtol=0)


class _Ranks(FastV):
    """FastV that records the visual positions it keeps at each call."""

    def select(self, ctx):
        drop = super().select(ctx)
        self.kept = getattr(self, "kept", []) + [torch.nonzero(ctx.visual[0] & ~drop[0]).flatten().tolist()]
        return drop


def test_fastv_per_step_generation_is_the_official_evaluation(seeded):
    seed, model, inputs, cases = seeded
    case = next(c for c in cases if c["rank"] == 144)
    steps = len(case["per_step"])
    n = inputs["input_ids"].shape[1]
    # the product path: generate without a KV cache, the pruner re-ranks at every step
    ours = _Ranks(k=K, keep=144, per_step=True)
    with apply_dop(model, DOPPolicy.full(16), token_pruner=ours), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, use_cache=False)
    tokens = out[0, n:].tolist()
    # independent reference: the pruned forward on the growing sequence, argmax
    ref, ids = _Ranks(k=K, keep=144), inputs["input_ids"]
    ref_tokens = []
    with apply_dop(model, DOPPolicy.full(16), token_pruner=ref), torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], use_cache=False).logits[0, -1]
            ref_tokens.append(int(logits.argmax()))
            ids = torch.cat([ids, ids.new_tensor([[ref_tokens[-1]]])], dim=1)
    assert tokens == ref_tokens == [s["token"] for s in case["per_step"]]
    assert ours.kept == ref.kept == [s["kept"] for s in case["per_step"]]
    assert ours.kept[0] == case["kept"] and ours.kept[1] != ours.kept[0]  # the newest token re-ranks


def test_default_fastv_ranks_once_at_prefill():
    model, inputs = golden_model(0), golden_inputs(0)
    once = _Ranks(k=K, keep=144)
    with apply_dop(model, DOPPolicy.full(16), token_pruner=once), torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False)  # with the KV cache (the default)
    assert once.kept == [next(c for c in GOLDEN["cases"] if c["seed"] == 0 and c["rank"] == 144)["kept"]]
