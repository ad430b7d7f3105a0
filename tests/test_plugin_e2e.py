"""End to end through VLMEvalKit: `run.py` -> `vlmeval.run.main()` on the tiny entries, offline.

One process imports vlmeval once (~10 s). VLMEvalKit's data root is redirected to a temporary directory
through its own `LMUData` variable (VLMEvalKit's configuration, not ours), so nothing is written to ~.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

FAMILIES = ("llava15", "llavanext", "qwen25vl", "internvl3")
VISUAL_TOKENS = {"llava15": 64, "llavanext": 336, "qwen25vl": 64, "internvl3": 80}  # 224x224 demo images
N_DEMO = 8


@pytest.fixture()
def built(run_py, monkeypatch):
    """Run run.main(argv) and return the wrapper instances VLMEvalKit built, by entry name."""
    models: dict[str, list] = {}
    original = run_py._build_model

    def capture(name, **kw):
        m = original(name, **kw)
        models.setdefault(name, []).append(m)
        return m

    monkeypatch.setattr(run_py, "_build_model", capture)
    argv0 = list(sys.argv)

    def run(*argv):
        try:
            run_py.main(list(argv))
        finally:
            sys.argv[:] = argv0
        return models

    return run


def _outputs(work: Path, entry: str, data: str = "DOP_Demo"):
    d = work / entry
    pred = d / f"{entry}_{data}.xlsx"
    acc = d / f"{entry}_{data}_acc.csv"
    return pred, acc


@pytest.mark.parametrize("family", FAMILIES)
def test_full_and_dop_entries_end_to_end(family, built, tmp_path):
    full, dop = f"tiny_{family}", f"tiny_{family}_dop"
    models = built("--model", full, dop, "--data", "DOP_Demo", "--work-dir", str(tmp_path))
    for entry in (full, dop):
        pred, acc = _outputs(tmp_path, entry)
        assert pred.exists() and acc.exists(), sorted(p.name for p in (tmp_path / entry).iterdir())
        preds = pd.read_excel(pred)
        assert len(preds) == N_DEMO and preds["prediction"].notna().all()
        scores = pd.read_csv(acc)
        assert {"Overall", "color", "count", "shape"} <= set(scores.columns)
        assert (tmp_path / entry / f"{entry}_DOP_Demo_results.xlsx").exists()
        (m,) = models[entry]
        assert m.samples == N_DEMO and m.last_visual_tokens == VISUAL_TOKENS[family]

    # the unpruned entry runs stock transformers (no executor); the DOP entry ran pruned: the executor's
    # own per-layer counts show layers 0-1 with the 8 kept visual tokens in MHA, layer 1 without them in
    # the MLP, layers 2-3 without any (policy (2, 1, 8), 4 decoder layers)
    assert models[full][0].last_layer_tokens is None and models[full][0].pruned_samples == 0
    m = models[dop][0]
    assert m.pruned_samples == N_DEMO
    (a0, p0), (a1, p1), (a2, p2), (a3, p3) = m.last_layer_tokens
    text = a2
    assert (a0, p0, a1, p1, p3, a3) == (text + 8, text + 8, text + 8, text, text, text)
    assert a2 == p2 == text and text < 200


def test_dop_r_resizes_the_image(built, tmp_path):
    """DOP_R: the wrapper resizes the image to ~n_v tokens, the executor prunes depths on all of them."""
    models = built("--model", "tiny_qwen25vl_dopr", "tiny_internvl3_dopr", "--data", "DOP_Demo",
                   "--work-dir", str(tmp_path))
    for entry, n_v in (("tiny_qwen25vl_dopr", 16), ("tiny_internvl3_dopr", 9)):
        m = models[entry][0]
        assert m.last_visual_tokens == n_v  # 16 = 112x112 px for Qwen, 9 = one 84x84 tile for InternVL
        counts = m.last_layer_tokens
        assert counts[0][0] - counts[3][0] == n_v and counts[1][0] - counts[1][1] == n_v
        assert _outputs(tmp_path, entry)[1].exists()


def test_second_run_reuses_predictions(built, tmp_path):
    models = built("--model", "tiny_llava15_dop", "--data", "DOP_Demo", "--work-dir", str(tmp_path))
    pred, acc = _outputs(tmp_path, "tiny_llava15_dop")
    first = pd.read_excel(pred)
    acc.unlink()
    models = built("--model", "tiny_llava15_dop", "--data", "DOP_Demo", "--work-dir", str(tmp_path), "--reuse")
    assert len(models["tiny_llava15_dop"]) == 1  # VLMEvalKit did not even build the model again
    assert acc.exists()  # evaluated again from the reused predictions
    pd.testing.assert_frame_equal(pd.read_excel(pred), first)


def test_benchmark_alias_is_rewritten(run_py):
    from vlmeval_dop.datasets import resolve_dataset_name

    argv = ["--model", "m", "--data", "TextVQA", "MMB", "MME", "--work-dir", "w", "--da=SQA", "--reuse"]
    assert run_py.rewrite_data_aliases(argv, resolve_dataset_name) == [
        "--model", "m", "--data", "TextVQA_VAL", "MMBench_DEV_EN", "MME", "--work-dir", "w",
        "--da=ScienceQA_TEST", "--reuse",
    ]


def test_unknown_model_and_dataset_exit_with_close_matches(run_py, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        run_py.main(["--model", "tiny_lava15_dop", "--data", "DOP_Demo", "--work-dir", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown entry 'tiny_lava15_dop'" in err and "tiny_llava15_dop" in err
    with pytest.raises(SystemExit) as exc:
        run_py.main(["--model", "tiny_llava15_dop", "--data", "TextVQ", "--work-dir", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'TextVQ'" in err and "TextVQA" in err and "TextVQA_VAL" in err
    assert not any(tmp_path.iterdir())  # refused before VLMEvalKit started


def test_missing_weights_fail_with_a_clear_message(run_py, capsys, tmp_path, monkeypatch):
    from huggingface_hub import constants

    # an empty Hugging Face cache and offline mode: the weights cannot be had, whatever this machine has
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(SystemExit) as exc:
        run_py.main(["--model", "llava15_7b", "--data", "DOP_Demo", "--work-dir", str(tmp_path / "w")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("run.py: error: weights of entry 'llava15_7b' (llava-hf/llava-1.5-7b-hf) are not available offline")
    assert "Traceback" not in err and "huggingface-cli download llava-hf/llava-1.5-7b-hf" in err


def test_prompts_follow_vlmeval_wrappers(lmu_root):
    """MCQ option formatting and the short-answer VQA prompt, as VLMEvalKit's own wrappers build them."""
    from vlmeval_dop.registry import load_entry

    line = pd.Series({"index": 0, "question": "Which colour?", "A": "red", "B": "blue", "hint": float("nan"),
                      "image_path": str(lmu_root / "x.png")})
    llava = load_entry("tiny_llava15")
    llava.set_dump_image(lambda line: [line["image_path"]])
    assert llava.use_custom_prompt("MMBench_DEV_EN") and not llava.use_custom_prompt("TextVQA_VAL")
    msg = llava.build_prompt(line, dataset="MMBench_DEV_EN")
    assert msg[-1]["value"] == (
        "Which colour?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly."
    )
    intern = load_entry("tiny_internvl3")
    intern.set_dump_image(lambda line: [line["image_path"]])
    msg = intern.build_prompt(line.drop(["A", "B"]), dataset="TextVQA_VAL")
    assert msg[0]["value"] == "Which colour?\nAnswer the question using a single word or phrase."
    qwen = load_entry("tiny_qwen25vl")
    assert not qwen.use_custom_prompt("MMBench_DEV_EN")  # VLMEvalKit's Qwen2.5-VL entry: dataset prompts


def test_vqa_accuracy_is_the_standard_metric():
    from vlmeval_dop.datasets import vqa_accuracy

    # 10 human answers; leave-one-out min(1, matches/3), averaged over the 10 subsets
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Two.", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("a dog", ["dog"] + ["cat"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0


def test_vqav2_dataset_scores_and_submission(lmu_root, tmp_path):
    from PIL import Image
    from vlmeval.dataset import build_dataset

    from vlmeval_dop.datasets import prepare_vqav2, register_datasets

    register_datasets()
    img_dir = tmp_path / "val2014"
    img_dir.mkdir()
    Image.new("RGB", (64, 64)).save(img_dir / "COCO_val2014_000000000042.jpg")
    qs = {"questions": [{"question_id": 420, "image_id": 42, "question": "How many?"},
                        {"question_id": 421, "image_id": 42, "question": "Is it dark?"}]}
    ann = {"annotations": [
        {"question_id": 420, "answer_type": "number", "question_type": "how many",
         "answers": [{"answer": a} for a in ["2"] * 3 + ["3"] * 7]},
        {"question_id": 421, "answer_type": "yes/no", "question_type": "is it",
         "answers": [{"answer": "yes"}] * 10},
    ]}
    (tmp_path / "q.json").write_text(__import__("json").dumps(qs))
    (tmp_path / "a.json").write_text(__import__("json").dumps(ann))
    prepare_vqav2("val", str(tmp_path / "q.json"), str(img_dir), annotations=str(tmp_path / "a.json"))
    ds = build_dataset("VQAv2_VAL")
    assert len(ds) == 2 and ds.build_prompt(ds.data.iloc[0])[-1]["value"].endswith("single word or phrase.")
    pred = tmp_path / "m_VQAv2_VAL.xlsx"
    data = ds.data.copy()
    data["prediction"] = ["two", "Yes"]
    data.to_excel(pred, index=False)
    ret = ds.evaluate(str(pred))
    assert ret["Overall"][0] == pytest.approx(100 * (0.9 + 1.0) / 2)
    assert ret["number"][0] == pytest.approx(90.0) and ret["yes/no"][0] == pytest.approx(100.0)
    with pytest.raises(FileNotFoundError, match="prepare-vqav2 --split test-dev"):
        build_dataset("VQAv2_TestDev")


@pytest.mark.parametrize("family", ["llava15", "qwen25vl"])
def test_full_policy_wrapper_equals_stock_generate(family, lmu_root):
    """The wrapper at the full policy gives what stock transformers gives on the same processor inputs."""
    import torch

    from vlmeval_dop.datasets import DOPDemoDataset
    from vlmeval_dop.policy import DOPPolicy
    from vlmeval_dop.registry import load_entry

    wrapper = load_entry(f"tiny_{family}", policy=DOPPolicy.full(4)).load()
    ds = DOPDemoDataset("DOP_Demo")
    msg = ds.build_prompt(ds.data.iloc[3])
    out = wrapper.generate(msg, dataset="DOP_Demo")
    inputs = wrapper.build_inputs(msg, "DOP_Demo")
    with torch.inference_mode():
        ids = wrapper.model.generate(**inputs, do_sample=False, max_new_tokens=wrapper.max_new_tokens)
    tok = wrapper.processor.tokenizer
    assert out == tok.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert wrapper.last_layer_tokens is None  # nothing was installed: the executor's full policy is stock


def test_decoder_side_baseline_entry_end_to_end(built, tmp_path):
    """FastV as one config line: run through VLMEvalKit, pruned after layer 1 (k=2) to 16 visual tokens."""
    entry = "tiny_llava15_fastv"
    models = built("--model", entry, "--data", "DOP_Demo", "--work-dir", str(tmp_path))
    assert all(p.exists() for p in _outputs(tmp_path, entry))
    counts = models[entry][0].last_layer_tokens
    assert counts[0] == counts[1] and counts[2] == counts[3]
    assert counts[0][0] - counts[2][0] == VISUAL_TOKENS["llava15"] - 16


def test_reducer_baseline_entry_end_to_end(built, tmp_path):
    """DivPrune as one config line: 16 visual tokens kept before the decoder, every layer."""
    entry = "tiny_llava15_divprune"
    models = built("--model", entry, "--data", "DOP_Demo", "--work-dir", str(tmp_path))
    assert all(p.exists() for p in _outputs(tmp_path, entry))
    counts = models[entry][0].last_layer_tokens
    assert len(set(counts)) == 1 and counts[0][0] == counts[0][1]
    assert counts[0][0] < 200 and models[entry][0].last_visual_tokens == VISUAL_TOKENS["llava15"]


def _tiny_method_entries():
    from vlmeval_dop.registry import load_entries

    return sorted(n for n, e in load_entries().items() if n.startswith("tiny_") and (e.reducer or e.baseline))


@pytest.mark.parametrize("entry", _tiny_method_entries())
def test_every_tiny_method_entry_generates_pruned(entry, lmu_root):
    """Every reducer / baseline / DOP entry of the tiny models runs the wrapper's greedy generate (the path
    VLMEvalKit calls) on a demo sample, and the executor's token counts show the reduction."""
    from vlmeval_dop.datasets import DOPDemoDataset
    from vlmeval_dop.registry import get_entry, load_entry

    e = get_entry(entry)
    wrapper = load_entry(entry).load()
    if getattr(wrapper, "VIDEO_LLM", False):  # Video-LLaVA: its entries' policies are for videos (8 frames)
        from vlmeval_dop.video_qa import DOPVideoDemoDataset

        ds = DOPVideoDemoDataset("DOP_VideoDemo")
        out = wrapper.generate(ds.build_prompt(ds.data.iloc[1], video_llm=True), dataset="DOP_VideoDemo")
    else:
        ds = DOPDemoDataset("DOP_Demo")
        out = wrapper.generate(ds.build_prompt(ds.data.iloc[1]), dataset="DOP_Demo")
    assert isinstance(out, str)
    counts = wrapper.last_layer_tokens
    assert counts is not None and len(counts) == 4
    if e.reducer not in (None, "resize") and e.policy is not None and e.policy.n_v is not None:
        # the first layer sees the kept visual tokens plus the text: fewer than the unpruned count
        assert counts[0][0] <= sum(counts[0]) and counts[0][0] < wrapper.last_visual_tokens + 200
    assert counts[-1][0] < counts[0][0] or e.baseline is None  # decoder-side methods drop tokens in the decoder


def test_operation_mask_entry_end_to_end(built, tmp_path):
    """`{entry}__mha2`: VLMEvalKit runs the model with the visual tokens skipping only layer 2's MHA
    (1-based), the name made on demand (paper Tables 26-28)."""
    entry = "tiny_llava15__mha2"
    models = built("--model", entry, "--data", "DOP_Demo", "--work-dir", str(tmp_path))
    assert all(p.exists() for p in _outputs(tmp_path, entry))
    counts = models[entry][0].last_layer_tokens
    n_vis = VISUAL_TOKENS["llava15"]
    assert counts[0] == counts[2] == counts[3] == (counts[0][0], counts[0][0])
    assert counts[1] == (counts[0][0] - n_vis, counts[0][0])  # MHA without the image, MLP with it
