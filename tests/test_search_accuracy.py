"""Accuracy-drop curves (Eq. 13): VLMEvalKit per-sample scoring, generation under the curve policies,
resumable runs and the acc_drop profile feeding optimize_accuracy (tiny models)."""
from __future__ import annotations

import json
from dataclasses import replace

import pandas as pd
import pytest
import torch

from vlmeval_dop.arch import ArchSpec
from vlmeval_dop.executor import apply_dop
from vlmeval_dop.policy import DOPPolicy
from vlmeval_dop.search.accuracy import (
    AccuracyProfileRun,
    build_accuracy_profile,
    profile_accuracy_batch,
    sample_scorer,
)
from vlmeval_dop.search.profile import curve_policies, merge_samples
from vlmeval_dop.tiny import load_tiny, tiny_image, tiny_inputs

QUESTIONS = ["What is shown?", "Which color is the large square in the picture?", "Count?"]
NEW_TOKENS = 4
DEPTHS_OF = {"llava15": [2, 0], "qwen25vl": [3, 1]}
VISUAL = [16, 4]


def _dataset(cls, name):
    """A VLMEvalKit dataset object without its data (the scorer reads only its class and name)."""
    ds = cls.__new__(cls)
    ds.dataset_name = name
    return ds


# ----------------------------------------------------------------------------------------- scoring
def test_vqa_scores_are_vlmevalkits():
    from vlmeval.dataset.image_vqa import CustomVQADataset, ImageVQADataset, VizWiz

    # VQA accuracy: mean over the 10 leave-one-out subsets of min(1, matches / 3), after normalisation.
    # k of 10 annotators agree with the prediction: (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10
    textvqa = sample_scorer(_dataset(ImageVQADataset, "TextVQA_VAL"))
    answers = pd.Series({"answer": str(["stop"] * 3 + ["stop sign"] * 2 + ["red"] * 1 + ["octagon"] * 4)})
    assert textvqa(answers, "Stop.") == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # k=3: 0.9
    assert textvqa(answers, "the STOP sign") == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # k=2: 0.6
    assert textvqa(answers, "Red") == pytest.approx((0 + 9 * 1 / 3) / 10)  # k=1: 0.3
    assert textvqa(answers, "octagon") == 1.0 and textvqa(answers, "blue") == 0.0
    assert sample_scorer(_dataset(VizWiz, "VizWiz"))(pd.Series({"answers": answers["answer"]}), "stop") == pytest.approx(0.9)
    # a custom TSV (e.g. a TextVQA training split) gets the same name rules
    assert sample_scorer(_dataset(CustomVQADataset, "TextVQA_TRAIN"))(answers, "stop") == pytest.approx(0.9)
    with pytest.raises(ValueError, match="list of reference answers"):  # leave-one-out of one answer is 0
        sample_scorer(_dataset(CustomVQADataset, "TextVQA_TRAIN"))(pd.Series({"answer": "stop"}), "stop")

    # the other ImageVQADataset metrics, by name
    chart = sample_scorer(_dataset(ImageVQADataset, "ChartQA_TEST"))  # relaxed: within 5 %
    assert chart(pd.Series({"answer": "40"}), "41.9") == 1.0 and chart(pd.Series({"answer": "40"}), "42.1") == 0.0
    gqa = sample_scorer(_dataset(ImageVQADataset, "GQA_TestDev_Balanced"))  # exact, case-insensitive
    assert gqa(pd.Series({"answer": "Left"}), " left ") == 1.0 and gqa(pd.Series({"answer": "left"}), "the left") == 0.0
    doc = sample_scorer(_dataset(ImageVQADataset, "DocVQA_VAL"))  # ANLS, 0 below 0.5
    assert doc(pd.Series({"answer": str(["hello", "xyz"])}), "hallo") == pytest.approx(1 - 1 / 5)
    assert doc(pd.Series({"answer": str(["hello"])}), "help!!") == 0.5  # distance 3 / 6: 0.5 is not < 0.5, kept
    assert doc(pd.Series({"answer": str(["hello"])}), "hxxxo!") == 0.0


def test_mcq_and_yes_no_scores():
    from vlmeval.dataset.image_mcq import ImageMCQDataset, MMMUDataset
    from vlmeval.dataset.image_yorn import ImageYORNDataset

    mcq = sample_scorer(_dataset(ImageMCQDataset, "MMBench_DEV_EN"))
    row = pd.Series({"index": 3, "question": "Which animal?", "A": "dog", "B": "cat", "C": "bird",
                     "D": float("nan"), "answer": "B"})
    hits = {p: mcq(row, p) for p in ["B", "The answer is B.", "(B) cat", "a cat", "A", "A or B", "I don't know", "D"]}
    assert hits == {"B": 1.0, "The answer is B.": 1.0, "(B) cat": 1.0, "a cat": 1.0,
                    "A": 0.0, "A or B": 0.0, "I don't know": 0.0, "D": 0.0}
    # MMMU open questions become "A = answer, B = Other Answers" (VLMEvalKit's MMMU_preproc)
    mmmu = sample_scorer(_dataset(MMMUDataset, "MMMU_DEV_VAL"))
    open_q = pd.Series({"index": 1, "question": "How many?", "A": float("nan"), "B": float("nan"), "answer": "42"})
    assert mmmu(open_q, "42") == 1.0 and mmmu(open_q, "7") == 0.0

    pope = sample_scorer(_dataset(ImageYORNDataset, "POPE"))
    yes = pd.Series({"answer": "Yes"})
    assert [pope(yes, p) for p in ["Yes, there is.", "yes", "No.", "yes and no", "maybe"]] == [1, 1, 0, 0, 0]
    assert pope(pd.Series({"answer": "No"}), "No, there is not.") == 1.0
    assert sample_scorer(_dataset(ImageYORNDataset, "AMBER"))(pd.Series({"answer": "yes"}), "Yes") == 1.0


def test_unsupported_datasets_are_refused():
    from vlmeval.dataset.image_vqa import CountBenchQA, OCRBench  # CountBenchQA: ImageVQADataset, own evaluate

    from vlmeval_dop.datasets import DOPDemoDataset, VQAv2Dataset

    for cls, name in [(OCRBench, "OCRBench"), (CountBenchQA, "CountBenchQA")]:
        with pytest.raises(ValueError, match="supported: VQA .*MCQ .*Y/N"):
            sample_scorer(_dataset(cls, name))
    with pytest.raises(ValueError, match="no public answers"):
        sample_scorer(_dataset(VQAv2Dataset, "VQAv2_TestDev"))
    # the plugin datasets score with their own evaluate's rule
    vqav2 = sample_scorer(_dataset(VQAv2Dataset, "VQAv2_VAL"))
    assert vqav2(pd.Series({"answer": json.dumps(["two"] * 2 + ["3"] * 8)}), "2") == pytest.approx(0.6)
    demo = sample_scorer(_dataset(DOPDemoDataset, "DOP_Demo"))
    assert demo(pd.Series({"answer": "red"}), " Red.") == 1.0 and demo(pd.Series({"answer": "red"}), "blue") == 0.0


# ------------------------------------------------------------------------------------- generation
def _generate(model, inputs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


def _decoder(processor):
    return lambda ids: processor.batch_decode(ids, skip_special_tokens=True)


def test_batch_drops_equal_independent_generations():
    family = "llava15"
    model, processor = load_tiny(family)
    L = ArchSpec.from_model(model).num_layers
    decode = _decoder(processor)
    inputs = tiny_inputs(family, processor, QUESTIONS[:2], [tiny_image(1), tiny_image(2)])

    # the full policy is the stock model: identical generated ids
    stock = _generate(model, inputs)
    with apply_dop(model, DOPPolicy(L, L, None)):
        assert torch.equal(_generate(model, inputs), stock)

    # reference scorer: 1 when the answer is the unpruned one
    refs = [a.strip() for a in decode(stock)]
    rows = [pd.Series({"ref": r}) for r in refs]
    depths = [L, 0]  # depth L: the curve point that is the full policy
    out = profile_accuracy_batch(model, decode, inputs, rows, lambda row, p: float(p == row["ref"]),
                                 depths, VISUAL, "uniform", NEW_TOKENS)
    assert out.full_scores.tolist() == [1.0, 1.0] and out.answers["full"] == refs

    for curve, policies in curve_policies(L, depths, VISUAL).items():
        expected = torch.zeros(2, len(policies), dtype=torch.float64)
        for j, policy in enumerate(policies):
            with apply_dop(model, policy, reducer="uniform" if policy.n_v is not None else None):
                answers = [a.strip() for a in decode(_generate(model, inputs))]
            for b in range(2):
                expected[b, j] = 1.0 - float(answers[b] == refs[b])
                assert out.answers[curve][b][j] == answers[b]
        assert out.drops[curve].dtype == torch.float64
        torch.testing.assert_close(out.drops[curve], expected, atol=0, rtol=0)
    assert out.drops["D_A"][:, 0].tolist() == out.drops["D_P"][:, 0].tolist() == [0.0, 0.0]  # d = L
    assert max(float(out.drops[c].max()) for c in out.drops) == 1.0  # pruning does change answers
    with pytest.raises(ValueError, match="1 rows for a batch of 2"):
        profile_accuracy_batch(model, decode, inputs, rows[:1], lambda row, p: 0.0, depths, VISUAL, "uniform", 1)


# ------------------------------------------------------------------------------------------ the job
FAMILY = "llava15"
DEPTHS = [2, 0]
PATTERN = "acc_samples.rank*.jsonl"


def _run(path, job, items, **kw):
    model, decode, scorer = job["model"], job["decode"], job["scorer"]
    run = AccuracyProfileRun(path, DEPTHS, VISUAL, "uniform", NEW_TOKENS, **kw)
    return run.run(model, decode, scorer, run.shard(items))


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Tiny llava15, 3 samples (batch 1) whose rows make the unpruned answer the TextVQA consensus, and
    their uninterrupted single-process run."""
    from vlmeval.dataset.image_vqa import ImageVQADataset

    model, processor = load_tiny(FAMILY)
    decode = _decoder(processor)
    items = []
    for i in range(3):
        inputs = tiny_inputs(FAMILY, processor, [QUESTIONS[i]], [tiny_image(i)])
        answer = decode(_generate(model, inputs))[0].strip()
        items.append(([f"s{i}"], inputs, [pd.Series({"answer": str([answer] * 10)})]))
    out = {"model": model, "decode": decode, "items": items,
           "scorer": sample_scorer(_dataset(ImageVQADataset, "TextVQA_VAL"))}
    out["full"] = tmp_path_factory.mktemp("acc_full")
    assert _run(out["full"], out, items) == 3
    return out


def test_resume_and_shards_give_the_same_results(tmp_path, job):
    items, full = job["items"], job["full"]
    full_lines = (full / "acc_samples.rank0.jsonl").read_bytes().splitlines(keepends=True)
    assert _run(tmp_path, job, items[:1]) == 1  # "interrupted" after one sample
    assert _run(tmp_path, job, items[:2]) == 1  # resumed: only the missing one, appended
    assert (tmp_path / "acc_samples.rank0.jsonl").read_bytes() == b"".join(full_lines[:2])
    # two ranks take over: rank 1's shard (s1) is done already, rank 0's (s0, s2) only needs s2
    assert _run(tmp_path, job, items, rank=1, world_size=2) == 0
    assert _run(tmp_path, job, items, rank=0, world_size=2) == 1
    assert _run(tmp_path, job, items) == 0  # finished work is never redone
    a = json.dumps(merge_samples(full, pattern=PATTERN), sort_keys=True)
    b = json.dumps(merge_samples(tmp_path, pattern=PATTERN), sort_keys=True)
    assert a == b
    record = json.loads(full_lines[0])
    assert record["full"] == 1.0 and len(record["answers"]["D_v"]) == len(VISUAL)
    assert not list(full.glob("samples.rank*.jsonl"))  # apart from a KL profile's files


def test_accuracy_profile_feeds_optimize_accuracy(job):
    from vlmeval_dop.flops import policy_tflops
    from vlmeval_dop.search import DivergenceProfile, optimize_accuracy

    prof = build_accuracy_profile(job["full"], model="tiny_llava15", reducer="uniform", dataset="tiny", seed=0,
                                  num_layers=4, num_visual=64, depths=DEPTHS, visual=VISUAL)
    again = DivergenceProfile.from_json(prof.to_json())
    assert again.objective == "acc_drop" and again.n_samples == 3 and again.to_json() == prof.to_json()
    records = [json.loads(x) for x in (job["full"] / "acc_samples.rank0.jsonl").read_text().splitlines()]
    assert list(again.D_v.per_sample[0]) == [r["D_v"][1] for r in records]  # points ascending: 4 first
    assert again.D_A.values[0] == pytest.approx(sum(r["D_A"][1] for r in records) / 3)

    spec = ArchSpec.from_model(job["model"], visual_tokens=64)
    result = optimize_accuracy(again, spec, 0.5, text_tokens=13, alpha=1.0)
    p = result.policy
    assert p.d_P <= p.d_A and p.n_v >= result.n_min
    assert policy_tflops(spec, p, 13)["ratio"] <= 0.5 + 1e-12
    with pytest.raises(ValueError, match="acc_drop"):  # a KL profile is not Eq. 13's input
        optimize_accuracy(replace(again, objective="kl"), spec, 0.5, text_tokens=13, alpha=1.0)
