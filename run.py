"""VLMEvalKit's `run.py` with the DOP entries and datasets registered.

    python run.py --model llava15_7b_dop28 --data TextVQA [any VLMEvalKit flag]
    torchrun --nproc-per-node=8 run.py --model qwen25vl_7b_dop26 --data ChartQA MME
    python run.py --model tiny_llava15_dop --data DOP_Demo          # offline demo, tiny random model

What it adds before handing the (unchanged) flags to `vlmeval.run.main()`:
- every runnable entry of `vlmeval-dop list` becomes a model name in `vlmeval.config.supported_VLM`
  (weights load when VLMEvalKit first needs the model, i.e. only if predictions are missing);
- the plugin datasets (VQAv2_VAL, VQAv2_TestDev, DOP_Demo) join VLMEvalKit's dataset registry;
- the paper's short benchmark names in `--data` (TextVQA, GQA, MMB, ...) are rewritten to VLMEvalKit's
  names, so result files and VLMEvalKit's name-based evaluation logic are those of the real dataset;
- `--model` must be a listed, runnable entry (or one made on demand from it: `llava15_7b__mha4-6` prunes
  single visual operations, `llava15_7b_dopcd28__swap1mlp.s3` is a random policy perturbation; paper
  Tables 26-30) and `--data` a known dataset: otherwise one clear error
  naming the closest valid names, before anything runs. An entry whose weights are neither cached nor
  downloadable stops with a message saying so (not a traceback from inside transformers).
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


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = sys.argv[0] if sys.argv else "run.py"
    # vlmeval.run must be imported before anything initialises CUDA: under torchrun it assigns each local
    # rank its GPUs through CUDA_VISIBLE_DEVICES at import time.
    import vlmeval.run as vrun
    from vlmeval.config import supported_VLM
    from vlmeval.smp import load_env

    from vlmeval_dop.datasets import UnknownDatasetError, resolve_dataset_name
    from vlmeval_dop.registry import EntryError, runnable_entry

    load_env()  # as VLMEvalKit's run.py does (API keys for judges from its .env)
    register(supported_VLM)

    sys.argv = [prog] + argv
    args = vrun.parse_args()  # VLMEvalKit's own parser: same flags, same help, same errors
    for name in args.model or []:
        try:
            runnable_entry(name)
        except EntryError as exc:
            raise _fail(str(exc)) from None
        # `{entry}__mha4-6` names (single operations pruned, Tables 26-28) are made on demand
        supported_VLM.setdefault(name, partial(_build_model, name))

    def resolve(name: str) -> str:
        try:
            return resolve_dataset_name(name)
        except UnknownDatasetError as exc:
            raise _fail(str(exc)) from None

    sys.argv = [prog] + rewrite_data_aliases(argv, resolve)
    vrun.main()


if __name__ == "__main__":
    main()
