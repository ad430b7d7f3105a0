"""Policy perturbation (Tables 29-30): random operation swaps, their entries, plan and statistics."""
from __future__ import annotations

import pandas as pd
import pytest

from vlmeval_dop.policy import DOPPolicy, PolicyError
from vlmeval_dop.perturbation import swap_operations


@pytest.mark.parametrize("module,k", [("mha", 1), ("mha", 3), ("mlp", 1), ("mlp", 3)])
def test_swaps_move_exactly_k_operations_each_way(module, k):
    base = DOPPolicy(26, 19, 97)
    depth = 26 if module == "mha" else 19
    for seed in range(10):
        policy, mask = swap_operations(base, 32, module, k, seed)
        pruned = mask.attn if module == "mha" else mask.mlp
        other = mask.mlp if module == "mha" else mask.attn
        assert not other
        was_pruned = set(range(depth, 32))
        assert len(pruned) == len(was_pruned)  # same number of pruned operations: same TFLOPs count
        assert len(pruned - was_pruned) == k and len(was_pruned - pruned) == k
        assert (policy.d_A, policy.d_P) == ((32, 19) if module == "mha" else (26, 32)) and policy.n_v == 97
        assert swap_operations(base, 32, module, k, seed) == (policy, mask)  # deterministic in the seed
    assert len({swap_operations(base, 32, module, k, s)[1] for s in range(10)}) > 1


def test_bad_swaps():
    with pytest.raises(PolicyError, match="valid: 1..6"):
        swap_operations(DOPPolicy(26, 19, 97), 32, "mha", 7, 0)
    with pytest.raises(PolicyError, match="valid: mha, mlp"):
        swap_operations(DOPPolicy(26, 19, 97), 32, "ffn", 1, 0)


def test_swap_entries_and_masked_run():
    from vlmeval_dop.datasets import DOPDemoDataset
    from vlmeval_dop.registry import EntryError, get_entry, load_entry

    e = get_entry("llava15_7b_dopcd28__swap3mlp.s4")
    assert e.reducer == "cdpruner" and (e.policy.d_A, e.policy.d_P, e.policy.n_v) == (26, 32, 97)
    assert e.op_mask == swap_operations(DOPPolicy(26, 19, 97), 32, "mlp", 3, 4)[1]
    with pytest.raises(EntryError, match="has none"):
        get_entry("llava15_7b__swap1mha.s0")
    # tiny DOP entry (2, 1, 8) on 4 layers: swap one MHA operation, run the wrapper's generate
    wrapper = load_entry("tiny_llava15_dop__swap1mha.s0").load()
    ds = DOPDemoDataset("DOP_Demo")
    wrapper.generate(ds.build_prompt(ds.data.iloc[0]), dataset="DOP_Demo")
    mask = get_entry("tiny_llava15_dop__swap1mha.s0").op_mask
    counts = wrapper.last_layer_tokens
    text = min(a for a, _ in counts)  # the layers whose MHA runs without the (8 kept) visual tokens
    assert {i for i, (a, _) in enumerate(counts) if a == text} == set(mask.attn)
    assert max(a for a, _ in counts) == text + 8


def test_plan_and_statistics(tmp_path):
    from reproduce import run as rrun
    from reproduce.aggregate import swap_statistics

    cells = rrun.plan_table(30, tmp_path)
    swaps = {c.entry for c in cells if "__swap" in c.entry}
    assert swaps == {f"qwen25vl_7b_dopr26__swap{k}mlp.s{s}" for k in (1, 3) for s in range(10)}
    scores = pd.DataFrame({
        "method": ["m_dop28"] + [f"m_dop28__swap1mha.s{s}" for s in range(3)],
        "benchmark": "TextVQA", "score": [55.0, 54.0, 56.0, 52.0],
    })
    out, notes = swap_statistics(scores)
    got = dict(zip(out["method"], out["score"]))
    assert got == {"m_dop28": 55.0, "m_dop28[swap=1MHA;stat=best]": 56.0, "m_dop28[swap=1MHA;stat=mean]": 54.0}
    assert notes and "3 draws" in notes[0]
