"""`vlmeval-dop search --joint-grid / --grid-additive / --spearman / --system-tokens` end to end on a tiny model
and the offline DOP_Demo set (issue 19, part 2)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from vlmeval_dop.policy import DOPPolicy


@pytest.fixture()
def lmu(tmp_path):
    old = os.environ.get("LMUData")
    os.environ["LMUData"] = str(tmp_path / "LMUData")
    yield
    if old is None:
        os.environ.pop("LMUData", None)
    else:
        os.environ["LMUData"] = old


def _config(tmp_path):
    from vlmeval_dop.models_config import CONFIG_DIR

    cfg = tmp_path / "eval_configs"
    shutil.copytree(CONFIG_DIR, cfg)
    return cfg


def test_joint_grid_and_spearman(tmp_path, lmu, capsys):
    """--joint-grid measures every feasible grid policy (joint.json) and installs the least divergent one;
    the grid-additive optimum and its measured divergence are reported beside it; --spearman is scipy's rho
    of D_sum (the profile's points) and the measured D; a rerun computes nothing; --grid-additive agrees."""
    from vlmeval_dop.cli import main
    from vlmeval_dop.flops import full_flops, policy_flops
    from vlmeval_dop.registry import load_entries
    from vlmeval_dop.search.curves import DivergenceProfile
    from vlmeval_dop.search.extensions import additive_divergence, grid_policies, table7_policies
    from vlmeval_dop.search.joint import policy_key
    from vlmeval_dop.search.run import run_search

    cfg = _config(tmp_path)
    kw = dict(batch_size=2, config_dir=cfg)
    summary = run_search("tiny_llava15", "DOP_Demo", "uniform", [0.6], 3, 1, tmp_path / "p", joint_grid=True,
                         spearman=216, install="jg", **kw)
    run_dir = Path(summary["dir"])
    joint = json.loads((run_dir / "joint.json").read_text())
    profile = DivergenceProfile.load(run_dir / "profile.json")
    from vlmeval_dop.arch import ArchSpec
    from vlmeval_dop.tiny import load_tiny

    spec = ArchSpec.from_model(load_tiny("llava15")[0], visual_tokens=profile.N_v)
    r = summary["results"]["0.6"]
    text, L = summary["text_tokens"], spec.num_layers
    # the F.3 grid's steps scaled to the tiny model: every layer, every 2nd token
    assert summary["grid"] == {"depths": list(range(1, L + 1)), "n_values": list(range(2, profile.N_v + 1, 2))}
    grid = grid_policies(spec, 0.6, text_tokens=text, alpha=summary["alpha"], **summary["grid"])
    assert r["n_evaluated"] == len(grid.policies) > 10 and r["n_feasible"] == grid.n_feasible
    full = full_flops(spec, text)
    best = min(grid.policies, key=lambda p: (joint[policy_key(p)], policy_flops(spec, p, text) / full,
                                             (p.d_A, p.d_P, p.n_v)))
    assert DOPPolicy.from_dict(r["policy"]) == best and r["objective"] == joint[policy_key(best)]
    assert r["objective_kind"] == "joint divergence" and r["paper_ratio"] <= 0.6
    add = DOPPolicy.from_dict(r["grid_additive"]["policy"])
    assert add in grid.policies and r["grid_additive"]["joint_divergence"] == joint[policy_key(add)]
    assert r["objective"] <= r["grid_additive"]["joint_divergence"]
    entry = load_entries(cfg)[summary["installed"]["0.6"]]
    assert entry.name == "tiny_llava15_dopuniform60_jg" and entry.policy == best
    # Table 7: every combination of the sampling points, D_sum at the measured points (literal policies)
    pols = table7_policies(summary["depths"], summary["visual"])
    d_sum = additive_divergence(profile.tables(), pols)
    d = [joint[policy_key(p.effective(L))] for p in pols]
    ref = stats.spearmanr(d_sum, d)
    sp = summary["spearman"]
    assert sp["n"] == len(pols) == 96 and sp["rho"] == pytest.approx(ref.statistic) and np.isfinite(sp["pvalue"])
    # finished work is kept: nothing new on a rerun; the grid-additive row of Table 22 from the same profile
    assert main(["search", "--model", "tiny_llava15", "--data", "DOP_Demo", "--samples", "3", "--seed", "1",
                 "--budget", "0.6", "--out-dir", str(tmp_path / "p"), "--joint-grid", "--spearman", "216",
                 "--batch-size", "2", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["joint"]["newly_computed"] == 0 and again["newly_profiled"] == 0
    assert again["results"]["0.6"]["policy"] == r["policy"]
    assert main(["search", "--model", "tiny_llava15", "--data", "DOP_Demo", "--samples", "3", "--seed", "1",
                 "--budget", "0.6", "--out-dir", str(tmp_path / "p"), "--spearman", "10", "--recompute",
                 "--batch-size", "2", "--json"]) == 0
    redo = json.loads(capsys.readouterr().out)  # --recompute redoes the joint values it needs, nothing more
    assert redo["newly_profiled"] == 3 and redo["joint"]["newly_computed"] == 3 * redo["joint"]["policies"]
    assert redo["joint"]["policies"] <= 10 and redo["spearman"]["n"] == 10
    assert main(["search", "--model", "tiny_llava15", "--data", "DOP_Demo", "--samples", "3", "--seed", "1",
                 "--budget", "0.6", "--out-dir", str(tmp_path / "p"), "--grid-additive", "--json"]) == 0
    ga = json.loads(capsys.readouterr().out)
    assert ga["search"] == "grid_additive" and ga["results"]["0.6"]["policy"] == r["grid_additive"]["policy"]
    assert "joint" not in ga and (run_dir / "search.grid_additive.json").exists()
    assert float(additive_divergence(profile.tables(), [add])[0]) == ga["results"]["0.6"]["objective"]


def test_system_tokens_search_solve_and_install(tmp_path, lmu, capsys):
    """--system-tokens profiles D_A_sys/D_P_sys into `<run dir>-system`, solves Eq. 14 with the prompts' count
    of tokens before the image, installs 5-depth policies; `solve --system-tokens` reuses the profile."""
    from vlmeval_dop.arch import ArchSpec
    from vlmeval_dop.cli import main
    from vlmeval_dop.registry import load_entries
    from vlmeval_dop.search.curves import DivergenceProfile
    from vlmeval_dop.search.extensions import optimize_with_system
    from vlmeval_dop.search.run import run_search
    from vlmeval_dop.tiny import load_tiny

    cfg = _config(tmp_path)
    summary = run_search("tiny_llava15", "DOP_Demo", "uniform", [0.6], 2, 1, tmp_path / "p", system=0,
                         install="vs", batch_size=2, config_dir=cfg)
    run_dir = Path(summary["dir"])
    assert run_dir.name.endswith("-system") and summary["search"] == "system"
    prof = DivergenceProfile.load(run_dir / "profile.json")
    assert prof.D_A_sys is not None and prof.meta["system_tokens"] == summary["system_tokens"] > 0
    r = summary["results"]["0.6"]
    pol = DOPPolicy.from_dict(r["policy"])
    assert pol.has_system_depths and r["paper_ratio"] <= 0.6
    spec = ArchSpec.from_model(load_tiny("llava15")[0], visual_tokens=prof.N_v)
    same = optimize_with_system(prof, spec, 0.6, text_tokens=summary["text_tokens"],
                                system_tokens=summary["system_tokens"], alpha=summary["alpha"])
    assert same.policy == pol
    assert load_entries(cfg)[summary["installed"]["0.6"]].policy == pol
    path = str(run_dir / "profile.json")
    assert main(["solve", "--profile", path, "--model", "llava15_7b", "--budget", "0.28", "--system-tokens",
                 "35", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["system_tokens"] == 35 and "d_A_sys" in out["results"]["0.28"]["policy"]
    plain = run_dir.parent / run_dir.name[: -len("-system")]
    assert not plain.exists()  # the visual-only profile is a separate run directory


@pytest.mark.parametrize("extra, needle", [
    (["--joint-grid", "--system-tokens"], "different searches"),
    (["--joint-grid", "--grid-additive"], "different searches"),
    (["--spearman", "1"], "--spearman 1"),
    (["--spearman", "216", "--system-tokens"], "--spearman"),
    (["--joint-grid", "--reducer", "resize"], "--reducer resize"),
    (["--joint-grid", "--objective", "acc_drop"], "--objective acc_drop"),
    (["--system-tokens", "-3"], "--system-tokens -3"),
])
def test_search_mode_arguments_are_checked_before_loading(tmp_path, capsys, extra, needle):
    from vlmeval_dop.cli import main

    out = tmp_path / "never"
    argv = ["search", "--model", "tiny_llava15", "--data", "DOP_Demo", "--out-dir", str(out)] + extra
    assert main(argv) == 2
    assert needle in capsys.readouterr().err and not out.exists()


def test_solve_system_tokens_needs_system_curves(tmp_path, capsys):
    from vlmeval_dop.cli import main
    from vlmeval_dop.search.curves import profile_from_measurements

    prof = profile_from_measurements(model="llava15_7b", reducer="cdpruner", dataset="d", n_samples=1, seed=0,
                                     L=32, N_v=576, D_A={0: 1.0}, D_P={0: 0.5}, D_v={16: 1.0})
    path = prof.save(tmp_path / "profile.json")
    assert main(["solve", "--profile", str(path), "--model", "llava15_7b", "--system-tokens"]) == 2
    assert "no system-token curves" in capsys.readouterr().err


def test_joint_grid_under_torchrun_merges_the_ranks(tmp_path, lmu, capsys):
    """Two CPU ranks (gloo) measure the joint divergences of their own samples; rank 0 merges: the same
    grid optimum and Spearman rho as one process."""
    import subprocess
    import sys

    from vlmeval_dop.cli import main

    args = ["search", "--model", "tiny_llava15", "--data", "DOP_Demo", "--samples", "3", "--seed", "1",
            "--budget", "0.6", "--device", "cpu", "--joint-grid", "--spearman", "20", "--json"]
    assert main(args + ["--out-dir", str(tmp_path / "one")]) == 0
    one = json.loads(capsys.readouterr().out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "vlmeval_dop.cli", *args, "--out-dir", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout)
    run_dir = Path(two["dir"])
    assert two["world_size"] == 2 and two["joint"]["policies"] == one["joint"]["policies"]
    assert (run_dir / "joint.rank0.jsonl").exists() and (run_dir / "joint.rank1.jsonl").exists()
    assert two["joint"]["layer_forwards"] == one["joint"]["layer_forwards"]
    assert two["results"]["0.6"]["policy"] == one["results"]["0.6"]["policy"]
    assert two["spearman"]["rho"] == pytest.approx(one["spearman"]["rho"], abs=1e-9)
    a = json.loads((Path(one["dir"]) / "joint.json").read_text())
    b = json.loads((run_dir / "joint.json").read_text())
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-6
