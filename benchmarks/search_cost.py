"""Cost of profiling the divergence curves: the paper's naive 3I+1 runs vs ours, measured in one run.

Naive (as the paper): batch size 1, eager attention, one full forward per sampling point (vision tower
included). Ours: prefix sharing (unpruned layers replayed from the unpruned run), vision tower once per
sample, batched samples, sdpa. Same model weights (a reduced-depth decoder of a paper model's real width,
random weights, built as in executor_latency.py); sampling points are the paper's Table 6 points scaled to
the reduced depth. Prints decoder-layer forwards, FLOP-weighted layer equivalents and wall time.

    python benchmarks/search_cost.py                      # CPU: 4 layers of the 7B width, 2 samples
    python benchmarks/search_cost.py --narrow --layers 32  # real depth and token counts, 64-wide layers:
                                                           # counts weighted by the 7B shapes, no timing
    python benchmarks/search_cost.py --device cuda --dtype bfloat16 --layers 32 --samples 100 --batch 8
    python benchmarks/search_cost.py --narrow --layers 32 --samples 1 --batch 1 --joint-grid 0.28
                                                           # + the joint runs of search --joint-grid (F.3 grid)
"""
from __future__ import annotations

import argparse
import time

import torch

from executor_latency import build  # same stand-in model as the executor benchmark
from vlmeval_dop.models_config import get_model
from vlmeval_dop.search.profile import ProfileCounter, profile_batch, profile_naive


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llava15_7b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--visual-tokens", type=int, default=576)
    p.add_argument("--text-tokens", type=int, default=135)
    p.add_argument("--system-tokens", type=int, default=35,
                   help="text tokens before the image (default 35: LLaVA-1.5's prompt, BOS + Vicuna system prompt + "
                        "'USER:'); the search never recomputes them (their keys/values come from the unpruned run)")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--skip-naive", action="store_true", help="only time ours (e.g. 100 samples on a GPU)")
    p.add_argument("--narrow", action="store_true",
                   help="64-wide decoder layers (fast at real depth): layer counts are exact, layer-equivalents are "
                        "weighted by the paper model's shapes, wall times are not meaningful")
    p.add_argument("--joint-grid", type=float, default=None, metavar="BUDGET",
                   help="also count the joint runs of `search --joint-grid` at this budget (the F.3 grid of the paper "
                        "model at --layers depth) against one full forward per grid policy (analytic, executed FLOPs)")
    args = p.parse_args(argv)

    paper = get_model(args.model)
    L_paper = paper.arch.num_layers
    depths = sorted({round(d * args.layers / L_paper) for d in paper.sampling_depths}, reverse=True)
    visual = [max(1, round(n * args.visual_tokens / paper.arch.visual_tokens)) for n in paper.sampling_visual]

    args.attn = "sdpa"
    if args.narrow:
        import dataclasses

        narrow = dataclasses.replace(paper.arch, hidden_size=64, intermediate_size=172, num_heads=4,
                                     num_kv_heads=4, head_dim=16)  # fmt: skip
        model, one = build(args, arch=narrow)
    else:
        model, one = build(args)
    weigh = paper.arch if args.narrow else None  # layer-equivalents of the real 7B-shaped layers
    if not 0 <= args.system_tokens <= args.text_tokens:
        raise SystemExit(f"--system-tokens must be in 0..--text-tokens={args.text_tokens}")
    image = torch.zeros_like(one["input_ids"][0], dtype=torch.bool)
    image[args.system_tokens : args.system_tokens + args.visual_tokens] = True
    one["input_ids"][0][image] = 32000  # the prompt's layout: system text, image, instruction
    one["input_ids"][0][~image] = torch.randint(1, 31000, (int((~image).sum()),)).to(args.device)

    def batch_of(n: int) -> dict:
        out = {k: v.repeat(n, *([1] * (v.ndim - 1))) for k, v in one.items()}
        g = torch.Generator().manual_seed(n)
        # different prompts per sample (text ids and pixels), same length: no padding needed
        text = out["input_ids"] != 32000
        out["input_ids"][text] = torch.randint(1, 31000, (int(text.sum()),), generator=g).to(args.device)
        out["pixel_values"] = torch.randn(out["pixel_values"].shape, generator=g).to(out["pixel_values"])
        return out

    width = "64-wide stand-in layers, counts weighted by the " + args.model if args.narrow else args.model
    print(f"# {width} width, {args.layers} layers, {args.visual_tokens}+{args.text_tokens} tokens "
          f"({args.system_tokens} before the image), "
          f"{args.samples} samples, {args.device} {args.dtype}; depths {depths}, n_v {visual}")
    ours, t0 = ProfileCounter(flops_spec=weigh), time.perf_counter()
    done = 0
    while done < args.samples:
        n = min(args.batch, args.samples - done)
        profile_batch(model, batch_of(n), depths, visual, "uniform", ours)
        done += n
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_ours = time.perf_counter() - t0
    print(f"ours  (prefix sharing, vision once, batch {args.batch}, sdpa): {ours.layer_forwards} layer forwards, "
          f"{ours.layer_equivalents:.1f} layer-equivalents, {t_ours:.1f} s")
    if args.joint_grid is not None:
        joint_cost(args, paper, model, batch_of(1), weigh)
    if args.skip_naive:
        return
    model.set_attn_implementation("eager")
    naive, t0 = ProfileCounter(flops_spec=weigh), time.perf_counter()
    for _ in range(args.samples):
        profile_naive(model, batch_of(1), depths, visual, "uniform", naive)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_naive = time.perf_counter() - t0
    print(f"naive (paper: 3I+1 full runs, batch 1, eager):          {naive.layer_forwards} layer forwards, "
          f"{naive.layer_equivalents:.1f} layer-equivalents, {t_naive:.1f} s")
    print(f"ratio naive/ours: layer forwards {naive.layer_forwards / ours.layer_forwards:.2f}x, "
          f"layer-equivalents {naive.layer_equivalents / ours.layer_equivalents:.2f}x, wall time {t_naive / t_ours:.2f}x"
          + (" (narrow stand-in: wall time not meaningful)" if args.narrow else ""))
    masked = naive.model_runs * args.layers  # an implementation that masks instead of skipping: every layer full
    print(f"vs a masking implementation of the naive procedure ({masked} full layer-equivalents): "
          f"{masked / ours.layer_equivalents:.2f}x")


def joint_cost(args, paper, model, inputs, weigh) -> None:
    """Layer-equivalents per sample of the joint runs of `--joint-grid` vs one full forward per policy."""
    import dataclasses

    from vlmeval_dop.flops import full_flops, layer_flops, policy_flops
    from vlmeval_dop.search.extensions import grid_policies
    from vlmeval_dop.search.joint import joint_batch

    spec = dataclasses.replace(paper.arch, num_layers=args.layers, visual_tokens=args.visual_tokens)
    grid = grid_policies(spec, args.joint_grid, text_tokens=args.text_tokens, alpha=paper.alpha)
    counter, t0 = ProfileCounter(flops_spec=weigh), time.perf_counter()
    joint_batch(model, inputs, list(grid.policies), "uniform", counter)
    t = time.perf_counter() - t0
    unit = layer_flops(spec, args.visual_tokens + args.text_tokens, args.visual_tokens + args.text_tokens)
    plain = sum(policy_flops(spec, p, args.text_tokens, executed=True) for p in grid.policies) / unit
    plain += full_flops(spec, args.text_tokens) / unit  # the unpruned reference run
    print(f"joint grid at {args.joint_grid}: {len(grid.policies)} policies ({grid.n_feasible} grid points), "
          f"{counter.layer_forwards} layer forwards, {counter.layer_equivalents:.1f} layer-equivalents, {t:.1f} s; "
          f"one forward per policy (executor, executed FLOPs): {plain:.1f} ({plain / counter.layer_equivalents:.2f}x)")


if __name__ == "__main__":
    main()
