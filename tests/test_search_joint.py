"""Exact savings of the search (issue 19, 2b) and the joint-divergence engine (F.3 grid, Table 7), on tiny
models: every shortcut against the plain procedure, and the executor options it rests on."""
from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import pytest
import torch

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.arch import ArchSpec
from vlmeval_dop.executor import FrozenTokens
from vlmeval_dop.flops import layer_flops
from vlmeval_dop.search.joint import JointRun, joint_batch, joint_naive, merge_joint, policy_key
from vlmeval_dop.search.profile import (
    ProfileCounter, capture_full_run, profile_batch, profile_naive, system_mask, unpruned_prefix,
)
from vlmeval_dop.tiny import load_tiny, tiny_image, tiny_inputs

QUESTIONS = ["What is shown?", "Which color is the large square in the picture?"]


def _batch(family, processor, n=2):
    return tiny_inputs(family, processor, QUESTIONS[:n], [tiny_image(i + 1) for i in range(n)])


@pytest.mark.parametrize("family", ["llava15", "qwen25vl", "internvl3", "llavanext"])
def test_joint_divergences_equal_one_full_run_per_policy(family):
    """Prefix sharing across policies of a set (reduced run per n_v, (L, d_P, n_v) per MLP depth, suffixes),
    frozen pre-image tokens and the last-position-only last layer give the plain runs' divergences (left
    padded batch of 2), for dominated policies, d_A = 0 and d_A = L too, with much less work."""
    model, processor = load_tiny(family)
    inputs = _batch(family, processor)
    n_vis = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    policies = [DOPPolicy(a, p, n) for a, p, n in itertools.product([4, 3, 1, 0], [4, 2, 0], [n_vis // 2, 3])]
    ours_c, naive_c = ProfileCounter(), ProfileCounter()
    ours = joint_batch(model, inputs, policies, "uniform", ours_c)
    naive = joint_naive(model, inputs, policies, "uniform", naive_c)
    for p in policies:
        torch.testing.assert_close(ours[p], naive[p], atol=1e-6, rtol=0)
    assert float(ours[DOPPolicy(0, 0, 3)].min()) > 0  # real divergences
    torch.testing.assert_close(ours[DOPPolicy(3, 4, 3)], ours[DOPPolicy(3, 2, 3)], atol=0, rtol=0)  # same run
    assert ours_c.layer_equivalents < naive_c.layer_equivalents and ours_c.layer_forwards < naive_c.layer_forwards


@pytest.mark.parametrize("family", ["llava15", "qwen25vl", "qwen2vl", "internvl35", "llavaov", "qwen3vl", "smolvlm"])
def test_system_token_curves_equal_naive(family):
    """Every curve, Eq. 14's D_A_sys, D_P_sys included, equals the paper's procedure on the families beyond
    the paper too (Qwen3-VL's DeepStack, SmolVLM's tile runs): prefix sharing, the D_P layer replay, frozen
    pre-image tokens and the last-position-only last layer hold there."""
    model, processor = load_tiny(family)
    inputs = _batch(family, processor)
    depths, visual = [3, 2, 1, 0], [8, 2]
    ours = profile_batch(model, inputs, depths, visual, "uniform", system=True)
    naive = profile_naive(model, inputs, depths, visual, "uniform", system=True)
    assert set(ours) == {"D_A", "D_P", "D_v", "D_A_sys", "D_P_sys"}
    for curve in ours:
        torch.testing.assert_close(ours[curve], naive[curve], atol=1e-6, rtol=0)
    assert float(ours["D_A_sys"][:, -1].min()) > 0


def test_unpruned_prefix_per_group():
    L = 8
    assert unpruned_prefix(DOPPolicy(5, 8, None), L) == 5  # layer 4 keys/values only: replayable
    assert unpruned_prefix(DOPPolicy(8, 3, None), L) == 3
    assert unpruned_prefix(DOPPolicy(5, 2, None), L) == 2
    assert unpruned_prefix(DOPPolicy(8, 8, 10), L) == 0
    assert unpruned_prefix(DOPPolicy(8, 8, None, 4, 8), L) == 4
    assert unpruned_prefix(DOPPolicy(6, 8, None, 8, 2), L) == 2


def test_run_decoder_options_exact_and_counted():
    """run_decoder(frozen=, last_position_only=, check_replay=) on a padded batch: same logits as the plain
    decoder run; last_sample_layer_work says what ran (last layer: one query, all keys)."""
    model, processor = load_tiny("llava15")
    inputs = _batch("llava15", processor)
    L = 4
    B, N = inputs["input_ids"].shape
    full = capture_full_run(model, inputs, mid_layers=[1], frozen=True)
    assert full.frozen is not None and 1 in full.mids
    sys_counts = system_mask(model, inputs["input_ids"], inputs["attention_mask"]).sum(1).tolist()
    assert full.frozen.counts == sys_counts and min(sys_counts) > 0
    pol = DOPPolicy(L, L, 8)
    with apply_dop(model, pol, reducer="uniform") as h, torch.no_grad():
        plain = h.run_decoder(full.decoder_kwargs, inputs["input_ids"])
        plain_work = h.last_sample_layer_work
        fast = h.run_decoder(full.decoder_kwargs, inputs["input_ids"], frozen=full.frozen, last_position_only=True)
        fast_work = h.last_sample_layer_work
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    kept = [q for q, _, _, _ in plain_work[0]]  # tokens in every layer under (L, L, 8), padding included
    for b in range(B):
        assert fast_work[-1][b] == (1, kept[b] - sys_counts[b], kept[b], 1)  # last layer: the last position
        assert fast_work[0][b] == (kept[b] - sys_counts[b],) * 2 + (kept[b], kept[b] - sys_counts[b])
    # a pruned layer is refused as replay unless the caller vouches for it
    with apply_dop(model, DOPPolicy(L, 1, None)) as h, torch.no_grad(), pytest.raises(ValueError, match="pruned"):
        h.run_decoder(full.decoder_kwargs, inputs["input_ids"], replay={i: full.layer_outputs[i] for i in range(2)})
    bad = FrozenTokens(torch.full((B, 1), N - 1), torch.ones(B, 1, dtype=torch.bool), full.frozen.kv)
    with apply_dop(model, pol, reducer="uniform") as h, torch.no_grad(), pytest.raises(ValueError, match="frozen"):
        h.run_decoder(full.decoder_kwargs, inputs["input_ids"], frozen=bad)


def test_counter_weighs_queries_keys_and_frozen_keys():
    spec = ArchSpec.from_model(load_tiny("llava15")[0])
    c = ProfileCounter()
    c.add_work(spec, [[(3, 10, 14, 2)], [(0, 0, 0, 0)]], 20)
    h, q, kv, m = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.intermediate_size
    by_hand = 4 * 3 * h * q + 4 * 10 * h * kv + 4 * 3 * 14 * q + 6 * 2 * h * m
    assert c.layer_forwards == 1 and c.layer_equivalents == pytest.approx(by_hand / layer_flops(spec, 20, 20))


def test_joint_run_resumes_and_shards(tmp_path):
    """JointRun: per-sample records keyed like the profile's; a second policy set adds only its new
    policies; two ranks merge to the single-process values."""
    model, processor = load_tiny("llava15")
    items = [([f"s{i}"], tiny_inputs("llava15", processor, [QUESTIONS[i % 2]], [tiny_image(i)])) for i in range(3)]
    first = [DOPPolicy(2, 1, 8), DOPPolicy(4, 0, 8)]
    more = first + [DOPPolicy(3, 2, 16)]
    one = JointRun(tmp_path / "one", "uniform")
    assert one.run(model, items, first) == 6
    again = JointRun(tmp_path / "one", "uniform")
    assert again.run(model, items, more) == 3 and again.counter.model_runs > 0
    assert JointRun(tmp_path / "one", "uniform").run(model, items, more) == 0
    for rank in range(2):
        r = JointRun(tmp_path / "two", "uniform", rank=rank, world_size=2)
        r.run(model, list(r.shard(items)), more)
    keys = JointRun(tmp_path / "one", "uniform").expected_keys([f"s{i}" for i in range(3)])
    a, b = merge_joint(tmp_path / "one", more, keys), merge_joint(tmp_path / "two", more, keys)
    assert a["ids"] == b["ids"] == ["s0", "s1", "s2"]
    for k in map(policy_key, more):
        assert a["mean"][k] == pytest.approx(b["mean"][k], abs=1e-9)
    with pytest.raises(RuntimeError, match="missing"):
        merge_joint(tmp_path / "one", more + [DOPPolicy(1, 0, 4)], keys)
    # a line torn by a kill is dropped and its values computed again; a record of other settings is not reused
    path = tmp_path / "one" / "joint.rank0.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    torn = JointRun(tmp_path / "one", "uniform")
    assert torn.run(model, items, more) == 1 and torn.torn == 1  # the torn line held one sample's new policy
    other = JointRun(tmp_path / "one", "cdpruner-like", sample_keys=None)  # another reducer: another key
    assert other.done_policies() == {}
    keyed = JointRun(tmp_path / "one", "uniform", sample_keys={"s0": "new weights", "s1": "x", "s2": "y"})
    assert keyed.run(model, items, first) == 6 and keyed.stale > 0  # model/data changed: recomputed


def test_profiling_cost_at_llava15_7b_shapes_is_at_most_176():
    """The issue's measurement (benchmarks/search_cost.py --narrow: real depth and token counts, 64-wide
    layers, every layer weighed by LLaVA-1.5-7B's shapes): <= 176 layer-equivalents per sample (192 before)."""
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import search_cost
    finally:
        sys.path.remove(str(root / "benchmarks"))
    from io import StringIO
    from contextlib import redirect_stdout

    out = StringIO()
    with redirect_stdout(out):
        search_cost.main(["--narrow", "--samples", "1", "--batch", "1", "--model", "llava15_7b", "--layers", "32",
                          "--visual-tokens", "576", "--text-tokens", "135", "--skip-naive"])
    equivalents = float(re.search(r"([\d.]+) layer-equivalents", out.getvalue()).group(1))
    assert equivalents <= 176, out.getvalue()
