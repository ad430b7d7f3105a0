"""The DOP executor on tiny random-weight models of every family.

References: stock transformers (full policy, bit-identical), an independent masking implementation
written here (pruned policies), recomputation without cache (decoding), single samples (batching),
eager attention (sdpa), the analytic FLOPs model vs FlopCounterMode (compute really skipped).
"""
from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.arch import ArchSpec
from vlmeval_dop.flops import policy_flops
from vlmeval_dop.policy import PolicyError
from vlmeval_dop.reducers import ReducerError
from vlmeval_dop.reducers.uniform import uniform_indices
from vlmeval_dop.tiny import TINY_FAMILIES, load_tiny, tiny_image, tiny_inputs

from stock_reference import stock_decoder_inputs  # tests/stock_reference.py

FAMILY_KEY = {"llava15": "llava", "llavanext": "llava_next", "qwen25vl": "qwen2_5_vl", "internvl3": "internvl"}
QUESTIONS = ["What is shown in the picture?", "Color?"]


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def tiny(request):
    model, processor = load_tiny(request.param, attn_implementation="sdpa")
    return request.param, model, processor


def _inputs(family, processor, n=1):
    images = [tiny_image(seed=i) for i in range(n)]
    return tiny_inputs(family, processor, QUESTIONS[:n], images)


def _visual(model, input_ids):
    return input_ids == model.config.image_token_id


def _lm(model):
    """The decoder stack (`model.model.language_model`; SmolVLM's `text_model`)."""
    from vlmeval_dop.executor.families import adapter_for

    return adapter_for(model).language_model(model)


def _num_layers(model):
    return model.config.get_text_config(decoder=True).num_hidden_layers


# ---------------------------------------------------------------------------------------------------
# independent reference: full-length sequence, pruning by masking, residual pass-through by torch.where
# ---------------------------------------------------------------------------------------------------
def _image_runs(visual):
    """(B, N) id of the maximal run of visual tokens each token is in (-1 outside): Gemma 3's image blocks."""
    start = visual & ~torch.nn.functional.pad(visual, (1, 0))[:, :-1]
    return torch.where(visual, torch.cumsum(start.long(), 1) - 1, torch.full_like(visual, -1, dtype=torch.long))


def _layer_branches(layer):
    """(attention update, MLP update) of a decoder layer, written out per layout: Gemma 3 normalises both
    outputs ((1 + w) RMSNorms before and after), the LLaMA layout only the inputs."""
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 3
        return (lambda h, **kw: layer.post_attention_layernorm(layer.self_attn(hidden_states=layer.input_layernorm(h), **kw)[0]),
                lambda h: layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h))))  # fmt: skip
    return (lambda h, **kw: layer.self_attn(hidden_states=layer.input_layernorm(h), **kw)[0],
            lambda h: layer.mlp(layer.post_attention_layernorm(h)))  # fmt: skip


def extend_token_types(extra, nxt):
    """Generated tokens are text (type 0): Qwen2.5-VL's `mm_token_type_ids`, Gemma 3's `token_type_ids`."""
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in extra:
            extra[key] = torch.cat([extra[key], torch.zeros_like(nxt)], 1)


def masked_reference(model, inputs, policy: DOPPolicy, drop_after=None, op_mask=None) -> torch.Tensor:
    """Last-token logits of `policy`, computed by masking (no gathering, no cache, paper's d_P as is).

    `drop_after=(K, rule)`: after layer K, tokens `rule(h_out, visual, alive)` leave all later layers.
    `op_mask`: visual MHA / MLP operations pruned at single layers (sets of layer indices).
    Gemma 3 (a decoder config with `layer_types`): per-layer-type RoPE tables, image tokens of one image attending
    to each other in both directions (when `token_type_ids` is given, as stock), and local layers' windows over
    the RoPE positions (renumbered after the reducer's drop, as a rebuilt sequence would have them).
    """
    attn_off = set() if op_mask is None else set(op_mask.attn)
    mlp_off = set() if op_mask is None else set(op_mask.mlp)
    lm = _lm(model)
    captured, _ = stock_decoder_inputs(model, inputs)
    h = captured["inputs_embeds"]
    B, N, _ = h.shape
    visual = _visual(model, inputs["input_ids"])
    pad = inputs["attention_mask"].bool()
    dropped = torch.zeros_like(visual)
    if policy.n_v is not None:
        for b in range(B):
            pos = torch.nonzero(visual[b]).flatten()  # one image per sample in these tests
            keep = pos[uniform_indices(pos.numel(), policy.n_v)]
            dropped[b, pos] = True
            dropped[b, keep] = False
    pos_ids = captured.get("position_ids")
    if pos_ids is None:
        pos_ids = torch.arange(N)[None].expand(B, N)
    m_rope = pos_ids.ndim == 3
    if m_rope and pos_ids.shape[0] == 4:
        pos_ids = pos_ids[1:]
    if not m_rope:  # 1D RoPE: positions as in a sequence rebuilt without the dropped tokens
        pos_ids = pos_ids.expand(B, N) - (torch.cumsum(dropped.long(), 1) - dropped.long())
    text_cfg = lm.config
    layer_types = getattr(text_cfg, "layer_types", None) or [None] * len(lm.layers)
    if "layer_type" in inspect.signature(lm.rotary_emb.forward).parameters:  # Gemma 3: a RoPE table per layer type
        tables = {t: lm.rotary_emb(h, pos_ids, t) for t in set(layer_types)}
    else:
        tables = {t: lm.rotary_emb(h, pos_ids) for t in set(layer_types)}
    runs = _image_runs(visual) if "token_type_ids" in inputs else None
    same_image = None if runs is None else (runs[:, :, None] == runs[:, None, :]) & (runs[:, :, None] >= 0)

    system = (torch.cumsum(visual.long(), 1) == 0) & pad
    causal = torch.tril(torch.ones(N, N, dtype=torch.bool))
    L = len(lm.layers)
    d_A_sys = L if policy.d_A_sys is None else policy.d_A_sys
    d_P_sys = L if policy.d_P_sys is None else policy.d_P_sys
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            a_part = ~dropped & (~visual | ((i < policy.d_A) and i not in attn_off)) & (~system | (i < d_A_sys))
            m_part = ~dropped & (~visual | ((i < policy.d_P) and i not in mlp_off)) & (~system | (i < d_P_sys))
            kind = layer_types[i]
            visible = causal[None] if same_image is None else causal[None] | same_image
            if kind == "sliding_attention":  # key position > query position - window
                visible = visible & (pos_ids[:, None, :] > pos_ids[:, :, None] - text_cfg.sliding_window)
            allowed = visible & pad[:, None, :] & a_part[:, None, :]
            allowed = allowed | torch.eye(N, dtype=torch.bool)[None]
            mask = torch.zeros(B, 1, N, N, dtype=h.dtype).masked_fill(~allowed[:, None], torch.finfo(h.dtype).min)
            attn_update, mlp_update = _layer_branches(layer)
            a = attn_update(h, attention_mask=mask, position_embeddings=tables[kind])
            h = torch.where(a_part[..., None], h + a, h)
            m = mlp_update(h)
            h = torch.where(m_part[..., None], h + m, h)
            deepstack = captured.get("deepstack_visual_embeds")  # Qwen3-VL: features added after the first layers
            if deepstack is not None and i < len(deepstack):
                h = h.clone()
                h[captured["visual_pos_masks"]] += deepstack[i]
            if drop_after is not None and i == drop_after[0]:
                dropped = dropped | drop_after[1](h, visual, a_part)
        return model.lm_head(lm.norm(h))[:, -1]


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _generate(model, inputs, n=4):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[:, inputs["input_ids"].shape[1] :]


# ---------------------------------------------------------------------------------------------------
def test_full_policy_bit_identical(tiny):
    family, model, processor = tiny
    inputs = _inputs(family, processor, n=2)
    L = _num_layers(model)
    ref, ref_gen = _logits(model, inputs), _generate(model, inputs)
    with apply_dop(model, DOPPolicy.full(L)) as handle:
        out, gen = _logits(model, inputs), _generate(model, inputs)
    assert torch.equal(ref, out)
    assert torch.equal(ref_gen, gen)
    assert all(a == m for a, m in handle.last_layer_tokens)
    # restored exactly: no instance override left, stock behaviour unchanged
    assert all("forward" not in layer.__dict__ for layer in _lm(model).layers)
    assert torch.equal(_logits(model, inputs), ref)


def _grid(L, n_vis):
    half = max(1, n_vis // 3)
    return [
        DOPPolicy(0, 0),
        DOPPolicy(L, 0),
        DOPPolicy(0, L),
        DOPPolicy(L // 2, 1),
        DOPPolicy(1, L - 1),  # d_P > d_A: the executor skips the dead MLP work, outputs must not change
        DOPPolicy(L, L, half),
        DOPPolicy(L // 2, 1, half),
        DOPPolicy(0, 0, 1),
        DOPPolicy(L - 1, L // 2, n_vis),  # n_v = all visual tokens through the reducer
    ]


def test_policy_grid_matches_masked_reference(tiny):
    family, model, processor = tiny
    inputs = _inputs(family, processor, n=2)
    L = _num_layers(model)
    n_vis = int(_visual(model, inputs["input_ids"])[0].sum())
    for policy in _grid(L, n_vis):
        ref = masked_reference(model, inputs, policy)
        with apply_dop(model, policy, reducer="uniform" if policy.n_v else None):
            out = _logits(model, inputs)[:, -1]
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=f"{family} {policy}")


def test_system_token_depths_match_reference(tiny):
    family, model, processor = tiny
    inputs = _inputs(family, processor, n=2)
    L = _num_layers(model)
    policy = DOPPolicy(L - 1, 1, None, 1, 0)
    ref = masked_reference(model, inputs, policy)
    with apply_dop(model, policy):
        out = _logits(model, inputs)[:, -1]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_reducer_at_all_tokens_is_identity(tiny):
    family, model, processor = tiny
    inputs = _inputs(family, processor, n=1)
    L = _num_layers(model)
    n_vis = int(_visual(model, inputs["input_ids"]).sum())
    with apply_dop(model, DOPPolicy(L, L, n_vis), reducer="uniform"):
        out = _logits(model, inputs)
    torch.testing.assert_close(out[:, -1], _logits(model, inputs)[:, -1], atol=1e-5, rtol=1e-5)


def test_cached_decoding_equals_recompute(tiny):
    family, model, processor = tiny
    inputs = _inputs(family, processor, n=2)
    L = _num_layers(model)
    n_vis = int(_visual(model, inputs["input_ids"])[0].sum())
    policy = DOPPolicy(L // 2, 1, max(1, n_vis // 2))
    steps = 4
    with apply_dop(model, policy, reducer="uniform"):
        cached = _generate(model, inputs, steps)
        seq, mask = inputs["input_ids"], inputs["attention_mask"]
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        recomputed = []
        for _ in range(steps):
            with torch.no_grad():
                logits = model(input_ids=seq, attention_mask=mask, use_cache=False, **extra).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            recomputed.append(nxt)
            seq = torch.cat([seq, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            extend_token_types(extra, nxt)
    assert torch.equal(cached, torch.cat(recomputed, 1))


def test_left_padded_batch_equals_single(tiny):
    family, model, processor = tiny
    inputs = _inputs(family, processor, n=2)
    assert not bool(inputs["attention_mask"].all()), "the test needs a padded batch"
    L = _num_layers(model)
    n_vis = int(_visual(model, inputs["input_ids"])[0].sum())
    policy = DOPPolicy(L // 2, 1, max(1, n_vis // 3))
    with apply_dop(model, policy, reducer="uniform"):
        batch_logits = _logits(model, inputs)[:, -1]
        batch_gen = _generate(model, inputs, 3)
        for b in range(2):
            single = tiny_inputs(family, processor, [QUESTIONS[b]], [tiny_image(seed=b)])  # unpadded
            torch.testing.assert_close(_logits(model, single)[:, -1], batch_logits[b : b + 1], atol=1e-5, rtol=1e-5)
            assert torch.equal(_generate(model, single, 3), batch_gen[b : b + 1])


def test_sdpa_equals_eager(tiny):
    family, model, processor = tiny
    eager, _ = load_tiny(family, attn_implementation="eager")
    inputs = _inputs(family, processor, n=2)
    L = _num_layers(model)
    n_vis = int(_visual(model, inputs["input_ids"])[0].sum())
    policy = DOPPolicy(L // 2, 1, max(1, n_vis // 2))
    with apply_dop(model, policy, reducer="uniform"), apply_dop(eager, policy, reducer="uniform"):
        torch.testing.assert_close(_logits(model, inputs)[:, -1], _logits(eager, inputs)[:, -1], atol=1e-5, rtol=1e-5)
        assert torch.equal(_generate(model, inputs, 3), _generate(eager, inputs, 3))


def _decoder_flops(model, inputs) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**inputs, use_cache=False)
    per_module = counter.get_flop_counts()
    total = 0
    for name, ops in per_module.items():
        parts = name.split(".")
        # exactly the layer modules (children are included in their parent's count)
        if len(parts) >= 2 and parts[-2] == "layers" and parts[-1].isdigit() and ("language_model" in name or "text_model" in name):
            total += sum(ops.values())
    return total


def test_measured_flops_equal_analytic(tiny):
    family, model, processor = tiny
    eager, _ = load_tiny(family, attn_implementation="eager")  # explicit matmuls for the counter
    inputs = _inputs(family, processor, n=1)
    L = _num_layers(model)
    visual = _visual(model, inputs["input_ids"])
    n_vis = int(visual.sum())
    n_text = inputs["input_ids"].shape[1] - n_vis
    spec = ArchSpec.from_model(eager, visual_tokens=n_vis)
    for policy in (DOPPolicy.full(L), DOPPolicy(0, 0), DOPPolicy(L, L, n_vis // 2), DOPPolicy(1, L, max(1, n_vis // 3)), DOPPolicy(L // 2, 1, n_vis // 2)):
        with apply_dop(eager, policy, reducer="uniform" if policy.n_v else None):
            measured = _decoder_flops(eager, inputs)
        analytic = policy_flops(spec, policy, n_text, executed=True)
        assert abs(measured - analytic) <= 0.01 * analytic, (family, policy, measured, analytic)


def test_bad_input_messages(tiny):
    family, model, processor = tiny
    L = _num_layers(model)
    with pytest.raises(PolicyError, match=f"L={L}"):
        apply_dop(model, DOPPolicy(L + 1, 0))
    with pytest.raises(ReducerError, match="valid reducers: .*uniform"):
        apply_dop(model, DOPPolicy(1, 1, 3), reducer="nope")
    with pytest.raises(ReducerError, match="no reducer"):
        apply_dop(model, DOPPolicy(1, 1, 3))
    inputs = _inputs(family, processor, n=1)
    n_vis = int(_visual(model, inputs["input_ids"]).sum())
    with apply_dop(model, DOPPolicy(1, 1, n_vis + 1), reducer="uniform"):
        with pytest.raises(PolicyError, match=f"valid: 1..{n_vis}"):
            _logits(model, inputs)
    # the failed call left nothing behind
    assert all("forward" not in layer.__dict__ for layer in _lm(model).layers)


def test_arch_spec_from_tiny_config(tiny):
    family, model, processor = tiny
    spec = ArchSpec.from_model(model)
    text = model.config.get_text_config(decoder=True)
    assert spec.family == FAMILY_KEY[family]
    assert (spec.num_layers, spec.hidden_size, spec.intermediate_size) == (
        text.num_hidden_layers, text.hidden_size, text.intermediate_size,
    )
    assert spec.kv_dim == text.num_key_value_heads * spec.head_dim
    assert spec.gqa == (family in ("qwen25vl", "internvl3"))
    assert spec.image_token_ids == (model.config.image_token_id,)


def _weak_visual(h_out, visual, alive):
    """Toy content-dependent rule: drop the visual tokens whose output norm is below their sample's median."""
    norms = h_out.norm(dim=-1).masked_fill(~(visual & alive), float("inf"))
    drop = torch.zeros_like(visual)
    for b in range(visual.shape[0]):
        n = int((visual[b] & alive[b]).sum())
        drop[b, torch.argsort(norms[b])[: n // 2]] = True
    return drop


class _NormPruner:
    """A decoder-side pruner written against the hook (FastV-style: after one layer, drop tokens)."""

    name = "toy_norm"

    def __init__(self, layer):
        self.layers = (layer,)

    def select(self, ctx):
        assert ctx.hidden_out.shape == ctx.hidden_in.shape
        return _weak_visual(ctx.hidden_out, ctx.visual, ctx.alive)


def test_decoder_token_pruner_matches_reference_and_decodes(tiny):
    family, model, processor = tiny
    inputs = _inputs(family, processor, n=2)
    L = _num_layers(model)
    n_vis = int(_visual(model, inputs["input_ids"])[0].sum())
    for policy in (DOPPolicy.full(L), DOPPolicy(L - 1, 2, max(2, n_vis // 2))):
        ref = masked_reference(model, inputs, policy, drop_after=(1, _weak_visual))
        with apply_dop(model, policy, reducer="uniform" if policy.n_v else None, token_pruner=_NormPruner(1)) as h:
            out = _logits(model, inputs)[:, -1]
            cached = _generate(model, inputs, 3)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=f"{family} {policy}")
        kept_vis = (policy.n_v or n_vis) - (policy.n_v or n_vis) // 2
        assert h.last_sample_layer_tokens[2][0][0] == h.last_sample_layer_tokens[1][0][0] - (policy.n_v or n_vis) // 2
        assert kept_vis > 0
        # cached decoding equals recomputation under the same dynamic pruning
        seq, mask = inputs["input_ids"], inputs["attention_mask"]
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        with apply_dop(model, policy, reducer="uniform" if policy.n_v else None, token_pruner=_NormPruner(1)):
            for t in range(3):
                with torch.no_grad():
                    nxt = model(input_ids=seq, attention_mask=mask, use_cache=False, **extra).logits[:, -1].argmax(-1, keepdim=True)
                assert torch.equal(nxt[:, 0], cached[:, t])
                seq, mask = torch.cat([seq, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
                extend_token_types(extra, nxt)
    with pytest.raises(ValueError, match="valid: 0.."):
        apply_dop(model, DOPPolicy.full(L), token_pruner=_NormPruner(L - 1))


@pytest.mark.parametrize("mask", [({1}, set()), (set(), {0, 2}), ({0, 1, 2}, set()), ({2}, {1})])
def test_single_operation_pruning_equals_masking(tiny, mask):
    """Visual MHA/MLP operations pruned at single layers (the paper's redundancy analysis, Tables 26-30):
    gathered execution equals the masked reference, cached decoding equals recomputation, and the executor
    processes the declared tokens per layer."""
    from vlmeval_dop.flops import layer_token_counts
    from vlmeval_dop.policy import OperationMask

    family, model, processor = tiny
    inputs = _inputs(family, processor, n=2)
    L = _num_layers(model)
    op = OperationMask(attn=mask[0], mlp=mask[1])
    policy = DOPPolicy(L, L) if family != "llava15" else DOPPolicy(L - 1, L)
    ref = masked_reference(model, inputs, policy, op_mask=op)
    with apply_dop(model, policy, op_mask=op) as handle:
        out = _logits(model, inputs)[:, -1]
        gen = _generate(model, inputs, n=3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # tokens per layer: visual tokens leave exactly the masked operations (padding-free sample 0)
    n = int(inputs["attention_mask"][0].sum())
    n_vis = int(_visual(model, inputs["input_ids"])[0].sum())
    spec = ArchSpec.from_model(model)
    expect = layer_token_counts(spec, policy, n - n_vis, n_visual=n_vis, executed=True, op_mask=op)
    assert handle.last_sample_layer_tokens and [c[0] for c in handle.last_sample_layer_tokens] == expect
    # decoding from the pruned caches equals recomputing the whole sequence step by step
    seq = inputs["input_ids"]
    am = inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with apply_dop(model, policy, op_mask=op), torch.no_grad():
        for t in range(gen.shape[1]):
            logits = model(input_ids=seq, attention_mask=am, use_cache=False, **extra).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            assert torch.equal(nxt, gen[:, t : t + 1])
            seq = torch.cat([seq, nxt], 1)
            am = torch.cat([am, torch.ones_like(nxt)], 1)
            extend_token_types(extra, nxt)
    with pytest.raises(Exception, match="valid: 0.."):
        apply_dop(model, policy, op_mask=OperationMask(attn={L}))


# The family battery: the tests above that take the `tiny` fixture. Other family test modules run them with their
# own `tiny` fixture by `export_battery(globals())` (pytest collects them there).
BATTERY = (
    "test_full_policy_bit_identical",
    "test_policy_grid_matches_masked_reference",
    "test_system_token_depths_match_reference",
    "test_reducer_at_all_tokens_is_identity",
    "test_cached_decoding_equals_recompute",
    "test_left_padded_batch_equals_single",
    "test_sdpa_equals_eager",
    "test_measured_flops_equal_analytic",
    "test_bad_input_messages",
    "test_decoder_token_pruner_matches_reference_and_decodes",
    "test_single_operation_pruning_equals_masking",
)


def export_battery(namespace: dict) -> None:
    """Put the battery's test functions into a test module's namespace."""
    for name in BATTERY:
        namespace[name] = globals()[name]
