"""`run.py --batch-size N`: the batched loop answers exactly as VLMEvalKit's one-sample loop.

- through run.py -> VLMEvalKit, on DOP_Demo and on a probe dataset built here (prompts from 1 to ~190
  words, one or two images of different shapes per sample): the prediction files of `--batch-size 4` equal
  those of the default loop for every tiny family (the paper's four and the five beyond it, unpruned and
  pruned) and one entry of every method kind (paper DOP entries,
  the vision-side reducers, the decoder-side baselines, resize, an operation mask, a perturbation), and the
  executor's per-layer token counts summed over the samples are equal too;
- model level, for the methods without a tiny entry (PDrop, FastV re-ranking at every step) and for a
  batch where one sample stops after one token and the others run to the limit (an extra stop token);
- resume: a batched run interrupted after k batches keeps the k batches' answers, the rerun computes
  only the others and writes the same file; the rank pickle is written at VLMEvalKit's cadence;
- data parallel: each rank batches its own shard;
- fallback: a wrapper whose one-sample path differs from the base class runs one sample at a time and
  says so once.
"""
from __future__ import annotations

import logging
import sys

import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from vlmeval_dop import batched_inference as bi
from vlmeval_dop.datasets import DOPDemoDataset

PROBE = "DOP_BatchProbe"
WORDS = ("describe the colours shapes and positions of every object in the pictures and say which one is the "
         "largest and which is the smallest and whether any of them overlap ").split()


def _image(seed: int, size: tuple[int, int]) -> str:
    from vlmeval.smp import encode_image_to_base64

    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    colours = [(220, 30, 30), (30, 170, 60), (30, 60, 220), (235, 200, 20)]
    for i in range(1 + seed % 3):
        x, y = 10 + 37 * ((seed + i) % 4), 12 + 29 * ((seed * 3 + i) % 3)
        d.rectangle((x, y, x + 40 + 9 * i, y + 30), fill=colours[(seed + i) % 4])
    return encode_image_to_base64(img, fmt="PNG")


def probe_samples() -> list[dict]:
    """8 samples: prompt lengths from 1 word to ~190, 1 or 2 images, square and elongated images."""
    spec = [  # (question words, image sizes)
        (1, [(224, 224)]),
        (190, [(224, 224), (120, 200)]),
        (4, [(300, 120)]),
        (60, [(160, 160)]),
        (2, [(224, 224), (224, 224)]),
        (120, [(96, 240)]),
        (9, [(224, 224)]),
        (30, [(200, 200), (256, 128)]),
    ]
    rows = []
    for i, (n_words, sizes) in enumerate(spec):
        question = f"Q{i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n_words)) + "?"
        images = [_image(10 * i + j, s) for j, s in enumerate(sizes)]
        rows.append({"index": i, "image": images[0] if len(images) == 1 else images, "question": question,
                     "answer": "red", "category": "probe"})
    return rows


class BatchProbeDataset(DOPDemoDataset):
    """DOP_Demo's prompt and scoring on the probe samples."""

    DATASET_URL = {PROBE: ""}

    def load_data(self, dataset):
        return pd.DataFrame(probe_samples())


@pytest.fixture(scope="module")
def probe(lmu_root):
    import vlmeval.dataset as vd

    from vlmeval_dop.datasets import register_datasets

    register_datasets()
    vd.DATASET_CLASSES.append(BatchProbeDataset)
    vd.IMAGE_DATASET.append(BatchProbeDataset)
    vd.SUPPORTED_DATASETS.append(PROBE)
    yield PROBE
    vd.DATASET_CLASSES.remove(BatchProbeDataset)
    vd.IMAGE_DATASET.remove(BatchProbeDataset)
    vd.SUPPORTED_DATASETS.remove(PROBE)


def _run(run_py, *argv, models: dict | None = None):
    """run.main(argv); `models` collects the wrappers VLMEvalKit built, by entry name."""
    original, argv0 = run_py._build_model, list(sys.argv)

    def capture(name, **kw):
        m = original(name, **kw)
        if models is not None:
            models[name] = m
        return m

    run_py._build_model = capture
    from vlmeval.config import supported_VLM

    for name in argv:  # on-demand entries (`__mha2`) are registered once per process: bind them to `capture`
        if "__" in name:
            supported_VLM.pop(name, None)
    try:
        run_py.main(list(argv))
    finally:
        run_py._build_model = original
        sys.argv[:] = argv0


def _predictions(work, entry, data) -> pd.DataFrame:
    return pd.read_excel(work / entry / f"{entry}_{data}.xlsx")


def _texts(df: pd.DataFrame) -> list[str]:
    """The prediction strings of a file (an empty answer reads back as NaN)."""
    return [p if isinstance(p, str) else "" for p in df["prediction"]]


# every tiny family (unpruned and DOP), and one entry of every method kind
UNPRUNED = ("tiny_llava15", "tiny_llavanext", "tiny_qwen25vl", "tiny_internvl3",
            "tiny_qwen2vl", "tiny_internvl35", "tiny_llavaov", "tiny_smolvlm", "tiny_qwen3vl")
ENTRIES = UNPRUNED + (
    "tiny_qwen2vl_dopr", "tiny_internvl35_dop", "tiny_llavaov_dop", "tiny_smolvlm_dop", "tiny_qwen3vl_dopr",
    "tiny_llava15_dop", "tiny_llavanext_dopcd", "tiny_qwen25vl_dopr", "tiny_internvl3_dopr", "tiny_qwen25vl_dopcd",
    "tiny_llava15_dopv", "tiny_llava15_divprune", "tiny_llava15_visionzip", "tiny_llava15_prumergeplus",
    "tiny_llava15_trim", "tiny_llava15_fastv", "tiny_internvl3_fastv", "tiny_llava15_sparsevlm",
    "tiny_llava15_dart", "tiny_llava15_fitprune",
    "tiny_llava15_dop__mha2", "tiny_llava15_dop__swap1mha.s3",
)


@pytest.fixture(scope="module")
def runs(run_py, probe, tmp_path_factory):
    """The same command with the default loop and with --batch-size 4: (work dirs, built models)."""
    from vlmeval.smp import get_logger

    out, log = {}, get_logger("vlmeval.dop")
    for size in (1, 4):
        work = tmp_path_factory.mktemp(f"bs{size}")
        models: dict = {}
        messages: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda r, messages=messages: messages.append(r.getMessage())
        log.addHandler(handler)
        torch.manual_seed(0)  # SparseVLM's tie-breaking noise comes from the default generator (both runs: batch 1)
        try:
            _run(run_py, "--model", *ENTRIES, "--data", "DOP_Demo", probe, "--work-dir", str(work),
                 "--batch-size", str(size), models=models)
        finally:
            log.removeHandler(handler)
        out[size] = (work, models, [m for m in messages if "--batch-size" in m])
    return out


def test_only_sparsevlm_falls_back_and_says_so_once(runs):
    assert runs[1][2] == []
    (msg,) = runs[4][2]  # once, although it ran two datasets
    assert msg.startswith("tiny_llava15_sparsevlm: --batch-size 4 is not used for this entry (sparsevlm declares")


@pytest.mark.parametrize("entry", ENTRIES)
def test_batch4_predictions_equal_batch1(runs, entry, probe):
    (w1, m1, _), (w4, m4, _) = runs[1], runs[4]
    for data in ("DOP_Demo", probe):
        one, four = _predictions(w1, entry, data), _predictions(w4, entry, data)
        assert len(one) == 8  # (a random tiny model may answer with an empty string: NaN in the file)
        pd.testing.assert_frame_equal(four, one)
    # the same per-layer token counts ran (executor evidence, padding excluded), sample for sample
    assert m4[entry].samples == m1[entry].samples == 16
    assert m4[entry].layer_tokens_sum == m1[entry].layer_tokens_sum
    assert (m1[entry].layer_tokens_sum is None) == (entry in UNPRUNED)


def _messages(model, dataset_name):
    from vlmeval.dataset import build_dataset

    ds = build_dataset(dataset_name)
    model.set_dump_image(ds.dump_image)
    return [model.prepare_message(bi.build_message(model, ds, ds.data.iloc[i])) for i in range(len(ds))]


@pytest.mark.parametrize("entry, overrides", [
    ("tiny_llava15", {"baseline": "pdrop", "baseline_args": {"boundaries": [1, 2, 3], "ratio": 0.5}}),
    ("tiny_llava15_fastv", {"baseline_args": {"k": 2, "keep": 16, "per_step": True}}),
])
def test_methods_without_tiny_entry_batch_exactly(entry, overrides, probe):
    from vlmeval_dop.registry import load_entry

    model = load_entry(entry, **overrides)
    msgs = _messages(model, probe)
    single = [model.generate_inner(m, probe) for m in msgs]
    assert model.batch_blocker() is None
    assert model.generate_batch(msgs[:4], probe) + model.generate_batch(msgs[4:], probe) == single


@pytest.mark.parametrize("entry", ["tiny_llava15", "tiny_llavanext_dop", "tiny_qwen25vl_fastv", "tiny_internvl3_dopr",
                                   "tiny_smolvlm_dop"])
def test_a_row_that_stops_early_is_cut_at_its_own_stop(entry, probe):
    """One sample of the batch stops after its first token (an extra stop token), the others run to the
    limit: every answer equals its one-sample answer."""
    from vlmeval_dop.registry import load_entry

    model = load_entry(entry, max_new_tokens=12)
    msgs = _messages(model, probe)[:4]

    def new_ids(m):
        inputs = model.model_inputs(m, probe)
        out, _ = model._generate_ids(inputs, model.prompt_of(m))
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    first = new_ids(msgs[2])[0]
    gen = model.generation_config()
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    gen.eos_token_id = eos + [first]
    lengths = [len(new_ids(m)) for m in msgs]
    assert lengths[2] == 1 and max(lengths) >= 8, lengths
    single = [model.generate_inner(m, probe) for m in msgs]
    assert model.generate_batch(msgs, probe) == single


def test_interrupted_batched_run_resumes_without_recomputing(run_py, probe, runs, tmp_path, monkeypatch):
    from vlmeval.smp import dump as vlmeval_dump

    from vlmeval_dop.models.base import DOPWrapper

    entry, k = "tiny_llava15_dop", 1
    seen: list[list[str]] = []
    writes: list[int] = []
    original = DOPWrapper.generate_batch

    def spy(self, messages, dataset=None, inputs=None):
        if stop_after is not None and len(seen) == stop_after:
            raise KeyboardInterrupt
        seen.append([m[-1]["value"].split(":")[0] for m in messages])  # "Q3" from "Q3: ..."
        return original(self, messages, dataset, inputs)

    def dump_spy(data, f, **kw):
        if str(f).endswith(f"01_{probe}.pkl"):
            writes.append(len(data))
        return vlmeval_dump(data, f, **kw)

    monkeypatch.setattr(DOPWrapper, "generate_batch", spy)
    monkeypatch.setattr("vlmeval.smp.dump", dump_spy)
    monkeypatch.setattr(bi, "DUMP_EVERY", 4)  # VLMEvalKit's cadence is 10; 4 shows it on 8 samples
    argv = ("--model", entry, "--data", probe, "--work-dir", str(tmp_path), "--batch-size", "3")
    stop_after = k
    with pytest.raises(SystemExit) as exc:
        _run(run_py, *argv)
    assert exc.value.code == 130
    first = [q for batch in seen for q in batch]
    assert len(seen) == k and len(first) == 3 and writes == [3]  # kept on the way out

    seen.clear(), writes.clear()
    stop_after = None
    _run(run_py, *argv)
    second = [q for batch in seen for q in batch]
    assert sorted(first + second) == [f"Q{i}" for i in range(8)]  # nobody twice
    assert writes == [8, 8]  # after the batch that reached 4 new samples, then the final ordered write
    pd.testing.assert_frame_equal(_predictions(tmp_path, entry, probe), _predictions(runs[1][0], entry, probe))

    seen.clear()
    models: dict = {}
    _run(run_py, *argv, "--reuse", models=models)  # VLMEvalKit's --reuse: finished predictions, no model built
    assert seen == [] and models == {}
    pd.testing.assert_frame_equal(_predictions(tmp_path, entry, probe), _predictions(runs[1][0], entry, probe))


def test_each_rank_batches_its_own_shard(probe, runs, tmp_path, monkeypatch):
    import vlmeval.inference as vinf
    from vlmeval.dataset import build_dataset
    from vlmeval.smp import load

    from vlmeval_dop.registry import load_entry

    entry = "tiny_qwen25vl"
    model = load_entry(entry)
    ds = build_dataset(probe)
    merged = {}
    for rank in range(2):
        monkeypatch.setattr("vlmeval.smp.get_rank_and_world_size", lambda rank=rank: (rank, 2))
        out = tmp_path / f"{rank}2_{probe}.pkl"
        bi.infer_data_batched(model, entry, str(tmp_path), ds, str(out), batch_size=4, original=vinf.infer_data)
        shard = load(str(out))
        assert list(shard) == list(ds.data["index"][rank::2])
        merged.update(shard)
    ref = _predictions(runs[1][0], entry, probe)
    assert [merged[i] for i in ref["index"]] == _texts(ref)


def test_a_wrapper_with_its_own_generate_falls_back_once(probe, tmp_path):
    import vlmeval.inference as vinf
    from vlmeval.dataset import build_dataset
    from vlmeval.smp import get_logger

    from vlmeval_dop.models.llava import LLaVA15DOP

    class Custom(LLaVA15DOP):
        def generate_inner(self, message, dataset=None):
            return super().generate_inner(message, dataset).upper()

    model = Custom(tiny="llava15", entry="custom", max_new_tokens=4)
    assert "overrides generate_inner()" in model.batch_blocker()
    sparse = LLaVA15DOP(tiny="llava15", baseline="sparsevlm", baseline_args={"layers": [0, 1, 2], "keep": [32, 16, 8]})
    assert sparse.batch_blocker() == "sparsevlm declares batch_exact = False"  # noise drawn in batch order
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    log = get_logger("vlmeval.dop")
    log.addHandler(handler)
    try:
        ds = build_dataset(probe)
        for rep in range(2):
            out = tmp_path / f"{rep}_{probe}.pkl"
            bi.infer_data_batched(model, "custom", str(tmp_path), ds, str(out), batch_size=4, original=vinf.infer_data)
    finally:
        log.removeHandler(handler)
    assert len([r for r in records if "--batch-size 4 is not used" in r]) == 1
    assert model.samples == 16  # VLMEvalKit's loop ran every sample, twice


def test_inputs_that_cannot_share_a_batch_run_one_at_a_time(probe, runs, tmp_path):
    import vlmeval.inference as vinf
    from vlmeval.dataset import build_dataset
    from vlmeval.smp import load

    from vlmeval_dop.models.base import BatchingError
    from vlmeval_dop.registry import load_entry

    entry = "tiny_llava15_dop"
    model = load_entry(entry).load()
    msgs = _messages(model, probe)[:2]
    inputs = [model.build_inputs(m, probe) for m in msgs]
    inputs[1]["note"] = "a list, not a tensor"
    with pytest.raises(BatchingError, match="'note' as a non-tensor"):
        model.collate_inputs(inputs)

    calls = []
    unbatchable = [{"input_ids": torch.ones(1, 2), "x": [1]}]
    model.generate_batch = lambda *a, **k: calls.append(1) or model.collate_inputs(unbatchable)
    ds = build_dataset(probe)
    out = tmp_path / f"01_{probe}.pkl"
    bi.infer_data_batched(model, entry, str(tmp_path), ds, str(out), batch_size=4, original=vinf.infer_data)
    assert len(calls) == 1  # tried once, then one sample at a time for the rest
    ref = _predictions(runs[1][0], entry, probe)
    got = load(str(out))
    assert [got[i] for i in ref["index"]] == _texts(ref)


def test_batch_size_flag(run_py):
    argv = ["--model", "m", "--batch-size", "16", "--reuse"]
    assert run_py.split_batch_size(argv) == (16, ["--model", "m", "--reuse"])
    assert run_py.split_batch_size(["--batch-size=8"]) == (8, [])
    assert run_py.split_batch_size(["--data", "x"]) == (1, ["--data", "x"])
    for bad in (["--batch-size", "0"], ["--batch-size=two"], ["--batch-size"]):
        with pytest.raises(SystemExit) as exc:
            run_py.split_batch_size(bad)
        assert exc.value.code == 2
    assert bi.length_batches([5, 9, 7, 9, 1], 2) == [[1, 3], [2, 0], [4]]
