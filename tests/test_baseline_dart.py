"""DART on the decoder-side hook: the selection equals a hand computation and a naive set-based loop
(the official algorithm's shape: pivots in Python set order, per-pivot quota), the pruner's pivots/similarities equal ones rebuilt from hooked key
projections and hidden states of a plain run, and token counts / measured FLOPs match the analytic model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.arch import ArchSpec
from vlmeval_dop.baselines import get_decoder_pruner
from vlmeval_dop.baselines.dart import DART, dart_layer_tokens, dart_retained, dart_select, dart_selection_flops
from vlmeval_dop.flops import schedule_flops
from vlmeval_dop.tiny import load_tiny, tiny_image, tiny_inputs


def naive_dart(key_img, key_txt, f_img, f_txt, keep, p_img, p_txt, img_pos=None, txt_pos=None):
    """Set/list re-implementation of the official algorithm: pivots by L1-norm ranking, visited in the order of
    the Python set of their sequence indices; each takes its quota of the least cosine-similar remaining visual
    tokens one at a time, one pairwise cosine call per candidate."""
    V, T = len(key_img), len(key_txt)
    img_pos = list(range(V)) if img_pos is None else list(img_pos)
    txt_pos = list(range(V, V + T)) if txt_pos is None else list(txt_pos)
    local = {p: i for i, p in enumerate(img_pos)}
    quota = min(keep, V - min(p_img, V)) // (p_img + p_txt)
    img_piv = sorted(range(V), key=lambda i: -float(key_img[i]))[: min(p_img, V)]
    txt_piv = sorted(range(T), key=lambda i: -float(key_txt[i]))[: min(p_txt, T)]
    vec = {img_pos[i]: f_img[i] for i in img_piv} | {txt_pos[j]: f_txt[j] for j in txt_piv}
    chosen = {img_pos[i] for i in img_piv}
    for item in list(set([img_pos[i] for i in img_piv] + [txt_pos[j] for j in txt_piv])):
        for _ in range(quota):
            cands = [p for p in img_pos if p not in chosen]
            if not cands:
                break
            cos = {p: float(F.cosine_similarity(vec[item], f_img[local[p]], dim=0)) for p in cands}
            chosen.add(min(cands, key=lambda p: cos[p]))
    return sorted(local[p] for p in chosen)


def test_dart_select_by_hand():
    # image pivot: token 1 (largest key norm); text pivot: text token 1 (sequence index 7)
    key_img = torch.tensor([0.1, 5.0, 0.2, 0.3, 0.4, 0.5])
    key_txt = torch.tensor([1.0, 2.0])
    f_img = torch.tensor([[1, 0], [1, 0], [0, 1], [-1, 0], [0, -1], [0.7, 0.7]])
    f_txt = torch.tensor([[0, 1], [-1, 0.1]])
    # keep 2: each of the 2 pivots adds 2 // 2 = 1 token. Set {1, 7} is visited 1 then 7: pivot (1,0) takes
    # token 3 (-1,0) (cos -1), then pivot (-1,0.1) takes token 0 (1,0) (cos -0.995)
    assert dart_select(key_img, key_txt, f_img, f_txt, keep=2, pivot_image=1, pivot_text=1).tolist() == [0, 1, 3]
    # keep 0 (or 1): a quota of 0, the image pivot only
    assert dart_select(key_img, key_txt, f_img, f_txt, keep=1, pivot_image=1, pivot_text=1).tolist() == [1]
    # keep beyond the image: capped at V - pivot_image = 5, quota 5 // 2 = 2, so 1 + 2 x 2 = 5 of 6 are kept
    out = dart_select(key_img, key_txt, f_img, f_txt, keep=9, pivot_image=1, pivot_text=1).tolist()
    assert len(out) == 5 == dart_retained(9, 6, 1, 1) and {0, 1, 3} <= set(out)


def test_dart_visits_pivots_in_python_set_order():
    # one image pivot (token 0, at sequence index 7) and one text pivot (at index 9); both like token 1 least,
    # then the image pivot token 2, the text pivot token 3. The set {7, 9} iterates 9 first (9 % 8 = 1 < 7),
    # so the text pivot takes token 1 and the image pivot token 2; visiting in sequence order would keep 3.
    key_img, key_txt = torch.tensor([5.0, 0.1, 0.1, 0.1]), torch.tensor([1.0])
    f_img = torch.tensor([[1.0, 0.1], [-1.0, 0.0], [-1.0, -0.3], [-1.0, 0.3]])
    f_txt = torch.tensor([[1.0, -0.1]])
    assert list({7, 9}) == [9, 7]
    got = dart_select(key_img, key_txt, f_img, f_txt, 2, 1, 1, image_positions=[7, 8, 10, 11], text_positions=[9])
    assert got.tolist() == [0, 1, 2]
    in_sequence_order = dart_select(key_img, key_txt, f_img, f_txt, 2, 1, 1)  # image at 0..3, text at 4: {0, 4}
    assert in_sequence_order.tolist() == [0, 1, 3]


@pytest.mark.parametrize("seed", range(6))
def test_dart_select_matches_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    V, T, H = 30, [0, 3, 7][seed % 3], 8
    key_img, key_txt = torch.rand(V, generator=g), torch.rand(T, generator=g)
    f_img, f_txt = torch.randn(V, H, generator=g), torch.randn(T, H, generator=g)
    img_pos = (torch.randperm(200, generator=g)[:V].sort().values + 3).tolist()  # any sequence indices
    txt_pos = list(range(img_pos[-1] + 1, img_pos[-1] + 1 + T))
    for keep, p_img, p_txt in [(0, 4, 4), (2, 4, 4), (9, 4, 4), (13, 2, 3), (29, 4, 4), (30, 4, 4), (11, 0, 5), (40, 4, 4)]:
        got = dart_select(key_img, key_txt, f_img, f_txt, keep, p_img, p_txt, img_pos, txt_pos).tolist()
        assert got == naive_dart(key_img, key_txt, f_img, f_txt, keep, p_img, p_txt, img_pos, txt_pos), (keep, p_img, p_txt)
        if T >= p_txt:
            assert len(got) == dart_retained(keep, V, p_img, p_txt)


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


class _Spy(DART):
    def select(self, ctx):
        self.seen_drop = super().select(ctx)
        return self.seen_drop


@pytest.mark.parametrize("family", ["llava15", "llavanext"])
def test_dart_end_to_end_against_plain_run(family):
    model, processor = load_tiny(family, attn_implementation="eager")  # eager: FlopCounterMode sees QK^T, AV
    inputs = tiny_inputs(family, processor, ["What is shown in the picture?", "Color?"], [tiny_image(0), tiny_image(1)])
    visual = inputs["input_ids"] == model.config.image_token_id
    real = inputs["attention_mask"].bool()
    n_vis = int(visual[0].sum())
    L = model.config.get_text_config(decoder=True).num_hidden_layers
    lm = model.model.language_model
    k, keep = 2, n_vis // 5

    # reference inputs from a plain run: the key projection of layer k-1 (hooked) and its output
    grabbed = {}
    hook = lm.layers[k - 1].self_attn.k_proj.register_forward_hook(lambda m, a, out: grabbed.setdefault("k", out))
    with torch.no_grad():
        plain = model(**inputs, output_hidden_states=True)
    hook.remove()
    N = inputs["input_ids"].shape[1]
    cos, sin = lm.rotary_emb(plain.hidden_states[0], torch.arange(N)[None])
    hd = model.config.get_text_config(decoder=True).head_dim
    keys = grabbed["k"].view(2, N, -1, hd)
    keys = _rope(keys, cos[:, :, None], sin[:, :, None]).flatten(2)  # (B, N, kv_heads * hd)
    with torch.no_grad():
        feats = lm.norm(plain.hidden_states[k])

    spy = _Spy(k=k, keep=keep)
    with apply_dop(model, DOPPolicy.full(L), token_pruner=spy) as handle, torch.no_grad():
        model(**inputs)
    for b in range(2):
        vis = torch.nonzero(visual[b]).flatten()
        txt = torch.nonzero(~visual[b] & real[b] & (torch.arange(N) > vis[0])).flatten()
        l1 = keys[b].abs().sum(-1)
        index = torch.cumsum(real[b].long(), 0) - 1  # indices in the sample's own (unpadded) sequence
        kept = naive_dart(l1[vis], l1[txt], feats[b, vis], feats[b, txt], keep, 4, 4, index[vis].tolist(), index[txt].tolist())
        dropped = set(torch.nonzero(spy.seen_drop[b]).flatten().tolist())
        assert dropped == set(vis.tolist()) - set(vis[kept].tolist())

    n_other = [int((~visual[b]).sum()) for b in range(2)]  # text + padding take part in every layer
    for b in range(2):
        assert [layer[b] for layer in handle.last_sample_layer_tokens] == dart_layer_tokens(L, k, n_vis, keep, n_other[b])

    single = tiny_inputs(family, processor, ["What is shown in the picture?"], [tiny_image(0)])
    counter = FlopCounterMode(display=False)
    with apply_dop(model, DOPPolicy.full(L), token_pruner=DART(k=k, keep=keep)) as handle, torch.no_grad(), counter:
        model(**single, use_cache=False)
    measured = sum(
        sum(ops.values()) for name, ops in counter.get_flop_counts().items()
        if name.split(".")[-2:-1] == ["layers"] and "language_model" in name
    )
    n = single["input_ids"].shape[1]
    vis0 = torch.nonzero(single["input_ids"][0] == model.config.image_token_id).flatten()
    n_after = int((torch.arange(n) > vis0[0]).sum()) - (n_vis - 1)  # tokens after the image
    spec = ArchSpec.from_model(model, visual_tokens=n_vis)
    counts = dart_layer_tokens(L, k, n_vis, keep, n - n_vis)
    assert handle.last_layer_tokens == counts
    analytic = schedule_flops(spec, counts) + dart_selection_flops(spec, n_vis, n_after)
    assert abs(measured - analytic) <= 1e-9 * analytic


def test_dart_keep_beyond_the_image_is_capped():
    # the official NeXT cap: keep is limited to n_visual - pivot_image = 60, quota 60 // 8 = 7, 4 + 56 = 60 kept
    model, processor = load_tiny("llava15")
    inputs = tiny_inputs("llava15", processor, ["Color?"], [tiny_image(2)])
    L = model.config.get_text_config(decoder=True).num_hidden_layers
    n = inputs["input_ids"].shape[1]
    with apply_dop(model, DOPPolicy.full(L), token_pruner=DART(k=1, keep=10_000)) as handle, torch.no_grad():
        model(**inputs)
    assert handle.last_layer_tokens[0][0] == n and handle.last_layer_tokens[1][0] == n - 64 + 60 == n - 4
    assert dart_retained(10_000, 64) == 60 and dart_retained(128, 576) == 132 and dart_retained(0, 576) == 4


def test_dart_bad_input():
    with pytest.raises(ValueError, match="k >= 1"):
        DART(k=0)
    with pytest.raises(ValueError, match="keep must be an integer >= 0"):
        DART(keep=-1)
    with pytest.raises(ValueError, match="pivot_text must be an integer >= 0"):
        DART(pivot_text=-2)
    with pytest.raises(ValueError, match="at least one pivot"):
        DART(pivot_image=0, pivot_text=0)
    with pytest.raises(ValueError, match="valid: .*dart"):
        get_decoder_pruner("dartt")
    assert isinstance(get_decoder_pruner("dart", k=2, keep=16), DART)
    # the executor rejects a pruning layer past the last one
    model, _ = load_tiny("llava15")
    with pytest.raises(ValueError, match="valid: 0..2"):
        apply_dop(model, DOPPolicy.full(4), token_pruner=DART(k=4, keep=8))


def test_dart_layer_tokens_static_matches_function():
    assert DART.layer_tokens(32, 576, 60, k=2, keep=128) == dart_layer_tokens(32, 2, 576, 128, 60)
    counts = dart_layer_tokens(32, 2, 576, 128, 60)  # "128" keeps 132
    assert counts[1] == (636, 636) and counts[2] == (192, 192) and len(counts) == 32
