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
"""
from __future__ import annotations

import argparse
import time

import torch

from executor_latency import build  # same stand-in model as the executor benchmark
from vlmeval_dop.models_config import get_model
from vlmeval_dop.search.profile import ProfileCounter, profile_batch, profile_naive


def sampling_points(model_key: str, layers: int, visual_tokens: int) -> tuple[list[int], list[int]]:
    """The paper model's Table 6 sampling points scaled to `layers` decoder layers and `visual_tokens` visual
    tokens (identical to the paper's at the real depth and token count)."""
    paper = get_model(model_key)
    depths = sorted({round(d * layers / paper.arch.num_layers) for d in paper.sampling_depths}, reverse=True)
    visual = [max(1, round(n * visual_tokens / paper.arch.visual_tokens)) for n in paper.sampling_visual]
    return depths, visual


def make_batch(one: dict, n: int, seed: int = 0, image_token_ids=(32000,), vocab: int = 31000) -> dict:
    """`n` samples made from the one-sample inputs `one`: same length (no padding), different text ids
    (random in [1, vocab), never an image token) and different pixels per sample."""
    out = {k: v.repeat(n, *([1] * (v.ndim - 1))) for k, v in one.items()}
    g = torch.Generator().manual_seed(seed)
    ids = out["input_ids"]
    image = torch.isin(ids, torch.tensor(list(image_token_ids), device=ids.device))
    new = torch.randint(1, vocab, (int((~image).sum()),), generator=g)
    new[torch.isin(new, torch.tensor(list(image_token_ids)))] = 1
    ids[~image] = new.to(ids.device)
    out["pixel_values"] = torch.randn(out["pixel_values"].shape, generator=g).to(out["pixel_values"])
    return out


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def profile_ours(model, one: dict, depths, visual, samples: int, batch: int, reducer="uniform",
                 counter: ProfileCounter | None = None, deadline: float | None = None, first_seed: int = 0,
                 **batch_kw) -> dict:
    """Time our profiling (prefix sharing, vision once, batches of `batch`) of `samples` samples built from
    `one` (`make_batch`, seeds from `first_seed`; `batch_kw` goes to it). Stops before a batch once
    `time.perf_counter()` has passed `deadline` (None: never).
    Returns {"samples": done, "seconds": wall time, "counter": counter}."""
    counter = counter if counter is not None else ProfileCounter()
    device = one["input_ids"].device
    t0, done = time.perf_counter(), 0
    while done < samples and (deadline is None or time.perf_counter() < deadline):
        n = min(batch, samples - done)
        batch_in = make_batch(one, n, seed=first_seed + done, **batch_kw)
        profile_batch(model, batch_in, depths, visual, reducer, counter)
        _sync(device)
        done += n
    return {"samples": done, "seconds": time.perf_counter() - t0, "counter": counter}


def profile_paper(model, one: dict, depths, visual, samples: int, reducer="uniform",
                  counter: ProfileCounter | None = None, deadline: float | None = None, first_seed: int = 0,
                  **batch_kw) -> dict:
    """Time the paper's procedure (3I+1 full forwards per sample, batch 1) on `samples` samples; the caller
    sets the attention implementation (the paper: eager). Same return and `deadline` as `profile_ours`."""
    counter = counter if counter is not None else ProfileCounter()
    device = one["input_ids"].device
    t0, done = time.perf_counter(), 0
    while done < samples and (deadline is None or time.perf_counter() < deadline):
        profile_naive(model, make_batch(one, 1, seed=first_seed + done, **batch_kw), depths, visual, reducer, counter)
        _sync(device)
        done += 1
    return {"samples": done, "seconds": time.perf_counter() - t0, "counter": counter}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llava15_7b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--visual-tokens", type=int, default=576)
    p.add_argument("--text-tokens", type=int, default=135)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--skip-naive", action="store_true", help="only time ours (e.g. 100 samples on a GPU)")
    p.add_argument("--narrow", action="store_true",
                   help="64-wide decoder layers (fast at real depth): layer counts are exact, layer-equivalents are "
                        "weighted by the paper model's shapes, wall times are not meaningful")
    args = p.parse_args(argv)

    paper = get_model(args.model)
    depths, visual = sampling_points(args.model, args.layers, args.visual_tokens)

    args.attn = "sdpa"
    if args.narrow:
        import dataclasses

        narrow = dataclasses.replace(paper.arch, hidden_size=64, intermediate_size=172, num_heads=4,
                                     num_kv_heads=4, head_dim=16)  # fmt: skip
        model, one = build(args, arch=narrow)
    else:
        model, one = build(args)
    weigh = paper.arch if args.narrow else None  # layer-equivalents of the real 7B-shaped layers

    width = "64-wide stand-in layers, counts weighted by the " + args.model if args.narrow else args.model
    print(f"# {width} width, {args.layers} layers, {args.visual_tokens}+{args.text_tokens} tokens, "
          f"{args.samples} samples, {args.device} {args.dtype}; depths {depths}, n_v {visual}")
    r = profile_ours(model, one, depths, visual, args.samples, args.batch, "uniform", ProfileCounter(flops_spec=weigh))
    ours, t_ours = r["counter"], r["seconds"]
    print(f"ours  (prefix sharing, vision once, batch {args.batch}, sdpa): {ours.layer_forwards} layer forwards, "
          f"{ours.layer_equivalents:.1f} layer-equivalents, {t_ours:.1f} s")
    if args.skip_naive:
        return
    model.set_attn_implementation("eager")
    r = profile_paper(model, one, depths, visual, args.samples, "uniform", ProfileCounter(flops_spec=weigh))
    naive, t_naive = r["counter"], r["seconds"]
    print(f"naive (paper: 3I+1 full runs, batch 1, eager):          {naive.layer_forwards} layer forwards, "
          f"{naive.layer_equivalents:.1f} layer-equivalents, {t_naive:.1f} s")
    print(f"ratio naive/ours: layer forwards {naive.layer_forwards / ours.layer_forwards:.2f}x, "
          f"layer-equivalents {naive.layer_equivalents / ours.layer_equivalents:.2f}x, wall time {t_naive / t_ours:.2f}x"
          + (" (narrow stand-in: wall time not meaningful)" if args.narrow else ""))
    masked = naive.model_runs * args.layers  # an implementation that masks instead of skipping: every layer full
    print(f"vs a masking implementation of the naive procedure ({masked} full layer-equivalents): "
          f"{masked / ours.layer_equivalents:.2f}x")


if __name__ == "__main__":
    main()
