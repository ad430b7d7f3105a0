"""Issue 18 (reliability), the parts that need no model run: content-keyed sample records (A), locked atomic
installs under a real multi-process race (B), crash-safe records with a simulated full disk (C), failure
summaries of reproduce/run.py (D), argument checks of solve/flops/reproduce (E, F), parse errors that name
the file (G, H) and the image size rule (I). Profiling is replaced by a deterministic stand-in where only
the bookkeeping around it is under test; tests/test_reliability_search.py runs the real search."""
from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import shutil
import stat
import time
from pathlib import Path

import pytest
import torch
import yaml

from vlmeval_dop import fileio
from vlmeval_dop.search import profile as prof_mod
from vlmeval_dop.search.profile import ProfileRun, merge_samples

DEPTHS, VISUAL = [3, 2, 1, 0], [32, 16, 8]


# ------------------------------------------------------------------------------------------ helpers
def _fake_profile_batch(calls):
    """profile_batch stand-in: per-sample values derived from the inputs (so a sample's numbers are its own)."""

    def fake(model, inputs, depths, visual, reducer, counter=None, resized=None, system=None):
        calls.append(len(inputs["x"]))
        base = inputs["x"].to(torch.float64)[:, None]
        return {"D_A": base + torch.arange(len(depths)), "D_P": base * 2 + torch.arange(len(depths)),
                "D_v": base * 3 + torch.arange(len(visual))}

    return fake


def _items(n, offset=0.0):
    return [([f"s{i}"], {"x": torch.tensor([float(i) + offset])}) for i in range(n)]


@pytest.fixture()
def fake_profile(monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(prof_mod, "profile_batch", _fake_profile_batch(calls))
    return calls


def _run(out, items, keys=None, depths=DEPTHS, visual=VISUAL, reducer="uniform"):
    run = ProfileRun(out, depths, visual, reducer, sample_keys=keys)
    return run, run.run(None, items)


def _synthetic_profile(path, a=1.0, b=1.0, c=1.0):
    """Smooth made-up curves on LLaVA-1.5-7B's Table 6 points (D_A, D_P, D_v scaled by a, b, c)."""
    from vlmeval_dop.search.curves import profile_from_measurements

    depths, visual = [26, 20, 14, 8, 4, 0], [512, 256, 128, 64, 32, 16]
    prof = profile_from_measurements(
        model="llava15_7b", reducer="cdpruner", dataset="TextVQA_TRAIN", n_samples=100, seed=42, L=32, N_v=576,
        D_A={d: a * 0.02 * (32 - d) ** 1.5 for d in depths}, D_P={d: b * 0.01 * (32 - d) for d in depths},
        D_v={n: c * 3.0 / n ** 0.5 for n in visual},
    )
    return prof.save(path)


# ------------------------------------------------------------------------------------------ A: cache keys
def test_records_are_reused_only_under_the_same_key(tmp_path, fake_profile):
    """A: a record is reused only when everything that determines it is unchanged; a changed sampling point,
    reducer or per-sample key (dataset row / inputs / model) recomputes exactly the affected samples."""
    keys = {f"s{i}": f"row{i}" for i in range(3)}
    run, added = _run(tmp_path, _items(3), keys)
    assert added == 3 and run.stale == 0
    _, added = _run(tmp_path, _items(3), keys)
    assert added == 0  # same everything: resumed, nothing recomputed

    run, added = _run(tmp_path, _items(3), keys, depths=[3, 1, 0])  # other sampling points
    assert added == 3 and run.stale == 3
    run, added = _run(tmp_path, _items(3), keys, depths=[3, 1, 0], reducer="divprune")  # other reducer
    assert added == 3 and run.stale == 3

    edited = {**keys, "s1": "row1-edited"}  # one dataset row changed: only that sample is recomputed
    items = _items(3)
    items[1] = (["s1"], {"x": torch.tensor([7.0])})
    run, added = _run(tmp_path, items, edited, depths=[3, 1, 0], reducer="divprune")
    assert added == 1 and run.stale == 1
    fresh = tmp_path / "fresh"
    _, added = _run(fresh, items, edited, depths=[3, 1, 0], reducer="divprune")
    expected = ProfileRun(tmp_path, [3, 1, 0], VISUAL, "divprune", sample_keys=edited).expected_keys(edited)
    assert merge_samples(tmp_path, expected=expected) == merge_samples(fresh)  # == a fresh directory
    lines = (tmp_path / "samples.rank0.jsonl").read_text().splitlines()
    assert len(lines) == 3  # stale records were dropped, not kept beside the new ones


def test_record_keys_cover_decoding_code_and_points():
    """A: the acc_drop record key changes with the decoding settings; both change with the code version."""
    from transformers import GenerationConfig

    from vlmeval_dop.search.accuracy import AccuracyProfileRun

    def key(**kw):
        args = {"out_dir": Path("x"), "depths": DEPTHS, "visual": VISUAL, "reducer": "uniform", "max_new_tokens": 4,
                "generation_config": GenerationConfig(do_sample=False), "sample_keys": {"s0": "k"}}
        args.update(kw)
        return AccuracyProfileRun(**args).record_key("s0")

    base = key()
    assert base == key()
    assert base != key(max_new_tokens=5)
    assert base != key(generation_config=GenerationConfig(do_sample=False, repetition_penalty=1.2))
    assert base != key(visual=[32, 16])
    assert base != key(sample_keys={"s0": "other weights"})
    kl = ProfileRun(Path("x"), DEPTHS, VISUAL, "uniform").record_key("s0")
    old = prof_mod.PROFILE_VERSION
    try:
        prof_mod.PROFILE_VERSION = old + 1
        assert ProfileRun(Path("x"), DEPTHS, VISUAL, "uniform").record_key("s0") != kl
    finally:
        prof_mod.PROFILE_VERSION = old


def test_sample_keys_change_with_weights_row_and_inputs(tmp_path):
    """A: the per-sample key fingerprints the model entry, the weights' content, the dataset row and the
    model inputs."""
    from types import SimpleNamespace

    import pandas as pd

    from vlmeval_dop.search.run import _CHECKPOINT_IDS, sample_keys

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights-1")
    wrapper = SimpleNamespace(_checkpoint=lambda: str(ckpt), dtype=torch.float32, device=torch.device("cpu"),
                              attn_implementation="sdpa")
    entry = SimpleNamespace(name="tiny_llava15", model=SimpleNamespace(args={}))
    rows = pd.DataFrame([{"index": 0, "question": "q0", "image": "AAAA"}, {"index": 1, "question": "q1", "image": "BB"}])
    val = SimpleNamespace(wrapper=wrapper, entry=entry, rows=rows, dataset_name="D")
    items = [(["0"], {"input_ids": torch.tensor([[1, 2]])}), (["1"], {"input_ids": torch.tensor([[1, 3]])})]
    base = sample_keys(val, items)
    assert base == sample_keys(val, items) and base["0"] != base["1"]
    rows.loc[1, "question"] = "q1 edited"
    edited = sample_keys(val, items)
    assert edited["0"] == base["0"] and edited["1"] != base["1"]
    items2 = [items[0], (["1"], {"input_ids": torch.tensor([[1, 4]])})]
    assert sample_keys(val, items2)["1"] != edited["1"]
    _CHECKPOINT_IDS.clear()
    (ckpt / "model.safetensors").write_bytes(b"weights-2")  # other weights: every sample changes
    assert all(sample_keys(val, items)[k] != edited[k] for k in edited)


# ------------------------------------------------------------------------------------------ C: crash safety
def test_disk_full_leaves_no_torn_line_and_resumes(tmp_path, fake_profile, monkeypatch):
    """C: a write that hits ENOSPC after half a line is undone (no torn line); the rerun computes only the
    samples that were not written, and the profile equals an uninterrupted run's."""
    real = fileio._os_write
    writes = []

    def disk_fills(fd, data):
        writes.append(1)
        if len(writes) == 3:  # the third record: half of it reaches the disk, then the disk is full
            real(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(fileio, "_os_write", disk_fills)
    with pytest.raises(fileio.DiskFullError) as err:
        _run(tmp_path, _items(4))
    assert err.value.errno == errno.ENOSPC and "samples.rank0.jsonl" in err.value.filename
    raw = (tmp_path / "samples.rank0.jsonl").read_bytes()
    assert raw.endswith(b"\n") and len(raw.splitlines()) == 2  # two whole records, nothing torn
    monkeypatch.setattr(fileio, "_os_write", real)
    run, added = _run(tmp_path, _items(4))
    assert added == 2 and run.torn == 0
    _run(tmp_path / "clean", _items(4))
    assert merge_samples(tmp_path) == merge_samples(tmp_path / "clean")


def test_torn_last_line_is_detected_and_recomputed(tmp_path, fake_profile, capsys):
    """C: a line cut by a kill (no newline) and garbage appended after it are dropped on resume, with a
    warning, and those samples are computed again; the file is whole afterwards."""
    _run(tmp_path, _items(3))
    path = tmp_path / "samples.rank0.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2]) + lines[2][:40])  # killed mid-write of the third record
    capsys.readouterr()
    run, added = _run(tmp_path, _items(3))
    assert added == 1 and run.torn == 1
    assert "dropped 1 incomplete record" in capsys.readouterr().err
    assert path.read_bytes() == b"".join(lines)  # identical to the uninterrupted file
    # an old-format file where a record was glued onto a torn line: that line is invalid -> recomputed
    path.write_bytes(lines[0] + lines[1][:30] + lines[2])
    run, added = _run(tmp_path, _items(3))
    assert added == 2 and run.torn == 1


def test_atomic_write_keeps_the_old_file_on_a_full_disk(tmp_path, monkeypatch):
    """C: atomic_write_text never leaves a half-written target or a temporary file behind."""
    target = tmp_path / "profile.json"
    fileio.atomic_write_text(target, "old\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "_os_write", full)
    with pytest.raises(fileio.DiskFullError):
        fileio.atomic_write_text(target, "new content\n")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["profile.json"]


def test_parse_errors_name_the_file_and_the_fix(tmp_path, capsys):
    """C/G/H: a truncated, missing, folder or non-object profile.json gives one line naming the file and
    what to do (exit 2); so does a broken eval_configs YAML."""
    from vlmeval_dop.cli import main

    good = _synthetic_profile(tmp_path / "profile.json")
    text = good.read_text()
    (tmp_path / "cut.json").write_text(text[: len(text) // 2])
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "folder.json").mkdir()
    cases = {"cut.json": "is not valid JSON", "list.json": "holds a JSON list", "folder.json": "is not a file",
             "missing.json": "does not exist"}
    for name, what in cases.items():
        assert main(["solve", "--profile", str(tmp_path / name), "--model", "llava15_7b"]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(tmp_path / name) in err[0] and what in err[0], err
        assert "rerun the `vlmeval-dop search`" in err[0]
    cut = tmp_path / "cut.json"
    with pytest.raises(fileio.FileFormatError, match=r"line \d+ column \d+"):
        fileio.read_json(cut, "fix it")
    bad = tmp_path / "models.yaml"
    bad.write_text("llava15_7b: {hf_id: [\n")
    with pytest.raises(fileio.FileFormatError, match=rf"{bad}.*not valid YAML.*restore"):
        from vlmeval_dop.models_config import _read

        _read("models.yaml", tmp_path)


# ------------------------------------------------------------------------------------------ B: installs
def _solve_child(profile, budget, tag, cfg, barrier, results):
    from vlmeval_dop.search.run import solve_profile

    barrier.wait(timeout=60)
    try:
        solve_profile(Path(profile), "llava15_7b", [budget], install=tag, config_dir=Path(cfg))
        results.put((str(profile), budget, "ok"))
    except ValueError as exc:
        results.put((str(profile), budget, str(exc)))


def _race(jobs, tag, cfg):
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(len(jobs)), ctx.Queue()
    procs = [ctx.Process(target=_solve_child, args=(p, b, tag, str(cfg), barrier, results)) for p, b in jobs]
    for p in procs:
        p.start()
    out = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out


@pytest.fixture()
def slow_writes(monkeypatch):
    """Widen the read-merge-write window (inherited by forked children): without the lock, concurrent
    installs would read the same old file and overwrite each other."""
    real = fileio.atomic_write_text

    def slow(*args, **kwargs):
        time.sleep(0.15)
        return real(*args, **kwargs)

    monkeypatch.setattr(fileio, "atomic_write_text", slow)


def test_concurrent_installs_all_land_and_conflicts_are_refused(tmp_path, slow_writes):
    """B: 8 processes install different budgets into one tag at once: all 8 land, the file is 0644. Then 4
    processes install 4 different policies at one budget: exactly one wins, the others are refused as they
    would be one after the other, and the file holds the winner's policy."""
    from vlmeval_dop.models_config import CONFIG_DIR, get_model
    from vlmeval_dop.registry import load_entries
    from vlmeval_dop.search.optimize import optimize
    from vlmeval_dop.search.run import load_profile

    cfg = tmp_path / "eval_configs"
    shutil.copytree(CONFIG_DIR, cfg)
    profile = _synthetic_profile(tmp_path / "p.json")
    budgets = [0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8]
    out = _race([(profile, b) for b in budgets], "race", cfg)
    assert all(r[2] == "ok" for r in out), out
    path = cfg / "searched" / "race.cdpruner.yaml"
    assert sorted(yaml.safe_load(path.read_text())["llava15_7b"]) == budgets
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp or lock files left
    entries = load_entries(cfg)
    assert all(f"llava15_7b_dopcd{round(100 * b)}_race" in entries for b in budgets)

    m = get_model("llava15_7b")
    profiles = [_synthetic_profile(tmp_path / f"q{i}.json", a=a, b=b)
                for i, (a, b) in enumerate([(1, 1), (0.1, 1), (0.1, 10), (1, 0.1)])]
    policies = {str(q): optimize(load_profile(q), m.arch, 0.3, text_tokens=m.text_tokens, alpha=m.alpha).policy
                for q in profiles}
    assert len({tuple(p.to_dict().values()) for p in policies.values()}) == 4  # four different answers
    out = _race([(q, 0.3) for q in profiles], "race3", cfg)
    winners = [r for r in out if r[2] == "ok"]
    assert len(winners) == 1, out
    assert all("already holds llava15_7b @ 0.3" in r[2] and "--overwrite" in r[2] for r in out if r[2] != "ok")
    won = policies[winners[0][0]]
    held = yaml.safe_load((cfg / "searched" / "race3.cdpruner.yaml").read_text())["llava15_7b"][0.3]
    assert held == [won.d_A, won.d_P, won.n_v]


def test_broken_searched_yaml_is_skipped_by_name(tmp_path, capsys):
    """G: a broken or stray file in eval_configs/searched/ does not break listing or run.py's registration:
    it is skipped with a warning naming it; installing into it is refused until it is fixed."""
    from vlmeval_dop import registry
    from vlmeval_dop.cli import main
    from vlmeval_dop.models_config import CONFIG_DIR
    from vlmeval_dop.policy import DOPPolicy

    cfg = tmp_path / "eval_configs"
    shutil.copytree(CONFIG_DIR, cfg)
    searched = cfg / "searched"
    searched.mkdir(exist_ok=True)
    (searched / "good.uniform.yaml").write_text("tiny_llava15: {0.6: [2, 1, 16]}\n")
    (searched / "broken.uniform.yaml").write_text("tiny_llava15: {0.6: [2, 1,\n")
    (searched / "notes.yaml").write_text("just: notes\n")
    entries = registry.load_entries(cfg)
    err = capsys.readouterr().err
    assert "tiny_llava15_dopuniform60_good" in entries and "tiny_llava15" in entries
    assert f"skipped {searched / 'broken.uniform.yaml'}" in err and "not valid YAML" in err
    assert f"skipped {searched / 'notes.yaml'}" in err and "<tag>.<reducer>.yaml" in err
    with pytest.raises(registry.EntryError, match="skipped unreadable searched policy files"):
        registry.get_entry("tiny_llava15_dopuniform60_broken", cfg)
    with pytest.raises(fileio.FileFormatError, match="broken.uniform.yaml is not valid YAML"):
        registry.install_policies("broken", "uniform", "tiny_llava15", {0.5: DOPPolicy(2, 1, 8)}, config_dir=cfg)
    # `vlmeval-dop list` (and run.py's registration, the same load_entries) still works
    registry.load_entries.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as mp_:
            mp_.setattr(registry, "CONFIG_DIR", cfg)
            assert main(["list", "--runnable"]) == 0
            out = capsys.readouterr()
            assert "tiny_llava15_dopuniform60_good" in out.out and str(searched / "broken.uniform.yaml") in out.err
    finally:
        registry.load_entries.cache_clear()


# ------------------------------------------------------------------------------------------ E/F: arguments
@pytest.mark.parametrize("argv, message", [
    (["--text-tokens", "-500"], "--text-tokens -500: must be >= 0"),
    (["--alpha", "-1"], "--alpha -1.0: n_min = alpha * n_e needs a finite alpha >= 0"),
    (["--alpha", "nan"], "finite alpha >= 0"),
    (["--budget", "0"], "in (0, 1]"),
    (["--budget", "nan"], "in (0, 1]"),
    (["--budget", "1.5"], "in (0, 1]"),
    (["--reducer", "bogus", "--install", "t"], "unknown reducer 'bogus'; valid reducers: "),
])
def test_solve_refuses_bad_arguments_and_installs_nothing(argv, message, tmp_path, capsys, monkeypatch):
    """E/F: solve's arguments are checked before anything is solved or installed: one line, exit 2."""
    from vlmeval_dop import registry
    from vlmeval_dop.cli import main
    from vlmeval_dop.models_config import CONFIG_DIR

    cfg = tmp_path / "eval_configs"
    shutil.copytree(CONFIG_DIR, cfg)
    monkeypatch.setattr(registry, "CONFIG_DIR", cfg)  # installs go to the copy
    profile = _synthetic_profile(tmp_path / "p.json")
    assert main(["solve", "--profile", str(profile), "--model", "llava15_7b", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (cfg / "searched").exists()


def test_solve_install_of_an_infeasible_budget_fails_loudly(tmp_path, capsys, monkeypatch):
    """F: `solve --budget 0.0001 --install t` no longer exits 0 having installed nothing: exit 1 and a line
    saying which budget was not installed and why; feasible budgets of the same call are installed."""
    from vlmeval_dop import registry
    from vlmeval_dop.cli import main
    from vlmeval_dop.models_config import CONFIG_DIR

    cfg = tmp_path / "eval_configs"
    shutil.copytree(CONFIG_DIR, cfg)
    monkeypatch.setattr(registry, "CONFIG_DIR", cfg)  # installs go to the copy
    profile = _synthetic_profile(tmp_path / "p.json")
    assert main(["solve", "--profile", str(profile), "--model", "llava15_7b", "--budget", "0.0001",
                 "--install", "t"]) == 1
    out = capsys.readouterr()
    assert "nothing installed for budget 0.0001" in out.err and "smallest feasible" in out.err
    assert not (cfg / "searched" / "t.cdpruner.yaml").exists()
    assert main(["solve", "--profile", str(profile), "--model", "llava15_7b", "--budget", "0.0001",
                 "--budget", "0.5", "--install", "t"]) == 1
    assert "installed: python run.py --model llava15_7b_dopcd50_t" in capsys.readouterr().out
    assert main(["solve", "--profile", str(profile), "--model", "llava15_7b", "--budget", "0.0001"]) == 0  # no install


def test_flops_refuses_bad_token_counts(capsys):
    """F: flops checks its token counts (negative text tokens gave wrong ratios)."""
    from vlmeval_dop.cli import main

    assert main(["flops", "--model", "llava15_7b", "--policy", "2,1,64", "--text-tokens", "-5"]) == 2
    assert "--text-tokens must be >= 0" in capsys.readouterr().err
    assert main(["flops", "--model", "llava15_7b", "--policy", "2,1,64", "--system-tokens", "-1"]) == 2
    assert "--system-tokens must be in 0.." in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ D: reproduce
def test_reproduce_refuses_bad_arguments(tmp_path, capsys):
    """D/E: --limit -1 (ran 339 of 340 cells) and --gpus 0 are refused before anything runs."""
    from reproduce import run as rrun

    assert rrun.main(["--table", "8", "--limit", "-1", "--work-dir", str(tmp_path / "w")]) == 2
    assert "--limit -1: give a number of cells >= 0" in capsys.readouterr().err
    assert rrun.main(["--table", "8", "--gpus", "0", "--work-dir", str(tmp_path / "w")]) == 2
    (tmp_path / "file").write_text("")
    assert rrun.main(["--table", "8", "--work-dir", str(tmp_path / "file")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_reproduce_summarises_failed_cells_and_exits_nonzero(tmp_path, monkeypatch, capsys):
    """D: a cell without a score file after its run counts as failed (VLMEvalKit logs a failed benchmark and
    exits 0); the run ends with a summary (cell, VLMEvalKit's recorded error or the exit code, log path) and
    exit 1. When every cell gets its score file, exit 0."""
    from reproduce import run as rrun

    cells = [c for c in rrun.plan_table(8, tmp_path) if c.entry in ("llava15_7b", "llava15_7b_divprune28")]
    assert {c.status for c in cells} == {"todo"}

    def fake_call(cmd):  # VLMEvalKit: GQA of llava15_7b fails (logged), the rest is scored; divprune crashes
        entry = cmd[cmd.index("--model") + 1]
        if entry == "llava15_7b_divprune28":
            return 2
        folder = tmp_path / entry
        folder.mkdir(exist_ok=True)
        (tmp_path / "logs").mkdir(exist_ok=True)
        (tmp_path / "logs" / "run.log").write_text("...")
        datasets = cmd[cmd.index("--data") + 1: cmd.index("--work-dir")]
        for d in datasets:
            if d not in ("GQA_TestDev_Balanced", "VQAv2_TestDev"):
                for suffix in ("_acc.csv", "_score.csv"):  # whichever this benchmark's score file is
                    (folder / f"{entry}_{d}{suffix}").write_text("Overall\n1\n")
        (folder / "status.json").write_text(json.dumps({"datasets": {
            "GQA_TestDev_Balanced": {"status": "done", "error_message": "FileNotFoundError: GQA_TestDev_Balanced.tsv"},
            "VQAv2_TestDev": {"status": "done", "skip_reason": "evaluate_returned_none"}}}))  # EvalAI submission
        return 0

    monkeypatch.setattr(rrun.subprocess, "call", fake_call)
    assert rrun.run_cells(cells, tmp_path, limit=None, gpus=1, extra=[]) == 1
    err = capsys.readouterr().err
    crashed = sum(c.entry == "llava15_7b_divprune28" for c in cells)
    assert f"{crashed + 1} of {len(cells)} cell(s) failed" in err
    assert "llava15_7b x GQA_TestDev_Balanced: FileNotFoundError: GQA_TestDev_Balanced.tsv" in err
    assert "llava15_7b_divprune28 x TextVQA_VAL: run.py exited with code 2" in err
    assert f"log: {tmp_path / 'logs' / 'run.log'}" in err
    assert "llava15_7b x VQAv2_TestDev finished without a local score (evaluate returned none)" in err
    cells = [c for c in rrun.plan_table(8, tmp_path) if c.entry == "llava15_7b"]
    assert [c.dataset for c in cells if c.status == "todo"] == ["VQAv2_TestDev", "GQA_TestDev_Balanced"]
    monkeypatch.setattr(rrun.subprocess, "call", lambda cmd: (
        (tmp_path / "llava15_7b" / "llava15_7b_GQA_TestDev_Balanced_acc.csv").write_text("Overall\n1\n"), 0)[1])
    cells = [c for c in cells if c.dataset == "GQA_TestDev_Balanced"]
    assert rrun.run_cells(cells, tmp_path, limit=None, gpus=1, extra=[]) == 0  # all scored: exit 0


def test_ctrl_c_prints_one_line_and_exits_130(monkeypatch, capsys, tmp_path):
    """G: Ctrl-C (KeyboardInterrupt, what SIGINT raises) in the CLI and in reproduce/run.py."""
    from reproduce import run as rrun
    from vlmeval_dop import cli
    from vlmeval_dop.search import run as srun

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(srun, "run_search", interrupted)
    assert cli.main(["search", "--model", "tiny_llava15", "--data", "DOP_Demo"]) == 130
    assert capsys.readouterr().err == "interrupted; rerun the same command to resume\n"
    monkeypatch.setattr(rrun.subprocess, "call", interrupted)
    assert rrun.main(["--table", "8", "--limit", "1", "--work-dir", str(tmp_path)]) == 130
    assert capsys.readouterr().err.endswith("interrupted; rerun the same command to resume\n")


# ------------------------------------------------------------------------------------------ I: images
def test_huge_and_extreme_images_are_downscaled_before_padding(tmp_path, monkeypatch):
    """I: an image whose longer side exceeds MAX_SIDE is downscaled (aspect kept) before any padding; a
    decompression bomb is refused naming the file; ordinary images are untouched."""
    from PIL import Image

    from vlmeval_dop import images

    wide = tmp_path / "wide.png"
    Image.new("RGB", (20000, 10), (200, 10, 10)).save(wide)
    im = images.open_image(str(wide))
    assert im.size == (images.MAX_SIDE, 4) and im.mode == "RGB"
    small = tmp_path / "small.png"
    Image.new("RGB", (640, 480), (1, 2, 3)).save(small)
    assert images.open_image(str(small)).size == (640, 480)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(images.ImageError, match=f"image {small} is too large to decode safely"):
        images.open_image(str(small))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89478485)
    with pytest.raises(images.ImageError, match="junk.png cannot be decoded"):
        images.open_image(str(tmp_path / "junk.png"))


def test_writable_checks(tmp_path, monkeypatch):
    """E/G: an out-dir that is a file, under a file, or not writable is refused without creating anything."""
    from vlmeval_dop.checks import UsageError, check_out_dir

    (tmp_path / "f").write_text("")
    with pytest.raises(UsageError, match="exists and is not a folder"):
        check_out_dir(tmp_path / "f")
    with pytest.raises(UsageError, match="is not a folder"):
        check_out_dir(tmp_path / "f" / "sub")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    with pytest.raises(UsageError, match="cannot be created: .* is not writable"):
        check_out_dir(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()
