"""Analytic FLOPs of the families beyond the paper (issue 15) against FlopCounterMode on 2-layer builds at the
real decoder width of each paper-scale entry in eval_configs/models.yaml.

The model is the family's stock transformers class built from its tiny checkpoint's config with the decoder
shape of the real checkpoint (hidden size, heads, KV heads, head_dim, MLP width; 2 layers, eager attention),
weights allocated uninitialised and zeroed (FLOPs do not depend on values). It runs under `apply_dop` on a
sequence with visual placeholders and no pixels (the vision tower is not part of the decoder count), and
the matmul FLOPs FlopCounterMode measures in the decoder layers must equal `flops.policy_flops(executed=True)`
exactly, for policies that exercise every term (reduced tokens, MLP-only, attention-only, keys/values-only).
"""
from __future__ import annotations

import gc

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.arch import ArchSpec
from vlmeval_dop.flops import policy_flops
from vlmeval_dop.models_config import load_models

# paper-scale entry -> tiny family whose config (classes, token ids, vision tower) is reused
ENTRIES = {"qwen2vl_7b": "qwen2vl", "internvl35_8b": "internvl35", "llavaov_7b": "llavaov", "smolvlm_256m": "smolvlm",
           "smolvlm_500m": "smolvlm", "smolvlm_2b": "smolvlm", "qwen3vl_8b": "qwen3vl", "qwen3vl_4b": "qwen3vl",
           "qwen3vl_2b": "qwen3vl", "gemma3_4b": "gemma3", "videollava_7b": "videollava"}
N_TEXT_BEFORE, N_VISUAL, N_TEXT_AFTER = 6, 24, 10


def real_width_model(entry: str, tiny_family: str, num_layers: int = 2):
    """The family's stock model with `entry`'s decoder shape and `num_layers` layers, eager attention."""
    import transformers
    from transformers import AutoConfig

    from vlmeval_dop.tiny import _MODEL_CLASSES, tiny_path

    arch = load_models()[entry].arch
    config = AutoConfig.from_pretrained(tiny_path(tiny_family), local_files_only=True)
    data = config.to_dict()
    text = data["text_config"]
    text.pop("layer_types", None)  # rebuilt for the new depth
    text.update(
        hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size, num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads, head_dim=arch.head_dim, num_hidden_layers=num_layers,
    )  # fmt: skip
    rope = text.get("rope_parameters") or {}
    if "mrope_section" in rope:  # M-RoPE sections of the real head_dim 128 (Qwen3-VL: interleaved)
        rope["mrope_section"] = [24, 20, 20] if rope.get("mrope_interleaved") else [16, 24, 24]
    if data.get("model_type") == "qwen2_vl":
        data["vision_config"]["hidden_size"] = arch.hidden_size  # the merger's output width
    if data.get("model_type") == "qwen3_vl":
        data["vision_config"]["out_hidden_size"] = arch.hidden_size
    if data.get("model_type") == "gemma3":  # the real attention scale and window (masks change no matmul count)
        text.update(query_pre_attn_scalar=arch.head_dim, sliding_window=1024)
    config = type(config).from_dict(data)
    cls = getattr(transformers, _MODEL_CLASSES[tiny_family])
    with torch.device("meta"):
        model = cls._from_config(config, attn_implementation="eager")
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.zero_()
    return model


def _decoder_flops(model, inputs) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(**inputs, use_cache=False)
    total = 0
    for name, ops in counter.get_flop_counts().items():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] == "layers" and parts[-1].isdigit() and ("language_model" in name or "text_model" in name):
            total += sum(ops.values())
    return total


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_real_width_flops_equal_analytic(entry):
    model = real_width_model(entry, ENTRIES[entry])
    try:
        arch = load_models()[entry].arch
        spec = ArchSpec.from_model(model, visual_tokens=N_VISUAL)
        # the built decoder is the models.yaml shape (so the count below is the entry's count per layer)
        assert (spec.family, spec.hidden_size, spec.q_dim, spec.kv_dim, spec.intermediate_size) == (
            arch.family, arch.hidden_size, arch.q_dim, arch.kv_dim, arch.intermediate_size,
        )  # fmt: skip
        text_id = 5
        # every visual placeholder id of the family (Video-LLaVA: `<image>` and `<video>`)
        for image in spec.image_token_ids:
            ids = [text_id] * N_TEXT_BEFORE + [image] * N_VISUAL + [text_id] * N_TEXT_AFTER
            inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
            n_text = len(ids) - N_VISUAL
            for policy in (DOPPolicy.full(2), DOPPolicy(0, 0), DOPPolicy(2, 2, 12), DOPPolicy(1, 2, 8),
                           DOPPolicy(1, 0), DOPPolicy(2, 0, 5)):  # fmt: skip
                with apply_dop(model, policy, reducer="uniform" if policy.n_v else None):
                    measured = _decoder_flops(model, inputs)
                analytic = policy_flops(spec, policy, n_text, executed=True)
                assert measured == analytic, (entry, image, policy, measured, analytic)
    finally:
        del model
        gc.collect()


def test_cli_flops_any_supported_config(capsys):
    """`vlmeval-dop flops --model` takes a checkpoint directory, its config.json or a tiny model key; the count
    is the analytic one of the config's ArchSpec."""
    import json

    from vlmeval_dop.cli import main
    from vlmeval_dop.flops import policy_tflops
    from vlmeval_dop.tiny import tiny_path

    path = tiny_path("qwen2vl")
    spec = ArchSpec.from_config(__import__("transformers").AutoConfig.from_pretrained(path), visual_tokens=64)
    want = policy_tflops(spec, DOPPolicy(2, 1, 8), 40)
    for model in (str(path), str(path / "config.json"), "tiny_qwen2vl"):
        extra = [] if model == "tiny_qwen2vl" else ["--text-tokens", "40", "--visual-tokens", "64"]
        assert main(["flops", "--model", model, "--policy", "2,1,8", "--json", *extra]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["visual_tokens"] == 64 and out["text_tokens"] == 40
        assert out["ratio"] == pytest.approx(want["ratio"]) and out["tflops"] == pytest.approx(want["tflops"])
    # a registered key keeps its models.yaml shape; a checkpoint of an unsupported class names the supported ones
    assert main(["flops", "--model", "internvl35_8b", "--policy", "20,14,256"]) == 0
    assert "L=36, N_v=1280, text tokens=135" in capsys.readouterr().out
    bad = path.parent / "not-a-model"
    bad.mkdir(exist_ok=True)
    (bad / "config.json").write_text('{"model_type": "bert"}')
    assert main(["flops", "--model", str(bad), "--policy", "1,1,1"]) == 2
    assert "vlmeval_dop supports: " in capsys.readouterr().err
