"""DART against its official selection on golden inputs (tests/golden/dart/README.md): on a 16-layer LLaVA-1.5-
shaped model, through `apply_dop`, the kept visual tokens after layer K-1 equal the official ones exactly for 3
seeds x 5 settings (K=2 with max_num_trunction 64 / 128 / 192, K=1 with 32, and the official LLaVA-NeXT cap at
640), the kept tokens keep their original positions, and the final logits equal the official forward's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from golden_llava import SEEDS, SameContext, golden_inputs, golden_model, one_thread  # noqa: F401 (tests/golden_llava.py)
from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.baselines.dart import DART, dart_retained

GOLDEN = json.loads((Path(__file__).parent / "golden" / "dart" / "dart_golden.json").read_text())


def test_fixture_covers_the_official_settings():
    cases = GOLDEN["cases"]
    assert {c["seed"] for c in cases} == set(SEEDS)
    assert {(c["K"], c["max_num_trunction"], c["path"]) for c in cases} == {
        (2, 64, "llava"), (2, 128, "llava"), (2, 192, "llava"), (1, 32, "llava"), (2, 640, "next")
    }
    for c in cases:  # "128" keeps 4 + 8 x 16 = 132; the NeXT cap keeps 4 + 8 x (572 // 8) = 572
        assert len(c["kept"]) == dart_retained(c["max_num_trunction"], 576)


@pytest.mark.parametrize("seed", SEEDS)
def test_dart_matches_official(seed):
    model, inputs = golden_model(seed), golden_inputs(seed)
    n = inputs["input_ids"].shape[1]
    for k in (1, 2):
        cases = [c for c in GOLDEN["cases"] if c["seed"] == seed and c["K"] == k]
        pruners = {c["max_num_trunction"]: DART(k=k, keep=c["max_num_trunction"]) for c in cases}
        shown = cases[seed % len(cases)]  # the one the model runs (its logits are compared); all are selected
        spy = SameContext(pruners[shown["max_num_trunction"]], pruners)
        with apply_dop(model, DOPPolicy.full(16), token_pruner=spy) as handle, torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[0, -1]
        for c in cases:
            assert spy.kept[c["max_num_trunction"]] == [c["kept"]], (seed, k, c["max_num_trunction"])
        # no renumbering: layer K runs the kept tokens at their original positions (official keep_indexs)
        survivors = torch.nonzero(~spy.drops[shown["max_num_trunction"]][0][0]).flatten().tolist()
        assert survivors == shown["positions"]
        assert handle.last_layer_tokens[k] == (len(survivors),) * 2 and handle.last_layer_tokens[k - 1] == (n, n)
        torch.testing.assert_close(logits, torch.tensor(shown["logits"]), atol=1e-4, rtol=1e-4)
