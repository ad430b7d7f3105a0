"""VisPruner (DOP_V): by hand, against a naive re-implementation, and through the executor on tiny LLaVA-1.5 /
LLaVA-NeXT against the tower's own eager attention."""
from __future__ import annotations

import math

import pytest
import torch

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.reducers import ImageSpan, ReducerError, ReductionContext
from vlmeval_dop.reducers.llava_next_layout import llava_next_layout
from vlmeval_dop.reducers.vision import feature_layer_index, vision_tower
from vlmeval_dop.reducers.vispruner import VisPruner, split_budget, vispruner_select
from vlmeval_dop.tiny import load_tiny, tiny_image, tiny_inputs


def _unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_by_hand():
    # 10 patches. [CLS] attention (ties: 3 = 9 = .15, 4 = 6 = .10; ties go to the lower index):
    attn = torch.tensor([0.02, 0.20, 0.05, 0.15, 0.10, 0.12, 0.10, 0.08, 0.03, 0.15])
    # descending: 1, 3, 9, 5, 4, 6, 7, 2, 8, 0
    # n_keep = 8, ratio 0.5 -> 4 important: {1, 3, 9, 5}; remainder R = [4, 6, 7, 2, 8, 0], T_div = 4,
    # r = min(8, 6 - 4) = 2; A = [4, 7, 8] (even positions), B = [6, 2, 0].
    # Features (2D unit vectors, degrees): 4: 0, 6: 5, 7: 90, 2: 180, 8: 100, 0: 270 (others irrelevant)
    # max cos to B: 4 -> cos 5 = .996 (6), 7 -> cos 85 = .087 (6), 8 -> cos 80 = .174 (2)
    # drop the 2 highest: 4 and 8. Remainder [7, 6, 2, 0] has T_div tokens: done.
    deg = {0: 270, 1: 45, 2: 180, 3: 135, 4: 0, 5: 300, 6: 5, 7: 90, 8: 100, 9: 200}
    feats = torch.tensor([_unit(deg[i]) for i in range(10)])
    assert vispruner_select(attn, feats, 8).tolist() == [0, 1, 2, 3, 5, 6, 7, 9]
    # ratio 1: the 4 largest attentions only
    assert vispruner_select(attn, feats, 4, important_ratio=1.0).tolist() == [1, 3, 5, 9]
    # swap the tie 4/6 into 6 before 4 (6 gets .1001): remainder [6, 4, 7, 2, 8, 0], A = [6, 7, 8], B = [4, 2, 0]
    # max cos: 6 -> .996, 7 -> cos 90 = 0 (4) / cos 90 (2) = 0, 8 -> .174 (2); drop 6 and 8
    attn2 = attn.clone()
    attn2[6] = 0.1001
    assert vispruner_select(attn2, feats, 8).tolist() == [0, 1, 2, 3, 4, 5, 7, 9]
    assert vispruner_select(attn, feats, 0).tolist() == []
    assert vispruner_select(attn, feats, 10).tolist() == list(range(10))


def _naive(attn, feats, n, ratio=0.5, step=8, desc=None):
    """Independent reference: the official algorithm with plain Python lists (float64 similarities).
    `desc(values) -> order`: how a list is ranked in descending order (default: stable, lower index first
    on ties; the official `torch.argsort` is not stable, see test_ties_as_the_official_argsort)."""
    desc = desc or (lambda v: sorted(range(len(v)), key=lambda i: -v[i]))
    f = torch.nn.functional.normalize(feats.double(), dim=-1)
    sim = (f @ f.T).tolist()
    order = desc(attn.tolist())
    n_imp = int(n * ratio)
    n_div = n - n_imp
    imp, res = order[:n_imp], order[n_imp:]
    while n_div > 0 and len(res) > n_div:
        r = min(step, len(res) - n_div)
        A, B = res[0::2], res[1::2]
        score = [max(sim[i][j] for j in B) for i in A]
        res = [A[k] for k in desc(score)][r:] + B
    return sorted(imp + (res if n_div > 0 else []))


@pytest.mark.parametrize("seed", range(4))
def test_equals_naive_on_random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    P = 64
    attn = torch.softmax(torch.randn(P, generator=g) * 3, 0)
    feats = torch.randn(P, 12, generator=g)
    # odd remainders (n=7: R = 61; n=51-like) and r > |A| (n=60) are where the official code fails
    for n in (1, 2, 7, 16, 33, 40, 60, 63, 64):
        for ratio in (0.5, 0.25, 0.0, 1.0):
            assert vispruner_select(attn, feats, n, important_ratio=ratio).tolist() == _naive(attn, feats, n, ratio), (n, ratio)


def test_ties_as_the_official_argsort():
    # one-hot features (cosines exactly 0 / 1) and attention on a coarse grid: many exact ties everywhere.
    # The official code ranks with the non-stable torch.argsort(descending=True); on CPU its tie order is not
    # "lower index first" beyond 16 elements, and the difference cascades through the iterations.
    g = torch.Generator().manual_seed(7)
    feats = torch.nn.functional.one_hot(torch.randint(0, 4, (40,), generator=g), 4).float()
    attn = torch.randint(0, 5, (40,), generator=g).float() / 10

    def argsort_desc(values):
        return torch.tensor(values, dtype=torch.float32).argsort(descending=True).tolist()

    differs = 0
    for n in (3, 10, 21, 30):
        got = vispruner_select(attn, feats, n).tolist()
        assert got == _naive(attn, feats, n, desc=argsort_desc)
        differs += got != _naive(attn, feats, n)
    assert differs  # a stable tie order would give other tokens here


def _round_robin(n, caps):
    """Deal n tokens one at a time to crops 0, 1, 2, ... in turn, skipping full crops."""
    q = [0] * len(caps)
    c = 0
    for _ in range(n):
        while q[c % len(caps)] >= caps[c % len(caps)]:
            c += 1
        q[c % len(caps)] += 1
        c += 1
    return q


def test_split_budget():
    assert split_budget(2560, [576] * 5) == [512] * 5  # paper n_v = 2560 = official T = 512 per crop
    assert split_budget(963, [576] * 5) == [193, 193, 193, 192, 192]
    assert split_budget(6, [5, 1, 5, 5]) == [2, 1, 2, 1]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        caps = torch.randint(0, 12, (5,), generator=g).tolist()
        n = int(torch.randint(0, sum(caps) + 1, (1,), generator=g))
        assert split_budget(n, caps) == _round_robin(n, caps)
    with pytest.raises(ReducerError, match="valid: 0..7"):
        split_budget(8, [3, 4])


def _eager_capture(model, inputs):
    """Per image: (C, P) [CLS] attention and (C, P, D) patch features of the feature layer, straight from
    the tower's eager attention weights and hidden states (not the executor's recomputation)."""
    tower = vision_tower(model)
    pv = inputs["pixel_values"]
    counts = [1] * pv.shape[0]
    if "image_sizes" in inputs:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = model.config
        counts = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                  for s in inputs["image_sizes"]]  # fmt: skip
        pv = torch.cat([p[:k] for p, k in zip(pv, counts)])
    idx = feature_layer_index(model)
    with torch.no_grad():
        out = tower(pv, output_attentions=True, output_hidden_states=True)
    attn = out.attentions[idx][:, :, 0, 1:].mean(1)
    feats = out.hidden_states[idx + 1][:, 1:]
    return list(zip(attn.split(counts), feats.split(counts)))


def _expected_next_stock(model, size, attn, feats, num_tokens, n_keep):
    """Reference of next_packing="stock": crops dealt round robin, VisPruner on each crop's span patches."""
    lay = llava_next_layout(model, size, num_tokens=num_tokens)
    pos = [torch.nonzero(lay.crop == c).flatten() for c in range(lay.num_crops)]
    quota = _round_robin(n_keep, [p.numel() for p in pos])
    kept = []
    for c, (p, q) in enumerate(zip(pos, quota)):
        patches = lay.patch[p]
        kept += p[_naive(attn[c, patches], feats[c, patches], q)].tolist()
    return sorted(kept)


def _expected_next_official(model, size, attn, feats, n_keep):
    """Reference of the official packing: VisPruner on all patches of every crop, then the base crop's kept
    patches in patch order and the grid crops' in row-major order of the stitched grid, as (crop, patch)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    C, P = attn.shape
    side = int(P**0.5)
    rows, cols = get_anyres_image_grid_shape(list(size), model.config.image_grid_pinpoints, model.config.vision_config.image_size)
    # n_keep // C per crop, the first n_keep % C crops one more (the wide image has a 1x2 grid: 3 crops)
    kept = [set(_naive(attn[c], feats[c], n_keep // C + (c < n_keep % C))) for c in range(C)]
    order = [(0, p) for p in sorted(kept[0])]
    for y in range(rows * side):
        for x in range(cols * side):
            c, p = 1 + (y // side) * cols + x // side, (y % side) * side + x % side
            if p in kept[c]:
                order.append((c, p))
    return order


def _run(model, inputs, n_v, reducer="vispruner"):
    L = model.config.get_text_config(decoder=True).num_hidden_layers
    calls = []
    hook = vision_tower(model).register_forward_hook(lambda *a: calls.append(1))
    try:
        with apply_dop(model, DOPPolicy(L - 1, L - 2, n_v), reducer=reducer) as handle, torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    assert len(calls) == 1  # the tower ran once: the reducer used the executor's recording
    return handle


@pytest.fixture(scope="module")
def llava15():
    model, processor = load_tiny("llava15", attn_implementation="eager")
    inputs = tiny_inputs("llava15", processor, ["What is it?", "Which colour?"], [tiny_image(3), tiny_image(8)])
    return model, inputs, processor


@pytest.fixture(scope="module")
def llavanext():
    model, processor = load_tiny("llavanext", attn_implementation="eager")
    # square (2x2 grid, nothing unpadded) and a wide image (grid crops partly unpadded)
    inputs = tiny_inputs("llavanext", processor, ["What is it?", "Which colour?"],
                         [tiny_image(3), tiny_image(5, size=(150, 300))])  # fmt: skip
    return model, inputs, processor


def _spans(model, inputs):
    ids = inputs["input_ids"]
    return [torch.nonzero(ids[b] == model.config.image_token_id).flatten() for b in range(ids.shape[0])]


@pytest.mark.parametrize("n_v", [16, 5, 64])
def test_llava15_executor_equals_reference(llava15, n_v):
    model, inputs, _ = llava15
    handle = _run(model, inputs, n_v)
    ref = _eager_capture(model, inputs)
    for b, (attn, feats) in enumerate(ref):
        assert handle.last_kept[b].tolist() == _naive(attn[0], feats[0], n_v)
    B, T = inputs["input_ids"].shape  # tokens in layer 0, both samples (64 placeholders each)
    assert handle.last_layer_tokens[0][0] == B * (T - 64 + n_v)


@pytest.mark.parametrize("n_v", [40, 37])
def test_llavanext_stock_packing_equals_reference(llavanext, n_v):
    model, inputs, _ = llavanext
    handle = _run(model, inputs, n_v, reducer=VisPruner(next_packing="stock"))
    ref = _eager_capture(model, inputs)
    for b, ((attn, feats), span) in enumerate(zip(ref, _spans(model, inputs))):
        expect = _expected_next_stock(model, inputs["image_sizes"][b], attn, feats, span.numel(), n_v)
        assert handle.last_kept[b].tolist() == expect
    # square image: 5 crops of 64, 40 -> 8 per crop (official T = 8), no newline
    lay = llava_next_layout(model, inputs["image_sizes"][0])
    kept = handle.last_kept[0]
    if n_v == 40:
        assert torch.bincount(lay.crop[kept], minlength=5).tolist() == [8] * 5
    assert not bool(lay.newline[kept].any())


def test_llavanext_official_packing_equals_reference(llavanext):
    """Default packing: 40 / crops per crop among all 64 patches (padded ones included), 40 rows in the official
    order; the rows are the projected features of those patches; sources name their placeholders (-1 for
    patches the wide image's unpadding removed from the span)."""
    model, inputs, _ = llavanext
    rows = {}

    class Spy(VisPruner):
        def select(self, ctx, n_keep):
            out = super().select(ctx, n_keep)
            rows.update(enumerate(o.embeds for o in out))
            return out

    handle = _run(model, inputs, 40, reducer=Spy())
    ref = _eager_capture(model, inputs)
    for b, ((attn, feats), span) in enumerate(zip(ref, _spans(model, inputs))):
        order = _expected_next_official(model, inputs["image_sizes"][b].tolist(), attn, feats, 40)
        with torch.no_grad():
            proj = model.model.multi_modal_projector(feats)  # (C, P, H): every patch of every crop
        torch.testing.assert_close(rows[b], torch.stack([proj[c, p] for c, p in order]), atol=1e-5, rtol=0)
        lay = llava_next_layout(model, inputs["image_sizes"][b], num_tokens=span.numel())
        slot = {(int(c), int(p)): i for i, (c, p) in enumerate(zip(lay.crop, lay.patch)) if c >= 0}
        assert handle.last_kept[b].tolist() == [slot.get(o, -1) for o in order]
    B, T = inputs["input_ids"].shape  # both spans replaced by 40 rows
    assert handle.last_layer_tokens[0][0] == B * T - sum(s.numel() - 40 for s in _spans(model, inputs))


def test_llavanext_newlines_beyond_the_vision_tokens(llavanext):
    # square tiny image: 336 placeholders = 320 vision tokens + 16 newlines (one per grid row, every 17th
    # token after the 64 base tokens). n_v = 325: all 320 vision tokens + 5 newlines evenly spaced over the
    # 16: rows floor((k + .5) * 16 / 5) = 1, 4, 8, 11, 14.
    model, _, processor = llavanext
    inputs = tiny_inputs("llavanext", processor, ["What is it?"], [tiny_image(3)])
    handle = _run(model, inputs, 325, reducer=VisPruner(next_packing="stock"))
    newlines = [64 + 17 * row + 16 for row in range(16)]
    dropped = sorted(set(range(336)) - set(handle.last_kept[0].tolist()))
    assert dropped == [newlines[r] for r in range(16) if r not in (1, 4, 8, 11, 14)]


@pytest.mark.parametrize("family", ["llava15", "llavanext"])
def test_keep_all_is_stock_and_deterministic(family, request):
    model, _, processor = request.getfixturevalue(family)
    inputs = tiny_inputs(family, processor, ["What is shown?"], [tiny_image(2)])
    N = _spans(model, inputs)[0].numel()
    L = model.config.get_text_config(decoder=True).num_hidden_layers
    with torch.no_grad():
        stock = model(**inputs).logits
    with apply_dop(model, DOPPolicy(L, L, N), reducer="vispruner") as handle, torch.no_grad():
        got = model(**inputs).logits
    assert handle.last_kept[0].tolist() == list(range(N))
    torch.testing.assert_close(got, stock, atol=1e-5, rtol=1e-5)
    runs = []
    for _ in range(2):
        with apply_dop(model, DOPPolicy(L, L, 11), reducer="vispruner") as handle, torch.no_grad():
            model(**inputs)
        kept = handle.last_kept[0]
        assert kept.numel() == 11 and (family == "llavanext" or bool((kept[1:] > kept[:-1]).all()))
        runs.append(kept.tolist())
    assert runs[0] == runs[1]


def test_bad_input(llava15):
    with pytest.raises(ReducerError, match="valid: 0..4"):
        vispruner_select(torch.rand(4), torch.rand(4, 3), 5)
    with pytest.raises(ReducerError, match=r"important_ratio must be in \[0, 1\]"):
        VisPruner(important_ratio=1.5)
    with pytest.raises(ReducerError, match="next_packing must be one of official, stock"):
        VisPruner(next_packing="unpad")
    model, inputs, _ = llava15
    span = _spans(model, inputs)[0]
    ctx = ReductionContext(family="llava", model=model, input_ids=inputs["input_ids"], inputs_embeds=torch.zeros(1),
                           attention_mask=None, images=[ImageSpan(0, 0, span)], model_inputs=dict(inputs))  # fmt: skip
    with pytest.raises(ReducerError, match="valid: 0..64"):
        VisPruner().select(ctx, 65)
    qwen, processor = load_tiny("qwen25vl")
    with pytest.raises(ReducerError, match="does not support model family 'qwen2_5_vl'; supported: llava, llava_next"):
        apply_dop(qwen, DOPPolicy(2, 2, 8), reducer="vispruner")
    ctx.family = "qwen2_5_vl"
    with pytest.raises(ReducerError, match="supported: llava, llava_next"):
        VisPruner().select(ctx, 8)


@pytest.mark.parametrize("family", ["llava15", "llavanext"])
def test_generate_selects_as_forward(family, request):
    """transformers' generate() encodes images before the first forward (mm_encoder_outputs, pixel_values and
    image_sizes popped): the executor keeps that encoder call's recording and inputs for the reducer."""
    model, _, processor = request.getfixturevalue(family)
    inputs = tiny_inputs(family, processor, ["What is shown?"], [tiny_image(2)])
    L = model.config.get_text_config(decoder=True).num_hidden_layers
    with apply_dop(model, DOPPolicy(L, L, 20), reducer="vispruner") as handle, torch.no_grad():
        model(**inputs)
        forward_kept = handle.last_kept[0].tolist()
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert handle.last_kept[0].tolist() == forward_kept
