"""Tables 3 and 14 style efficiency: prefill latency, per-sample latency, peak memory and TFLOPs of the
unpruned model, the token-reduction baseline and DOP at the paper's budgets, per attention implementation.

Random weights of the real shapes (no checkpoint needed; latency does not depend on the weights, but the
number of generated tokens would, so every sample decodes exactly `--new-tokens` tokens). The model is a
stock LlavaForConditionalGeneration / LlavaNextForConditionalGeneration built from the shapes in
eval_configs/models.yaml with a CLIP ViT-L/14-336 vision tower, fed one 336x336 (LLaVA-1.5) or 672x672
(LLaVA-NeXT) image and `text_tokens` text tokens.

    python reproduce/efficiency.py --model llavanext_7b --budget 0.14 --device cuda --dtype bfloat16
    python reproduce/efficiency.py --model llava15_7b --budget 0.28 --reducer uniform   # stand-in reducer

CDPruner (the default, as Tables 3/14) runs with a random CLIP text tower of the real shape and a fixed
instruction, so its selection cost is part of the measured latency.

`--shrink K` divides every width by K and caps the depth (a CPU smoke test of the script, not a measurement).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from vlmeval_dop import DOPPolicy, apply_dop  # noqa: E402
from vlmeval_dop.arch import ArchSpec  # noqa: E402
from vlmeval_dop.flops import policy_tflops, uniform_tokens_for_budget  # noqa: E402
from vlmeval_dop.models_config import PAPER_POLICIES, get_model  # noqa: E402

IMAGE_TOKEN = 32000
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def build(model_key: str, attn: str, device: str, dtype: torch.dtype, shrink: int = 1):
    """Random-weight stock model of the paper model's shape, and one prompt's inputs."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration)

    paper = get_model(model_key)
    a = paper.arch
    if a.family not in ("llava", "llava_next"):
        raise ValueError(f"efficiency tables cover LLaVA-1.5/NeXT (Tables 3, 14); got {model_key} ({a.family})")
    s = max(1, shrink)
    vision = CLIPVisionConfig(hidden_size=1024 // s, intermediate_size=4096 // s, num_hidden_layers=24 if s == 1 else 2,
                              num_attention_heads=16 // min(s, 16) or 1, image_size=336, patch_size=14,
                              projection_dim=768 // s)
    text = LlamaConfig(hidden_size=a.hidden_size // s, intermediate_size=a.intermediate_size // s,
                       num_hidden_layers=a.num_layers if s == 1 else 4, num_attention_heads=a.num_heads // min(s, a.num_heads),
                       num_key_value_heads=a.num_kv_heads // min(s, a.num_kv_heads), vocab_size=32064,
                       max_position_embeddings=4096)
    torch.manual_seed(0)
    if a.family == "llava":
        cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2)
        cls, image = LlavaForConditionalGeneration, {"pixel_values": torch.randn(1, 3, 336, 336)}
    else:
        cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                              image_grid_pinpoints=PINPOINTS)
        cls = LlavaNextForConditionalGeneration
        image = {"pixel_values": torch.randn(1, 5, 3, 336, 336), "image_sizes": torch.tensor([[672, 672]])}
    cfg._attn_implementation = attn
    with torch.device(device):
        model = cls(cfg).to(dtype).eval()
    image = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in image.items()}
    with torch.no_grad():  # how many placeholders this image needs (llava-hf counts NeXT's row newlines too)
        feats = model.model.get_image_features(**image)
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    n_img = sum(f.shape[0] for f in feats) if isinstance(feats, (list, tuple)) else feats.shape[0] * feats.shape[1]
    ids = torch.randint(1, 31000, (1, paper.text_tokens + n_img), generator=torch.Generator().manual_seed(1))
    ids[0, 35 : 35 + n_img] = IMAGE_TOKEN  # after a system prompt, like the LLaVA template
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), **image}
    return model, inputs, n_img


def make_reducer(name: str, model, shrink: int, device: str, dtype: torch.dtype):
    """The reducer to time. CDPruner needs CLIP's text tower and the instruction: with random weights of the
    real shapes we register a random CLIP text tower of ViT-L/14-336's shape (no download) and give a fixed
    instruction of a typical length, so its cost is measured as in a real run."""
    if name != "cdpruner":
        return name
    from vlmeval_dop.reducers.cdpruner import CDPruner
    from vlmeval_dop.reducers.clip_text import random_clip_text

    source = random_clip_text(model.config.vision_config.hidden_size, shrink, device, dtype)
    question = "What is written on the sign next to the red car? Answer the question using a single word or phrase."
    return CDPruner(clip_model=source, text_fn=lambda ctx, span: question)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(model, inputs, device: str, reps: int, new_tokens: int) -> dict[str, float]:
    """Median prefill and whole-sample latency (ms) and peak memory (GiB, CUDA only)."""
    prefill, sample = [], []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        model(**inputs, use_cache=True, logits_to_keep=1)  # warm-up
        for _ in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            model(**inputs, use_cache=True, logits_to_keep=1)
            _sync(device)
            prefill.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            _sync(device)
            sample.append(time.perf_counter() - t0)
    out = {"prefill_ms": 1e3 * statistics.median(prefill), "sample_ms": 1e3 * statistics.median(sample)}
    if device.startswith("cuda"):
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def run(args) -> list[dict]:
    paper = get_model(args.model)
    budget = args.budget
    if budget not in PAPER_POLICIES.get(args.model, {}):
        raise ValueError(f"no paper policy for {args.model} at {budget}; valid: {sorted(PAPER_POLICIES[args.model])}")
    dtype = getattr(torch, args.dtype)
    rows = []
    for attn in args.attn:
        model, inputs, n_img = build(args.model, attn, args.device, dtype, args.shrink)
        spec = ArchSpec.from_model(model, visual_tokens=paper.arch.visual_tokens)
        n_e = uniform_tokens_for_budget(paper.arch, budget, paper.text_tokens)
        L = spec.num_layers
        paper_dop = PAPER_POLICIES[args.model][budget]
        dop = paper_dop
        if args.shrink > 1:  # keep the policy's shape on the shrunk depth
            dop = DOPPolicy(round(dop.d_A * L / paper.arch.num_layers), round(dop.d_P * L / paper.arch.num_layers), dop.n_v)
        Lp = paper.arch.num_layers
        # (label, policy run here, reducer, the paper-shape policy whose TFLOPs the row reports)
        variants = [("unpruned", DOPPolicy.full(L), None, DOPPolicy.full(Lp)),
                    (f"{args.reducer} (n_v={n_e})", DOPPolicy(L, L, n_e), args.reducer, DOPPolicy(Lp, Lp, n_e)),
                    (f"DOP {paper_dop}", dop, args.reducer, paper_dop)]
        reducer_obj = make_reducer(args.reducer, model, args.shrink, args.device, dtype)
        variants = [(n, p, reducer_obj if r is not None else None, pp) for n, p, r, pp in variants]
        for name, policy, reducer, paper_policy in variants:
            tf = policy_tflops(paper.arch, paper_policy, paper.text_tokens)
            with apply_dop(model, policy, reducer=reducer if policy.n_v else None):
                m = measure(model, inputs, args.device, args.reps, args.new_tokens)
            rows.append({"model": args.model, "attn": attn, "method": name, "tflops_ratio": tf["ratio"],
                         "image_placeholders": n_img, **m})
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llava15_7b", choices=["llava15_7b", "llava15_13b", "llavanext_7b", "llavanext_13b"])
    p.add_argument("--budget", type=float, default=0.28)
    p.add_argument("--reducer", default="cdpruner", help="token reduction for the baseline and DOP rows")
    p.add_argument("--attn", nargs="+", default=["eager", "sdpa"], help="attention implementations (flash_attention_2 needs flash-attn)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--shrink", type=int, default=1, help="divide widths by K and use 4 layers (smoke test only)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    try:
        rows = run(args)
    except ValueError as exc:
        print(f"reproduce/efficiency.py: error: {exc}", file=sys.stderr)
        return 2
    note = "random weights of the real shapes" if args.shrink == 1 else f"SMOKE TEST: widths / {args.shrink}, 4 layers"
    print(f"# {args.model} @ {args.budget}, {args.device} {args.dtype}, median of {args.reps}, "
          f"{args.new_tokens} new tokens per sample; {note}")
    print("| attn | method | TFLOPs | prefill (ms) | sample (ms) | peak mem (GiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mem = f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "-"
        print(f"| {r['attn']} | {r['method']} | {100 * r['tflops_ratio']:.1f} % | {r['prefill_ms']:.1f} | "
              f"{r['sample_ms']:.1f} | {mem} |")
    if args.json:
        args.json.write_text(json.dumps({"note": note, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
