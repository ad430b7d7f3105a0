"""PruMerge+ against the official code's outputs (tests/golden/prumerge, see its README): CLIP-shaped towers
with 577 tokens (24x24 patches + [CLS], 24 layers, tiny width, seeded weights), 3 seeds x 5 ratios (the official
adaptive one and the ratios solved for 32/64/128/192 rows), through the reducer of a tiny LLaVA-1.5 that
carries the same tower: kept patches and their order exactly, the merged rows and the extra row within 1e-5,
and the decoder on those rows equals the stock model on the sequence rebuilt with them."""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.reducers import ImageSpan, ReducerError, ReductionContext
from vlmeval_dop.reducers.prumerge import _ATTN_KEY, PruMergePlus, budget_ratio, outlier_ratio, prumerge_plus_select

from stock_reference import replaced_span_logits, stock_embeds  # tests/stock_reference.py

GOLDEN = Path(__file__).parent / "golden" / "prumerge" / "cases.pt"
# the generator (tests/golden/prumerge/README.md) builds the tower from these same definitions
VISION = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=24,
              image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)  # fmt: skip
IMAGE_TOKEN = 3
PROMPT = ([1, 5, 6], [7, 8, 9])  # token ids before / after the 576 image placeholders


def fill_tower(tower: torch.nn.Module, seed: int) -> None:
    """Seeded weights of the golden CLIP tower (parameters in name order; norms ~1, biases small, the
    rest N(0, 1/fan_in)), independent of transformers' own initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(tower.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("bias"):
                p.copy_(0.02 * noise)
            elif "norm" in name:
                p.copy_(1 + 0.1 * noise)
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(noise / math.sqrt(fan_in))


def golden_pixels(seed: int) -> torch.Tensor:
    """(1, 3, 336, 336) seeded input image of the golden tower."""
    return torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(1000 + seed))


@lru_cache(maxsize=None)
def golden_cases() -> list[dict]:
    """The official outputs: per seed and ratio mode, `ratio`, `kept` (patch indices in the official order),
    `rows` ((K + 1, 64) pre-projector rows, the extra row last) and the tower's `feature_sum`."""
    return torch.load(GOLDEN, weights_only=True)


@lru_cache(maxsize=3)
def golden_llava(seed: int):
    """A tiny LLaVA-1.5 whose vision tower is the golden tower of `seed` (feature layer -2, patches only)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1)  # fmt: skip
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=text, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576)  # fmt: skip
    with torch.random.fork_rng():  # projector and language model: any weights (they only map the rows on)
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    fill_tower(model.model.vision_tower, seed)
    ids = torch.tensor([PROMPT[0] + [IMAGE_TOKEN] * 576 + PROMPT[1]])
    return model, {"input_ids": ids, "pixel_values": golden_pixels(seed)}


def _case_id(case: dict) -> str:
    return f"seed{case['seed']}-{case['mode']}"


def _reducer_and_budget(case: dict) -> tuple[PruMergePlus, int]:
    if case["mode"] == "adaptive":
        return PruMergePlus(adaptive=True), 576
    return PruMergePlus(), int(case["mode"].removeprefix("budget"))


@lru_cache(maxsize=3)
def _stock(seed: int):
    """The stock decoder inputs / logits of the golden prompt and a reducer cache shared by its cases (the
    vision capture and the attention are computed once per seed, as during policy search)."""
    model, inputs = golden_llava(seed)
    emb, stock = stock_embeds(model, inputs)
    return emb, stock, {}


def _select(seed: int, reducer, n_keep):
    """The reducer's selection on the golden image of `seed` (its vision capture runs the model's own tower)."""
    model, inputs = golden_llava(seed)
    emb, _, cache = _stock(seed)
    vis = torch.nonzero(inputs["input_ids"][0] == IMAGE_TOKEN).flatten()
    ctx = ReductionContext(family="llava", model=model, input_ids=inputs["input_ids"], inputs_embeds=emb,
                           attention_mask=None, images=[ImageSpan(0, 0, vis)], model_inputs=dict(inputs),
                           cache=cache)  # fmt: skip
    return reducer.select(ctx, n_keep)[0]


def test_fixture_inputs_are_reproduced():
    # the towers rebuilt here are the ones the official code ran on (feature layer, bit for bit in sum)
    for seed in range(3):
        model, inputs = golden_llava(seed)
        with torch.no_grad():
            hs = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2]
        want = next(c["feature_sum"] for c in golden_cases() if c["seed"] == seed)
        assert float(hs.double().sum()) == pytest.approx(want, rel=1e-6)
    assert {(c["seed"], c["mode"]) for c in golden_cases()} == {
        (s, m) for s in range(3) for m in ("adaptive", "budget32", "budget64", "budget128", "budget192")
    }


@pytest.mark.parametrize("case", golden_cases(), ids=_case_id)
def test_reducer_equals_official(case):
    model, _ = golden_llava(case["seed"])
    reducer, n_keep = _reducer_and_budget(case)
    sel = _select(case["seed"], reducer, n_keep)
    # kept patches in the official order, then the extra row (source -1)
    assert sel.sources.tolist() == case["kept"] + [-1]
    with torch.no_grad():
        want = model.model.multi_modal_projector(case["rows"][None])[0]
    torch.testing.assert_close(sel.embeds, want, atol=1e-5, rtol=1e-5)
    assert sel.embeds.shape[0] <= n_keep  # the budget bounds the rows the LLM sees
    # the pre-projector rows themselves, from the attention / keys / features the reducer used
    cap, attn, keys = _stock(case["seed"])[2][_ATTN_KEY]
    kept, rows = prumerge_plus_select(attn[0], keys[0], cap.features[0, 1:], case["ratio"])
    assert kept.tolist() == case["kept"]
    torch.testing.assert_close(rows, case["rows"], atol=1e-5, rtol=1e-5)


def test_ratios_are_the_official_ones():
    """The adaptive ratio is the official outlier fraction of the reducer's attention; the budget ratios
    are the ones the reducer solves."""
    for case in golden_cases():
        if case["mode"] != "adaptive":
            assert budget_ratio(576, int(case["mode"].removeprefix("budget"))) == case["ratio"]
            continue
        _select(case["seed"], PruMergePlus(adaptive=True), 576)
        assert outlier_ratio(_stock(case["seed"])[2][_ATTN_KEY][1][0]) == case["ratio"]
        with pytest.raises(ReducerError, match=f"adaptive PruMerge\\+ gave {len(case['kept']) + 1} rows"):
            _select(case["seed"], PruMergePlus(adaptive=True), len(case["kept"]))  # n_v bounds the rows


@pytest.mark.parametrize("seed,mode", [(0, "budget64"), (1, "adaptive")])
def test_through_the_executor_equals_rebuilt_sequence(seed, mode):
    """apply_dop with the reducer = the stock model on the prompt with the official rows in place of the image."""
    model, inputs = golden_llava(seed)
    case = next(c for c in golden_cases() if c["seed"] == seed and c["mode"] == mode)
    reducer, n_keep = _reducer_and_budget(case)
    with apply_dop(model, DOPPolicy(2, 2, n_keep), reducer=reducer) as handle, torch.no_grad():
        got = model(**inputs).logits[0, -1]
    assert handle.last_kept[0].tolist() == case["kept"] + [-1]
    emb, stock, _ = _stock(seed)
    vis = torch.nonzero(inputs["input_ids"][0] == IMAGE_TOKEN).flatten()
    with torch.no_grad():
        rows = model.model.multi_modal_projector(case["rows"][None])[0]
    torch.testing.assert_close(got, replaced_span_logits(model, emb, vis, rows), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, stock[0, -1], atol=1e-4)
