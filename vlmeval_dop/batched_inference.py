"""Batched inference for `run.py --batch-size N`: VLMEvalKit's per-rank loop, N samples per `generate`.

VLMEvalKit's `vlmeval.inference.infer_data` calls `model.generate(message, dataset)` one sample at a time.
`batched(N)` replaces it (for the duration of a run) by `infer_data_batched`, which keeps everything around
the generation as VLMEvalKit does it, so the rest of VLMEvalKit (`infer_data_job`: the previous-run file,
merging the ranks, the prediction file, evaluation, `--reuse`) runs unchanged on its output:

- the rank's shard (`range(rank, len(dataset), world_size)`; torchrun data parallel: each rank batches its
  own shard), the samples already in the rank's pickle or the previous run's file skipped, the model built
  only if something is missing (and with `WORLD_SIZE` unset, as VLMEvalKit does);
- each sample's message built as VLMEvalKit builds it (`force_use_dataset_prompt`, the model's
  `build_prompt` when `use_custom_prompt`, else the dataset's) and checked/converted as `BaseModel.generate`
  does;
- the rank's intermediate pickle `{work_dir}/{rank}{world_size}_{dataset}.pkl` (index -> prediction)
  written whenever the count of computed samples reaches a multiple of 10 (VLMEvalKit's cadence; with
  N >= 10, after every batch), and also when the loop stops on an exception or Ctrl-C, so finished samples
  are never computed again on the rerun; at the end the rank's predictions in dataset order;
- `SKIP_ERR=1`: a batch that raises a RuntimeError is redone one sample at a time with VLMEvalKit's
  per-sample error message; `--verbose` prints every answer.
- samples whose inputs cannot share a batch (`BatchingError` from `DOPWrapper.collate_inputs`, e.g. a new
  family whose processor returns something that is not a tensor) are answered one at a time by
  `model.generate`, as are all later samples of that model, and the log says so once.

Batches: samples are taken in the shard's order in windows of `WINDOW_BATCHES x N`, each window is sorted by
prompt length (tokens after image expansion, longest first) and cut into batches of N, so left padding stays
small. Each batch runs `DOPWrapper.generate_batch` (the wrapper's one-sample prompt building, image
preprocessing, reducer and executor, one `generate` on the left-padded batch, each row cut at its own stop
token). A model that cannot be batched exactly (`DOPWrapper.batch_blocker()`, or a model that is not a
`vlmeval_dop` wrapper) runs VLMEvalKit's own loop instead, announced once per model in the log.

The progress bar counts samples (samples/s).
"""
from __future__ import annotations

import os
import os.path as osp
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from tqdm import tqdm

WINDOW_BATCHES = 4  # prompts are sorted by length within windows of this many batches
DUMP_EVERY = 10  # VLMEvalKit's infer_data writes the rank's pickle every 10 samples
FAIL_MSG = "Failed to obtain answer"  # VLMEvalKit's SKIP_ERR message prefix

_announced: set[tuple[str, str]] = set()


def _logger():
    from vlmeval.smp import get_logger

    return get_logger("vlmeval.dop")


def announce_fallback(model_name: str, batch_size: int, reason: str) -> None:
    """Log once per (model, reason) that this model runs one sample at a time despite `--batch-size`."""
    if (model_name, reason) in _announced:
        return
    _announced.add((model_name, reason))
    _logger().warning(
        "%s: --batch-size %d is not used for this entry (%s); it runs one sample at a time, VLMEvalKit's own loop",
        model_name, batch_size, reason,
    )


def build_message(model, dataset, line):
    """The message VLMEvalKit's `infer_data` builds for one row of the dataset."""
    if hasattr(dataset, "force_use_dataset_prompt") and dataset.force_use_dataset_prompt:
        return dataset.build_prompt(line)
    if hasattr(model, "use_custom_prompt") and model.use_custom_prompt(dataset.dataset_name):
        return model.build_prompt(line, dataset=dataset.dataset_name)
    return dataset.build_prompt(line)


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Positions 0..len-1 grouped into batches of `batch_size`, longest first (stable for equal lengths)."""
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def infer_data_batched(model, model_name, work_dir, dataset, out_file, verbose=False, api_nproc=4, use_vllm=False,
                       retry_failed=True, *, batch_size: int, original: Callable, window: int | None = None):
    """Drop-in for `vlmeval.inference.infer_data` (same arguments, same files, same return value) that runs
    `batch_size` samples per `generate`; `original` is VLMEvalKit's `infer_data` (for fallbacks)."""
    from vlmeval.config import supported_VLM
    from vlmeval.smp import dump, get_rank_and_world_size, load

    common = dict(work_dir=work_dir, model_name=model_name, dataset=dataset, out_file=out_file, verbose=verbose,
                  api_nproc=api_nproc, use_vllm=use_vllm, retry_failed=retry_failed)
    dataset_name = dataset.dataset_name
    prev_file = f"{work_dir}/{model_name}_{dataset_name}_PREV.pkl"
    res = load(prev_file) if osp.exists(prev_file) else {}
    if osp.exists(out_file):
        res.update(load(out_file))

    rank, world_size = get_rank_and_world_size()
    sheet_indices = list(range(rank, len(dataset), world_size))
    data = dataset.data.iloc[sheet_indices]
    data_indices = list(data["index"])
    if all(idx in res for idx in data_indices):  # finished: no model is built
        dump({k: res[k] for k in data_indices}, out_file)
        return model
    data = data[~data["index"].isin(res)]

    if isinstance(model, str):
        kwargs = {}
        if model_name is not None and any(k in model_name for k in ("Llama-4", "Qwen2-VL", "Qwen2.5-VL")):
            kwargs = {"use_vllm": use_vllm}  # as VLMEvalKit
        ws_bak = os.environ.pop("WORLD_SIZE", None)  # VLMEvalKit: no transformers TP under torchrun
        model = supported_VLM[model_name](**kwargs)
        if ws_bak:
            os.environ["WORLD_SIZE"] = ws_bak

    if getattr(model, "is_api", False) or not hasattr(model, "generate_batch"):
        announce_fallback(model_name, batch_size, "not a vlmeval_dop wrapper")
        return original(model=model, **common)
    blocker = model.batch_blocker()
    if blocker is not None:
        announce_fallback(model_name, batch_size, blocker)
        return original(model=model, **common)
    model.set_dump_image(dataset.dump_image)

    window = window or WINDOW_BATCHES * batch_size
    lt = len(data)
    done = dumped = 0
    batching = True
    bar = tqdm(total=lt, unit="sample", desc=f"Infer {model_name}/{dataset_name}, Rank {rank}/{world_size}")
    try:
        for start in range(0, lt, window):
            rows = data.iloc[start:start + window]
            structs = [build_message(model, dataset, rows.iloc[i]) for i in range(len(rows))]
            messages = [model.prepare_message(s) for s in structs]
            inputs = [model.build_inputs(m, dataset_name) for m in messages]
            for group in length_batches([x["input_ids"].shape[1] for x in inputs], batch_size):
                answers, batching = _generate(
                    model, model_name, batch_size, batching, [structs[j] for j in group],
                    [messages[j] for j in group], [inputs[j] for j in group], dataset_name,
                )
                torch.cuda.empty_cache()
                for j, answer in zip(group, answers):
                    if verbose:
                        print(answer, flush=True)
                    res[rows.iloc[j]["index"]] = answer
                before, done = done, done + len(group)
                bar.update(len(group))
                if done // DUMP_EVERY > before // DUMP_EVERY:
                    dump(res, out_file)
                    dumped = done
    finally:
        bar.close()
        if done != dumped:  # stopped between two regular writes: keep what is finished
            dump(res, out_file)

    dump({k: res[k] for k in data_indices}, out_file)
    return model


def _generate(model, model_name, batch_size, batching, structs, messages, inputs, dataset_name):
    """(answers, whether to keep batching): one `generate_batch`, or the samples one at a time."""
    from vlmeval_dop.models.base import BatchingError

    skip_err = os.environ.get("SKIP_ERR", False) == "1"
    if batching:
        try:
            return model.generate_batch(messages, dataset_name, inputs=inputs), True
        except BatchingError as exc:  # inputs this wrapper builds cannot share a batch: one at a time from now on
            batching = False
            announce_fallback(model_name, batch_size, str(exc))
        except RuntimeError:
            if not skip_err:
                raise
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    # one sample at a time, as VLMEvalKit's loop (with SKIP_ERR, failing samples get its message)
    answers = []
    for struct in structs:
        if not skip_err:
            answers.append(model.generate(message=struct, dataset=dataset_name))
            continue
        try:
            answers.append(model.generate(message=struct, dataset=dataset_name))
        except RuntimeError as err:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            warnings.warn(f"{type(err)} {str(err)}")
            answers.append(f"{FAIL_MSG}: {type(err)} {str(err)}")
    return answers, batching


@contextmanager
def batched(batch_size: int, window: int | None = None) -> Iterator[None]:
    """Within this context VLMEvalKit's `infer_data_job` runs `infer_data_batched` (batch 1: unchanged)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if batch_size == 1:
        yield
        return
    import vlmeval.inference as vinf

    original = vinf.infer_data
    vinf.infer_data = partial(infer_data_batched, batch_size=batch_size, original=original, window=window)
    try:
        yield
    finally:
        vinf.infer_data = original


__all__ = ["batched", "infer_data_batched", "length_batches", "build_message", "WINDOW_BATCHES"]
