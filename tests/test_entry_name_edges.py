"""Edge cases of on-demand entry names and method registration (review of issue #17's registry): a name
the wrappers treat specially cannot be registered, a seed suffix is set once, and every on-demand entry has
exactly one name (its results directory), so no run is silently repeated under an alias."""
from __future__ import annotations

import pytest
import torch

from vlmeval_dop import methods
from vlmeval_dop.registry import EntryError, get_entry


class _Rand:
    """A seeded vision-side method (the guide's `rand`, inline)."""

    name, families = "rnd", None

    def __init__(self, seed: int = 0):
        self.seed = seed

    def select(self, ctx, n_keep):
        g = torch.Generator().manual_seed(self.seed)
        return [torch.randperm(s.num_tokens, generator=g)[:n_keep].sort().values for s in ctx.images]


@pytest.fixture()
def rnd():
    before = dict(methods._REGISTRY)
    methods.register_method("rnd", kind="vision", entry_args={"seed": int})(_Rand)
    yield
    methods._REGISTRY.clear()
    methods._REGISTRY.update(before)


def test_resize_is_reserved():
    """`resize` entries run the wrappers' image resize (entries.IMAGE_SIDE_REDUCERS), never a registered
    class: a user's method of that name would silently not run, so the name is refused."""
    before = dict(methods._REGISTRY)
    try:
        with pytest.raises(methods.RegistrationError, match="reserved"):
            methods.register_method("resize", kind="vision")(_Rand)
    finally:
        methods._REGISTRY.clear()
        methods._REGISTRY.update(before)


def test_one_seed_suffix(rnd):
    assert get_entry("tiny_llava15_rnd90.s3").seed == 3
    with pytest.raises(EntryError, match=r"one seed.*tiny_llava15_rnd90\.s4"):
        get_entry("tiny_llava15_rnd90.s3.s4")  # was: seed 4 silently, under a third name
    with pytest.raises(EntryError, match=r"write it 'tiny_llava15_rnd90\.s3'"):
        get_entry("tiny_llava15_rnd90.s03")  # was: seed 3 under a second name (a second results folder)


def test_on_demand_names_are_canonical(rnd):
    """`fastv028` was FastV at 28 % named `..._fastv28` inside but run (and resumed) under `..._fastv028`."""
    assert get_entry("llava15_7b_fastv28").name == "llava15_7b_fastv28"
    for alias, name in [("llava15_7b_fastv028", "llava15_7b_fastv28"), ("tiny_llava15_rnd090", "tiny_llava15_rnd90"),
                        ("tiny_llava15_rnd90p0", "tiny_llava15_rnd90")]:
        with pytest.raises(EntryError, match=rf"write it '{name}'"):
            get_entry(alias)
    e = get_entry("tiny_llava15_rnd90p5")  # a canonical decimal label
    assert (e.name, e.budget) == ("tiny_llava15_rnd90p5", pytest.approx(0.905))


def test_operation_mask_on_a_seeded_entry(rnd):
    e = get_entry("tiny_llava15_rnd90.s3__mha1")
    assert (e.seed, e.reducer_args, sorted(e.op_mask.attn)) == (3, {"seed": 3}, [0])


def test_compare_keeps_an_explicit_entrys_seed(rnd, tmp_path):
    """reproduce/compare.py: an explicit seeded entry in `methods:` runs with its own seed; the spec's
    `seeds:` (for the method names) were appended to it (`rnd90.s3.s0`: seed 0 in a row labelled s3)."""
    from reproduce import compare

    path = tmp_path / "mine.yaml"
    path.write_text("models: [tiny_llava15]\nmethods: [rnd, tiny_llava15_rnd90.s3]\nbudgets: [0.9]\n"
                    "benchmarks: [DOP_Demo]\nseeds: [0, 1]\n")
    rows = {r.label: r for r in compare.resolve_rows(compare.load_spec(path))}
    assert rows["tiny_llava15_rnd90.s3"].runs == (compare.Run("tiny_llava15_rnd90.s3", 3, ""),)
    assert [r.entry for r in rows["tiny_llava15_rnd90"].runs] == ["tiny_llava15_rnd90.s0", "tiny_llava15_rnd90.s1"]
    path.write_text("models: [tiny_llava15]\nmethods: [tiny_llava15_rnd090]\nbenchmarks: [DOP_Demo]\n")
    with pytest.raises(compare.SpecError, match=r"'tiny_llava15_rnd090' \(.*write it 'tiny_llava15_rnd90'"):
        compare.resolve_rows(compare.load_spec(path))


def _broken_entry_point(folder):
    """An installed package (a dist-info on sys.path) whose `vlmeval_dop.methods` entry point raises."""
    info = folder / "brokenpkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenpkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[vlmeval_dop.methods]\nbroken = broken_ep_mod\n")
    (folder / "broken_ep_mod.py").write_text("raise RuntimeError('boom in entry point')\n")


def test_broken_entry_point_is_one_error_line(tmp_path):
    """run.py and aggregate.py --compare said a traceback (PluginError raised outside their checks)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    _broken_entry_point(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(tmp_path)]), "OMP_NUM_THREADS": "1"}
    for cmd in ([sys.executable, "run.py", "--model", "tiny_llava15", "--data", "DOP_Demo", "--work-dir",
                 str(tmp_path / "w")],
                [sys.executable, "reproduce/aggregate.py", "--compare", "reproduce/compare_example.yaml",
                 "--work-dir", str(tmp_path)]):
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr and "failed to import: RuntimeError: boom in entry point" in p.stderr
    assert not (tmp_path / "w").exists() and not (tmp_path / "comparisons").exists()


def test_failed_discovery_is_not_retried_silently(tmp_path, monkeypatch):
    """After a failed entry point, the next registry call fails again (it used to go on with the methods
    registered so far, as if the package had none)."""
    from vlmeval_dop import plugins

    _broken_entry_point(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(methods, "_DISCOVERED", False)
    for _ in range(2):
        with pytest.raises(plugins.PluginError, match="boom in entry point"):
            methods.registered()


def test_list_all_says_when_a_model_has_no_grid(capsys):
    """`list --all --model tiny_llava15` printed only "every (model, method, budget) cell has a runnable
    entry" although tiny models have no budget labels, so no cell was checked."""
    from vlmeval_dop.cli import main as cli_main

    assert cli_main(["list", "--all", "--model", "tiny_llava15"]) == 0
    assert "no cells checked (give --budget 0.9 ...): tiny_llava15" in capsys.readouterr().out
    assert cli_main(["list", "--all", "--model", "tiny_llava15", "--budget", "0.9"]) == 0
    assert "no cells checked" not in capsys.readouterr().out


def test_policy_perturbation_names_are_canonical():
    """`__swap01mha.s07` was a second name (and results folder) for `__swap1mha.s7`."""
    e = get_entry("tiny_llava15_dop__swap1mha.s7")
    assert e.name == "tiny_llava15_dop__swap1mha.s7" and e.op_mask is not None
    for alias in ("tiny_llava15_dop__swap01mha.s7", "tiny_llava15_dop__swap1mha.s07"):
        with pytest.raises(EntryError, match=r"write it 'tiny_llava15_dop__swap1mha\.s7'"):
            get_entry(alias)
