"""`vlmeval-dop search` end to end on a tiny model and the offline DOP_Demo set (through VLMEvalKit)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlmeval_dop.policy import DOPPolicy


@pytest.fixture()
def lmu(tmp_path):
    old = os.environ.get("LMUData")
    os.environ["LMUData"] = str(tmp_path / "LMUData")  # VLMEvalKit's own data root setting
    yield
    if old is None:
        os.environ.pop("LMUData", None)
    else:
        os.environ["LMUData"] = old


def test_search_cli_tiny(tmp_path, lmu, capsys):
    from vlmeval_dop.cli import main

    argv = ["search", "--model", "tiny_llava15", "--data", "DOP_Demo", "--samples", "3", "--seed", "1",
            "--budget", "0.6", "--budget", "0.01", "--out-dir", str(tmp_path / "p"), "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    run_dir = tmp_path / "p" / "tiny_llava15-uniform-DOP_Demo-3-1"
    assert summary["dir"] == str(run_dir) and summary["samples"] == 3 and summary["newly_profiled"] == 3
    for name in ("profile.json", "profile.png", "policies.yaml", "search.json", "samples.rank0.jsonl"):
        assert (run_dir / name).exists(), name
    assert "error" in summary["results"]["0.01"] and "smallest feasible" in summary["results"]["0.01"]["error"]
    r = summary["results"]["0.6"]
    pol = DOPPolicy.from_dict(r["policy"])
    assert pol.d_P <= pol.d_A and r["paper_ratio"] <= 0.6
    written = yaml.safe_load((run_dir / "policies.yaml").read_text())
    assert written == {"tiny_llava15": {0.6: [pol.d_A, pol.d_P, pol.n_v]}}
    # a rerun reuses the finished profile: nothing new is computed
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["newly_profiled"] == 0 and again["results"] == summary["results"]


def _curves(run_dir):
    return {c: v["values"] for c, v in json.loads((run_dir / "profile.json").read_text())["curves"].items()}


def _assert_same_curves(a, b):
    assert a.keys() == b.keys()
    for c in a:
        assert max(abs(x - y) for x, y in zip(a[c], b[c])) < 1e-6, c


def test_search_cli_batching_and_recompute(tmp_path, lmu, capsys):
    """--batch-size changes how samples are grouped, not the profile; --recompute redoes finished samples."""
    from vlmeval_dop.cli import main

    base = ["search", "--model", "tiny_llava15", "--data", "DOP_Demo", "--samples", "4", "--seed", "1",
            "--budget", "0.6", "--json"]
    assert main(base + ["--out-dir", str(tmp_path / "one")]) == 0
    one = json.loads(capsys.readouterr().out)
    assert main(base + ["--out-dir", str(tmp_path / "three"), "--batch-size", "3"]) == 0
    three = json.loads(capsys.readouterr().out)
    assert three["batch_size"] == 3 and three["newly_profiled"] == 4
    assert three["layer_forwards"] == one["layer_forwards"]  # same work, fewer (batched) forwards
    _assert_same_curves(_curves(Path(one["dir"])), _curves(Path(three["dir"])))
    assert three["results"]["0.6"]["policy"] == one["results"]["0.6"]["policy"]
    assert main(base + ["--out-dir", str(tmp_path / "one"), "--recompute"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["newly_profiled"] == 4 and again["results"] == one["results"]  # same batch size: identical
    assert len((Path(one["dir"]) / "samples.rank0.jsonl").read_text().splitlines()) == 4
    assert main(base + ["--out-dir", str(tmp_path / "x"), "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err


def test_search_under_torchrun_merges_the_ranks(tmp_path, lmu, capsys):
    """Two CPU ranks (gloo) profile half the samples each; rank 0 merges: same profile as one process."""
    from vlmeval_dop.cli import main

    args = ["search", "--model", "tiny_llava15", "--data", "DOP_Demo", "--samples", "3", "--seed", "1",
            "--budget", "0.6", "--batch-size", "2", "--device", "cpu"]
    assert main(args + ["--out-dir", str(tmp_path / "one"), "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "vlmeval_dop.cli", *args, "--out-dir", str(tmp_path / "two"), "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout)  # only rank 0 prints
    run_dir = Path(two["dir"])
    assert two["world_size"] == 2 and two["newly_profiled"] == 3
    assert len((run_dir / "samples.rank0.jsonl").read_text().splitlines()) == 2
    assert len((run_dir / "samples.rank1.jsonl").read_text().splitlines()) == 1
    assert two["layer_forwards"] == one["layer_forwards"]
    _assert_same_curves(_curves(Path(one["dir"])), _curves(run_dir))
    assert two["results"]["0.6"]["policy"] == one["results"]["0.6"]["policy"]


def _textvqa_train(tmp_path, answers_of):
    """An official-format TextVQA train json + images -> LMUData/TextVQA_TRAIN.tsv (prepare-textvqa-train)."""
    from vlmeval_dop.datasets import main as datasets_main
    from vlmeval_dop.tiny import tiny_image

    images = tmp_path / "train_images"
    images.mkdir(exist_ok=True)
    questions = ["What is written on the sign?", "What brand is shown?", "What number is on it?"]
    data = []
    for i, q in enumerate(questions):
        tiny_image(i, (160, 120)).save(images / f"img{i}.jpg")
        data.append({"question_id": 100 + i, "image_id": f"img{i}", "question": q, "answers": answers_of(100 + i)})
    (tmp_path / "TextVQA_0.5.1_train.json").write_text(json.dumps({"data": data}))
    assert datasets_main(["prepare-textvqa-train", "--questions", str(tmp_path / "TextVQA_0.5.1_train.json"),
                          "--images", str(images)]) == 0


def test_search_cli_accuracy_drop_on_textvqa_train(tmp_path, lmu, capsys):
    """--objective acc_drop (Eq. 13) on the paper's validation split (TextVQA_TRAIN, built from the official
    format): answers are the ones evaluation produces (the VLMEvalKit wrapper's generate, an independent
    path), scored with TextVQA's VQA score by hand, and Eq. 7 runs on the drop curves."""
    from vlmeval.dataset import build_dataset

    from vlmeval_dop.cli import main
    from vlmeval_dop.registry import load_entry

    wrapper = load_entry("tiny_llava15", max_new_tokens=4, device="cpu")  # registers the plugin datasets
    _textvqa_train(tmp_path, lambda qid: ["x"] * 10)
    dataset = build_dataset("TextVQA_TRAIN")
    assert type(dataset).__name__ == "TextVQATrainDataset" and len(dataset) == 3
    prompt = wrapper.build_prompt(dataset.data.iloc[0], "TextVQA_TRAIN") if wrapper.use_custom_prompt(
        "TextVQA_TRAIN") else dataset.build_prompt(dataset.data.iloc[0])
    assert "single word or phrase" in prompt[-1]["value"]
    # ground truth: 3 of 10 annotators gave the unpruned model's own answer -> VQA score 0.9 (hand)
    full = {int(r["index"]): wrapper.generate(dataset.build_prompt(r), dataset="TextVQA_TRAIN")
            for _, r in dataset.data.iterrows()}
    _textvqa_train(tmp_path, lambda qid: [full[qid]] * 3 + ["zzz"] * 7)
    assert capsys.readouterr().out.strip().endswith("TextVQA_TRAIN.tsv")  # prepare-textvqa-train's output

    argv = ["search", "--model", "tiny_llava15", "--data", "TextVQA_TRAIN", "--samples", "3", "--seed", "1",
            "--budget", "0.6", "--objective", "acc_drop", "--max-new-tokens", "4", "--batch-size", "2",
            "--out-dir", str(tmp_path / "p"), "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    run_dir = Path(summary["dir"])
    assert run_dir.name == "tiny_llava15-uniform-TextVQA_TRAIN-3-1-acc_drop" and summary["objective"] == "acc_drop"
    assert json.loads((run_dir / "profile.json").read_text())["objective"] == "acc_drop"
    assert "policy" in summary["results"]["0.6"]
    records = [json.loads(line) for line in (run_dir / "acc_samples.rank0.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for rec in records:
        assert rec["answers"]["full"] == full[int(rec["id"])]
        assert rec["full"] == pytest.approx(0.9)
        for curve in ("D_A", "D_P", "D_v"):
            for drop, pruned in zip(rec[curve], rec["answers"][curve]):
                same = pruned.strip().lower() == full[int(rec["id"])].strip().lower()
                assert drop == pytest.approx(0.0 if same else 0.9), (curve, pruned)
    assert main(argv) == 0 and json.loads(capsys.readouterr().out)["newly_profiled"] == 0  # resumed


def test_search_cli_resize_reducer_internvl(tmp_path, lmu, capsys):
    """DOP_R's D_v curve through the CLI on InternVL (whose VLMEvalKit prompt saves images: the inference
    loop's dump_image hook must be set); a reducer name that does not exist is refused by name."""
    from vlmeval_dop.cli import main

    argv = ["search", "--model", "tiny_internvl3", "--reducer", "resize", "--data", "DOP_Demo", "--samples", "2",
            "--seed", "3", "--budget", "0.8", "--batch-size", "2", "--out-dir", str(tmp_path), "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    prof = json.loads((Path(summary["dir"]) / "profile.json").read_text())
    assert prof["reducer"] == "resize" and sorted(prof["curves"]["D_v"]["points"]) == sorted(summary["visual"])
    assert all(v > 0 for v in prof["curves"]["D_v"]["values"])  # smaller images change the output
    assert main(["search", "--model", "tiny_llava15", "--reducer", "nope", "--data", "DOP_Demo",
                 "--out-dir", str(tmp_path)]) == 2
    assert "valid reducers: " in capsys.readouterr().err


def test_search_install_makes_entries(tmp_path, lmu):
    """--install TAG: the solved policies become entries {model}_{method}{budget}_TAG; an installed different
    policy is never replaced silently."""
    import shutil

    from vlmeval_dop.models_config import CONFIG_DIR
    from vlmeval_dop.registry import EntryError, load_entries
    from vlmeval_dop.search.run import run_search

    cfg = tmp_path / "eval_configs"
    shutil.copytree(CONFIG_DIR, cfg)
    with pytest.raises(EntryError, match="search tag"):
        run_search("tiny_llava15", "DOP_Demo", "uniform", [0.6], 2, 1, tmp_path / "p", install="Bad__Tag", config_dir=cfg)
    target = cfg / "searched" / "t1.uniform.yaml"
    target.parent.mkdir()
    target.write_text("tiny_llava15: {0.6: [1, 0, 9]}\n")  # a different, earlier result
    with pytest.raises(ValueError, match="already holds"):
        run_search("tiny_llava15", "DOP_Demo", "uniform", [0.6, 0.8], 2, 1, tmp_path / "p", install="t1", config_dir=cfg)
    assert target.read_text() == "tiny_llava15: {0.6: [1, 0, 9]}\n"  # nothing partial written
    summary = run_search("tiny_llava15", "DOP_Demo", "uniform", [0.6, 0.8], 2, 1, tmp_path / "p", install="t1",
                         overwrite=True, config_dir=cfg)
    assert summary["newly_profiled"] == 0  # the profile of the refused run was kept and reused
    entries = load_entries(cfg)
    for budget, name in summary["installed"].items():
        e = entries[name]
        assert name == f"tiny_llava15_dopuniform{round(100 * float(budget))}_t1"
        assert e.policy == DOPPolicy.from_dict(summary["results"][budget]["policy"]) and e.reducer == "uniform"
        assert e.source == "searched/t1.uniform.yaml" and e.runnable
    assert not any(n.endswith("_t1") for n in load_entries())  # the repository's eval_configs untouched
    from vlmeval_dop.registry import method_for_reducer

    assert method_for_reducer("cdpruner") == "dopcd" and method_for_reducer("resize") == "dopr"


def test_solve_cli_from_a_saved_profile_and_transferred(tmp_path, capsys):
    """`vlmeval-dop solve`: Eq. 7 from profile.json (same policy as optimize on it), and for another model
    through Eq. 12 (same policy as optimize on transfer_profile with the target's L and N_v); --install on
    the transferred DOP_R policy of Qwen2.5-VL makes a `qwen25vl_7b_dopr26_<tag>` entry."""
    import shutil

    from vlmeval_dop.cli import main
    from vlmeval_dop.models_config import CONFIG_DIR, get_model
    from vlmeval_dop.registry import load_entries
    from vlmeval_dop.search.curves import profile_from_measurements
    from vlmeval_dop.search.optimize import optimize
    from vlmeval_dop.search.run import solve_profile
    from vlmeval_dop.search.transfer import transfer_profile

    depths, visual = [26, 20, 14, 8, 4, 0], [512, 256, 128, 64, 32, 16]
    prof = profile_from_measurements(  # smooth made-up curves on LLaVA-1.5-7B's Table 6 points
        model="llava15_7b", reducer="cdpruner", dataset="TextVQA_TRAIN", n_samples=100, seed=42, L=32, N_v=576,
        D_A={d: 0.02 * (32 - d) ** 1.5 for d in depths}, D_P={d: 0.01 * (32 - d) for d in depths},
        D_v={n: 3.0 / n ** 0.5 for n in visual},
    )
    path = prof.save(tmp_path / "profile.json")
    assert main(["solve", "--profile", str(path), "--model", "llava15_7b", "--budget", "0.28", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    m7 = get_model("llava15_7b")
    ref = optimize(prof, m7.arch, 0.28, text_tokens=m7.text_tokens, alpha=m7.alpha)
    assert out["transferred_from"] is None and out["results"]["0.28"]["policy"] == ref.policy.to_dict()

    cfg = tmp_path / "eval_configs"
    shutil.copytree(CONFIG_DIR, cfg)
    summary = solve_profile(path, "qwen25vl_7b", [0.26], reducer="resize", install="from7b", config_dir=cfg)
    q = get_model("qwen25vl_7b")
    moved = transfer_profile(prof, L=q.arch.num_layers, N_v=q.arch.visual_tokens, model="qwen25vl_7b")
    ref = optimize(moved, q.arch, 0.26, text_tokens=q.text_tokens, alpha=q.alpha)
    assert summary["transferred_from"] == "llava15_7b"
    assert summary["results"]["0.26"]["policy"] == ref.policy.to_dict()
    entry = load_entries(cfg)[summary["installed"]["0.26"]]
    assert entry.name == "qwen25vl_7b_dopr26_from7b" and entry.reducer == "resize" and entry.policy == ref.policy
    assert main(["solve", "--profile", str(path), "--model", "llava99"]) == 2
    assert "valid: llava15_7b" in capsys.readouterr().err


def test_search_cli_refuses_pruned_entry(tmp_path, lmu, capsys):
    from vlmeval_dop.cli import main

    assert main(["search", "--model", "tiny_llava15_dop", "--data", "DOP_Demo", "--out-dir", str(tmp_path)]) == 2
    assert "unpruned model entry" in capsys.readouterr().err


def test_fitprune_cli_writes_the_schedule_an_entry_needs(tmp_path, lmu, monkeypatch, capsys):
    """`vlmeval-dop fitprune` fits on validation samples, writes the entry's schedule file atomically, and
    a rerun keeps the finished file."""
    from vlmeval_dop import registry
    from vlmeval_dop.arch import ArchSpec
    from vlmeval_dop.baselines.fitprune import FitPruneSchedule
    from vlmeval_dop.cli import main
    from vlmeval_dop.flops import schedule_flops
    from vlmeval_dop.tiny import load_tiny

    real = dict(registry.load_entries())
    target = tmp_path / "fitprune" / "tiny_llava15_80.yaml"
    entry = registry.Entry(
        "tiny_llava15_fitprune80", real["tiny_llava15"].model, "fitprune", budget=0.8, baseline="fitprune",
        baseline_args={"budget": 0.8, "schedule": str(target)}, source="paper", required_file=str(target),
    )
    assert "vlmeval-dop fitprune --model tiny_llava15 --budget 0.8" in entry.unavailable_reason()
    monkeypatch.setattr(registry, "load_entries", lambda config_dir=None: {**real, entry.name: entry})

    argv = ["fitprune", "--model", "tiny_llava15", "--data", "DOP_Demo", "--samples", "3", "--seed", "1"]
    assert main(argv) == 0
    assert str(target) in capsys.readouterr().out
    assert entry.runnable
    schedule = FitPruneSchedule.load(target)
    assert schedule.budget == 0.8 and schedule.n_samples == 3
    spec = ArchSpec.from_model(load_tiny("llava15")[0])
    full = schedule_flops(spec, [(schedule.n_visual + schedule.text_tokens,) * 2] * spec.num_layers)
    assert schedule_flops(spec, schedule.layer_tokens(schedule.text_tokens)) <= 0.8 * full
    stamp = target.stat().st_mtime_ns
    assert main(argv) == 0 and target.stat().st_mtime_ns == stamp  # finished work is not redone
    assert main(["fitprune", "--model", "tiny_llava15_dop", "--data", "DOP_Demo"]) == 2  # not unpruned / no entries
