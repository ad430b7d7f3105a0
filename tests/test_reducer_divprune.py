"""DivPrune: greedy max-min diversity, checked by hand, against a naive loop of the official rule, and through
the executor (golden fixtures of the official code: test_golden_divprune.py)."""
from __future__ import annotations

import math

import pytest
import torch

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.reducers import ReducerError
from vlmeval_dop.reducers.divprune import divprune_order, divprune_select
from vlmeval_dop.tiny import TINY_FAMILIES, load_tiny, tiny_image, tiny_inputs


def _unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_by_hand_on_the_circle():
    # angles 0, 10, 90, 180, 185 deg. Nearest-neighbour distances 1-cos: 0.015, 0.015, 0.826, 0.004, 0.004
    # -> first pick 90 (idx 2); distances to it: 1, 0.826, 1, 1.087 -> 185 (idx 4); then
    # min over {90, 185}: 0 deg -> 1, 10 deg -> 0.826, 180 deg -> 0.004 -> 0 deg (idx 0)
    f = torch.tensor([_unit(a) for a in (0, 10, 90, 180, 185)])
    assert divprune_select(f, 1).tolist() == [2]
    assert divprune_select(f, 2).tolist() == [2, 4]
    assert divprune_select(f, 3).tolist() == [0, 2, 4]
    assert divprune_select(f, 5).tolist() == [0, 1, 2, 3, 4]


def _naive(features, n):
    """Independent reference of the official greedy in plain Python: first the token whose column's
    second-smallest distance (its own ~0 included) is largest, then the token whose smallest distance to
    the picks is largest, picked tokens not excluded; ties to the lowest index. Returns the pick order."""
    f = [v / v.norm() for v in features.double()]
    d = [[1.0 - float(a @ b) for a in f] for b in f]  # d[j][i]: column j
    N = len(f)
    picks = [max(range(N), key=lambda j: (sorted(d[j])[1], -j))]
    while len(picks) < n:
        picks.append(max(range(N), key=lambda j: (min(d[j][s] for s in picks), -j)))
    return picks


@pytest.mark.parametrize("seed", range(5))
def test_equals_naive_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(30, 8, generator=g, dtype=torch.float64)
    for n in (1, 4, 11, 30):
        assert divprune_order(f, n).tolist() == _naive(f, n)
        assert divprune_select(f, n).tolist() == sorted(_naive(f, n))


def test_bad_input():
    with pytest.raises(ReducerError, match="valid: 0..4"):
        divprune_select(torch.randn(4, 3), 5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_through_the_executor(family):
    model, processor = load_tiny(family)
    inputs = tiny_inputs(family, processor, ["What is shown?"], [tiny_image(3)])
    lm = model.model.language_model
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    h = lm.register_forward_pre_hook(grab, with_kwargs=True)
    L = model.config.get_text_config(decoder=True).num_hidden_layers
    n_keep = 12
    with apply_dop(model, DOPPolicy(L, L, n_keep), reducer="divprune") as handle, torch.no_grad():
        model(**inputs)
    h.remove()
    pos = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    expect = divprune_select(seen["embeds"][0, pos], n_keep)
    assert handle.last_kept[0].tolist() == expect.tolist()
    assert handle.last_layer_tokens[0][0] == inputs["input_ids"].shape[1] - pos.numel() + n_keep
