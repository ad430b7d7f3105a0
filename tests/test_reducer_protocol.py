"""Reducer protocol, registry and the uniform reducer (hand-computed indices)."""
from __future__ import annotations

import pytest
import torch

from vlmeval_dop.reducers import ImageSpan, ReducerError, ReductionContext, check_family, check_selection, get_reducer
from vlmeval_dop.reducers.uniform import UniformReducer, uniform_indices


def test_uniform_indices_by_hand():
    # bins of width 16/4 = 4, centres 2, 6, 10, 14
    assert uniform_indices(16, 4).tolist() == [2, 6, 10, 14]
    # width 10/3: centres floor(1.67, 5, 8.33) = 1, 5, 8
    assert uniform_indices(10, 3).tolist() == [1, 5, 8]
    assert uniform_indices(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert uniform_indices(5, 9).tolist() == [0, 1, 2, 3, 4]
    for n in range(1, 40):
        for k in range(1, n + 1):
            idx = uniform_indices(n, k)
            assert idx.numel() == k and bool((idx[1:] > idx[:-1]).all()) and 0 <= idx[0] and idx[-1] < n


def _ctx(sizes):
    spans = [ImageSpan(0, i, torch.arange(s)) for i, s in enumerate(sizes)]
    return ReductionContext("llava", None, torch.zeros(1, 1), torch.zeros(1, 1, 1), None, spans)


def test_uniform_reducer_and_selection_checks():
    r = get_reducer("uniform")
    assert isinstance(r, UniformReducer)
    ctx = _ctx([16, 8])
    kept = r.select(ctx, 4)
    check_selection(r, ctx, 4, kept)
    assert [k.tolist() for k in kept] == [[2, 6, 10, 14], [1, 3, 5, 7]]
    with pytest.raises(ReducerError, match="kept 3 tokens, expected 4"):
        check_selection(r, ctx, 4, [kept[0][:3], kept[1]])
    with pytest.raises(ReducerError, match="sorted unique"):
        check_selection(r, ctx, 4, [kept[0].flip(0), kept[1]])


def test_registry_errors():
    with pytest.raises(ReducerError, match="valid reducers: .*uniform"):
        get_reducer("visprunr")

    class OnlyQwen:
        name, families = "only_qwen", ("qwen2_5_vl",)

    with pytest.raises(ReducerError, match="does not support model family 'llava'; supported: qwen2_5_vl"):
        check_family(OnlyQwen(), "llava")
