"""DivPrune against golden outputs of the official code (vbdi/divprune `LlavaMetaForCausalLM.DivPrune`).

Fixtures: tests/golden/divprune/ (README there: commit, function, inputs, steps). Three input sets:
- LLaVA-1.5 shaped: 576 x 1024 decoder inputs (a 24 x 24 patch grid), seeds 0-2, 56 (the official
  SUBSET_RATIO 0.098), 64, 128, 192 tokens, float32 and float16.
- LLaVA-NeXT packed: base 576 + unpadded 2 x 2 crop grid with one shared newline row per grid row (the
  official DivPrune runs on that whole sequence), three image shapes, ratios 0.05, 0.098, 0.2, fp32/fp16.
- Tiny models through `apply_dop` (the product path): tiny LLaVA-1.5 / LLaVA-NeXT, three images each
  (square and non-square for NeXT), ratios 0.098, 0.5 and 1.0 (official repeated rows), the model loaded
  in float32 and in float16.
Plus hand-made duplicate rows (degenerate.json) where the official greedy repeats a pick.
The synthetic inputs are rebuilt here from their seed by `smooth_features` (the generator script
reimplements it; the fixture stores a fingerprint of the float32 input, checked first), the tiny models'
decoder inputs are stored (tiny_embeds.pt) and compared with what the model feeds now.
Everything asserts exact equality of the official pick order and of the kept set / order.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.reducers import ImageSpan, ReductionContext
from vlmeval_dop.reducers.base import ReplacedSpan
from vlmeval_dop.reducers.divprune import DivPrune, divprune_order, divprune_select, official_compute_dtype
from vlmeval_dop.tiny import load_tiny, tiny_image, tiny_inputs

GOLDEN = Path(__file__).parent / "golden" / "divprune"
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def smooth_features(seed: int, rows: int, cols: int, dim: int, rank: int = 32) -> torch.Tensor:
    """(rows * cols, dim) float32 patch features with spatial structure, from `seed` (CPU generator).

    A 4x-upsampled random coarse field of `rank` channels, blurred by a 5-point mean (neighbours at
    distance 2, edges replicated), plus per-patch noise, spread to `dim` channels as a sum of two
    weighted channels each, plus small isotropic noise. Only elementwise arithmetic after the random
    draws, so the values do not depend on the CPU's matrix-product kernels.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(rank, (rows + 3) // 4, (cols + 3) // 4, generator=g)
    field = coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, :rows, :cols]
    p = F.pad(field[None], (2, 2, 2, 2), mode="replicate")[0]
    field = (p[:, 2:-2, 2:-2] + p[:, :-4, 2:-2] + p[:, 4:, 2:-2] + p[:, 2:-2, :-4] + p[:, 2:-2, 4:]) / 5
    z = field.flatten(1).T + 0.5 * torch.randn(rows * cols, rank, generator=g)
    chan = torch.randint(rank, (2, dim), generator=g)
    w = torch.randn(2, dim, generator=g)
    x = z[:, chan[0]] * w[0] + z[:, chan[1]] * w[1] + 0.1 * torch.randn(rows * cols, dim, generator=g)
    return x + torch.randn(dim, generator=g)  # a component shared by all tokens (mean cosine ~0.45)


def next_packed_features(seed: int, rows: int, cols: int, dim: int = 256) -> torch.Tensor:
    """LLaVA-NeXT decoder-input layout: 576 base tokens, then `rows` rows of `cols` crop-grid tokens each
    followed by the newline token (one shared vector), as the official `spatial_unpad` packing."""
    base = smooth_features(seed, 24, 24, dim)
    grid = smooth_features(seed + 1000, rows, cols, dim).view(rows, cols, dim)
    newline = torch.randn(dim, generator=torch.Generator().manual_seed(seed + 2000))
    packed = torch.cat([grid, newline.expand(rows, 1, dim)], dim=1).reshape(-1, dim)
    return torch.cat([base, packed])


@functools.lru_cache(maxsize=None)
def _inputs32(kind: str, seed: int, rows: int | None, cols: int | None) -> torch.Tensor:
    if kind == "llava15":
        return smooth_features(seed, 24, 24, 1024)
    return next_packed_features(seed, rows, cols)


def _synthetic_inputs(case: dict) -> torch.Tensor:
    x = _inputs32(case["kind"], case["seed"], case.get("rows"), case.get("cols"))
    return x.to(DTYPES[case["dtype"]])


def _load(name: str) -> list[dict]:
    return json.loads((GOLDEN / name).read_text())["cases"]


SYNTHETIC = _load("synthetic.json")
DEGENERATE = _load("degenerate.json")
TINY = _load("tiny.json")


def _fingerprint(x: torch.Tensor) -> list[float]:
    x = x.double()
    return [float(x.sum()), float(x.abs().sum()), float(x[::7, ::3].sum())]


def test_fixture_coverage():
    # >= 3 seeds and >= 3 budgets per input set and dtype, as the golden standard asks
    for cases, key in ((SYNTHETIC, "kind"), (TINY, "family")):
        for group in {(c[key], c["dtype"]) for c in cases}:
            sel = [c for c in cases if (c[key], c["dtype"]) == group]
            assert len({c["seed"] for c in sel}) >= 3 and len({c["n_keep"] for c in sel}) >= 3, group


@pytest.mark.parametrize("kind", ["llava15", "llavanext"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_synthetic_equals_official(kind, dtype):
    for case in SYNTHETIC:
        if (case["kind"], case["dtype"]) != (kind, dtype):
            continue
        x32 = _inputs32(kind, case["seed"], case.get("rows"), case.get("cols"))
        x = x32.to(DTYPES[dtype])
        where = f"{kind} seed {case['seed']} n {case['n_keep']} {dtype}"
        # the inputs are the generator's (a changed random stream would make the comparison moot)
        assert _fingerprint(x32) == pytest.approx(case["fingerprint"], rel=1e-9), where
        order = divprune_order(x, case["n_keep"])
        assert order.tolist() == case["order"], where
        assert torch.sort(order).values.tolist() == case["kept"], where


def test_float16_fixtures_need_float16_arithmetic():
    # The fixtures discriminate: the same fp16 features selected in float32 arithmetic (the old default,
    # now the named option) give other tokens in some cases, so the test above fails if the selection
    # upcasts again.
    differ = 0
    for case in SYNTHETIC:
        if case["kind"] == "llava15" and case["dtype"] == "float16":
            x = _synthetic_inputs(case)
            differ += divprune_select(x, case["n_keep"], torch.float32).tolist() != case["kept"]
    assert differ >= 4


def test_degenerate_inputs_repeat_picks_as_official():
    # duplicate rows: the official greedy picks a row twice once only duplicates remain (and fp16 rounding
    # of a near-duplicate's distance can do the same); ours too, and `distinct` never repeats
    for case in DEGENERATE:
        x = torch.tensor(case["rows_data"], dtype=DTYPES[case["dtype"]])
        where = f"{case['name']} {case['dtype']} n {case['n_keep']}"
        assert divprune_order(x, case["n_keep"]).tolist() == case["order"], where
        assert divprune_select(x, case["n_keep"]).tolist() == case["kept"], where
        distinct = divprune_order(x, case["n_keep"], distinct=True).tolist()
        assert len(set(distinct)) == case["n_keep"], where
        if len(set(case["order"])) == case["n_keep"]:  # no repeat: `distinct` changes nothing
            assert distinct == case["order"], where
    assert any(len(set(c["order"])) < c["n_keep"] for c in DEGENERATE)


def _span_ctx(family: str, x: torch.Tensor) -> ReductionContext:
    n = x.shape[0]
    return ReductionContext(family=family, model=None, input_ids=torch.zeros(1, n + 2, dtype=torch.long),
                            inputs_embeds=torch.cat([torch.zeros(1, 1, x.shape[1]), x[None], torch.zeros(1, 1, x.shape[1])], 1),
                            attention_mask=None, images=[ImageSpan(0, 0, torch.arange(1, n + 1))])


def test_reducer_repeated_pick_is_a_replaced_span():
    # the official sequence then holds the repeated row twice: a ReplacedSpan on 1D-RoPE families; on
    # Qwen2.5-VL (M-RoPE, no official code) the picks stay distinct
    case = next(c for c in DEGENERATE if c["name"] == "dup6" and c["dtype"] == "float32" and c["n_keep"] == 5)
    x = torch.tensor(case["rows_data"])
    (sel,) = DivPrune().select(_span_ctx("llava", x), 5)
    assert isinstance(sel, ReplacedSpan)
    assert sel.sources.tolist() == case["kept"] and torch.equal(sel.embeds, x[case["kept"]])
    (plain,) = DivPrune().select(_span_ctx("qwen2_5_vl", x), 5)
    assert isinstance(plain, torch.Tensor) and plain.tolist() == sorted(set(divprune_order(x, 5, distinct=True).tolist()))


@pytest.fixture(scope="module")
def tiny_embeds():
    return torch.load(GOLDEN / "tiny_embeds.pt")


def _run_tiny(model, processor, family, image, n_keep, reducer="divprune"):
    """(handle.last_kept[0], decoder-input image rows) of one prefill through apply_dop."""
    lm = model.model.language_model
    L = model.config.get_text_config(decoder=True).num_hidden_layers
    inputs = tiny_inputs(family, processor, ["What is shown?"], [image])
    seen = {}
    h = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(e=kw["inputs_embeds"]), with_kwargs=True)
    try:
        with apply_dop(model, DOPPolicy(L, L, n_keep), reducer=reducer) as handle, torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    pos = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    return handle.last_kept[0], seen["e"][0, pos]


@pytest.mark.parametrize("family", ["llava15", "llavanext"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tiny_model_product_path_equals_official(family, dtype, tiny_embeds):
    model, processor = load_tiny(family, dtype=DTYPES[dtype])
    for case in [c for c in TINY if (c["family"], c["dtype"]) == (family, dtype)]:
        stored = tiny_embeds[case["embeds_key"]]
        kept, rows = _run_tiny(model, processor, family, tiny_image(case["seed"], tuple(case["size"])), case["n_keep"])
        where = f"{family} {dtype} seed {case['seed']} n {case['n_keep']}"
        assert torch.equal(rows, stored), where  # the model feeds the fixture's inputs (else the rest is moot)
        assert divprune_order(stored, case["n_keep"]).tolist() == case["order"], where
        assert kept.tolist() == case["kept"], where
    # the fixtures include the official repeated rows (LLaVA-NeXT with every token kept: shared newlines)
    assert family != "llavanext" or any(len(set(c["kept"])) < c["n_keep"] for c in TINY if c["family"] == family)


def test_bfloat16_model_selects_in_float16():
    # bfloat16 decoder inputs (no official run exists) are selected in float16 arithmetic, which differs
    # from bfloat16 arithmetic here
    model, processor = load_tiny("llavanext", dtype=torch.bfloat16)
    kept, rows = _run_tiny(model, processor, "llavanext", tiny_image(0), 16)
    assert kept.tolist() == divprune_select(rows, 16, torch.float16).tolist()
    assert kept.tolist() != divprune_select(rows, 16).tolist()
    kept32, _ = _run_tiny(model, processor, "llavanext", tiny_image(0), 16, reducer=DivPrune(torch.float32))
    assert kept32.tolist() == divprune_select(rows, 16, torch.float32).tolist()
    # rows whose norm overflows float16 are selected in float32 instead of giving inf norms
    big = torch.full((4, 8), 3.0e4, dtype=torch.bfloat16)
    assert official_compute_dtype(big) is torch.float32 and official_compute_dtype(big / 1e3) is torch.float16
