"""Selection overhead of the decoder-side baselines against the prefill FLOPs they save, at the paper's budgets.

For every decoder-side paper entry of a model (eval_configs/baselines.yaml, arguments solved for the budget)
it prints the schedule's decoder prefill TFLOPs, the TFLOPs it saves against the unpruned model, and the
FLOPs of our selection work (attention rows recomputed from q/k, pivot similarities, rater scores,
clustering): the same per-method counts the tests check against FlopCounterMode on the tiny models
(`*_selection_flops`), taken from each method's registration (`@register_method(selection_cost=...)`; a
decoder-side method registered without one is printed as such). Analytic at the real shapes, so it runs anywhere in a second. Vision-side methods
(reducers) are timed by benchmarks/reducer_cost.py; `--with-reducers` runs that too, so one command prints
every baseline's overhead.

Assumptions stated in the output: SparseVLM's raters are data-dependent; we count every instruction token
as a rater (an upper bound). FitPrune rows need a fitted schedule (`vlmeval-dop fitprune`), else skipped.

No baseline here forces eager attention on the model: the official FastV/PDrop/FitPrune/SparseVLM code reads
attention maps from eager attention layers; ours recomputes the few rows it needs from the layer's q/k.

    python benchmarks/baseline_overhead.py [--model llava15_7b --model llavanext_7b] [--with-reducers] [--plugins mine]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from vlmeval_dop.flops import schedule_flops
from vlmeval_dop.methods import method_info
from vlmeval_dop.models_config import load_models
from vlmeval_dop.plugins import add_plugins_argument, load_plugins
from vlmeval_dop.registry import entry_layer_tokens, load_entries, missing_cells


def selection_flops(entry, spec, counts, n_vis: int, text: int) -> float | None:
    """Our selection FLOPs for one sample under the entry's schedule `counts` (per-layer (n_A, n_P)), from
    the method's registered cost model (`@register_method(selection_cost=...)`); None if it has none."""
    cost = method_info(entry.baseline).selection_cost
    return None if cost is None else cost(spec, entry.baseline_args, counts, n_vis, text)


def decoder_entries(model: str) -> list:
    """The model's decoder-side entries: the paper's (baselines.yaml) and, at the same budget labels, every
    other registered decoder-side method (plugins too) that can meet them."""
    paper = [e for e in load_entries().values() if e.model.name == model and e.baseline is not None and e.source == "paper"]
    made, _ = missing_cells([model])
    return paper + [e for e in made if e.baseline is not None]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="paper model (repeatable); default llava15_7b, llavanext_7b")
    ap.add_argument("--with-reducers", action="store_true", help="also time the vision-side methods (reducer_cost.py)")
    add_plugins_argument(ap)
    args = ap.parse_args(argv)
    if args.plugins:
        load_plugins(args.plugins)
    models = load_models()
    print(f"{'entry':<26}{'arguments':<44}{'TFLOPs':>8}{'saved':>8}{'select GFLOPs':>15}{'select/saved':>14}")
    for model in args.model or ["llava15_7b", "llavanext_7b"]:
        pm = models[model]
        spec, n_vis, text = pm.arch, pm.arch.visual_tokens, pm.text_tokens
        full = schedule_flops(spec, [(n_vis + text,) * 2] * spec.num_layers)
        for e in decoder_entries(model):
            counts = entry_layer_tokens(e)
            if counts is None:
                why = "no fitted schedule: vlmeval-dop fitprune" if e.required_file else "no layer_tokens cost model"
                print(f"{e.name:<26}({why})")
                continue
            tf = schedule_flops(spec, counts)
            sel = selection_flops(e, spec, counts, n_vis, text)
            shown = ",".join(f"{k}={v}" for k, v in e.baseline_args.items() if k not in ("n_visual", "schedule"))
            head = f"{e.name:<26}{shown[:43]:<44}{tf / 1e12:>8.2f}{(full - tf) / 1e12:>8.2f}"
            if sel is None:  # reported, not skipped: the registration has no cost model
                print(f"{head}   (no selection_cost registered for {e.baseline!r}: @register_method(selection_cost=...))")
                continue
            print(f"{head}{sel / 1e9:>15.2f}{sel / (full - tf):>14.3%}")
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
