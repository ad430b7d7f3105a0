"""The search math: Eq. 9-10 divergence, Eq. 8 interpolation, Eq. 7 enumeration, Eq. 12 transfer, extensions.

Fast and offline: no model runs; random curves stand in for measured ones.
"""
from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
import torch
import yaml
from scipy import stats

from vlmeval_dop.arch import ArchSpec
from vlmeval_dop.flops import BudgetError, budget_floor, full_flops, policy_flops
from vlmeval_dop.models_config import CONFIG_DIR, get_model
from vlmeval_dop.policy import DOPPolicy
from vlmeval_dop.search import (
    Curve,
    DivergenceProfile,
    DivergenceTables,
    InfeasibleBudgetError,
    PolicySearch,
    TopKReference,
    accuracy_drop,
    additive_divergence,
    brute_force_optimize,
    brute_force_optimize_with_system,
    budget_for_uniform_tokens,
    closed_form_flops,
    interpolate,
    joint_grid_search,
    optimize,
    optimize_for_model,
    optimize_with_system,
    profile_from_measurements,
    rescale_points,
    spearman,
    spearman_additive_vs_joint,
    table7_policies,
    topk_kl,
    transfer_profile,
    write_policy,
)

EPS = 1e-8
TINY = ArchSpec(family="llava", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=16,
                intermediate_size=176, visual_tokens=16)
TINY_GQA = ArchSpec(family="qwen2_5_vl", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=1, head_dim=16,
                    intermediate_size=176, visual_tokens=16, gqa=True)
TEXT = 5


# ------------------------------------------------------------------------------------------- Eq. 9-10
def test_topk_kl_hand_computed_with_zero_probabilities():
    # Row 0: the pruned model puts probability 0 on the original's 2nd most likely token.
    #   top-3 ids of p_org = [0, 1, 2]; p_org = [.5, .3, .2], p = [.2, 0, .8]; both sums are 1, so after adding
    #   eps both normalisers are 1 + 3 eps and the ratio is (p_org + eps) / (p + eps):
    #   KL = (.5+e)/(1+3e) ln((.5+e)/(.2+e)) + (.3+e)/(1+3e) ln((.3+e)/e) + (.2+e)/(1+3e) ln((.2+e)/(.8+e))
    #      ~ .5 * 0.916291 + .3 * 17.216708 + .2 * (-1.386294) = 0.458145 + 5.165012 - 0.277259 = 5.345899
    # Row 1: the original has only two non-zero tokens, so its 3rd top id (ties -> lowest id: 2) has p_org = 0.
    #   p_org = [.6, .4, 0], p = [.5, .5, 0]:
    #   KL = (.6+e)/(1+3e) ln((.6+e)/(.5+e)) + (.4+e)/(1+3e) ln((.4+e)/(.5+e)) + e/(1+3e) ln(e/e)
    #      ~ .6 * 0.182322 + .4 * (-0.223144) + 0 = 0.109393 - 0.089257 = 0.020136
    f64 = torch.float64  # float32 0.3 is not 0.3; the hand numbers assume exact decimals
    org = torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0], [0.6, 0.4, 0.0, 0.0, 0.0]], dtype=f64)
    pru = torch.tensor([[0.2, 0.0, 0.8, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0, 0.0]], dtype=f64)
    e, z = EPS, 1 + 3 * EPS
    row0 = ((.5 + e) / z * math.log((.5 + e) / (.2 + e)) + (.3 + e) / z * math.log((.3 + e) / e)
            + (.2 + e) / z * math.log((.2 + e) / (.8 + e)))
    row1 = (.6 + e) / z * math.log((.6 + e) / (.5 + e)) + (.4 + e) / z * math.log((.4 + e) / (.5 + e))
    res = topk_kl(org, pru, k=3)
    assert res.per_sample.dtype == torch.float64
    assert res.per_sample.tolist() == pytest.approx([row0, row1], rel=1e-12)
    assert row0 == pytest.approx(5.345899, abs=1e-6) and row1 == pytest.approx(0.020136, abs=1e-6)
    assert res.mean == pytest.approx((row0 + row1) / 2, rel=1e-12)
    ref = TopKReference.from_probs(org, k=3)
    assert ref.ids.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_topk_kl_identity_logits_and_eps_zero():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    assert topk_kl(logits, logits, logits=True).per_sample.tolist() == [0.0] * 4
    # logits path = softmax over the full vocabulary, then Eq. 9-10 (not a softmax over the top-k logits)
    other = logits + 0.3 * torch.randn(4, 50)
    a = topk_kl(logits, other, logits=True)
    b = topk_kl(torch.softmax(logits.double(), -1), torch.softmax(other.double(), -1))
    assert torch.equal(a.per_sample, b.per_sample)
    # independent numpy re-implementation with the default k = 10
    P, Q = torch.softmax(logits.double(), -1).numpy(), torch.softmax(other.double(), -1).numpy()
    for i in range(4):
        ids = np.argsort(-P[i], kind="stable")[:10]
        p = (P[i, ids] + EPS) / (P[i, ids] + EPS).sum()
        q = (Q[i, ids] + EPS) / (Q[i, ids] + EPS).sum()
        assert a.per_sample[i].item() == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-10)
    # eps = 0: a zero in the original contributes 0, a zero in the pruned distribution gives +inf
    org = torch.tensor([0.7, 0.3, 0.0])
    assert topk_kl(org, torch.tensor([0.7, 0.3, 0.0]), k=3, eps=0.0).mean == 0.0
    assert topk_kl(org, torch.tensor([1.0, 0.0, 0.0]), k=3, eps=0.0).mean == math.inf
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        topk_kl(org, torch.tensor([0.5, 0.5]), k=2)


def test_accuracy_drop():
    res = accuracy_drop([1, 1, 0, 1], [1, 0, 1, 0])
    assert res.per_sample.tolist() == [0.0, 1.0, -1.0, 1.0] and res.mean == 0.25


# ------------------------------------------------------------------------------------------- Eq. 8
def test_interpolation_matches_eq8_by_hand():
    prof = profile_from_measurements(
        model="m", reducer="r", dataset="d", n_samples=1, seed=0, L=10, N_v=16,
        D_A={8: 0.5, 0: 3.0, 4: 1.0}, D_P={0: 2.0, 10: 0.25}, D_v={4: 2.0, 8: 1.0},
    )
    D_A = prof.interpolate("D_A")
    # d=2 between 0 and 4: 3 + (2-0)/(4-0) (1-3) = 2; d=5: 1 + 1/4 (0.5-1) = 0.875;
    # d=9 between 8 and the implied full point (10, 0): 0.5 + 1/2 (0-0.5) = 0.25
    assert D_A[[0, 2, 4, 5, 8, 9, 10]].tolist() == [3.0, 2.0, 1.0, 0.875, 0.5, 0.25, 0.0]
    # a measured full point is used as measured (here 0.25, not the implied 0): d=5: 2 + 5/10 (0.25-2)
    assert prof.interpolate("D_P", [5, 10]).tolist() == [2.0 + 0.5 * (0.25 - 2.0), 0.25]
    # n_v: n=12: 1 + (12-8)/(16-8) (0-1) = 0.5; below the smallest sampled point: +inf or clamped
    assert prof.interpolate("D_v", [2, 4, 6, 12, 16]).tolist() == [math.inf, 2.0, 1.5, 0.5, 0.0]
    assert prof.interpolate("D_v", [2, 3], outside="clamp").tolist() == [2.0, 2.0]
    t = prof.tables()
    assert t.L == 10 and t.N_v == 16 and t.D_v.shape == (17,)
    # at sampled points the measured value comes back exactly (no t*(b-a) rounding)
    assert interpolate([0.0, 3.0], [0.1, 0.7], [0.0, 3.0]).tolist() == [0.1, 0.7]


# ------------------------------------------------------------------------------------------- Eq. 12
def test_transfer_reproduces_eq12_by_hand():
    src = profile_from_measurements(
        model="src", reducer="cdpruner", dataset="d", n_samples=4, seed=1, L=4, N_v=16,
        D_A={0: 4.0, 1: 2.0, 2: 1.0, 3: 0.5}, D_P={0: 1.0, 2: 0.5}, D_v={2: 3.0, 4: 2.0, 8: 1.0},
    )
    tgt = transfer_profile(src, L=8, N_v=20, model="tgt")
    # d' = d * 8/4: [0, 2, 4, 6] (+ implied (8, 0)); n' = n * 20/16: [2.5, 5, 10] (+ implied (20, 0))
    assert tgt.D_A.points == (0, 2, 4, 6) and tgt.D_A.values == (4.0, 2.0, 1.0, 0.5)
    assert tgt.D_v.points == (2.5, 5, 10) and rescale_points([2, 4, 8], 16, 20) == (2.5, 5.0, 10.0)
    D_A = tgt.interpolate("D_A")
    # d'=1: 4 + 1/2 (2-4) = 3; d'=3: 2 + 1/2 (1-2) = 1.5; d'=7: 0.5 + 1/2 (0-0.5) = 0.25
    assert D_A.tolist() == [4.0, 3.0, 2.0, 1.5, 1.0, 0.75, 0.5, 0.25, 0.0]
    D_P = tgt.interpolate("D_P")  # points [0, 4] (+ (8, 0)): d'=1: 1 + 1/4 (0.5-1) = 0.875; d'=6: 0.25
    assert D_P[[1, 6]].tolist() == [0.875, 0.25]
    D_v = tgt.interpolate("D_v")
    # n'=2 is below 2.5 -> inf; n'=4: 3 + (4-2.5)/(5-2.5) (2-3) = 2.4; n'=15: 1 + (15-10)/(20-10) (0-1) = 0.5
    assert D_v[2] == math.inf
    assert D_v[4] == pytest.approx(3.0 + 0.6 * (2.0 - 3.0), abs=1e-15)
    assert D_v[15] == 0.5
    assert tgt.L == 8 and tgt.N_v == 20 and tgt.meta["transfer"]["from_model"] == "src"


# ------------------------------------------------------------------------------------------- JSON
def test_profile_json_round_trip_is_byte_identical(tmp_path):
    prof = profile_from_measurements(
        model="llava15_7b", reducer="cdpruner", dataset="TextVQA_train", n_samples=3, seed=7, L=32, N_v=576,
        D_A={26: 0.1, 20: 1 / 3, 0: 2.5}, D_P={0: 1e-9, 26: 0.0}, D_v={16: 2.0, 512: 0.01},
        D_A_sys={0: 0.3}, D_P_sys={0: 0.2},
        per_sample={"D_A": {26: [0.1, 0.2, 0.0], 20: [1 / 3, 1 / 3, 1 / 3], 0: [2.5, 2.5, 2.5]}},
        meta={"b": [1, 2], "a": {"z": 1, "y": 0.5}},
    )
    prof = transfer_profile(prof, L=40, N_v=2880, model="llavanext_13b")  # fractional points too
    path = prof.save(tmp_path / "p.json")
    raw = path.read_bytes()
    back = DivergenceProfile.load(path)
    assert back == prof
    assert back.save(tmp_path / "q.json").read_bytes() == raw
    assert DivergenceProfile.from_json(raw.decode()).to_json().encode() == raw
    keys = list(yaml.safe_load(raw.decode()).keys())
    assert keys == sorted(keys)
    assert back.D_A.per_sample[0] == (2.5, 2.5, 2.5)  # rows follow the sorted points


# ------------------------------------------------------------------------------------------- FLOPs
def test_closed_form_flops_matches_per_layer_count():
    for spec in (TINY, TINY_GQA):
        L = spec.num_layers
        for a, p, n in itertools.product(range(L + 1), range(L + 1), (1, 7, 16)):
            assert closed_form_flops(spec, TEXT, a, p, n) == policy_flops(spec, DOPPolicy(a, p, n), TEXT)
        for a, p, sa, sp in itertools.product(range(L + 1), repeat=4):
            pol = DOPPolicy(a, p, 9, sa, sp)
            got = closed_form_flops(spec, TEXT, a, p, 9, system_tokens=3, d_A_sys=sa, d_P_sys=sp)
            assert got == policy_flops(spec, pol, TEXT, system_tokens=3)


# ------------------------------------------------------------------------------------------- Eq. 7
def _random_tables(rng, L, N_v, *, quantum=None, holes=False, system=False):
    def curve(size):
        v = rng.uniform(0, 2, size)
        if quantum:  # multiples of a power of two: sums are exact, so equal objectives really tie
            v = np.round(v / quantum) * quantum
        return v

    D_v = curve(N_v + 1)
    if holes:
        D_v[: rng.integers(1, N_v // 2)] = np.inf  # no estimate below the smallest sampled n_v
    extra = {"D_A_sys": curve(L + 1), "D_P_sys": curve(L + 1)} if system else {}
    return DivergenceTables(D_A=curve(L + 1), D_P=curve(L + 1), D_v=D_v, **extra)


BUDGETS = (0.2, 0.35, 0.5, 0.7, 0.9, 1.0)


@pytest.mark.parametrize("spec", [TINY, TINY_GQA], ids=["mha", "gqa"])
def test_enumeration_equals_brute_force(spec):
    rng = np.random.default_rng(1234)
    floor = budget_floor(spec, TEXT)
    full = full_flops(spec, TEXT)
    checked = 0
    for trial in range(12):
        tables = _random_tables(rng, 4, 16, quantum=0.25 if trial % 2 else None, holes=trial % 3 == 0)
        alpha = (0.0, 1.5, 1.25)[trial % 3]
        search = PolicySearch(tables, spec, text_tokens=TEXT, alpha=alpha)
        for budget in BUDGETS + (floor + 0.01,):
            try:
                ref, ref_obj = brute_force_optimize(tables, spec, budget, text_tokens=TEXT, alpha=alpha)
            except BudgetError:
                with pytest.raises(InfeasibleBudgetError):
                    search.solve(budget)
                continue
            res = search.solve(budget)
            assert res.policy == ref and res.objective == ref_obj, (trial, budget)
            pol = res.policy
            assert pol.effective(4) == pol  # never dominated
            assert policy_flops(spec, pol, TEXT) <= budget * full and res.paper_ratio <= budget
            # only the keys/values-only layer d_A-1 differs between the two counts
            assert res.executed_ratio == policy_flops(spec, pol, TEXT, executed=True) / full <= res.paper_ratio
            assert pol.n_v >= res.n_min and res.n_min == min(alpha * res.n_e, 16)
            assert res.objective == (tables.D_A[pol.d_A] + tables.D_P[pol.d_P]) + tables.D_v[pol.n_v]
            count = sum(
                1 for a, p, n in itertools.product(range(5), range(5), range(1, 17))
                if (p <= max(a - 1, 0) or a == 4) and n >= res.n_min and np.isfinite(tables.D_A[a] + tables.D_P[p] + tables.D_v[n])
                and policy_flops(spec, DOPPolicy(a, p, n), TEXT) <= budget * full
            )
            assert res.n_feasible == count
            checked += 1
    assert checked > 50


def test_dominated_policy_is_never_returned():
    # D_P keeps falling after d_A: the additive sum alone would prefer d_P > d_A.
    tables = DivergenceTables(D_A=np.array([5.0, 4.0, 0.1, 0.05, 0.0]), D_P=np.array([5.0, 4.0, 3.0, 0.5, 0.0]),
                              D_v=np.linspace(3.0, 0.0, 17))
    for budget in (0.45, 0.6, 0.8):
        res = optimize(tables, TINY, budget, text_tokens=TEXT, alpha=0.0)
        assert res.policy.effective(4) == res.policy
        assert res.policy == brute_force_optimize(tables, TINY, budget, text_tokens=TEXT, alpha=0.0)[0]


def test_infeasible_budget_names_the_smallest_feasible_one():
    rng = np.random.default_rng(7)
    tables = _random_tables(rng, 4, 16)
    floor = budget_floor(TINY, TEXT)
    search = PolicySearch(tables, TINY, text_tokens=TEXT, alpha=1.5, model="tiny")
    with pytest.raises(InfeasibleBudgetError, match=r"below the floor .*smallest feasible budget is") as info:
        search.solve(floor * 0.9)
    best = info.value.smallest_feasible_budget
    assert isinstance(info.value, BudgetError) and floor <= best <= floor + 1e-6
    search.solve(best)  # the named budget works

    # No estimate at depth 0 or 1 (sampling started at 2), n_v only from 6 up: the floor is not reachable.
    holes = DivergenceTables(D_A=np.array([np.inf, np.inf, 1.0, 0.5, 0.0]), D_P=np.array([np.inf, np.inf, 1.0, 0.5, 0.0]),
                             D_v=np.concatenate([np.full(6, np.inf), np.linspace(2.0, 0.0, 11)]))
    search = PolicySearch(holes, TINY, text_tokens=TEXT, alpha=1.5)
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible budget") as info:
        search.solve(floor + 0.01)
    best = info.value.smallest_feasible_budget
    res = search.solve(best)
    assert res.policy.d_A >= 2 and res.policy.n_v >= 6
    # independent check: scan budgets with the brute-force reference; nothing below `best` is feasible
    for tau in np.linspace(floor, best, 200)[:-1]:
        with pytest.raises(BudgetError):
            brute_force_optimize(holes, TINY, float(tau), text_tokens=TEXT, alpha=1.5)
    assert brute_force_optimize(holes, TINY, best, text_tokens=TEXT, alpha=1.5)[0] == res.policy

    # The literal C.4 rule (no cap at N_v) excludes everything at tau = 1: 1.5 * 16 > 16.
    with pytest.raises(InfeasibleBudgetError, match="n_min=24"):
        optimize(tables, TINY, 1.0, text_tokens=TEXT, alpha=1.5, clamp_n_min=False)
    with pytest.raises(BudgetError, match=r"\(0, 1\]"):
        optimize(tables, TINY, 1.2, text_tokens=TEXT, alpha=1.5)


def test_paper_models_budgets_and_llavanext13b_timing():
    src = profile_from_measurements(
        model="llava15_7b", reducer="cdpruner", dataset="TextVQA", n_samples=100, seed=0, L=32, N_v=576,
        D_A={26: 0.02, 20: 0.15, 14: 0.6, 8: 1.5, 4: 2.5, 0: 3.5}, D_P={26: 0.01, 20: 0.05, 14: 0.2, 8: 0.6, 4: 1.2, 0: 2.0},
        D_v={512: 0.01, 256: 0.08, 128: 0.25, 64: 0.6, 32: 1.1, 16: 1.8},
    )
    res = optimize_for_model(src, "llava15_7b")
    # the labels stand for 128 / 64 / 32 uniform tokens: n_min = 1.5 n_e = 192 / 96 / 48 as in the paper
    assert {k: (r.n_e, r.n_min) for k, r in res.items()} == {0.37: (128, 192.0), 0.28: (64, 96.0), 0.23: (32, 48.0)}
    for r in res.values():
        assert r.paper_ratio <= r.budget and r.policy.n_v >= r.n_min

    pm = get_model("llavanext_13b")
    from vlmeval_dop.search import transfer_to_model

    prof = transfer_to_model(src, "llavanext_13b")
    assert prof.D_A.points == (0, 5, 10, 17.5, 25, 32.5)  # Eq. 12: d * 40 / 32
    t0 = time.perf_counter()
    search = PolicySearch(prof, pm.arch, text_tokens=pm.text_tokens, alpha=pm.alpha)
    t1 = time.perf_counter()
    out = {lab: search.solve(budget_for_uniform_tokens(pm.arch, n, pm.text_tokens)) for lab, n in pm.budgets.items()}
    t2 = time.perf_counter()
    cells = 41 * 41 * 2880
    print(f"\nLLaVA-NeXT-13B enumeration ({cells:,} cells): grid {t1 - t0:.3f} s, "
          f"{len(out)} budgets {t2 - t1:.3f} s ({(t2 - t1) / len(out):.3f} s each)")
    for lab, r in out.items():
        print(f"  {lab}: {r.policy} ratio={r.paper_ratio:.4f} n_min={r.n_min:g} D_sum={r.objective:.4f}")
        assert r.paper_ratio <= r.budget and r.policy.d_P <= r.policy.d_A


# ------------------------------------------------------------------------------------------- Eq. 14
def test_system_token_search_equals_brute_force():
    spec = ArchSpec(family="llava", num_layers=3, hidden_size=32, num_heads=2, num_kv_heads=2, head_dim=16,
                    intermediate_size=88, visual_tokens=10)
    rng = np.random.default_rng(99)
    for trial in range(6):
        tables = _random_tables(rng, 3, 10, quantum=0.25 if trial % 2 else None, holes=trial == 2, system=True)
        alpha = 1.5 if trial % 3 else 0.0
        for budget in (0.25, 0.4, 0.6, 0.85, 1.0):
            try:
                ref, ref_obj = brute_force_optimize_with_system(tables, spec, budget, text_tokens=8, system_tokens=3, alpha=alpha)
            except BudgetError:
                with pytest.raises(InfeasibleBudgetError):
                    optimize_with_system(tables, spec, budget, text_tokens=8, system_tokens=3, alpha=alpha)
                continue
            res = optimize_with_system(tables, spec, budget, text_tokens=8, system_tokens=3, alpha=alpha)
            assert (res.policy, res.objective) == (ref, ref_obj), (trial, budget)
            assert res.policy.d_P <= res.policy.d_A and res.policy.d_P_sys <= res.policy.d_A_sys
            assert res.paper_ratio <= budget and res.n_feasible > 0


def test_accuracy_objective_uses_the_same_search():
    from vlmeval_dop.search import optimize_accuracy

    prof = profile_from_measurements(model="m", reducer="r", dataset="d", n_samples=10, seed=0, L=4, N_v=16,
                                     D_A={0: 0.5, 2: -0.1}, D_P={0: 0.3, 2: 0.1}, D_v={1: 0.6, 8: 0.2}, objective="acc_drop")
    res = optimize_accuracy(prof, TINY, 0.6, text_tokens=TEXT, alpha=1.0)
    assert res.policy == brute_force_optimize(prof.tables(), TINY, 0.6, text_tokens=TEXT, alpha=1.0)[0]
    with pytest.raises(ValueError, match="acc_drop"):
        optimize_accuracy(DivergenceProfile.from_json(
            prof.to_json().replace('"acc_drop"', '"kl"')), TINY, 0.6, text_tokens=TEXT, alpha=1.0)


# ------------------------------------------------------------------------------------------- F.3 / E.1
def test_joint_grid_search_picks_the_best_feasible_effective_policy():
    rng = np.random.default_rng(3)
    tables = _random_tables(rng, 4, 16)
    calls = []

    def joint(pol):  # additive + an interaction term, as a stand-in for model runs
        calls.append(pol)
        return float(additive_divergence(tables, [pol])[0] + 0.1 * (4 - pol.d_A) * (4 - pol.d_P))

    res = joint_grid_search(joint, TINY, 0.6, text_tokens=TEXT, alpha=1.0, depths=[1, 2, 3, 4], n_values=[4, 8, 12, 16])
    assert all(p.effective(4) == p for p in calls) and len(calls) == len(set(calls)) == res.n_evaluated
    full = full_flops(TINY, TEXT)
    feasible = [DOPPolicy(a, p, n).effective(4) for a, p, n in itertools.product([1, 2, 3, 4], [1, 2, 3, 4], [4, 8, 12, 16])
                if n >= res.n_min and policy_flops(TINY, DOPPolicy(a, p, n), TEXT) <= 0.6 * full]
    assert set(calls) == set(feasible)
    assert res.best_divergence == min(joint(p) for p in feasible)


def test_spearman_against_scipy_and_by_hand():
    x, y = [1, 2, 3, 4, 5], [5, 6, 7, 8, 7]  # scipy's documented example, with a tie in y
    assert spearman(x, y).rho == pytest.approx(stats.spearmanr(x, y).statistic, abs=0) == pytest.approx(0.8207826816681233)
    # no ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]).rho == pytest.approx(0.8, abs=1e-15)
    # additive vs joint over Table 7's S_d x S_d x S_v: a monotone transform of D_sum ranks identically
    tables = _random_tables(np.random.default_rng(5), 4, 16)
    pols = table7_policies([4, 2, 0], [16, 8, 4])
    assert len(pols) == 27
    d_sum = additive_divergence(tables, pols)
    res = spearman_additive_vs_joint(tables, pols, np.exp(d_sum))
    assert res.rho == pytest.approx(1.0) and res.n == 27


# ------------------------------------------------------------------------------------------- outputs
def test_write_policy_keeps_other_entries(tmp_path):
    original = (CONFIG_DIR / "policies.yaml").read_text()
    path = tmp_path / "policies.yaml"
    path.write_text(original)
    write_policy(path, "llava15_7b", 0.28, DOPPolicy(26, 19, 97))  # same value: byte-identical file
    assert path.read_text() == original
    write_policy(path, "llava15_7b", 0.28, DOPPolicy(27, 18, 99))
    write_policy(path, "llava15_7b", 0.5, DOPPolicy(30, 20, 300))
    write_policy(path, "tiny_llava", 0.3, DOPPolicy(3, 2, 9, 2, 1))
    new = yaml.safe_load(path.read_text())
    old = yaml.safe_load(original)
    assert new["llava15_7b"] == {0.5: [30, 20, 300], 0.37: [25, 19, 192], 0.28: [27, 18, 99], 0.23: [25, 16, 51]}
    assert new["tiny_llava"] == {0.3: [3, 2, 9, 2, 1]}
    assert {k: v for k, v in new.items() if k not in ("llava15_7b", "tiny_llava")} == {k: v for k, v in old.items() if k != "llava15_7b"}
    changed = [a for a, b in zip(original.splitlines(), path.read_text().splitlines()) if a != b]
    assert len(changed) == 1 and changed[0].startswith("llava15_7b:")  # comments and other lines untouched


def test_plot_profile_writes_png_next_to_profile(tmp_path):
    prof = profile_from_measurements(model="m", reducer="r", dataset="d", n_samples=1, seed=0, L=4, N_v=16,
                                     D_A={0: 2.0, 2: 0.5}, D_P={0: 1.0, 2: 0.2}, D_v={4: 1.0, 8: 0.3})
    path = prof.save(tmp_path / "profile.json")
    from vlmeval_dop.search import plot_profile

    out = plot_profile(path, policies={0.5: DOPPolicy(3, 2, 9)})
    assert out == tmp_path / "profile.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curve_validation():
    with pytest.raises(ValueError, match="duplicate"):
        Curve((1, 1.0), (0.1, 0.2))
    with pytest.raises(ValueError, match="leave 0..4"):
        profile_from_measurements(model="m", reducer="r", dataset="d", n_samples=1, seed=0, L=4, N_v=16,
                                  D_A={5: 1.0}, D_P={0: 1.0}, D_v={4: 1.0})
    with pytest.raises(ValueError, match="transfer"):
        optimize(_random_tables(np.random.default_rng(0), 3, 16), TINY, 0.5, text_tokens=TEXT, alpha=1.0)
