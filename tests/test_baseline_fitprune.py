"""FitPrune: recomputed head-max attention equals eager attention maps, the per-layer deletion rules equal
hand computations and naive loops (the official `for i in range(...)` form), inference follows the recipe
per layer with measured FLOPs equal to the analytic count, and the fitted recipe meets its budget,
deterministically, and round-trips through JSON/YAML."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.arch import ArchSpec
from vlmeval_dop.baselines import get_decoder_pruner
from vlmeval_dop.baselines.fitprune import (
    FitPrune,
    FitPruneSchedule,
    VisualAttention,
    _stop,
    fit_deletions,
    fit_fitprune_schedule,
    fitprune_selection_flops,
    rank_for_drop,
    visual_attention,
)
from vlmeval_dop.flops import schedule_flops
from vlmeval_dop.tiny import load_tiny, tiny_image, tiny_inputs


def _va(cross, self_):
    return VisualAttention(torch.arange(len(cross)), torch.tensor(cross), torch.tensor(self_), n_text=3)


def naive_fit_deletions(cross, self_, ref_cross, ref_self, alpha):
    """The official loop: delete the i-1 smallest once deleting i drops a mass below (1-alpha) x ref."""

    def side(vals, ref):
        order = sorted(range(len(vals)), key=lambda i: (vals[i], i))
        n = len(vals)
        for i in range(len(vals) + 1):
            if sum(vals) - sum(vals[j] for j in order[:i]) < (1 - alpha) * ref - 1e-12:
                n = max(i - 1, 0)
                break
        return set(order[:n])

    return sorted(side(cross, ref_cross) & side(self_, ref_self))


def test_rules_by_hand():
    s = _va([0.1, 0.4, 0.2, 0.3], [0.5, 0.1, 0.3, 0.4])
    # cross x self = .05 .04 .06 .12 -> drop order 1, 0, 2, 3
    assert rank_for_drop(s).tolist() == [1, 0, 2, 3]
    # alpha .35: cross may lose .35 of 1.0 -> {0, 2} (.3 gone); self may lose .455 of 1.3 -> {1, 2} (.4)
    assert fit_deletions(s, 1.0, 1.3, 0.35).tolist() == [2]
    # alpha .25: cross {0}, self {1}: nothing in common
    assert fit_deletions(s, 1.0, 1.3, 0.25).tolist() == []
    # alpha 1: every token may go
    assert fit_deletions(s, 1.0, 1.3, 1.0).tolist() == [0, 1, 2, 3]
    # the reference mass can be below the current one: deletions even at alpha 0; cross keeps >= .3 by
    # dropping .1, .2, .3 -> {0, 2, 3}; self keeps >= .4 by dropping .1, .3, .4 -> {1, 2, 3}
    assert fit_deletions(s, 0.3, 0.4, 0.0).tolist() == [2, 3]


@pytest.mark.parametrize("seed", range(5))
def test_rules_match_naive_loops(seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        c = int(torch.randint(1, 12, (1,), generator=g))
        cross, self_ = torch.rand(c, generator=g).double(), torch.rand(c, generator=g).double()
        ref_c, ref_s = float(cross.sum()) * (0.7 + 0.6 * float(torch.rand(1, generator=g))), float(self_.sum())
        alpha = float(torch.rand(1, generator=g))
        s = VisualAttention(torch.arange(c), cross, self_, n_text=2)
        assert fit_deletions(s, ref_c, ref_s, alpha).tolist() == naive_fit_deletions(cross.tolist(), self_.tolist(), ref_c, ref_s, alpha)
        prod = (cross * self_).tolist()
        assert rank_for_drop(s).tolist() == sorted(range(c), key=lambda i: prod[i])


def test_stop_rule_by_hand():
    model, _ = load_tiny("llava15")
    spec = ArchSpec.from_model(model)
    full = schedule_flops(spec, [(74, 74)] * 4)
    kept = [64, 40, 20, 10]
    flops = lambda ks: schedule_flops(spec, [(10 + v,) * 2 for v in ks])  # noqa: E731
    # the first layer whose "freeze from here" recipe fits wins
    limit = flops([64, 40, 20, 20]) + 1.0
    assert flops([64, 40, 40, 40]) > limit
    assert _stop(kept, spec, 10, limit) == [64, 40, 20, 20]
    assert _stop(kept, spec, 10, full) == [64] * 4
    assert _stop(kept, spec, 10, flops(kept) - 1.0) is None


class _Spy(FitPrune):
    def select(self, ctx):
        self.seen = getattr(self, "seen", {})
        self.seen[ctx.layer_idx] = (visual_attention(ctx), super().select(ctx))
        return self.seen[ctx.layer_idx][1]


@pytest.mark.parametrize("family", ["llava15", "llavanext"])
def test_inference_against_eager_attention_and_flops(family):
    model, processor = load_tiny(family, attn_implementation="eager")
    inputs = tiny_inputs(family, processor, ["What is shown in the picture?", "Color?"], [tiny_image(0), tiny_image(1)])
    visual = inputs["input_ids"] == model.config.image_token_id
    real = inputs["attention_mask"].bool()
    n_vis = int(visual[0].sum())
    L = model.config.get_text_config(decoder=True).num_hidden_layers
    kept = [n_vis, n_vis - n_vis // 4, n_vis // 3, n_vis // 3]
    N = inputs["input_ids"].shape[1]

    with torch.no_grad():
        eager = model(**inputs, output_attentions=True).attentions[0].amax(1)  # layer 0, head max
    spy = _Spy(kept)
    with apply_dop(model, DOPPolicy.full(L), token_pruner=spy) as handle, torch.no_grad():
        model(**inputs)
    assert sorted(spy.seen) == [0, 1]  # layers where the recipe shrinks
    stats, drop = spy.seen[0]
    for b in range(2):
        vis = torch.nonzero(visual[b]).flatten()
        txt = torch.nonzero(~visual[b] & real[b] & (torch.arange(N) > vis[0])).flatten()
        cross = eager[b][txt][:, vis].sum(0) / len(txt)
        self_ = eager[b][vis][:, vis].sum(0) / len(vis)
        torch.testing.assert_close(stats[b].cross, cross.float(), atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(stats[b].self_, self_.float(), atol=1e-6, rtol=1e-4)
        # by hand: the n_vis - kept[1] smallest cross x self products go
        gone = vis[torch.argsort(cross * self_)[: n_vis - kept[1]]]
        assert set(torch.nonzero(drop[b]).flatten().tolist()) == set(gone.tolist())

    n_other = [int((~visual[b]).sum()) for b in range(2)]
    for b in range(2):
        assert [layer[b] for layer in handle.last_sample_layer_tokens] == [(n_other[b] + v,) * 2 for v in kept]

    single = tiny_inputs(family, processor, ["What is shown in the picture?"], [tiny_image(0)])
    n = single["input_ids"].shape[1]
    counter = FlopCounterMode(display=False)
    with apply_dop(model, DOPPolicy.full(L), token_pruner=FitPrune(kept)) as handle, torch.no_grad(), counter:
        model(**single, use_cache=False)
    measured = sum(
        sum(ops.values()) for name, ops in counter.get_flop_counts().items()
        if name.split(".")[-2:-1] == ["layers"] and "language_model" in name
    )
    spec = ArchSpec.from_model(model, visual_tokens=n_vis)
    counts = FitPruneSchedule(kept).layer_tokens(n - n_vis)
    assert handle.last_layer_tokens == counts
    vis0 = int(torch.nonzero(single["input_ids"][0] == model.config.image_token_id)[0])
    n_after = n - vis0 - n_vis
    selection = sum(fitprune_selection_flops(spec, n - n_vis + kept[i], kept[i] + n_after) for i in (0, 1))
    assert abs(measured - schedule_flops(spec, counts) - selection) <= 1e-9 * measured


def test_fit_meets_budget_deterministic_and_round_trips(tmp_path):
    model, processor = load_tiny("llava15")
    calib = [
        tiny_inputs("llava15", processor, ["What is it?", "Describe the colors in detail."], [tiny_image(5), tiny_image(6)]),
        tiny_inputs("llava15", processor, ["How many objects?"], [tiny_image(7)]),
    ]
    spec = ArchSpec.from_model(model)
    budget = 0.6
    a = fit_fitprune_schedule(model, calib, budget, tol=0.05)  # 5 search steps instead of 7: test time
    b = fit_fitprune_schedule(model, calib, budget, tol=0.05)
    assert a == b  # deterministic
    assert 0.0 < a.alpha < 1.0 and a.budget == budget
    assert a.n_samples == 3 and a.n_visual == 64 and a.kept[0] == 64 and len(a.kept) == 4
    # text tokens: the calibration mean of the real non-visual tokens
    texts = [int(c["attention_mask"][i].sum()) - 64 for c in calib for i in range(c["input_ids"].shape[0])]
    assert a.text_tokens == round(sum(texts) / 3)
    full = schedule_flops(spec, [(a.text_tokens + 64,) * 2] * 4)
    used = schedule_flops(spec, a.layer_tokens(a.text_tokens))
    assert used <= budget * full and used > 0.3 * full  # meets the budget without collapsing
    assert all(x >= y for x, y in zip(a.kept, a.kept[1:]))
    # data round trip
    for name in ("s.json", "s.yaml"):
        path = a.save(tmp_path / name)
        assert FitPruneSchedule.load(path) == a
        assert FitPrune(str(path)).schedule == a
    # the full budget prunes nothing
    assert fit_fitprune_schedule(model, calib, 1.0).kept == [64] * 4


def test_schedule_conversions_and_scaling():
    s = FitPruneSchedule.from_official_scheme({0: 3, 1: 7, 2: 49, 3: 24}, n_visual=576)
    assert s.kept == [576, 573, 566, 517]  # layer 3's deletions happen after the last layer here
    assert FitPruneSchedule([8, 6, 3, 3]).kept_for(16) == [16, 12, 6, 6]
    assert FitPruneSchedule([8, 6, 3, 3]).kept_for(6) == [6, 5, 2, 2]  # round half up of 4.5, 2.25
    assert FitPrune([8, 6, 3, 3]).layers == (0, 1)
    assert FitPrune.layer_tokens(4, 8, 10, schedule=[8, 6, 3, 3]) == [(18, 18), (16, 16), (13, 13), (13, 13)]


def test_fitprune_bad_input():
    with pytest.raises(ValueError, match="needs a fitted schedule"):
        FitPrune()
    with pytest.raises(ValueError, match="needs a fitted schedule"):
        get_decoder_pruner("fitprune", budget=0.3)
    with pytest.raises(ValueError, match="non-increasing"):
        FitPrune([8, 6, 7, 3])
    with pytest.raises(ValueError, match="integers >= 0"):
        FitPrune([8, 6, -1, 0])
    with pytest.raises(ValueError, match="keep all n_visual=10"):
        FitPruneSchedule([8, 6, 3, 3], n_visual=10)
    with pytest.raises(ValueError, match="does not exist"):
        FitPrune("/nonexistent/schedule.json")
    with pytest.raises(ValueError, match="only keys"):
        FitPrune({"keep": [8, 4]})
    with pytest.raises(ValueError, match="fitted for budget 0.5"):
        FitPrune(FitPruneSchedule([8, 4], budget=0.5), budget=0.3)
    model, processor = load_tiny("llava15")
    inputs = tiny_inputs("llava15", processor, ["Color?"], [tiny_image(1)])
    with pytest.raises(ValueError, match="schedule has 3 layers, the model has 4"):
        with apply_dop(model, DOPPolicy.full(4), token_pruner=FitPrune([64, 32, 16])), torch.no_grad():
            model(**inputs)
    for budget in (0.0, 1.5, "0.3"):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            fit_fitprune_schedule(model, [inputs], budget)
    with pytest.raises(ValueError, match="at least one calibration input"):
        fit_fitprune_schedule(model, [], 0.5)
    with pytest.raises(ValueError, match="below the cheapest recipe"):
        fit_fitprune_schedule(model, [inputs], 0.2)
