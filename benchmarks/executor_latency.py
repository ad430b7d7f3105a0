"""Prefill latency of the DOP executor vs its TFLOPs ratio, on a reduced-depth, real-width LLaVA decoder.

Builds a LlavaForConditionalGeneration with random weights: the decoder has the real width of the chosen
paper model (e.g. 4096/11008 for 7B) but only `--layers` layers; the vision tower is a tiny stand-in that
still yields the real number of visual tokens (576 for LLaVA-1.5, 2880+48 for LLaVA-NeXT is not built
here: use --visual-tokens), so the measured time is dominated by the decoder as in the real model.
Prints, measured in one run: decoder latency ratio DOP/full beside the executed TFLOPs ratio, the share
of time outside the decoder layers (vision, embedding, lm_head: unpruned by DOP), and the full-policy
overhead of the executor versus stock transformers.

    python benchmarks/executor_latency.py                       # CPU, 2 layers of the 7B width
    python benchmarks/executor_latency.py --device cuda --dtype bfloat16 --layers 32   # real depth on a GPU
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from vlmeval_dop import DOPPolicy, apply_dop
from vlmeval_dop.arch import ArchSpec
from vlmeval_dop.flops import policy_tflops
from vlmeval_dop.models_config import get_model


def build(args, arch=None) -> tuple[LlavaForConditionalGeneration, dict]:
    """Stand-in LLaVA with the decoder shapes of `arch` (default: the paper model's) and `args.layers` layers."""
    paper = get_model(args.model)
    a = arch or paper.arch
    side = int(round(args.visual_tokens**0.5))
    if side * side != args.visual_tokens:
        raise SystemExit("--visual-tokens must be a square number for the single-tile stand-in tower")
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        image_size=side * 14, patch_size=14,
    )
    text = LlamaConfig(
        hidden_size=a.hidden_size, intermediate_size=a.intermediate_size, num_hidden_layers=args.layers,
        num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim,
        vocab_size=32064, max_position_embeddings=8192,
    )
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):
        model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    model.set_attn_implementation(args.attn)
    n_text = args.text_tokens
    ids = torch.randint(1, 31000, (1, n_text + args.visual_tokens))
    ids[0, 5 : 5 + args.visual_tokens] = 32000
    inputs = {
        "input_ids": ids.to(args.device),
        "attention_mask": torch.ones_like(ids).to(args.device),
        "pixel_values": torch.randn(1, 3, side * 14, side * 14, dtype=dtype, device=args.device),
    }
    return model, inputs


def timed(model, inputs, reps: int, device: str) -> tuple[float, float]:
    """Median wall time of one prefill and of the decoder layers within it (seconds)."""
    lm = model.model.language_model
    marks: dict[str, float] = {}

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def pre(*_a, **_k):
        sync()
        marks["start"] = time.perf_counter()

    def post(*_a, **_k):
        sync()
        marks["end"] = time.perf_counter()

    first, last = lm.layers[0], lm.layers[-1]
    h1 = first.register_forward_pre_hook(pre)
    h2 = last.register_forward_hook(post)
    totals, decoder = [], []
    try:
        with torch.no_grad():
            for _ in range(2):  # warm-up (generate-style prefill: logits of the last token only)
                model(**inputs, use_cache=True, logits_to_keep=1)
            for _ in range(reps):
                sync()
                t0 = time.perf_counter()
                model(**inputs, use_cache=True, logits_to_keep=1)
                sync()
                totals.append(time.perf_counter() - t0)
                decoder.append(marks["end"] - marks["start"])
    finally:
        h1.remove()
        h2.remove()
    return statistics.median(totals), statistics.median(decoder)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llava15_7b", help="paper model whose decoder width is used")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--visual-tokens", type=int, default=576)
    p.add_argument("--text-tokens", type=int, default=135)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    args = p.parse_args(argv)

    model, inputs = build(args)
    L = args.layers
    spec = ArchSpec.from_model(model, visual_tokens=args.visual_tokens)
    n_v = args.visual_tokens
    # paper-like operating points scaled to L layers (fractions of depth as in Table 15)
    policies = [
        DOPPolicy.full(L),
        DOPPolicy(L, L, n_v // 3),
        DOPPolicy(max(1, (26 * L) // 32), max(1, (19 * L) // 32), max(1, (97 * n_v) // 576)),
        DOPPolicy(L // 2, L // 4, max(1, (51 * n_v) // 576)),
        DOPPolicy(0, 0, 1),
    ]
    timed(model, inputs, 1, args.device)  # first-call effects (allocator, thread pools) out of the numbers
    stock_total, stock_dec = timed(model, inputs, args.reps, args.device)
    print(f"# {args.model} width, {L} layers, {n_v} visual + {args.text_tokens} text tokens, "
          f"{args.device} {args.dtype} {args.attn}, median of {args.reps}")
    print(f"stock transformers: prefill {stock_total * 1e3:.1f} ms, decoder layers {stock_dec * 1e3:.1f} ms "
          f"(outside decoder: {100 * (1 - stock_dec / stock_total):.1f} % of prefill)")
    print(f"{'policy':34s} {'TFLOPs':>7s} {'exec':>7s} {'dec.lat':>8s} {'lat/TF':>7s} {'prefill':>8s}")
    for policy in policies:
        r = policy_tflops(spec, policy, args.text_tokens)
        with apply_dop(model, policy, reducer="uniform" if policy.n_v else None):
            total, dec = timed(model, inputs, args.reps, args.device)
        ratio = dec / stock_dec
        print(f"{str(policy):34s} {r['ratio']:7.3f} {r['executed_ratio']:7.3f} {ratio:8.3f} "
              f"{ratio / r['executed_ratio']:7.3f} {total / stock_total:8.3f}")
        if policy == DOPPolicy(0, 0, 1):
            # the same decoder on a text-only prompt of the surviving length: what any implementation
            # would pay for these tokens (small matmuls run below peak; this is not executor overhead)
            ids = inputs["input_ids"][:, inputs["input_ids"][0] != 32000][:, : args.text_tokens + 1]
            _, floor = timed(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, args.reps, args.device)
            print(f"  stock decoder on {ids.shape[1]} text tokens: {floor / stock_dec:.3f} of full "
                  f"(DOP at this policy: {ratio:.3f})")
        if policy == DOPPolicy.full(L):
            print(f"  full-policy overhead vs stock: decoder {100 * (ratio - 1):+.2f} %, prefill {100 * (total / stock_total - 1):+.2f} %")


if __name__ == "__main__":
    main()
