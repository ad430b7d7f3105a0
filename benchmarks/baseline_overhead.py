"""Selection overhead of the decoder-side baselines against the prefill FLOPs they save, at the paper's budgets.

For every decoder-side paper entry of a model (eval_configs/baselines.yaml, arguments solved for the budget)
it prints the schedule's decoder prefill TFLOPs, the TFLOPs it saves against the unpruned model, and the
FLOPs of our selection work (attention rows recomputed from q/k, pivot similarities, rater scores,
clustering): the same per-method counts the tests check against FlopCounterMode on the tiny models
(`*_selection_flops`). Analytic at the real shapes, so it runs anywhere in a second. Vision-side methods
(reducers) are timed by benchmarks/reducer_cost.py; `--with-reducers` runs that too, so one command prints
every baseline's overhead.

Assumptions stated in the output: SparseVLM's raters are data-dependent; we count every instruction token
as a rater (an upper bound). FitPrune rows need a fitted schedule (`vlmeval-dop fitprune`), else skipped.

No baseline here forces eager attention on the model: the official FastV/PDrop/FitPrune/SparseVLM code reads
attention maps from eager attention layers; ours recomputes the few rows it needs from the layer's q/k.

    python benchmarks/baseline_overhead.py [--model llava15_7b --model llavanext_7b] [--with-reducers]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from vlmeval_dop.baselines import DECODER_PRUNERS
from vlmeval_dop.baselines.dart import dart_selection_flops
from vlmeval_dop.baselines.fastv import fastv_selection_flops
from vlmeval_dop.baselines.fitprune import FitPruneSchedule, fitprune_selection_flops
from vlmeval_dop.baselines.pdrop import pdrop_selection_flops
from vlmeval_dop.baselines.sparsevlm import sparsevlm_selection_flops
from vlmeval_dop.flops import schedule_flops
from vlmeval_dop.models_config import load_models
from vlmeval_dop.registry import load_entries


def selection_flops(name: str, args: dict, spec, counts, n_vis: int, text: int) -> float | None:
    """Our selection FLOPs for one sample under the entry's schedule `counts` (per-layer (n_A, n_P))."""
    if name == "fastv":
        return fastv_selection_flops(spec, counts[args["k"] - 1][0])
    if name == "pdrop":  # the next layer's q/k of the whole current sequence, one score row, per boundary
        return sum(pdrop_selection_flops(spec, counts[b - 1][0]) for b in args["boundaries"])
    if name == "dart":
        return dart_selection_flops(spec, n_vis, text)
    if name == "sparsevlm":
        layers = args.get("layers", (2, 6, 15))
        stats = [{"layer": None, "visual": n_vis, "text": text}]
        for layer in layers:
            n = counts[layer][0]
            stats.append({"layer": layer, "queries": text, "keys": n})
        return sparsevlm_selection_flops(spec, stats)
    if name == "fitprune":
        return sum(fitprune_selection_flops(spec, counts[i][0], counts[i][0])
                   for i in range(len(counts) - 1) if counts[i + 1][0] < counts[i][0])  # fmt: skip
    return None


def layer_tokens(entry, spec, n_vis: int, text: int):
    cls = DECODER_PRUNERS[entry.baseline]
    if entry.baseline == "fitprune":
        path = Path(entry.baseline_args["schedule"])
        if not path.exists():
            return None
        return FitPruneSchedule.load(path).layer_tokens(text, n_vis)
    args = {k: v for k, v in entry.baseline_args.items() if k != "n_visual"}
    return cls.layer_tokens(spec.num_layers, n_vis, text, **args)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="paper model (repeatable); default llava15_7b, llavanext_7b")
    ap.add_argument("--with-reducers", action="store_true", help="also time the vision-side methods (reducer_cost.py)")
    args = ap.parse_args(argv)
    models = load_models()
    print(f"{'entry':<26}{'arguments':<44}{'TFLOPs':>8}{'saved':>8}{'select GFLOPs':>15}{'select/saved':>14}")
    for model in args.model or ["llava15_7b", "llavanext_7b"]:
        pm = models[model]
        spec, n_vis, text = pm.arch, pm.arch.visual_tokens, pm.text_tokens
        full = schedule_flops(spec, [(n_vis + text,) * 2] * spec.num_layers)
        for e in load_entries().values():
            if e.model.name != model or e.baseline is None or e.source != "paper":
                continue
            counts = layer_tokens(e, spec, n_vis, text)
            if counts is None:
                print(f"{e.name:<26}{'(no fitted schedule: vlmeval-dop fitprune)':<44}")
                continue
            tf = schedule_flops(spec, counts)
            sel = selection_flops(e.baseline, e.baseline_args, spec, counts, n_vis, text)
            shown = ",".join(f"{k}={v}" for k, v in e.baseline_args.items() if k not in ("n_visual", "schedule"))
            print(f"{e.name:<26}{shown[:43]:<44}{tf / 1e12:>8.2f}{(full - tf) / 1e12:>8.2f}"
                  f"{sel / 1e9:>15.2f}{sel / (full - tf):>14.3%}")
        print(f"{model}: unpruned {full / 1e12:.2f} TFLOPs ({n_vis} visual + {text} text tokens); "
              "SparseVLM raters counted as all text tokens (upper bound)")
    if args.with_reducers:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import reducer_cost

        print("\n# vision-side methods (measured on this machine):")
        reducer_cost.main([])


if __name__ == "__main__":
    main()
