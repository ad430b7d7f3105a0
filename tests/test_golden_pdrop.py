"""PDrop through `apply_dop` against fixtures from the official PyramidDrop code (tests/golden/pdrop/README.md).

A tiny LLaVA-1.5-shaped model (26-layer LLaMA decoder, so the official layer_list [8, 16, 24] runs) is built
from a seed with the same decoder weights as the official run (`golden_param`), its image features are the
same seeded tensor (`golden_inputs`, fed through the projector's output). For every case (official lambda 0.5
at [8, 16, 24] and the three solved lambdas of the budget entries at [2, 8, 16, 24], 3 seeds each; one
LLaVA-NeXT-sized image) the kept image tokens at every stage (set and order, in original and stage
coordinates), the RoPE positions every stage's attention uses in prefill and decoding, the logits of every
generated step and the greedy tokens equal the official ones.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.baselines.pdrop import PDrop, pdrop_kept_counts, pdrop_layer_tokens, pdrop_ratio_list

FIXTURE = Path(__file__).parent / "golden" / "pdrop" / "official_pdrop.json"
CASES = json.loads(FIXTURE.read_text())["cases"]

# ---- the generator script implements these two functions identically -----------------------------
LAYERS, HIDDEN, HEADS, INTER, VOCAB = 26, 64, 4, 128, 128
IMAGE_TOKEN_ID = VOCAB - 1


def golden_param(name, shape, seed):
    g = torch.Generator().manual_seed(seed * 100_003 + zlib.crc32(name.encode()))
    x = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
    return 1.0 + 0.1 * x if name.endswith("norm.weight") else 0.1 * x


def golden_inputs(seed, n_image):
    g = torch.Generator().manual_seed(10_000 + seed)
    pre = torch.randint(0, VOCAB - 1, (6 + seed % 3,), generator=g)
    post = torch.randint(0, VOCAB - 1, (12 + seed % 5,), generator=g)
    feats = torch.randn(n_image, HIDDEN, generator=g, dtype=torch.float32)
    return pre, post, feats
# ---------------------------------------------------------------------------------------------------


def _tiny_llava(seed: int):
    """LlavaForConditionalGeneration whose decoder and lm_head carry the official run's weights."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, rms_norm_eps=1e-5, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                         vision_feature_layer=-1, tie_word_embeddings=False)  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)  # the vision tower's weights do not matter (its output is replaced)
    model = LlavaForConditionalGeneration(config).eval()
    lm = model.model.language_model
    with torch.no_grad():
        for name, p in lm.named_parameters():
            p.copy_(golden_param(name, p.shape, seed))
        model.lm_head.weight.copy_(golden_param("lm_head.weight", model.lm_head.weight.shape, seed))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


class _Spy(PDrop):
    """PDrop that records, per stage, the kept image tokens in original and in stage coordinates."""

    def select(self, ctx):
        decision = super().select(ctx)
        cand = (ctx.visual & ctx.alive)[0]
        first = int(torch.nonzero(ctx.visual[0])[0])
        kept = torch.nonzero(cand & ~decision.drop[0]).flatten()
        alive = torch.nonzero(ctx.alive[0]).flatten().tolist()
        self.stages.append(([int(i) - first for i in kept], [alive.index(int(i)) - first for i in kept]))
        return decision


def _positions_from_rope(cos_sin: tuple[torch.Tensor, torch.Tensor], table: torch.Tensor) -> list[int]:
    """Recover the RoPE position of each token from the (cos, sin) an attention call got (sample 0)."""
    rows = torch.cat([cos_sin[0][0], cos_sin[1][0]], dim=-1)
    return torch.cdist(rows.double(), table.double()).argmin(1).tolist()


def _run(case):
    seed, n_image = case["seed"], case["n_image"]
    model = _tiny_llava(seed)
    pre, post, feats = golden_inputs(seed, n_image)
    assert (len(pre), len(post)) == (case["n_pre"], case["n_post"])
    ids = torch.cat([pre, torch.full((n_image,), IMAGE_TOKEN_ID), post])[None]
    embeds = model.model.language_model.embed_tokens(ids).detach()
    embeds[0, len(pre) : len(pre) + n_image] = feats
    assert abs(float(embeds.double().sum()) - case["input_checksum"]) < 1e-6 * max(1.0, abs(case["input_checksum"]))

    # the image features are the seeded tensor the official run used (the projector's output is replaced)
    model.model.multi_modal_projector.register_forward_hook(lambda mod, inp, out: feats[None].to(out.dtype))
    lm = model.model.language_model
    table = torch.cat([t[0] for t in lm.rotary_emb(embeds, torch.arange(4096)[None])], dim=-1)
    seen: dict[int, list[list[int]]] = {}
    watch = [0] + case["layer_list"]
    for i in watch:
        def hook(mod, args, kwargs, i=i):
            seen.setdefault(i, []).append(_positions_from_rope(kwargs["position_embeddings"], table))
        lm.layers[i].self_attn.register_forward_pre_hook(hook, with_kwargs=True)

    spy = _Spy(boundaries=case["layer_list"], ratios=case["ratios"])
    spy.stages = []
    n_new = len(case["tokens"])
    with apply_dop(model, DOPPolicy.full(LAYERS), token_pruner=spy), torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.zeros(1, 3, 28, 28),
            max_new_tokens=n_new, do_sample=False, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    return spy.stages, seen, out.sequences[0, -n_new:].tolist(), torch.stack([x[0] for x in out.logits])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"s{c['seed']}-N{c['n_image']}-{c['layer_list']}-{c['ratios'][0]:.4f}")
def test_pdrop_matches_official(case):
    stages, seen, tokens, logits = _run(case)
    assert len(stages) == len(case["stages"])
    for (orig, local), ref in zip(stages, case["stages"]):
        assert orig == ref["kept_visual_original"]  # same set, same order
        assert local == ref["kept_visual_local"]
    # prefill: each stage's first layer attends with the official (renumbered) positions
    for layer, ref in zip(case["layer_list"], case["stages"]):
        assert seen[layer][0] == ref["positions"] and len(ref["positions"]) == ref["seq_len"]
    assert seen[0][0] == list(range(case["n_pre"] + case["n_image"] + case["n_post"]))
    # decoding: the official per-stage position shift
    for layer, ref in case["decode_positions"].items():
        assert [p[0] for p in seen[int(layer)][1:]] == ref
    torch.testing.assert_close(logits, torch.tensor(case["logits"]), atol=1e-4, rtol=0)
    assert tokens == case["tokens"]


def test_pdrop_counts_and_flops_schedule():
    # official LLaVA-1.5 setting: 576 -> 288 -> 144 -> 72 with int() of N x ratio_list[s]
    assert pdrop_ratio_list([8, 16, 24], 0.5) == [0.5, 0.25, 0.125]
    assert pdrop_kept_counts(576, [0.5, 0.25, 0.125]) == [288, 144, 72]
    assert pdrop_kept_counts(576, pdrop_ratio_list([2, 8, 16, 24], 0.4367)) == [251, 109, 47, 20]  # floors, not ceil
    counts = pdrop_layer_tokens(32, [8, 16, 24], 576, 0.5, 100)
    assert [c[0] for c in counts[6:10]] == [676, 676, 388, 388] and counts[-1] == (172, 172)
    assert PDrop.layer_tokens(32, 576, 100, boundaries=[8, 16, 24], ratios=[0.5, 0.25, 0.125]) == counts
    for case in CASES:  # the fixtures' stage sizes are the counts the FLOPs model uses
        kept = pdrop_kept_counts(case["n_image"], case["ratios"])
        assert kept == [len(s["kept_visual_original"]) for s in case["stages"]]
    with pytest.raises(ValueError, match="non-increasing"):
        PDrop(boundaries=[8, 16], ratios=[0.25, 0.5])
    with pytest.raises(ValueError, match="one ratio per stage"):
        PDrop(boundaries=[8, 16], ratios=[0.5])
    with pytest.raises(ValueError, match="increasing layers"):
        PDrop(boundaries=[16, 8])
