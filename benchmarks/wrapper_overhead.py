"""Time per sample of our VLMEvalKit wrapper at the full policy vs calling transformers directly.

For each tiny family (offline, random weights), on the DOP_Demo samples as VLMEvalKit would hand them over
(its message: image path + prompt, from the dataset's / wrapper's `build_prompt`):

- wrapper: `load_entry("tiny_<family>", policy=DOPPolicy.full(L)).generate(message, dataset="DOP_Demo")`,
  i.e. everything VLMEvalKit calls per sample (message parsing, image loading, prompt, processor, greedy
  generate, decoding, bookkeeping);
- direct: the same model object called the way a transformers user would with the same prompt: open the
  image, apply the same geometry the wrapper applies for the paper's resolution, `processor(...)`,
  `model.generate(...)` with the same generation config, decode.

The prompt text and processor keyword arguments of the direct path are captured from the wrapper once per
sample (outside the timing), so both paths feed the model identical inputs; the outputs are checked equal.
Each sample runs through both paths back to back (alternating which goes first), `--rounds` times; the
printed time per sample is the median over rounds of the mean over samples, and the overhead is the median
over all (sample, round) pairs of wrapper/direct - 1 (paired, so that load drifts on a shared machine hit
both paths alike).

    python benchmarks/wrapper_overhead.py                 # all four tiny families, CPU
    python benchmarks/wrapper_overhead.py --family llava15 --rounds 20 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from vlmeval_dop.policy import DOPPolicy
from vlmeval_dop.registry import load_entry
from vlmeval_dop.tiny import TINY_FAMILIES


class _Spy:
    """Stands in for the processor during one wrapper call and records what it was called with."""

    def __init__(self, processor):
        self._processor = processor
        self.calls: list[dict] = []

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self._processor(**kwargs)


def _messages(wrapper, dataset) -> list[list[dict]]:
    """What VLMEvalKit's inference loop passes to `generate` for each DOP_Demo sample."""
    wrapper.set_dump_image(dataset.dump_image)
    out = []
    for i in range(len(dataset)):
        line = dataset.data.iloc[i]
        if wrapper.use_custom_prompt("DOP_Demo"):
            out.append(wrapper.build_prompt(line, dataset="DOP_Demo"))
        else:
            out.append(dataset.build_prompt(line))
    return out


def _geometry(wrapper):
    """The image geometry the wrapper applies before its processor (the paper's input resolution)."""
    if wrapper.FAMILY == "internvl":
        side = wrapper.image_size
        return lambda im: im.resize((side, side), resample=3)
    return lambda im: im  # LLaVA: padding/anyres grid and Qwen: pixel count are processor arguments


def measure(family: str, rounds: int) -> dict:
    from vlmeval_dop.datasets import DOPDemoDataset

    dataset = DOPDemoDataset("DOP_Demo")
    wrapper = load_entry(f"tiny_{family}").load()
    L = wrapper.model.config.get_text_config(decoder=True).num_hidden_layers
    wrapper = load_entry(f"tiny_{family}", policy=DOPPolicy.full(L))  # the full policy, explicitly
    model, processor = wrapper.load().model, wrapper.processor
    messages = _messages(wrapper, dataset)
    geometry = _geometry(wrapper)
    gen = wrapper.generation_config()
    tok = getattr(processor, "tokenizer", processor)

    # capture the exact processor call per sample (prompt text + kwargs), outside the timing
    direct_calls = []
    spy = _Spy(processor)
    wrapper._processor = spy
    try:
        for msg in messages:
            spy.calls.clear()
            wrapper.generate(msg, dataset="DOP_Demo")
            call = dict(spy.calls[-1])
            paths = [m["value"] for m in msg if m["type"] == "image"]
            call.pop("images")
            direct_calls.append((paths, call))
    finally:
        wrapper._processor = processor

    def direct(paths, call):
        images = [geometry(Image.open(p).convert("RGB")) for p in paths]
        inputs = processor(images=images or None, **call)
        with torch.inference_mode():
            out = model.generate(**inputs, generation_config=gen)
        return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    for msg, (paths, call) in zip(messages, direct_calls):  # warm-up, and same outputs on both paths
        assert wrapper.generate(msg, dataset="DOP_Demo") == direct(paths, call), f"{family}: outputs differ"

    # paired timing: each sample through both paths back to back (alternating which goes first), so slow
    # drifts in machine load hit both sides of a pair alike; overhead = median over pairs of wrapper/direct
    t_wrap, t_direct, ratios = [], [], []
    for r in range(rounds):
        w_sum = d_sum = 0.0
        for i, (msg, (paths, call)) in enumerate(zip(messages, direct_calls)):
            times = {}
            for which in (("w", "d") if (r + i) % 2 == 0 else ("d", "w")):
                t0 = time.perf_counter()
                if which == "w":
                    wrapper.generate(msg, dataset="DOP_Demo")
                else:
                    direct(paths, call)
                times[which] = time.perf_counter() - t0
            w_sum, d_sum = w_sum + times["w"], d_sum + times["d"]
            ratios.append(times["w"] / times["d"])
        t_wrap.append(w_sum / len(messages))
        t_direct.append(d_sum / len(messages))
    return {"family": family, "wrapper_ms": 1e3 * statistics.median(t_wrap),
            "direct_ms": 1e3 * statistics.median(t_direct), "overhead": statistics.median(ratios) - 1,
            "samples": len(messages), "max_new_tokens": wrapper.max_new_tokens}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", action="append", choices=TINY_FAMILIES, help="repeatable; default: all four")
    p.add_argument("--rounds", type=int, default=10, help="timed passes over the 8 DOP_Demo samples per path")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed for both paths)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(f, args.rounds) for f in (args.family or TINY_FAMILIES)]
    print(f"# tiny models, DOP_Demo ({rows[0]['samples']} samples, greedy, {rows[0]['max_new_tokens']} new tokens), "
          f"CPU, {args.threads} thread(s), {args.rounds} rounds, paired; full policy")
    print(f"{'family':10s} {'wrapper ms/sample':>18s} {'direct ms/sample':>17s} {'overhead':>9s}")
    for r in rows:
        print(f"{r['family']:10s} {r['wrapper_ms']:18.2f} {r['direct_ms']:17.2f} {100 * r['overhead']:+8.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
