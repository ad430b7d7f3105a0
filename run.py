"""VLMEvalKit's `run.py` with the DOP entries and datasets registered.

    python run.py --model llava15_7b_dop28 --data TextVQA [any VLMEvalKit flag]
    torchrun --nproc-per-node=8 run.py --model qwen25vl_7b_dop26 --data ChartQA MME
    python run.py --model tiny_llava15_dop --data DOP_Demo          # offline demo, tiny random model
    python run.py --model tiny_videollava_dopv --data DOP_VideoDemo # offline video demo (generated mp4s)
    python run.py --model videollava_7b --data TGIF-QA MSVD-QA MSRVTT-QA --judge-key KEY   # Table 18 (GPT judge)

What it adds before handing the (unchanged) flags to `vlmeval.run.main()`:
- every runnable entry of `vlmeval-dop list` becomes a model name in `vlmeval.config.supported_VLM`
  (weights load when VLMEvalKit first needs the model, i.e. only if predictions are missing);
- the plugin datasets (VQAv2_VAL, VQAv2_TestDev, DOP_Demo, NoCaps_VAL, TextCaps_VAL, the video datasets
  TGIF_QA, MSVD_QA, MSRVTT_QA and DOP_VideoDemo) join VLMEvalKit's dataset registry;
- the paper's short benchmark names in `--data` (TextVQA, GQA, MMB, ...) are rewritten to VLMEvalKit's
  names, so result files and VLMEvalKit's name-based evaluation logic are those of the real dataset;
- `--model` must be a listed, runnable entry (or one made on demand from it: `llava15_7b__mha4-6` prunes
  single visual operations, `llava15_7b_dopcd28__swap1mlp.s3` is a random policy perturbation; paper
  Tables 26-30) and `--data` a known dataset: otherwise one clear error
  naming the closest valid names, before anything runs. An entry whose weights are neither cached nor
  downloadable stops with a message saying so (not a traceback from inside transformers).
- `--model` and `--data` (or `--config`) are required and `--work-dir` must be writable: checked first.
- `<work-dir>/<model>/dop_entry.json` records what the entry ran (settings, and the source digest of a
  user's method); results of the same name made with other settings are refused, not resumed
  (vlmeval_dop/entry_record.py).
- At the end, a summary names every (model, benchmark) that failed and why (VLMEvalKit logs a failed
  benchmark and goes on to the next); the exit code is 1 when every requested benchmark failed, else
  VLMEvalKit's own (0 for partial success). Ctrl-C prints "interrupted; rerun the same command to resume"
  and exits 130 (VLMEvalKit's `--reuse` keeps finished predictions).
- `--plugins mymodule[,path/to/other.py]` (ours): import users' modules that register methods with
  `@vlmeval_dop.methods.register_method` first, so `--model {model}_{method}{budget}` works for them
  (docs/adding_a_baseline.md). Installed packages' `vlmeval_dop.methods` entry points load by themselves.
- `--batch-size N` (ours; default 1 = VLMEvalKit's own one-sample loop, unchanged): N samples per
  `generate`, grouped by prompt length, with the same intermediate files, resume, predictions and evaluation
  (vlmeval_dop/batched_inference.py); an entry that cannot be batched exactly says so once and runs batch 1.
Everything else (`--work-dir`, `--mode`, `--reuse`, `--judge`, `--verbose`, `--config`, torchrun, outputs
under `<work-dir>/<model>/`) is VLMEvalKit's own behaviour.
"""
from __future__ import annotations

import sys
from functools import partial

_DATA_FLAG = "--data"


def _fail(msg: str) -> "SystemExit":
    print(f"run.py: error: {msg}", file=sys.stderr)
    return SystemExit(2)


_BATCH_FLAG = "--batch-size"
BATCH_HELP = (
    "  --batch-size N        (vlmeval-dop) samples per generate call, grouped by prompt length; default 1 =\n"
    "                        VLMEvalKit's one-sample loop. Same predictions, files and resume.\n"
    "  --plugins MODULES     (vlmeval-dop) comma-separated modules or .py files registering methods with\n"
    "                        @vlmeval_dop.methods.register_method (docs/adding_a_baseline.md); repeatable."
)
_PLUGINS_FLAG = "--plugins"


def split_plugins_flag(argv: list[str]) -> tuple[list[str], list[str]]:
    """(`--plugins` values, argv without them): VLMEvalKit's parser does not know the flag."""
    plugins, out, i = [], [], 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith(_PLUGINS_FLAG + "="):
            plugins.append(tok.split("=", 1)[1])
        elif tok == _PLUGINS_FLAG:
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                raise _fail(f"{_PLUGINS_FLAG} needs a value (module names or .py paths, comma-separated)")
            plugins.append(argv[i + 1])
            i += 1
        else:
            out.append(tok)
        i += 1
    return plugins, out


def split_batch_size(argv: list[str]) -> tuple[int, list[str]]:
    """(`--batch-size` value, argv without it): VLMEvalKit's parser does not know the flag."""
    size, out, i = 1, [], 0
    while i < len(argv):
        tok = argv[i]
        if tok == _BATCH_FLAG or tok.startswith(_BATCH_FLAG + "="):
            if "=" in tok:
                value = tok.split("=", 1)[1]
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            else:
                raise _fail(f"{_BATCH_FLAG} needs a value (a whole number >= 1)")
            try:
                size = int(value)
            except ValueError:
                size = 0
            if size < 1:
                raise _fail(f"{_BATCH_FLAG} must be a whole number >= 1, got {value!r}")
        else:
            out.append(tok)
        i += 1
    return size, out


def _is_data_flag(token: str) -> bool:
    """`--data` or an unambiguous argparse abbreviation of it (`--da`, `--dat`), with or without `=`."""
    flag = token.split("=", 1)[0]
    return len(flag) >= 4 and _DATA_FLAG.startswith(flag)


def rewrite_data_aliases(argv: list[str], resolve) -> list[str]:
    """argv with every dataset name after `--data` passed through `resolve` (alias -> VLMEvalKit name)."""
    out, in_data = [], False
    for tok in argv:
        if tok.startswith("-") and len(tok) > 1:
            in_data = False
            if _is_data_flag(tok) and "=" in tok:
                flag, value = tok.split("=", 1)
                tok = f"{flag}={resolve(value)}"
            elif _is_data_flag(tok):
                in_data = True
        elif in_data:
            tok = resolve(tok)
        out.append(tok)
    return out


def _build_model(name: str, **overrides):
    """supported_VLM factory: VLMEvalKit calls it when it needs predictions, so weights load now."""
    from vlmeval_dop.models.weights import WeightsUnavailableError
    from vlmeval_dop.registry import load_entry

    model = load_entry(name, **overrides)
    try:
        model.load()
    except WeightsUnavailableError as exc:
        # SystemExit passes VLMEvalKit's per-dataset `except Exception` (which would log a traceback and
        # go on to the next dataset with the same missing weights): the run stops with this message.
        raise _fail(str(exc)) from None
    return model


def register(supported_vlm: dict) -> list[str]:
    """Put every runnable entry into VLMEvalKit's model table and our datasets into its registry."""
    from vlmeval_dop.datasets import register_datasets
    from vlmeval_dop.registry import load_entries

    names = [n for n, e in load_entries().items() if e.runnable]
    for n in names:
        supported_vlm[n] = partial(_build_model, n)
    register_datasets()
    return names


INTERRUPTED = "interrupted; rerun the same command to resume"


class Outcomes:
    """Records what VLMEvalKit reports per (model, dataset) through its `upsert_dataset_status` (wrapped)."""

    def __init__(self, original):
        self.original = original
        self.seen: dict[tuple[str, str], dict] = {}

    def __call__(self, run_dir, model_name, dataset_name, *args, **kwargs):
        rec = self.seen.setdefault((model_name, dataset_name), {})
        if kwargs.get("error_message") is not None and isinstance(kwargs["error_message"], str):
            rec["failed"] = kwargs["error_message"]
        from vlmeval_dop.checks import VLMEVAL_FAILED_SKIPS

        skip = kwargs.get("skip_reason")
        if isinstance(skip, str) and skip in VLMEVAL_FAILED_SKIPS:
            rec["failed"] = skip.replace("_", " ")
        return self.original(run_dir, model_name, dataset_name, *args, **kwargs)

    def failures(self) -> dict[tuple[str, str], str]:
        return {k: r["failed"] for k, r in self.seen.items() if "failed" in r}


def summarize(outcomes: Outcomes, requested: int, work_dir: str) -> int:
    """Print the failed (model, benchmark) pairs; 1 if all `requested` failed, else 0."""
    failed = outcomes.failures()
    if not failed:
        return 0
    print(f"run.py: {len(failed)} of {requested} benchmark run(s) failed:", file=sys.stderr)
    for (model, data), why in failed.items():
        print(f"  {model} x {data}: {why.splitlines()[0] if why else 'failed'}", file=sys.stderr)
    print(f"  (details: VLMEvalKit's log under {work_dir}/logs/; rerun the same command to retry, finished "
          "predictions are kept with --reuse)", file=sys.stderr)
    return 1 if len(failed) >= requested else 0


def _check_args(args) -> None:
    from vlmeval_dop.fileio import check_writable_dir

    if args.config is None and (not args.model or not args.data):
        raise _fail("give --model <entry ...> and --data <benchmark ...> (or --config <file>); "
                    "`vlmeval-dop list` shows the entries")
    try:
        check_writable_dir(args.work_dir, "--work-dir")
    except ValueError as exc:
        raise _fail(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    try:
        code = _main(argv)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        raise SystemExit(130) from None
    if code:
        raise SystemExit(code)


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = sys.argv[0] if sys.argv else "run.py"
    batch_size, argv = split_batch_size(argv)
    plugins, argv = split_plugins_flag(argv)
    if "-h" in argv or "--help" in argv:
        print(f"run.py = VLMEvalKit's run.py with the vlmeval-dop entries; flags of its own:\n{BATCH_HELP}\n")
    # vlmeval.run must be imported before anything initialises CUDA: under torchrun it assigns each local
    # rank its GPUs through CUDA_VISIBLE_DEVICES at import time.
    import vlmeval.run as vrun
    from vlmeval.config import supported_VLM
    from vlmeval.smp import load_env

    from vlmeval_dop.batched_inference import batched
    from vlmeval_dop.datasets import UnknownDatasetError, resolve_dataset_name
    from vlmeval_dop.registry import EntryError, runnable_entry

    load_env()  # as VLMEvalKit's run.py does (API keys for judges from its .env)
    from vlmeval_dop.plugins import PluginError, load_plugins

    try:  # users' methods (--plugins, installed entry points) register before the entries are read
        load_plugins(plugins)
    except PluginError as exc:
        raise _fail(str(exc)) from None
    register(supported_VLM)

    sys.argv = [prog] + argv
    args = vrun.parse_args()  # VLMEvalKit's own parser: same flags, same help, same errors
    _check_args(args)
    from vlmeval_dop.entry_record import record_mismatch, write_record

    for name in args.model or []:
        try:
            runnable_entry(name)
        except EntryError as exc:
            raise _fail(str(exc)) from None
        stale = record_mismatch(args.work_dir, name)  # results of the same name made with other settings
        if stale:
            raise _fail(stale)
        # `{entry}__mha4-6` names (single operations pruned, Tables 26-28) are made on demand
        supported_VLM.setdefault(name, partial(_build_model, name))

    def resolve(name: str) -> str:
        try:
            return resolve_dataset_name(name)
        except UnknownDatasetError as exc:
            raise _fail(str(exc)) from None

    sys.argv = [prog] + rewrite_data_aliases(argv, resolve)
    for name in args.model or []:  # what made the results about to be written (vlmeval_dop/entry_record.py)
        write_record(args.work_dir, name)
    outcomes = Outcomes(vrun.upsert_dataset_status)
    vrun.upsert_dataset_status = outcomes  # VLMEvalKit reports each benchmark's outcome through it
    try:
        with batched(batch_size):  # batch 1: VLMEvalKit's own inference loop
            vrun.main()
    finally:
        vrun.upsert_dataset_status = outcomes.original
    requested = len(args.model or []) * len(args.data or []) or len(outcomes.seen)
    return summarize(outcomes, requested, args.work_dir)


if __name__ == "__main__":
    main()
