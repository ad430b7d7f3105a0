"""reproduce/aggregate.py --work-dir: VLMEvalKit's own score files -> the paper's table with Rel. Avg.

The work dir is made by the repository's run.py (`vlmeval.run.main()`, in process, offline, as in
tests/test_plugin_e2e.py), so every score file is written by VLMEvalKit's pipeline and its datasets' own
`evaluate()`:

- DOP_Demo (VQA type, our plugin): real inference of the tiny random-weight DOP entry (its answers are
  whatever the random model says; the reference recomputes exact match from VLMEvalKit's prediction file);
- TextVQA_VAL, POPE, MME, OCRBench, MMBench_DEV_EN (real VLMEvalKit classes): tiny local TSVs in VLMEvalKit's
  format (base64 images) under the real names; VLMEvalKit re-downloads a TSV whose md5 differs from its
  table, so the test sets the table entry to the tiny file's md5 (VLMEvalKit's own check, pointed at our
  file). Predictions are written as VLMEvalKit's prediction files (`<entry>/<entry>_<dataset>.xlsx`): run.py
  finds them complete, skips inference and evaluates them, which is how hand-computable scores are obtained
  from random models;
- DOPTiny_MCQ: a local MCQ TSV, which VLMEvalKit itself treats as a custom MCQ dataset (CustomMCQDataset).

References are hand computations from the predictions written here (exact-match, VQA leave-one-out
accuracy, per-split F1, MME acc + acc+, circular MMBench), never collect_scores' own code.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from reproduce import aggregate  # noqa: E402
from reproduce.aggregate import InputError, collect_scores  # noqa: E402

BASE, DOP, QWEN = "tiny_llava15", "tiny_llava15_dop", "tiny_qwen25vl"
CUSTOM_MCQ = "DOPTiny_MCQ"


# ------------------------------------------------------------------------------------------ fixtures
def _b64(seed: int) -> str:
    img = Image.new("RGB", (16, 16), (40 * seed % 256, 90, 160))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _ten(**counts: int) -> str:
    """10 human answers, `counts` of each, the rest "zzz" (VLMEvalKit stores the list as a Python literal)."""
    answers = [a for a, n in counts.items() for _ in range(n)]
    return str(answers + ["zzz"] * (10 - len(answers)))


# dataset -> (rows without image, {entry: predictions}); hand-computed scores are in EXPECTED
TEXTVQA = [{"index": i, "question": f"q{i}?", "answer": a}
           for i, a in enumerate([_ten(cat=10), _ten(cat=3, dog=2), _ten(bird=4)])]
# VQA accuracy, mean over the 10 leave-one-out subsets of min(1, matches / 3):
# base: 10/10 -> 1; 3/10 -> (3*2/3 + 7*1)/10 = 0.9; 0/10 -> 0.  dop: 1; 2/10 -> (2*1/3 + 8*2/3)/10 = 0.6; 0
TEXTVQA_PRED = {BASE: ["cat", "cat", "cat"], DOP: ["cat", "dog", "cat"]}

POPE_SPLITS = ["adversarial"] * 4 + ["popular"] * 4 + ["random"] * 4
POPE = [{"index": i, "question": f"Is there a thing {i}?", "answer": a, "category": c}
        for i, (a, c) in enumerate(zip(["Yes", "Yes", "No", "No"] * 3, POPE_SPLITS))]
POPE_PRED = {
    # F1 = 2tp / (2tp + fp + fn) per split: adversarial tp2 fp2 -> 2/3; popular all right -> 1; random tp0 -> 0
    BASE: ["Yes", "Yes", "Yes", "Yes", "Yes", "Yes", "No", "No", "No", "No", "No", "No"],
    # adversarial tp0 -> 0; popular tp2 fp1 -> 0.8; random 0.8
    DOP: ["No", "No", "No", "No", "Yes", "Yes", "No", "Yes", "Yes", "Yes", "Yes", "No"],
}

# MME: two questions per image; category score = acc + acc+ (both questions of an image right), in percent
MME = [{"index": i, "question": f"q{i}? Please answer yes or no.", "answer": a, "category": c, "image_path": p}
       for i, (a, c, p) in enumerate([
           ("Yes", "color", "c1.jpg"), ("No", "color", "c1.jpg"), ("Yes", "color", "c2.jpg"), ("No", "color", "c2.jpg"),
           ("Yes", "code_reasoning", "r1.jpg"), ("No", "code_reasoning", "r1.jpg"),
           ("Yes", "code_reasoning", "r2.jpg"), ("No", "code_reasoning", "r2.jpg")])]
MME_PRED = {
    # color: 3/4 right, 1/2 images -> 75 + 50 = 125 (perception); code_reasoning all right -> 200 (reasoning)
    BASE: ["Yes", "No", "Yes", "Yes", "Yes", "No", "Yes", "No"],
    # color all right -> 200; code_reasoning 1/4, 0 images -> 25
    DOP: ["Yes", "No", "Yes", "No", "Yes", "Yes", "No", "Yes"],
}
MME_PRED[QWEN] = MME_PRED[BASE]

OCR = [{"index": i, "question": f"q{i}", "answer": str(a), "category": c} for i, (a, c) in enumerate([
    (["Hello"], "Regular Text Recognition"), (["42", "forty-two"], "Doc-oriented VQA"),
    (["ACME Inc"], "Key Information Extraction")])]
OCR_PRED = {BASE: ["hello world", "it is 42", "unknown"], DOP: ["HELLO", "no idea", "none"]}  # 2 and 1 found

# MMBench: 3 questions, each with a circular copy (index + 1e6, options swapped); circular hit = all copies right
MMB = []
for g, (a, b, ans) in enumerate([("red", "blue", "A"), ("cat", "dog", "B"), ("one", "two", "A")]):
    common = {"hint": float("nan"), "category": "attribute_recognition", "l2-category": "fine-grained", "split": "dev"}
    MMB.append({"index": g, "question": f"m{g}?", "A": a, "B": b, "answer": ans, **common})
    MMB.append({"index": 1_000_000 + g, "question": f"m{g}?", "A": b, "B": a, "answer": "B" if ans == "A" else "A",
                **common})
MMB_PRED = {BASE: ["A", "B", "B", "B", "B", "B"],  # group 0 right twice, 1 right once, 2 never -> 1/3
            DOP: ["A", "B", "B", "A", "A", "A"]}  # groups 0 and 1 right -> 2/3 (plain accuracy would be 4/6)

MCQ = [{"index": i, "question": f"c{i}?", "A": "w", "B": "x", "C": "y", "D": "z", "answer": ans}
       for i, ans in enumerate("ABCD")]
MCQ_PRED = {BASE: ["A", "B", "C", "A"], DOP: ["A", "B", "A", "A"]}  # 3/4, 2/4

# DOP_Demo: the dop entry is really inferred by the tiny model; the base's predictions are written (6/8 right,
# exact match ignores case and a trailing full stop), so that the base score is not 0
DEMO_PRED = {BASE: ["Red.", "GREEN", "blue", "2", "3", "5", "square", "circle"]}

DATASETS = {"DOP_Demo": (None, DEMO_PRED), "TextVQA_VAL": (TEXTVQA, TEXTVQA_PRED), "POPE": (POPE, POPE_PRED),
            "MME": (MME, MME_PRED), "OCRBench": (OCR, OCR_PRED), "MMBench_DEV_EN": (MMB, MMB_PRED),
            CUSTOM_MCQ: (MCQ, MCQ_PRED)}

EXPECTED = {  # hand computations of the comments above, in the paper's units
    BASE: {"TextVQA": 100 * (1 + 0.9 + 0) / 3, "POPE": 100 * (2 / 3 + 1 + 0) / 3, "MME": 125.0, "OCRBench": 2.0,
           "MMB": 100 / 3, CUSTOM_MCQ: 75.0, "DOP_Demo": 75.0},
    DOP: {"TextVQA": 100 * (1 + 0.6 + 0) / 3, "POPE": 100 * (0 + 0.8 + 0.8) / 3, "MME": 200.0, "OCRBench": 1.0,
          "MMB": 200 / 3, CUSTOM_MCQ: 50.0},
}
VLMEVAL_POOLED_POPE_BASE = 100 * 2 * 4 / (2 * 4 + 2 + 2)  # VLMEvalKit's Overall: one F1 of the pooled tp4 fp2 fn2


@pytest.fixture(scope="module")
def work(lmu_root, run_py, tmp_path_factory):
    """A VLMEvalKit work dir written by run.py: DOP_Demo inferred, the other datasets evaluated."""
    import hashlib

    from vlmeval.dataset.image_mcq import ImageMCQDataset
    from vlmeval.dataset.image_vqa import ImageVQADataset, OCRBench
    from vlmeval.dataset.image_yorn import ImageYORNDataset

    from vlmeval_dop.datasets import demo_samples

    work = tmp_path_factory.mktemp("work")
    md5_tables = {"TextVQA_VAL": ImageVQADataset.DATASET_MD5, "POPE": ImageYORNDataset.DATASET_MD5,
                  "MME": ImageYORNDataset.DATASET_MD5, "OCRBench": OCRBench.DATASET_MD5,
                  "MMBench_DEV_EN": ImageMCQDataset.DATASET_MD5}
    argv0 = list(sys.argv)
    with pytest.MonkeyPatch.context() as mp:
        for name, (rows, preds) in DATASETS.items():
            if rows is None:  # DOP_Demo builds its data itself
                data = pd.DataFrame(demo_samples())
            else:
                data = pd.DataFrame(rows)
                data.insert(1, "image", [_b64(i) for i in range(len(data))])
                tsv = lmu_root / f"{name}.tsv"
                data.to_csv(tsv, sep="\t", index=False)
                if name in md5_tables:
                    mp.setitem(md5_tables[name], name, hashlib.md5(tsv.read_bytes()).hexdigest())
            for entry, pred in preds.items():
                (work / entry).mkdir(exist_ok=True)
                out = data.drop(columns="image").assign(prediction=pred)
                out.to_excel(work / entry / f"{entry}_{name}.xlsx", index=False)
        try:
            run_py.main(["--model", BASE, DOP, "--data", *DATASETS, "--work-dir", str(work),
                         "--judge", "exact_matching"])
            run_py.main(["--model", QWEN, "--data", "MME", "--work-dir", str(work), "--judge", "exact_matching"])
        finally:
            sys.argv[:] = argv0
    return work


def _demo_score(work: Path, entry: str) -> float:
    """DOP_Demo exact match recomputed from the prediction file VLMEvalKit wrote (its own inference)."""
    pred = pd.read_excel(work / entry / f"{entry}_DOP_Demo.xlsx")
    norm = lambda t: str(t).strip().lower().rstrip(".").strip()  # noqa: E731
    return 100 * sum(norm(p) == norm(a) for p, a in zip(pred["prediction"], pred["answer"].astype(str))) / len(pred)


def _cells(df: pd.DataFrame) -> dict[tuple[str, str], float]:
    return {(m, b): s for m, b, s in zip(df["method"], df["benchmark"], df["score"])}


# --------------------------------------------------------------------------------------------- tests
def test_collect_reads_vlmevalkit_files_in_paper_units(work):
    got = _cells(collect_scores(work, entries=[BASE, DOP],
                                benchmarks=["TextVQA", "POPE", "MME", "OCRBench", "MMB", CUSTOM_MCQ, "DOP_Demo"]))
    for entry, scores in EXPECTED.items():
        for bench, value in scores.items():
            assert got[(entry, bench)] == pytest.approx(value, abs=1e-9), (entry, bench)
    assert got[(DOP, "DOP_Demo")] == pytest.approx(_demo_score(work, DOP), abs=1e-9)  # the tiny model's answers
    assert _demo_score(work, BASE) == 75.0 and len(got) == 14
    # the files really are VLMEvalKit's: POPE's own Overall is the pooled F1, which the paper does not print
    pope = pd.read_csv(work / BASE / f"{BASE}_POPE_score.csv").set_index("split")
    assert pope.loc["Overall", "Overall"] == pytest.approx(VLMEVAL_POOLED_POPE_BASE)
    assert VLMEVAL_POOLED_POPE_BASE - EXPECTED[BASE]["POPE"] > 10  # 66.7 vs the paper's mean 55.6
    # MCQ accuracy is stored as a fraction, MMBench's is the circular one
    mmb = pd.read_csv(work / DOP / f"{DOP}_MMBench_DEV_EN_acc.csv")
    assert mmb["Overall"].iloc[0] == pytest.approx(2 / 3) and mmb["split"].iloc[0] == "dev"


def test_default_selection_and_mme_units(work):
    """Default: every entry folder, the paper's benchmarks found (not DOP_Demo / custom sets); MME by family."""
    df = collect_scores(work)
    got = _cells(df)
    assert set(df["method"]) == {BASE, DOP, QWEN}
    assert set(df["benchmark"]) == {"TextVQA", "POPE", "MME", "OCRBench", "MMB"}
    assert got[(BASE, "MME")] == 125.0  # LLaVA tables: perception only
    assert got[(QWEN, "MME")] == 125.0 + 200.0  # Qwen2.5-VL tables: perception + reasoning, same predictions
    assert [k for k in got if k[0] == QWEN] == [(QWEN, "MME")]
    total = _cells(collect_scores(work, benchmarks=["MME"], mme="total"))
    assert total[(BASE, "MME")] == 325.0 and total[(DOP, "MME")] == 200.0 + 25.0
    assert _cells(collect_scores(work, benchmarks=["MME"], mme="perception"))[(QWEN, "MME")] == 125.0
    # a VLMEvalKit dataset name selects the same column under the paper's alias
    one = collect_scores(work, [BASE], ["TextVQA_VAL", "TextVQA"])
    assert _cells(one) == {(BASE, "TextVQA"): pytest.approx(63 + 1 / 3)}
    assert one.attrs["files"][(BASE, "TextVQA")] == work / BASE / f"{BASE}_TextVQA_VAL_acc.csv"


def test_cli_markdown_matches_hand_computed_rel_avg(work, tmp_path, capsys):
    benches = ["TextVQA", "POPE", "MME", "OCRBench", "MMB", CUSTOM_MCQ]
    out = tmp_path / "t"
    rc = aggregate.main(["--work-dir", str(work), "--entries", BASE, DOP, "--benchmarks", *benches,
                         "--base", BASE, "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    lines = stdout.strip().splitlines()
    assert lines[0] == "| Method | TextVQA | POPE | MME | MMB | OCRBench | DOPTiny_MCQ | Rel. Avg. |"  # paper order
    # hand: mean(53.33/63.33, 53.33/55.56, 200/125, 1/2, 66.67/33.33, 50/75) = mean(16/19, .96, 1.6, .5, 2, 2/3)
    rel = 100 * (16 / 19 + 0.96 + 1.6 + 0.5 + 2.0 + 2 / 3) / 6
    assert f"{rel:.1f}" == "109.5"
    assert lines[2] == "| tiny_llava15 | 63.333 | 55.556 | 125 | 33.333 | 2 | 75 | 100.0% |"
    assert lines[3] == "| tiny_llava15_dop | 53.333 | 53.333 | 200 | 66.667 | 1 | 50 | 109.5% |"
    table = pd.read_csv(tmp_path / "t.csv").set_index("method")
    assert table.loc[DOP, "rel_avg"] == pytest.approx(rel, abs=1e-9)


def test_work_dir_plus_scores_csv(work, tmp_path, capsys):
    """VQAv2 test-dev is scored by EvalAI: its cells come from --scores next to the work dir."""
    extra = tmp_path / "vqav2.csv"
    extra.write_text(f"method,benchmark,score\n{BASE},VQAv2,80\n{DOP},VQAv2,60\n")
    rc = aggregate.main(["--work-dir", str(work), "--entries", BASE, DOP, "--benchmarks", "OCRBench",
                         "--scores", str(extra), "--base", BASE])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    lines = stdout.strip().splitlines()
    assert lines[0] == "| Method | VQAv2 | OCRBench | Rel. Avg. |"
    assert lines[3] == "| tiny_llava15_dop | 60 | 1 | 62.5% |"  # (60/80 + 1/2) / 2
    extra.write_text(f"method,benchmark,score\n{BASE},OCRBench,3\n")
    assert aggregate.main(["--work-dir", str(work), "--benchmarks", "OCRBench", "--scores", str(extra),
                           "--base", BASE]) == 2
    assert "repeats cell(s) read from --work-dir: tiny_llava15/OCRBench" in capsys.readouterr().err


def test_timestamped_run_folders_and_symlinks(work, tmp_path):
    """Older VLMEvalKit: files in <entry>/T<date>_G<hash>/ with symlinks in <entry>/; the newest file wins."""
    copy = tmp_path / "w"
    shutil.copytree(work / DOP, copy / DOP, symlinks=True)
    name = f"{DOP}_OCRBench_score.json"
    run = copy / DOP / "T20250101_G1a2b3c"
    run.mkdir()
    (copy / DOP / name).rename(run / name)
    assert collect_scores(copy, benchmarks=["OCRBench"])["score"].tolist() == [1.0]  # only in the run folder
    (copy / DOP / name).symlink_to(run / name)
    assert collect_scores(copy, benchmarks=["OCRBench"])["score"].tolist() == [1.0]  # the symlink
    newer = copy / DOP / "T20250301-101010"
    newer.mkdir()
    (newer / name).write_text(json.dumps({**json.loads((run / name).read_text()), "Final Score": 3}))
    os.utime(newer / name, (2e9, 2e9))
    assert collect_scores(copy, benchmarks=["OCRBench"])["score"].tolist() == [3.0]  # the latest run
    (run / name).unlink()  # the symlink now dangles: ignored
    os.utime(newer / name, (1e9, 1e9))
    assert collect_scores(copy, benchmarks=["OCRBench"])["score"].tolist() == [3.0]
    # a similarly named dataset is not mistaken for this one (exact names, no prefix match)
    shutil.copy(newer / name, copy / DOP / f"{DOP}_OCRBench_v2_score.json")
    (newer / name).unlink()
    with pytest.raises(InputError, match="no VLMEvalKit score file for benchmark OCRBench"):
        collect_scores(copy, benchmarks=["OCRBench"])


def test_unknown_family_needs_an_explicit_mme_unit(work, tmp_path):
    copy = tmp_path / "w"
    (copy / "my_model").mkdir(parents=True)
    shutil.copy(work / BASE / f"{BASE}_MME_score.csv", copy / "my_model" / "my_model_MME_score.csv")
    with pytest.raises(InputError, match="cannot tell the MME unit of 'my_model'.*--mme perception"):
        collect_scores(copy)
    assert collect_scores(copy, mme="total")["score"].tolist() == [325.0]


@pytest.mark.parametrize("args,message", [
    (["--work-dir", "{tmp}/nowhere"], "work dir '{tmp}/nowhere' not found"),
    (["--work-dir", "{work}", "--benchmarks", "GQA"],
     "no VLMEvalKit score file for benchmark GQA (GQA_TestDev_Balanced)"),
    (["--work-dir", "{work}", "--benchmarks", "VQAv2"], "VQAv2 (VQAv2_TestDev) has no local score"),
    (["--work-dir", "{work}", "--entries", "tiny_llava15_dopp"], "no entry folder '{work}/tiny_llava15_dopp'"),
    (["--work-dir", "{work}", "--mme", "both"], "invalid choice: 'both'"),
    (["--work-dir", "{tmp}"], "no VLMEvalKit score files of the paper's benchmarks under '{tmp}'"),
    ([], "give --scores CSV, --work-dir DIR"),
    (["--benchmarks", "MME"], "--entries / --benchmarks select from a --work-dir"),
])
def test_bad_input_one_message_nothing_written(work, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path, work=work) for a in args]
    try:
        rc = aggregate.main([*args, "--base", BASE, "--out", str(tmp_path / "res")])
    except SystemExit as exc:  # argparse's own choice check
        rc = exc.code
    stdout, stderr = capsys.readouterr()
    assert rc == 2 and stdout == ""
    assert message.format(tmp=tmp_path, work=work) in stderr, stderr
    if "--mme" not in args:  # (argparse prints its usage before its own error)
        assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert not list(tmp_path.iterdir())


def test_caption_scores_and_ambiguous_splits(tmp_path):
    """Formats without a VLMEvalKit run here: the captioning plugin's `_score.json` (its documented
    {"CIDEr": ...}, Table 17's unit), and an MCQ `_acc.csv` with two splits, which has no single score."""
    (tmp_path / BASE).mkdir()
    (tmp_path / BASE / f"{BASE}_NoCaps_VAL_score.json").write_text(json.dumps({"CIDEr": 1.052, "Bleu_4": 0.3}))
    got = collect_scores(tmp_path)
    assert _cells(got) == {(BASE, "NoCaps"): 1.052}
    (tmp_path / BASE / f"{BASE}_AI2D_TEST_acc.csv").write_text("split,Overall\ndev,0.5\ntest,0.75\n")
    with pytest.raises(InputError, match="several splits \\(dev, test\\)"):
        collect_scores(tmp_path, benchmarks=["AI2D"])
