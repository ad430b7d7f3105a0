"""Divergence profiling with prefix sharing vs the paper's naive 3I+1 runs (tiny models)."""
from __future__ import annotations

import json

import pytest
import torch

from vlmeval_dop.search.profile import ProfileCounter, ProfileRun, merge_samples, profile_batch, profile_naive
from vlmeval_dop.tiny import load_tiny, tiny_image, tiny_inputs

DEPTHS = [3, 2, 1, 0]
QUESTIONS = ["What is shown?", "Which color is the large square in the picture?", "Count?", "Where?"]


@pytest.mark.parametrize("family", ["llava15", "qwen25vl", "internvl3", "llavanext", "gemma3"])
def test_prefix_sharing_equals_naive_with_fewer_forwards(family):
    model, processor = load_tiny(family)
    inputs = tiny_inputs(family, processor, QUESTIONS[:2], [tiny_image(1), tiny_image(2)])
    n_vis = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    visual = [n_vis // 2, n_vis // 4, n_vis // 8, 2]
    shared_c, naive_c = ProfileCounter(), ProfileCounter()
    shared = profile_batch(model, inputs, DEPTHS, visual, "uniform", shared_c)
    naive = profile_naive(model, inputs, DEPTHS, visual, "uniform", naive_c)
    for curve in shared:
        torch.testing.assert_close(shared[curve], naive[curve], atol=1e-6, rtol=0)
    # divergences are real: pruning everything visual changes the output distribution
    assert float(shared["D_A"][:, -1].min()) > 0
    assert naive_c.model_runs == shared_c.model_runs == 2 * (1 + 3 * 4)  # per sample
    assert shared_c.layer_forwards < naive_c.layer_forwards
    assert shared_c.layer_equivalents < naive_c.layer_equivalents
    # prefix sharing skips exactly the unpruned prefixes (sum of depths, for D_A and D_P) and, at a D_P point d,
    # layer d itself (known from the unpruned run), per sample
    assert naive_c.layer_forwards - shared_c.layer_forwards == 2 * (2 * sum(DEPTHS) + len(DEPTHS))


def _batches(family, processor, n):
    for i in range(n):
        yield [f"s{i}"], tiny_inputs(family, processor, [QUESTIONS[i % 4]], [tiny_image(i)])


def test_resume_gives_the_same_profile(tmp_path):
    family = "llava15"
    model, processor = load_tiny(family)
    visual = [32, 16, 8, 4]
    full = ProfileRun(tmp_path / "full", DEPTHS, visual, "uniform")
    assert full.run(model, _batches(family, processor, 4)) == 4

    part = ProfileRun(tmp_path / "part", DEPTHS, visual, "uniform")
    assert part.run(model, _batches(family, processor, 2)) == 2  # "interrupted" after two samples
    resumed = ProfileRun(tmp_path / "part", DEPTHS, visual, "uniform")
    assert resumed.run(model, _batches(family, processor, 4)) == 2  # only the missing ones
    assert resumed.counter.model_runs == 2 * (1 + 12)
    a = json.dumps(merge_samples(tmp_path / "full"), sort_keys=True)
    b = json.dumps(merge_samples(tmp_path / "part"), sort_keys=True)
    assert a == b
    # finished work is never redone
    again = ProfileRun(tmp_path / "part", DEPTHS, visual, "uniform")
    assert again.run(model, _batches(family, processor, 4)) == 0 and again.counter.model_runs == 0


def test_sharded_ranks_merge_to_the_single_process_profile(tmp_path):
    family = "llava15"
    model, processor = load_tiny(family)
    visual = [32, 8]
    items = list(_batches(family, processor, 3))
    single = ProfileRun(tmp_path / "one", DEPTHS, visual, "uniform")
    single.run(model, items)
    for rank in range(2):
        r = ProfileRun(tmp_path / "two", DEPTHS, visual, "uniform", rank=rank, world_size=2)
        r.run(model, r.shard(items))
    assert merge_samples(tmp_path / "one") == merge_samples(tmp_path / "two")


def test_profile_feeds_the_optimizer(tmp_path):
    """Tiny end to end: profile -> DivergenceProfile JSON -> Eq. 7 policy under a budget."""
    from vlmeval_dop.arch import ArchSpec
    from vlmeval_dop.flops import policy_tflops
    from vlmeval_dop.search import DivergenceProfile, optimize
    from vlmeval_dop.search.profile import build_profile

    model, processor = load_tiny("llava15")
    visual = [48, 32, 16, 8]
    run = ProfileRun(tmp_path, DEPTHS, visual, "uniform")
    run.run(model, _batches("llava15", processor, 3))
    prof = build_profile(tmp_path, model="tiny_llava15", reducer="uniform", dataset="tiny", seed=0,
                         num_layers=4, num_visual=64, depths=DEPTHS, visual=visual)
    again = DivergenceProfile.from_json(prof.to_json())
    assert again.to_json() == prof.to_json() and again.n_samples == 3
    spec = ArchSpec.from_model(model, visual_tokens=64)
    result = optimize(again, spec, 0.5, text_tokens=13, alpha=1.0)
    p = result.policy
    assert p.d_P <= p.d_A and p.n_v >= result.n_min
    assert policy_tflops(spec, p, 13)["ratio"] <= 0.5 + 1e-12
