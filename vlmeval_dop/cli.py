"""`vlmeval-dop` command line: analytic FLOPs of a policy, and an offline demo on tiny models."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .plugins import PluginError, add_plugins_argument, load_plugins
from .policy import DOPPolicy, PolicyError


DEFAULT_TEXT_TOKENS = 120  # `flops --model <config>` without --text-tokens: models.yaml's Qwen-style prompt count


def _flops_model(args: argparse.Namespace):
    """(name, ArchSpec, text tokens) for `flops --model`: a models.yaml key, a tiny model of entries.yaml
    (`tiny_qwen2vl`), or the path of a supported checkpoint directory / its config.json."""
    from types import SimpleNamespace

    from .arch import ArchSpec
    from .models_config import get_model, load_models

    if args.model in load_models():
        cfg = get_model(args.model)
        spec = cfg.arch if args.visual_tokens is None else _with_visual(cfg.arch, args.visual_tokens)
        return SimpleNamespace(name=cfg.name, arch=spec, text_tokens=cfg.text_tokens)
    path = Path(args.model).expanduser()
    config, text = None, DEFAULT_TEXT_TOKENS
    if path.exists():
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise PolicyError(f"--model {args.model}: not a readable transformers config ({exc})") from None
    else:
        from .registry import load_entries

        tiny = {e.model.name: e.model for e in load_entries().values() if e.model.tiny}
        if args.model not in tiny:
            import difflib

            valid = list(load_models()) + sorted(tiny)
            close = difflib.get_close_matches(args.model, valid, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise PolicyError(
                f"unknown model {args.model!r}{hint}; valid: {', '.join(valid)}, or the path of a checkpoint "
                "directory / its config.json"
            )
        from transformers import AutoConfig

        from .tiny import TINY_VISUAL_TOKENS, tiny_path

        spec_model = tiny[args.model]
        config = AutoConfig.from_pretrained(tiny_path(spec_model.tiny), local_files_only=True)
        text = spec_model.text_tokens if spec_model.text_tokens is not None else text
        if args.visual_tokens is None:
            args.visual_tokens = TINY_VISUAL_TOKENS[spec_model.tiny]
    spec = ArchSpec.from_config(config, visual_tokens=args.visual_tokens)  # UnsupportedModelError lists classes
    return SimpleNamespace(name=str(args.model), arch=spec, text_tokens=text)


def _with_visual(spec, n: int):
    from dataclasses import replace

    if n < 1:
        raise PolicyError(f"--visual-tokens must be >= 1, got {n}")
    return replace(spec, visual_tokens=int(n))


def _tf(tflops: float) -> str:
    """4 decimals, or 4 significant digits for the tiny models' counts (which round to 0.0000)."""
    return f"{tflops:.4f}" if tflops >= 0.01 or tflops == 0 else f"{tflops:.4g}"


def _cmd_flops(args: argparse.Namespace) -> int:
    from .flops import layer_token_counts, policy_tflops

    cfg = _flops_model(args)
    policy = DOPPolicy.parse(args.policy).validate(cfg.arch.num_layers, cfg.arch.visual_tokens)
    text = cfg.text_tokens if args.text_tokens is None else args.text_tokens
    if text < 0:
        raise PolicyError(f"--text-tokens must be >= 0, got {text}")
    if not 0 <= args.system_tokens <= text:
        raise PolicyError(f"--system-tokens must be in 0..{text} (the text tokens), got {args.system_tokens}")
    r = policy_tflops(cfg.arch, policy, text, system_tokens=args.system_tokens)
    result = {
        "model": cfg.name,
        "policy": policy.to_dict(),
        "effective_policy": policy.effective(cfg.arch.num_layers).to_dict(),
        "text_tokens": text,
        "visual_tokens": cfg.arch.visual_tokens,
        **r,
    }
    if args.json:
        result["layer_tokens"] = layer_token_counts(cfg.arch, policy, text, system_tokens=args.system_tokens)
        print(json.dumps(result, indent=2))
        return 0
    print(f"model            {cfg.name} (L={cfg.arch.num_layers}, N_v={cfg.arch.visual_tokens}, text tokens={text})")
    print(f"policy           {policy}")
    print(f"TFLOPs (Eq. 11)  {_tf(r['tflops'])} of {_tf(r['full_tflops'])}  ->  {100 * r['ratio']:.2f} %")
    if r["executed_tflops"] != r["tflops"]:
        print(
            f"executed         {_tf(r['executed_tflops'])}  ->  {100 * r['executed_ratio']:.2f} % "
            f"(as {policy.effective(cfg.arch.num_layers)} with visual tokens as keys/values only at layer d_A-1: "
            "their later work is dead)"
        )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .arch import ArchSpec
    from .executor import apply_dop
    from .flops import policy_tflops
    from .tiny import TINY_FAMILIES, load_tiny, tiny_image, tiny_inputs

    families = args.family or list(TINY_FAMILIES)
    for family in families:
        model, processor = load_tiny(family)
        inputs = tiny_inputs(family, processor, ["What is in the image?"], [tiny_image(0)])
        n_vis = int((inputs["input_ids"] == model.config.image_token_id).sum())
        n_text = inputs["input_ids"].shape[1] - n_vis
        L = model.config.get_text_config(decoder=True).num_hidden_layers
        policy = DOPPolicy(L // 2, L // 4, max(1, n_vis // 4))
        spec = ArchSpec.from_model(model, visual_tokens=n_vis)
        r = policy_tflops(spec, policy, n_text)
        with torch.no_grad():
            full = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            with apply_dop(model, policy, reducer="uniform") as handle:
                pruned = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        start = inputs["input_ids"].shape[1]
        decode = processor.tokenizer.decode if hasattr(processor, "tokenizer") else processor.decode
        print(f"[{family}] {type(model).__name__}  L={L}  visual tokens={n_vis}  text tokens={n_text}")
        print(f"  policy {policy}  TFLOPs ratio {100 * r['ratio']:.1f} %  (executed {100 * r['executed_ratio']:.1f} %)")
        print(f"  tokens per layer (MHA, MLP): {handle.last_layer_tokens}")
        print(f"  full   -> {decode(full[0, start:], skip_special_tokens=True)!r}")
        print(f"  DOP    -> {decode(pruned[0, start:], skip_special_tokens=True)!r}")
    print("(tiny random-weight models: the text is meaningless, the pruning is real)")
    return 0


def _unlabelled_models(models: list[str] | None) -> list[str]:
    """The models (of `models`, or all) without budget labels (tiny models): `list --all` has no grid for them."""
    from .entries.budgets import model_shape
    from .registry import EntryError, load_entries

    specs = {e.model.name: e.model for e in load_entries().values()}
    out = []
    for name in models or specs:
        try:
            if not model_shape(specs[name]).budgets:
                out.append(name)
        except (EntryError, KeyError):
            out.append(name)
    return out


def _cmd_list(args: argparse.Namespace) -> int:
    from .registry import budget_label, entry_tflops, format_missing, format_table, load_entries, missing_cells

    entries = list(load_entries().values())
    if args.model:
        entries = [e for e in entries if e.model.name in args.model]
    if args.budget:
        entries = [e for e in entries if e.budget in args.budget]
    missing = []
    if args.all:  # every known method at every budget label (or --budget) of each model
        made, missing = missing_cells(args.model, args.budget)
        entries += made
    if args.runnable:
        entries = [e for e in entries if e.runnable]
    if args.json:
        rows = []
        for e in entries:
            r = entry_tflops(e)
            rows.append({
                "entry": e.name, "model": e.model.name, "method": e.method, "budget": e.budget,
                "policy": None if e.policy is None else e.policy.to_dict(), "reducer": e.reducer,
                "baseline": e.baseline, "tflops_ratio": None if r is None else r["ratio"],
                "executed_tflops_ratio": None if r is None else r["executed_ratio"],
                "runnable": e.runnable, "unavailable_reason": e.unavailable_reason(), "source": e.source,
            })
        rows += [{"entry": f"{m}_{meth}{budget_label(b)}", "model": m, "method": meth, "budget": b,
                  "runnable": False, "unavailable_reason": why, "source": "missing"} for m, meth, b, why in missing]
        print(json.dumps(rows, indent=2))
        return 0
    print(format_table(entries))
    if args.all:
        print("\n" + format_missing(missing))
        unlabelled = [] if args.budget else _unlabelled_models(args.model)
        if unlabelled:  # their grid is empty: "every cell has a runnable entry" says nothing about them
            print(f"no budget labels of their own, so no cells checked (give --budget 0.9 ...): {', '.join(unlabelled)}")
    print(
        "\nTFLOPs %: decoder prefill, paper Eq. 11 (GQA variant for Qwen2-style LLMs) relative to the "
        "unpruned model, at the representative text tokens of eval_configs/models.yaml (paper models) or "
        "of the DOP_Demo prompt (tiny models, eval_configs/entries.yaml)."
    )
    return 0


def _torchrun_device(device: str | None) -> tuple[str | None, bool]:
    """Join torchrun's process group when launched by it (its WORLD_SIZE/LOCAL_RANK launcher protocol);
    each rank takes its own GPU. Returns (device, whether a group was created here)."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device, False
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None and torch.cuda.is_available():
        device = f"cuda:{local}"
    if device is not None and device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if device is not None and device.startswith("cuda") else "gloo")
    return device, True


def _cmd_search(args: argparse.Namespace) -> int:
    from .checks import check_device
    from .search.run import run_search

    check_device(args.device)  # before joining a process group with it
    device, created = _torchrun_device(args.device)
    try:
        summary = run_search(
            args.model, args.data, args.reducer, args.budget, args.samples, args.seed, args.out_dir,
            alpha=args.alpha, text_tokens=args.text_tokens, depths=args.depths, visual=args.visual,
            device=device, batch_size=args.batch_size, recompute=args.recompute, objective=args.objective,
            max_new_tokens=args.max_new_tokens, install=args.install, overwrite=args.overwrite,
            system=args.system_tokens, joint_grid=args.joint_grid, grid_additive=args.grid_additive,
            spearman=args.spearman,
        )
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    if summary is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return _install_status(args, summary)
    work = "" if summary["layer_forwards"] is None else (
        f", {summary['layer_forwards']} decoder-layer forwards ({summary['layer_equivalents']} layer-equivalents)")
    stale = summary.get("recomputed_stale", 0)
    redo = f", {stale} of them recomputed: computed before with other settings or data" if stale else ""
    print(f"profiled {summary['samples']} samples of {summary['dataset']} ({summary['newly_profiled']} new{redo}){work}")
    joint = summary.get("joint")
    if joint:
        print(f"joint divergences of {joint['policies']} policies per sample ({joint['newly_computed']} new values, "
              f"{joint['layer_forwards']} decoder-layer forwards, {joint['layer_equivalents']} layer-equivalents)")
    _print_policies(summary)
    if summary.get("spearman"):
        sp = summary["spearman"]
        print(f"  Spearman rho(D_sum, D) over {sp['n']} combinations: {sp['rho']:.4f} (p = {sp['pvalue']:.3g})")
    tail = "" if summary.get("search") in (None, "additive", "system") else f".{summary['search']}"
    print(f"outputs: {summary['dir']} (profile.json, profile.png, policies{tail}.yaml, search{tail}.json)")
    _print_installed(summary)
    return _install_status(args, summary)


def _print_policies(summary: dict) -> None:
    what = "predicted divergence" if summary["objective"] == "kl" else "predicted accuracy drop"
    for budget, r in summary["results"].items():
        if "error" in r:
            print(f"  budget {budget}: {r['error']}")
        else:
            p = DOPPolicy.from_dict(r["policy"])
            kind = {"joint divergence": "measured joint divergence", "D_sum": "D_sum"}.get(r.get("objective_kind"), what)
            grid = f" (best of {r['n_evaluated']} grid policies)" if "n_evaluated" in r else ""
            print(f"  budget {budget}: policy {_tuple(p)}  {kind} {r['objective']:.4g}  TFLOPs "
                  f"{100 * r['paper_ratio']:.2f} %{grid}")
            if "grid_additive" in r:
                g = r["grid_additive"]
                print(f"    additive on the grid: {_tuple(DOPPolicy.from_dict(g['policy']))}  D_sum {g['objective']:.4g}"
                      f"  measured joint divergence {g['joint_divergence']:.4g}")


def _tuple(p: DOPPolicy) -> str:
    return "(" + ", ".join(str(v) for v in ([p.d_A, p.d_P, p.n_v] + ([p.d_A_sys, p.d_P_sys] if p.has_system_depths else []))) + ")"


def _print_installed(summary: dict) -> None:
    for name in summary["installed"].values():
        print(f"  installed: python run.py --model {name} --data <dataset>")


def _install_status(args: argparse.Namespace, summary: dict) -> int:
    """1 (with one line per budget on stderr) when --install was asked for and a budget got no policy."""
    missing = summary.get("not_installed") or {}
    for budget, why in missing.items():
        print(f"vlmeval-dop {args.command}: error: nothing installed for budget {budget}: {why}", file=sys.stderr)
    return 1 if missing else 0


def _cmd_solve(args: argparse.Namespace) -> int:
    from .search.run import solve_profile

    summary = solve_profile(args.profile, args.model, args.budget, alpha=args.alpha, text_tokens=args.text_tokens,
                            reducer=args.reducer, install=args.install, overwrite=args.overwrite,
                            system=args.system_tokens)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return _install_status(args, summary)
    src = f" (curves of {summary['transferred_from']}, transferred by Eq. 12)" if summary["transferred_from"] else ""
    print(f"{summary['model']}, reducer {summary['reducer']}, objective {summary['objective']}{src}")
    _print_policies(summary)
    _print_installed(summary)
    return _install_status(args, summary)


def _cmd_fitprune(args: argparse.Namespace) -> int:
    from .search.run import run_fitprune

    paths = run_fitprune(args.model, args.data, args.budget, args.samples, args.seed, force=args.force, device=args.device)
    for budget, path in paths.items():
        print(f"budget {budget}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmeval-dop", description="Depth-wise Operation Pruning (DOP) for multimodal LLMs"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("flops", help="analytic decoder prefill TFLOPs of a policy (paper Eq. 11 / GQA variant)")
    p.add_argument("--model", required=True, help="a model of eval_configs/models.yaml (llava15_7b, ..., qwen2vl_7b, ...), a "
                   "tiny model (tiny_qwen2vl, ...), or the path of a supported checkpoint directory or its config.json")
    p.add_argument("--policy", required=True, help="d_A,d_P,n_v (n_v may be 'all'), optionally ,d_A_sys,d_P_sys")
    p.add_argument("--text-tokens", type=int, default=None, help="non-visual tokens (default: the model's value in "
                   f"eval_configs/models.yaml or entries.yaml; {DEFAULT_TEXT_TOKENS} for a checkpoint path)")
    p.add_argument("--visual-tokens", type=int, default=None, help="N_v, the visual tokens before reduction (default: "
                   "models.yaml's, or the family's count at its reference resolution, vlmeval_dop/arch.py)")
    p.add_argument("--system-tokens", type=int, default=0, help="system-prompt tokens among the text tokens (with system depths)")
    p.add_argument("--json", action="store_true", help="print one JSON object (tflops, full_tflops, ratio as a fraction, ...)")
    p.set_defaults(func=_cmd_flops)

    p = sub.add_parser("list", help="every evaluation entry (run.py --model) with model, method, policy, TFLOPs %%")
    p.add_argument("--runnable", action="store_true", help="only entries whose reducer/baseline is registered")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    p.add_argument("--all", action="store_true", help="also every registered method (plugins too) at every budget "
                   "label of each model (or --budget): the entries made on demand, and each missing (model, method, "
                   "budget) cell with its reason")
    p.add_argument("--model", action="append", default=None, help="only this model (repeatable)")
    p.add_argument("--budget", action="append", type=float, default=None,
                   help="only this TFLOPs fraction (repeatable); with --all, the budgets of the grid (tiny models "
                   "have no budget labels of their own)")
    add_plugins_argument(p)
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("search", help="profile divergence curves on validation samples and solve Eq. 7 per budget")
    p.add_argument("--model", required=True, help="unpruned model entry (e.g. llava15_7b, tiny_llava15)")
    p.add_argument("--reducer", default="uniform", help="reducer for the n_v curve: a vlmeval_dop.reducers name (cdpruner for DOP_CD, vispruner for DOP_V) "
                        "or resize (DOP_R: images resized before the processor; Qwen2.5-VL and InternVL3)")
    p.add_argument("--budget", type=float, action="append", help="TFLOPs fraction (repeatable); default: the paper's labels")
    p.add_argument("--data", required=True, help="VLMEvalKit dataset name (or the basename of $LMUData/<name>.tsv)")
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out-dir", type=Path, default=Path("profiles"))
    p.add_argument("--alpha", type=float, default=None, help="n_min = alpha * n_e (default: models.yaml, 1.5 otherwise)")
    p.add_argument("--text-tokens", type=int, default=None, help="non-visual tokens for the FLOPs model")
    p.add_argument("--depths", type=int, nargs="+", default=None, help="sampling depths (default: Table 6)")
    p.add_argument("--visual", type=int, nargs="+", default=None, help="sampling n_v values (default: Table 6)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="samples per forward where their image tensors can be concatenated (left padding); "
                        "results do not depend on it")
    p.add_argument("--objective", choices=["kl", "acc_drop"], default="kl",
                   help="kl: top-k KL of the first token (Eq. 10, the paper's default); acc_drop: accuracy drop of "
                        "whole greedy answers scored with VLMEvalKit's per-sample metric (Eq. 13, App. F.5)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="acc_drop only: answer length (default: the model wrapper's evaluation setting)")
    p.add_argument("--install", metavar="TAG", default=None,
                   help="also write the policies to eval_configs/searched/TAG.<reducer>.yaml: evaluation entries "
                        "{model}_{method}{budget}_TAG (e.g. llava15_7b_dopcd28_TAG)")
    p.add_argument("--overwrite", action="store_true", help="with --install: replace a different installed policy")
    p.add_argument("--recompute", action="store_true",
                   help="profile every sample again (default: finished samples in the output dir are reused)")
    p.add_argument("--device", default=None,
                   help="default: cuda if available (under torchrun: cuda:LOCAL_RANK), else cpu")
    p.add_argument("--system-tokens", type=int, nargs="?", const=0, default=None, metavar="N",
                   help="Eq. 14 (App. F.6): also profile the system-token curves and prune the tokens before the image; "
                        "N: their count in the FLOPs model (default: measured from the prompts); run dir suffix -system")
    p.add_argument("--joint-grid", action="store_true",
                   help="App. F.3 / Table 22: measure the joint divergence of every budget-feasible policy of the F.3 grid "
                        "(prefix sharing, batching, resume, torchrun) and take the best; --install installs it")
    p.add_argument("--grid-additive", action="store_true",
                   help="Table 22's other row: Eq. 7 restricted to the F.3 grid (no joint runs)")
    p.add_argument("--spearman", type=int, default=None, metavar="K",
                   help="App. E.1 / Table 7: joint divergences of K combinations of the sampling points (216 = all of "
                        "Table 6's) and Spearman's rho with the additive D_sum")
    p.add_argument("--json", action="store_true")
    add_plugins_argument(p)
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("solve", help="Eq. 7 from a saved profile.json (no model run); another model's profile is "
                                     "transferred by Eq. 12")
    p.add_argument("--profile", type=Path, required=True, help="profile.json written by `vlmeval-dop search`")
    p.add_argument("--model", required=True, help="paper model to solve for (eval_configs/models.yaml)")
    p.add_argument("--budget", type=float, action="append", help="TFLOPs fraction (repeatable); default: the model's labels")
    p.add_argument("--reducer", default=None, help="reduction the policies run with (default: the profile's; resize for DOP_R)")
    p.add_argument("--alpha", type=float, default=None, help="n_min = alpha * n_e (default: models.yaml)")
    p.add_argument("--text-tokens", type=int, default=None, help="non-visual tokens for the FLOPs model (default: models.yaml)")
    p.add_argument("--install", metavar="TAG", default=None, help="as for search: entries {model}_{method}{budget}_TAG")
    p.add_argument("--overwrite", action="store_true", help="with --install: replace a different installed policy")
    p.add_argument("--system-tokens", type=int, nargs="?", const=0, default=None, metavar="N",
                   help="Eq. 14 with the profile's system-token curves (search --system-tokens); N: their count "
                        "(default: the one the profile recorded)")
    p.add_argument("--json", action="store_true")
    add_plugins_argument(p)
    p.set_defaults(func=_cmd_solve)

    p = sub.add_parser("fitprune", help="fit FitPrune's per-layer schedules on validation samples (for the fitprune entries)")
    p.add_argument("--model", required=True, help="paper model with FitPrune entries (eval_configs/baselines.yaml), e.g. llava15_7b")
    p.add_argument("--budget", type=float, action="append", help="TFLOPs fraction (repeatable); default: every FitPrune entry of the model")
    p.add_argument("--data", required=True, help="VLMEvalKit dataset name (or the basename of $LMUData/<name>.tsv)")
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--force", action="store_true", help="refit and overwrite existing schedules")
    p.add_argument("--device", default=None)
    add_plugins_argument(p)
    p.set_defaults(func=_cmd_fitprune)

    p = sub.add_parser("demo", help="offline: build tiny random-weight models and run DOP-pruned generate for each family")
    p.add_argument("--family", action="append", help="tiny family (repeatable); default: all")
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.set_defaults(func=_cmd_demo)
    return parser


INTERRUPTED = "interrupted; rerun the same command to resume"


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done; 1 a failure while working (disk full, I/O error, a requested
    install that could not be made); 2 bad input (one line naming it, before any model loads); 130 Ctrl-C."""
    import errno

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "plugins", None):  # users' methods register before anything reads the registry
            load_plugins(args.plugins)
        return args.func(args)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)  # finished samples are on disk: the same command resumes
        return 130
    except (PolicyError, KeyError, ValueError, PluginError) as exc:  # bad input: one clear line, no traceback
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"vlmeval-dop {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine, not the input: disk full, permissions, ...
        where = f" ({exc.filename})" if exc.filename else ""
        hint = "; free some space and rerun the same command to resume" if exc.errno in (errno.ENOSPC, errno.EDQUOT) \
            else ""
        print(f"vlmeval-dop {args.command}: error: {exc.strerror or exc}{where}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
