"""SparseVLM on the decoder-side hook, and the hook's PruneDecision extension (overwriting survivors).

References: hand computations (raters, official schedules and counts, a stage on hand-built scores and
hidden states), naive Python loops (rater softmax, DPC-kNN), eager attention weights and hidden states of
the stock model (first stage end to end), a manual masking layer loop (the extended hook), FlopCounterMode
vs the analytic `flops.schedule_flops`, and cached decoding vs recomputation with the prefill's decisions.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.arch import ArchSpec
from vlmeval_dop.baselines import get_decoder_pruner
from vlmeval_dop.baselines.sparsevlm import (
    SparseVLM,
    density_noise,
    dpc_knn,
    merge_clusters,
    official_keep_counts,
    pairwise_distance,
    select_raters,
    sparsevlm_selection_flops,
    sparsify_stage,
)
from vlmeval_dop.executor.token_pruner import PruneDecision
from vlmeval_dop.flops import schedule_flops
from vlmeval_dop.tiny import load_tiny, tiny_image, tiny_inputs

from stock_reference import stock_embeds  # tests/stock_reference.py

QUESTIONS = ["What is shown in the picture?", "Color?"]


@pytest.fixture(scope="module")
def llava():
    model, processor = load_tiny("llava15", attn_implementation="eager")
    inputs = tiny_inputs("llava15", processor, QUESTIONS, [tiny_image(0), tiny_image(1)])
    return model, processor, inputs


def _visual(model, ids):
    return ids == model.config.image_token_id


def _layer_flops(counter) -> float:
    return sum(
        sum(ops.values()) for name, ops in counter.get_flop_counts().items()
        if name.split(".")[-2:-1] == ["layers"] and "language_model" in name
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ pure parts
def test_official_schedules_and_layer_tokens_by_hand():
    # official score.py (version 1_0) lists, exactly
    assert official_keep_counts(192) == [300, 200, 110] and official_keep_counts(128) == [303, 110, 36]
    assert official_keep_counts(96) == [238, 48, 26] and official_keep_counts(64) == [66, 30, 17]
    # halfway between 128 and 192: (303+300)/2 = 301.5 -> 302, (110+200)/2, (36+110)/2; below 64: scaled
    assert official_keep_counts(160) == [302, 155, 73] and official_keep_counts(32) == [33, 15, 9]
    assert official_keep_counts(960, n_visual=2880) == [1500, 1000, 550]  # 192 setting x 5
    # RETAIN 192 on LLaVA-1.5 by hand: 576 -> keep 300, 276 deleted, int(82.8)+1 = 83 recycled,
    # int(8.3)+1 = 9 clusters -> 309; keep 200 of 309, 109 deleted, 33 recycled, 4 clusters -> 204;
    # keep 110 of 204, 94 deleted, 29 recycled, 3 clusters -> 113. Layers 0-2 full, 3-6, 7-15, 16-31.
    counts = SparseVLM.layer_tokens(32, 576, 100)
    assert [c[0] - 100 for c in counts] == [576] * 3 + [309] * 4 + [204] * 9 + [113] * 16
    assert all(a == m for a, m in counts)
    no_recycle = SparseVLM.layer_tokens(32, 576, 0, retain=64, recycle=False)
    assert [c[0] for c in no_recycle] == [576] * 3 + [66] * 4 + [30] * 9 + [17] * 16


def test_paper_budget_entries_solved_against_brute_force():
    from vlmeval_dop.models_config import load_models
    from vlmeval_dop.registry import INFEASIBLE_BASELINES, load_entries

    entries, models = load_entries(), load_models()
    for model, budgets in (("llava15_7b", ("37", "28")), ("llavanext_7b", ("23", "14"))):
        pm = models[model]
        spec, L, N, text = pm.arch, pm.arch.num_layers, pm.arch.visual_tokens, pm.text_tokens
        for label in budgets:
            e = entries[f"{model}_sparsevlm{label}"]
            n_e = pm.budgets[int(label) / 100]
            target = schedule_flops(spec, [(text + n_e,) * 2] * L)

            def cost(r):
                return schedule_flops(spec, SparseVLM.layer_tokens(L, N, text, layers=[2, 6, 15], retain=r))

            best = max(r for r in range(1, N + 1) if cost(r) <= target)  # brute force over every retain
            assert e.baseline_args == {"layers": [2, 6, 15], "n_visual": N, "retain": best}
            pruner = get_decoder_pruner("sparsevlm", **e.baseline_args)
            assert pruner.schedule == dict(zip([2, 6, 15], official_keep_counts(best, N)))
    # three full layers exceed 32 (LLaVA-1.5) / 160 (LLaVA-NeXT) tokens on average: no cell, as in the paper
    assert "llava15_7b_sparsevlm23" in INFEASIBLE_BASELINES and "llavanext_7b_sparsevlm9" in INFEASIBLE_BASELINES


def test_raters_by_hand_and_naive_loop():
    # V T^T = [[2, 0, 0], [0, 0, 2]]; softmax rows, mean over visual: t0 = t2 = (e^2+1) / (2 (e^2+2)) ~ 0.447,
    # t1 = 1 / (e^2+2) ~ 0.106; mean 1/3 -> raters t0, t2
    V = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    T = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    assert select_raters(V, T).tolist() == [True, False, True]
    assert select_raters(V, torch.zeros(3, 2)).tolist() == [True] * 3  # all equal: nobody above the mean

    g = torch.Generator().manual_seed(0)
    V, T = torch.randn(7, 5, generator=g), torch.randn(6, 5, generator=g)
    score = [0.0] * 6
    for i in range(7):
        logits = [sum(V[i, c].item() * T[j, c].item() for c in range(5)) for j in range(6)]
        z = sum(math.exp(v) for v in logits)
        for j in range(6):
            score[j] += math.exp(logits[j]) / z / 7
    mean = sum(score) / 6
    assert select_raters(V, T).tolist() == [s > mean for s in score]


def _naive_dpc(x: torch.Tensor, k: int, noise: list[float]):
    """DPC-kNN of the official cluster_and_merge, written as plain loops: densities plus `noise`, "denser"
    strictly, centers by decreasing density x delta, every token to its nearest center (the first on ties)."""
    m, C = x.shape
    d = [[math.sqrt(sum((x[i, c].item() - x[j, c].item()) ** 2 for c in range(C))) / math.sqrt(C) for j in range(m)] for i in range(m)]
    dens = [math.exp(-sum(v * v for v in sorted(d[i])[:k]) / k) + noise[i] for i in range(m)]
    dmax = max(max(row) for row in d)
    delta = [min([d[i][j] for j in range(m) if dens[j] > dens[i]] + [dmax]) for i in range(m)]
    score = [delta[i] * dens[i] for i in range(m)]
    centers = sorted(range(m), key=lambda i: -score[i])[:k]
    assign = [min(range(k), key=lambda c: (d[centers[c]][i], c)) for i in range(m)]
    for c, i in enumerate(centers):
        assign[i] = c
    return centers, assign


def _naive_merge(x: torch.Tensor, assign: list[int], k: int) -> torch.Tensor:
    """Official cluster averages: members weighted 1 / (cluster size + 1e-6)."""
    rows = []
    for c in range(k):
        members = [i for i in range(x.shape[0]) if assign[i] == c]
        rows.append(sum(x[i].double() for i in members) / (len(members) + 1e-6))
    return torch.stack(rows).float()


def test_dpc_knn_and_merge_against_naive_loop_and_hand():
    # two well separated groups; the mutual nearest neighbours (0, 1) and (3, 5) have equal densities, which
    # only the official noise separates: without it both of (0, 1) count as densest and become the centers
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.5, -1.0], [10.0, 0.0], [10.0, 3.0], [11.0, 1.0]])
    noise = density_noise(6, x, torch.Generator().manual_seed(0))
    assert noise.shape == (6,) and bool((noise >= 0).all() and (noise < 1e-6).all())
    centers, assign = dpc_knn(x, 2, noise)
    groups = {tuple(sorted(torch.nonzero(assign == c).flatten().tolist())) for c in range(2)}
    assert groups == {(0, 1, 2), (3, 4, 5)}
    assert set(dpc_knn(x, 2)[0].tolist()) == {0, 1}
    merged = merge_clusters(x, assign, 2)
    by_group = {int(c in (3, 4, 5)): merged[i] for i, c in enumerate(centers.tolist())}
    torch.testing.assert_close(by_group[0], torch.tensor([0.5 / 3, 0.0]))
    torch.testing.assert_close(by_group[1], torch.tensor([31.0 / 3, 4.0 / 3]))
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(13, 6, generator=g) + 3 * torch.randint(0, 3, (13, 1), generator=g)
        for k in (1, 2, 4):
            # noise scaled up so float32 rounding (1 + 1e-6 U has ~8 values) cannot tie where doubles do not
            noise = density_noise(13, x, g) * 1e4
            centers, assign = dpc_knn(x, k, noise)
            ref_c, ref_a = _naive_dpc(x, k, noise.tolist())
            assert centers.tolist() == ref_c and assign.tolist() == ref_a
            torch.testing.assert_close(merge_clusters(x, assign, k), _naive_merge(x, ref_a, k))
    # the official noise is torch.rand((1, m)) * 1e-6 from the given (or the default) generator
    torch.testing.assert_close(density_noise(5, x, torch.Generator().manual_seed(3)),
                               torch.rand((1, 5), generator=torch.Generator().manual_seed(3))[0] * 1e-6)  # fmt: skip


def test_pairwise_distance_chunks_are_exact():
    x = torch.randn(37, 24, generator=torch.Generator().manual_seed(1))
    whole = pairwise_distance(x)
    assert torch.equal(pairwise_distance(x, chunk_bytes=5 * 37 * 24 * 4), whole)  # 5 rows per chunk
    ref = torch.tensor([[math.dist(a.tolist(), b.tolist()) / math.sqrt(24) for b in x] for a in x])
    torch.testing.assert_close(whole, ref.float())


def test_stage_on_hand_built_scores():
    # 10 visual tokens, keep 4: top-4 scores kept; 6 deleted -> int(1.8)+1 = 2 recycled, the best deleted
    # scores first (official topk order): tokens 4 (0.2), 5 (0.15); int(0.2)+1 = 1 cluster: its center is
    # the noise's denser token (k=1: every density is exp(0) + noise); its value = official mean of 4 and 5.
    score = torch.tensor([0.5, 0.1, 0.3, 0.05, 0.2, 0.15, 0.4, 0.01, 0.35, 0.02])
    hidden = torch.arange(20.0).view(10, 2)
    g = torch.Generator().manual_seed(0)
    st = sparsify_stage(score, hidden, keep=4, generator=g)
    assert st.kept.tolist() == [0, 2, 6, 8] and st.deleted.tolist() == [1, 3, 4, 5, 7, 9]
    assert st.recycled.tolist() == [4, 5]
    noise = torch.rand((1, 2), generator=torch.Generator().manual_seed(0))[0]
    assert st.centers.tolist() == [4 if noise[0] > noise[1] else 5]
    torch.testing.assert_close(st.merged, torch.tensor([[18.0, 20.0]]) / (2 + 1e-6))
    # best-first recycled order: the lower-index token 4 has the lower score here
    score2 = score.clone()
    score2[4], score2[5] = 0.15, 0.2
    assert sparsify_stage(score2, hidden, keep=4).recycled.tolist() == [5, 4]
    # keep >= present: the official cap keeps n - 1, the last one is recycled into itself
    st = sparsify_stage(score[:3], hidden[:3], keep=8)
    assert st.kept.tolist() == [0, 2] and st.centers.tolist() == [1]
    torch.testing.assert_close(st.merged, hidden[1:2] / (1 + 1e-6))
    st = sparsify_stage(score, hidden, keep=4, recycle=False)
    assert st.centers.numel() == 0 and st.merged.shape == (0, 2) and st.deleted.numel() == 6


# ------------------------------------------------------------------------------------------ the hook
class _OverwritePruner:
    """After layer 1: drop visual tokens at odd local index, overwrite the first visual token with the
    mean of the dropped ones plus 1 (a PruneDecision)."""

    name = "toy_overwrite"
    layers = (1,)

    def select(self, ctx):
        B, N = ctx.visual.shape
        drop = torch.zeros(B, N, dtype=torch.bool)
        upd = torch.zeros_like(drop)
        vals = []
        for b in range(B):
            vis = torch.nonzero(ctx.visual[b] & ctx.alive[b]).flatten()
            drop[b, vis[1::2]] = True
            upd[b, vis[0]] = True
            vals.append(ctx.hidden_out[b, vis[1::2]].mean(0) + 1.0)
        return PruneDecision(drop, upd, torch.stack(vals))


def _manual_reference(model, inputs, after: int, rule) -> torch.Tensor:
    """Last-token logits by masking: full-length layers, dropped tokens masked as keys and passed through,
    after layer `after` `rule(h, visual) -> (drop, update_mask, values)` is applied to the hidden states."""
    lm = model.model.language_model
    h, _ = stock_embeds(model, inputs)
    B, N, _ = h.shape
    visual = _visual(model, inputs["input_ids"])
    pad = inputs["attention_mask"].bool()
    cos, sin = lm.rotary_emb(h, torch.arange(N)[None].expand(B, N))
    causal = torch.tril(torch.ones(N, N, dtype=torch.bool))
    dropped = torch.zeros_like(visual)
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            allowed = (causal[None] & pad[:, None, :] & ~dropped[:, None, :]) | torch.eye(N, dtype=torch.bool)[None]
            mask = torch.zeros(B, 1, N, N).masked_fill(~allowed[:, None], torch.finfo(h.dtype).min)
            a = layer.self_attn(hidden_states=layer.input_layernorm(h), attention_mask=mask, position_embeddings=(cos, sin))[0]
            out = h + a
            out = out + layer.mlp(layer.post_attention_layernorm(out))
            h = torch.where(dropped[..., None], h, out)
            if i == after:
                drop, upd, values = rule(h, visual)
                h = h.clone()
                h[upd] = values
                dropped = dropped | drop
        return model.lm_head(lm.norm(h))[:, -1]


def _toy_rule(h, visual):
    B, N = visual.shape
    drop, upd, vals = torch.zeros(B, N, dtype=torch.bool), torch.zeros(B, N, dtype=torch.bool), []
    for b in range(B):
        vis = [n for n in range(N) if visual[b, n]]
        odd = vis[1::2]
        drop[b, odd] = True
        upd[b, vis[0]] = True
        vals.append(sum(h[b, n] for n in odd) / len(odd) + 1.0)
    return drop, upd, torch.stack(vals)


def test_prune_decision_overwrite_matches_manual_loop(llava):
    model, _, inputs = llava
    L = model.config.text_config.num_hidden_layers
    ref = _manual_reference(model, inputs, 1, _toy_rule)
    with apply_dop(model, DOPPolicy.full(L), token_pruner=_OverwritePruner()) as handle, torch.no_grad():
        out = model(**inputs).logits[:, -1]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    n_vis = int(_visual(model, inputs["input_ids"])[0].sum())
    assert handle.last_sample_layer_tokens[2][0][0] == handle.last_sample_layer_tokens[1][0][0] - n_vis // 2
    # without the overwrite the logits differ: the update really reaches the later layers
    with apply_dop(model, DOPPolicy.full(L), token_pruner=_DropOnly()), torch.no_grad():
        assert not torch.allclose(model(**inputs).logits[:, -1], ref, atol=1e-4)


class _DropOnly(_OverwritePruner):
    def select(self, ctx):
        return super().select(ctx).drop  # a plain bool tensor still works


class _BadPruner(_OverwritePruner):
    def __init__(self, how):
        self.how = how

    def select(self, ctx):
        d = super().select(ctx)
        if self.how == "dropped":  # overwrite a token that leaves the later layers
            return PruneDecision(d.drop, d.drop, ctx.hidden_out[d.drop])
        if self.how == "shape":
            return PruneDecision(d.drop, d.update_mask, d.update_values[:1])
        return "drop everything"


@pytest.mark.parametrize("how,err,match", [
    ("dropped", ValueError, "valid: tokens that took part"), ("shape", ValueError, "update_values must have shape"),
    ("type", TypeError, "valid: None, a \\(B, N\\) bool tensor or a PruneDecision"),
])  # fmt: skip
def test_prune_decision_bad_input(llava, how, err, match):
    model, _, inputs = llava
    with apply_dop(model, DOPPolicy.full(4), token_pruner=_BadPruner(how)), torch.no_grad(), pytest.raises(err, match=match):
        model(**inputs)


# ------------------------------------------------------------------------------------------ end to end
class _Spy(SparseVLM):
    def select(self, ctx):
        decision = super().select(ctx)
        self.decisions = getattr(self, "decisions", {}) if ctx.layer_idx else {}
        self.decisions[ctx.layer_idx] = decision
        return decision


def test_first_stage_against_eager_attention_and_hidden_states(llava):
    """Layer 0 is a sparsification layer (batch of 2): raters from the decoder input, scores from layer 0's
    eager attention weights, kept/recycled sets and merged values from its output, the noise from
    `noise_seed`, all recomputed here; the aggregated rows take the first deleted slots, ordered after the
    kept visual tokens."""
    model, _, inputs = llava
    L = model.config.text_config.num_hidden_layers
    with torch.no_grad():
        full = model(**inputs, output_attentions=True, output_hidden_states=True)
    visual, pad = _visual(model, inputs["input_ids"]), inputs["attention_mask"].bool()
    keep = 20
    spy = _Spy(layers=(0, 1, 2), keep=[keep, 12, 6], noise_seed=7)
    seen = {}
    layer1 = model.model.language_model.layers[1]
    def grab(module, args, kwargs):
        seen.setdefault("h", (args[0] if args else kwargs["hidden_states"]).clone())

    hook = layer1.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with apply_dop(model, DOPPolicy.full(L), token_pruner=spy), torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        hook.remove()
    dec = spy.decisions[0]
    assert dec.renumber
    g = torch.Generator().manual_seed(7)  # samples draw their noise in batch order
    for b in range(2):
        vis = torch.nonzero(visual[b]).flatten()
        last = int(vis[-1])
        text = torch.tensor([n for n in range(last + 1, visual.shape[1]) if pad[b, n]])
        emb = full.hidden_states[0][b]
        s = torch.softmax(emb[vis] @ emb[text].T, dim=-1).mean(0)
        raters = text[s > s.mean()]
        assert torch.equal(torch.nonzero(spy._raters[b]).flatten(), raters)
        rel = full.attentions[0][b].mean(0)[raters][:, vis].mean(0)
        kept = set(vis[torch.topk(rel, keep).indices].tolist())
        deleted = [int(n) for n in vis if int(n) not in kept]
        n_rec = int(len(deleted) * 0.3) + 1  # official formulas
        n_clu = int(n_rec / 10) + 1
        rec = sorted(deleted, key=lambda n: -rel[vis.tolist().index(n)].item())[:n_rec]  # best first
        assert spy.last_stages[0][b]["recycled"].tolist() == rec
        x = full.hidden_states[1][b, rec]
        noise = torch.rand((1, n_rec), generator=g)[0] * 1e-6
        # float32 clustering as official: at this noise scale float32 ties that a float64 loop would not see
        # decide centers, so the clustering here is `dpc_knn` (checked against the loop above and golden)
        _, assign = dpc_knn(x, n_clu, noise)
        merged = _naive_merge(x, assign.tolist(), n_clu)
        slots = deleted[:n_clu]  # the first deleted slots hold the aggregated rows, in the official order
        assert set(torch.nonzero(dec.drop[b]).flatten().tolist()) == set(deleted) - set(slots)
        assert torch.nonzero(dec.update_mask[b]).flatten().tolist() == slots
        h1 = seen["h"][b]
        torch.testing.assert_close(h1[slots], merged, atol=1e-5, rtol=1e-5)
        keys = dec.order[b, slots]
        assert bool((keys[1:] > keys[:-1]).all())
        assert float(keys[0]) > max(kept) and float(keys[-1]) < last + 1  # after the kept, before the text
        keep_pos = sorted(kept)
        torch.testing.assert_close(h1[keep_pos], full.hidden_states[1][b, keep_pos])


@pytest.mark.parametrize("family,keep", [("llava15", [32, 16, 8]), ("llavanext", [160, 80, 40])])
def test_layer_tokens_and_measured_flops(family, keep, llava):
    if family == "llava15":
        model, processor, inputs = llava
    else:
        model, processor = load_tiny(family, attn_implementation="eager")  # FlopCounterMode counts eager matmuls
        inputs = tiny_inputs(family, processor, QUESTIONS, [tiny_image(0), tiny_image(1)])
    L = model.config.get_text_config(decoder=True).num_hidden_layers
    layers = (0, 1, 2)
    visual = _visual(model, inputs["input_ids"])
    n_vis = int(visual[0].sum())
    pruner = SparseVLM(layers=layers, keep=keep)
    with apply_dop(model, DOPPolicy.full(L), token_pruner=pruner) as handle, torch.no_grad():
        model(**inputs)
    for b in range(2):  # padding takes part in every layer, like text
        others = int((~visual[b]).sum())
        assert [layer[b] for layer in handle.last_sample_layer_tokens] == SparseVLM.layer_tokens(L, n_vis, others, layers=layers, keep=keep)
        # the recorded stage counts follow the official formulas (written out here)
        n = n_vis
        for stat, k in zip(pruner.last_stats[b][1:], keep):
            kept = min(k, n - 1)
            rec = int((n - kept) * 0.3) + 1
            assert (stat["present"], stat["kept"], stat["recycled"], stat["clusters"]) == (n, kept, rec, int(rec / 10) + 1)
            n = kept + int(rec / 10) + 1

    single = tiny_inputs(family, processor, QUESTIONS[:1], [tiny_image(0)])
    counter = FlopCounterMode(display=False)
    pruner = SparseVLM(layers=layers, keep=keep)
    with apply_dop(model, DOPPolicy.full(L), token_pruner=pruner), torch.no_grad(), counter:
        model(**single, use_cache=False)
    spec = ArchSpec.from_model(model, visual_tokens=n_vis)
    n = single["input_ids"].shape[1]
    analytic = schedule_flops(spec, SparseVLM.layer_tokens(L, n_vis, n - n_vis, layers=layers, keep=keep))
    overhead = sparsevlm_selection_flops(spec, pruner.last_stats[0])
    assert overhead > 0
    assert abs(_layer_flops(counter) - analytic - overhead) <= 1e-6 * analytic


class _Replay:
    """Re-applies recorded prefill decisions to a longer sequence (generated tokens: never dropped, ordered
    after everything, in turn)."""

    name = "replay"

    def __init__(self, decisions):
        self.decisions = {i: d for i, d in decisions.items() if d is not None}
        self.layers = tuple(sorted(self.decisions))

    def select(self, ctx):
        d = self.decisions[ctx.layer_idx]
        B, n = d.drop.shape
        extra = ctx.visual.shape[1] - n
        grow = (lambda m: torch.cat([m, torch.zeros(B, extra, dtype=torch.bool)], 1))  # noqa: E731
        order = torch.cat([d.order, (n + torch.arange(extra, dtype=d.order.dtype)).expand(B, extra)], 1)
        return PruneDecision(grow(d.drop), grow(d.update_mask), d.update_values, renumber=d.renumber, order=order)


def test_cached_generation_equals_recompute(llava):
    """Decoding with the cache (each layer's new position continues from its own rebuilt length) equals
    recomputing the whole longer sequence under the prefill's decisions (renumbered in the same order)."""
    model, _, inputs = llava
    L = model.config.text_config.num_hidden_layers
    spy = _Spy(layers=(0, 2), keep=[24, 10])
    steps = 3
    with apply_dop(model, DOPPolicy.full(L), token_pruner=spy), torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
            return_dict_in_generate=True,
        )  # fmt: skip
    cached = out.sequences[:, inputs["input_ids"].shape[1] :]
    assert spy.decisions[0].renumber and spy.decisions[0].update_mask.any()
    # recomputation without cache under the prefill's decisions (SparseVLM itself would pick new raters
    # once generated tokens join the text, as the official code does not either: it prunes in prefill only)
    seq, mask, extra = inputs["input_ids"], inputs["attention_mask"], {"pixel_values": inputs["pixel_values"]}
    with apply_dop(model, DOPPolicy.full(L), token_pruner=_Replay(spy.decisions)), torch.no_grad():
        for t in range(steps):
            logits = model(input_ids=seq, attention_mask=mask, use_cache=False, **extra).logits[:, -1]
            torch.testing.assert_close(logits, out.logits[t], atol=1e-5, rtol=1e-5)
            nxt = logits.argmax(-1, keepdim=True)
            assert torch.equal(nxt[:, 0], cached[:, t])
            seq, mask = torch.cat([seq, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)


def test_bad_arguments(llava):
    with pytest.raises(ValueError, match="strictly increasing"):
        SparseVLM(layers=[6, 2, 15])
    with pytest.raises(ValueError, match="one count per layer"):
        SparseVLM(layers=[1, 2])
    with pytest.raises(ValueError, match="one count >= 0 per layer"):
        SparseVLM(layers=[1, 2], keep=[3, -1])
    with pytest.raises(ValueError, match="retain must be > 0"):
        SparseVLM(retain=0)
    with pytest.raises(ValueError, match="recycle_ratio and cluster_ratio must be in"):
        SparseVLM(recycle_ratio=1.5)
    with pytest.raises(ValueError, match="valid: .*sparsevlm"):
        get_decoder_pruner("sparsevml")
    model = llava[0]
    with pytest.raises(ValueError, match="valid: 0..2"):
        apply_dop(model, DOPPolicy.full(4), token_pruner=SparseVLM())  # official layers need >= 17 layers
