"""reproduce/run.py --compare and reproduce/aggregate.py --compare: a comparison of your own, end to end on the
tiny demo model and DOP_Demo (run.py's main called in-process for each cell group, as `python run.py` would be,
so VLMEvalKit is imported once), resume, the table's numbers against hand-computed ones, and bad specs."""
from __future__ import annotations

import math
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest

from reproduce import aggregate
from reproduce import compare
from reproduce import run as rrun

ROOT = Path(__file__).resolve().parents[1]


def _spec(tmp_path: Path, text: str, name: str = "mine.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture()
def in_process(run_py, monkeypatch):
    """reproduce/run.py's `python run.py ...` subprocess replaced by run.py's main in this process (same argv);
    returns the list of argv it was called with. VLMEvalKit's process-wide model table is restored afterwards
    (run.py adds on-demand entries such as `x_rand90.s0` to it, bound to this module's run.py)."""
    from vlmeval.config import supported_VLM

    before = dict(supported_VLM)
    calls = []

    def call(cmd):
        argv = cmd[cmd.index(str(ROOT / "run.py")) + 1:]
        calls.append(argv)
        argv0 = list(sys.argv)
        try:
            run_py.main(argv)
            return 0
        except SystemExit as exc:
            return exc.code or 0
        finally:
            sys.argv[:] = argv0

    monkeypatch.setattr(rrun.subprocess, "call", call)
    yield calls
    supported_VLM.clear()
    supported_VLM.update(before)


def _arch():
    from transformers import AutoConfig

    from vlmeval_dop.arch import ArchSpec
    from vlmeval_dop.tiny import tiny_path

    return ArchSpec.from_config(AutoConfig.from_pretrained(tiny_path("llava15"), local_files_only=True),
                                visual_tokens=64)


def test_compare_end_to_end_resume_table_and_plots(in_process, tmp_path, capsys):
    work = tmp_path / "w"
    spec = _spec(tmp_path, "name: demo\nmodels: [tiny_llava15]\n"
                           "methods: [full, tiny_llava15_dop, tiny_llava15_fastv]\nbenchmarks: [DOP_Demo]\n")
    assert rrun.main(["--compare", str(spec), "--work-dir", str(work)]) == 0
    assert [a[a.index("--model") + 1] for a in in_process] == ["tiny_llava15", "tiny_llava15_dop",
                                                                "tiny_llava15_fastv"]
    entries = ("tiny_llava15", "tiny_llava15_dop", "tiny_llava15_fastv")
    for e in entries:
        assert aggregate.find_score_file(work, e, "DOP_Demo") is not None
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()}

    # resume: the second run plans nothing, calls nothing and touches no file
    in_process.clear()
    capsys.readouterr()
    assert rrun.main(["--compare", str(spec), "--work-dir", str(work)]) == 0
    assert in_process == []
    assert "3 cells: 3 done, 0 to run, 0 blocked" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file()} == stamps

    assert aggregate.main(["--compare", str(spec), "--work-dir", str(work)]) == 0
    out = work / "comparisons" / "demo"
    table = pd.read_csv(out / "demo.csv").set_index("entry")
    # the scores are VLMEvalKit's own: its Overall in the score file
    for e in entries:
        assert table.at[e, "DOP_Demo"] == pytest.approx(
            float(pd.read_csv(aggregate.find_score_file(work, e, "DOP_Demo"))["Overall"].iloc[0]))
    # TFLOPs: the flops.py count of each entry's per-layer tokens, written out by hand here (text 92 + 64
    # visual tokens; DOP (2, 1, 8): visual tokens in MHA of layers 0-1 and MLP of layer 0; FastV k=2, keep 16)
    from vlmeval_dop.flops import schedule_flops

    spec_ = _arch()
    t, v = 92, 64
    expected = {"tiny_llava15": [(t + v, t + v)] * 4,
                "tiny_llava15_dop": [(t + 8, t + 8), (t + 8, t), (t, t), (t, t)],
                "tiny_llava15_fastv": [(t + v, t + v)] * 2 + [(t + 16, t + 16)] * 2}
    full = schedule_flops(spec_, expected["tiny_llava15"])
    for e, counts in expected.items():
        assert table.at[e, "tflops"] == pytest.approx(schedule_flops(spec_, counts) / 1e12, rel=1e-12)
        assert table.at[e, "tflops_ratio"] == pytest.approx(schedule_flops(spec_, counts) / full, rel=1e-12)
    # plots: valid PNG and SVG per benchmark and for Rel. Avg.
    from PIL import Image

    for stem in ("DOP_Demo", "rel_avg"):
        with Image.open(out / f"demo_{stem}.png") as im:
            im.verify()
            assert im.format == "PNG"
        assert ET.parse(out / f"demo_{stem}.svg").getroot().tag.endswith("svg")
    assert (out / "demo.md").read_text().startswith("| Entry | Method | Budget | TFLOPs |")


def _score(work: Path, entry: str, dataset: str, value: float) -> None:
    (work / entry).mkdir(parents=True, exist_ok=True)
    (work / entry / f"{entry}_{dataset}_acc.csv").write_text(f"Overall\n{value}\n")


def test_rel_avg_undefined_base_and_missing_cells(tmp_path, capsys):
    """Injected score files: Rel. Avg. by hand; a base of 0 makes every Rel. Avg. of that model undefined,
    a missing cell says why; the table and its files are written either way."""
    work = tmp_path / "w"
    spec = _spec(tmp_path, "models: [tiny_llava15]\nmethods: [tiny_llava15_dop, tiny_llava15_fastv, "
                           "tiny_llava15_divprune]\nbenchmarks: [DOP_Demo, TextVQA]\n")
    for entry, demo, text in (("tiny_llava15", 80.0, 40.0), ("tiny_llava15_dop", 60.0, 30.0),
                              ("tiny_llava15_fastv", 70.0, 10.0)):
        _score(work, entry, "DOP_Demo", demo)
        _score(work, entry, "TextVQA_VAL", text)
    _score(work, "tiny_llava15_divprune", "DOP_Demo", 20.0)
    s = compare.prepare(spec)
    table = {tr.row.label: tr for tr in compare.compare_table(s, work).rows}
    assert table["tiny_llava15"].row.note == compare.BASE_NOTE  # added as the denominator
    assert table["tiny_llava15"].rel.mean == pytest.approx(100.0)
    assert table["tiny_llava15_dop"].rel.mean == pytest.approx(100 * (60 / 80 + 30 / 40) / 2)  # 75.0
    assert table["tiny_llava15_fastv"].rel.mean == pytest.approx(100 * (70 / 80 + 10 / 40) / 2)  # 56.25
    div = table["tiny_llava15_divprune"]
    assert div.cells["DOP_Demo"].mean == 20.0 and div.cells["TextVQA"].status == "missing"
    assert "not run yet" in div.cells["TextVQA"].reason and div.rel.status == "missing"
    assert "lacks TextVQA" in div.rel.reason

    _score(work, "tiny_llava15", "TextVQA_VAL", 0.0)  # the base now scores 0 on TextVQA
    assert aggregate.main(["--compare", str(spec), "--work-dir", str(work)]) == 0
    md = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| tiny")}
    assert all("undefined [" in rows[r] for r in rows)  # every Rel. Avg. cell of that model, not a crash
    assert "base tiny_llava15 scores 0 on TextVQA: the ratio is undefined" in md
    assert "60.00" in rows["tiny_llava15_dop"] and "missing [" in rows["tiny_llava15_divprune"]
    csv = pd.read_csv(work / "comparisons" / "mine" / "mine.csv").set_index("entry")
    assert set(csv["rel_avg_status"]) == {"undefined"} and csv["rel_avg"].isna().all()

    (work / "tiny_llava15" / "tiny_llava15_TextVQA_VAL_acc.csv").unlink()  # base missing: undefined too
    t2 = {tr.row.label: tr for tr in compare.compare_table(s, work).rows}
    assert t2["tiny_llava15_dop"].rel.status == "undefined"
    assert "base tiny_llava15 has no score on TextVQA: not run yet" in t2["tiny_llava15_dop"].rel.reason


def test_mean_and_std_over_seeds_by_hand():
    """Rows with three seed runs: each cell is the mean and sample std (n - 1) of the runs that have it, the
    Rel. Avg. is per run then averaged; a run lacking a value lowers n and says which."""
    runs = tuple(compare.Run(f"m_x28.s{s}", s) for s in range(3))
    row = compare.Row("m", "x", 0.28, "m_x28", runs)
    base = compare.Row("m", "full", None, "m", (compare.Run("m"),), base=True)
    scores = {("m", "A"): 50.0, ("m", "B"): 20.0,
              ("m_x28.s0", "A"): 40.0, ("m_x28.s1", "A"): 45.0, ("m_x28.s2", "A"): 35.0,
              ("m_x28.s0", "B"): 10.0, ("m_x28.s1", "B"): 16.0}
    why = {("m_x28.s2", "B"): "failed: CUDA out of memory"}
    a = compare._stat(row, "A", scores, why)
    assert (a.mean, a.n) == (40.0, 3) and a.std == pytest.approx(5.0)  # sqrt(((0)^2 + 5^2 + 5^2) / 2)
    b = compare._stat(row, "B", scores, why)
    assert b.mean == 13.0 and b.std == pytest.approx(math.sqrt(18)) and b.n == 2
    assert b.reason == "seed 2: failed: CUDA out of memory"
    rel = compare._rel(row, base, ["A", "B"], scores, why)
    per_run = [100 * (40 / 50 + 10 / 20) / 2, 100 * (45 / 50 + 16 / 20) / 2]  # 65.0, 85.0
    assert rel.mean == pytest.approx(75.0) and rel.std == pytest.approx(statistics.stdev(per_run)) and rel.n == 2
    assert rel.reason == "seed 2: lacks B"
    cell = compare._fmt_stat(rel, 3, 1, pct=True)
    assert cell == f"75.0% ± {statistics.stdev(per_run):.1f} (n=2)"


@pytest.mark.parametrize("text, message", [
    ("models: [tiny_lava15]\nmethods: [full]\nbenchmarks: [DOP_Demo]\n",
     "unknown model(s) 'tiny_lava15' (did you mean tiny_llava15"),
    ("models: [llava15_7b]\nmethods: [full, dopp]\nbudgets: [0.28]\nbenchmarks: [TextVQA]\n",
     "unknown method(s) 'dopp' (did you mean dop"),
    ("models: [llava15_7b]\nmethods: [full, dop]\nbudgets: [28]\nbenchmarks: [TextVQA]\n",
     "give TFLOPs fractions of the full model in (0, 1)"),
    ("models: [llava15_7b]\nmethods: [dop]\nbenchmarks: [TextVQA]\n", "method(s) dop need `budgets:`"),
    ("models: [llava15_7b]\nmethods: [full]\nbenchmarks: [TextVQA]\nbudget: [0.28]\n",
     "unknown key(s) budget; valid keys: name, plugins, models"),
    ("models: [llava15_7b]\nmethods: [tiny_llava15_dop]\nbenchmarks: [TextVQA]\n",
     "entry 'tiny_llava15_dop' runs model 'tiny_llava15', which is not in models"),
    ("models: [llava15_7b]\nmethods: [full]\nbenchmarks: [TextVQB]\n", "unknown dataset 'TextVQB'"),
    ("models: [llava15_7b]\nmethods: [full]\nbenchmarks: [TextVQA]\nplugins: [no_such_module_xyz]\n",
     "plugin module 'no_such_module_xyz' not found"),
])
def test_bad_specs_one_message_nothing_written(text, message, tmp_path, capsys):
    spec = _spec(tmp_path, text)
    work = tmp_path / "w"
    assert rrun.main(["--compare", str(spec), "--work-dir", str(work)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    work.mkdir()
    assert aggregate.main(["--compare", str(spec), "--work-dir", str(work)]) == 2
    assert message in capsys.readouterr().err
    assert not any(work.iterdir())


def test_plan_blocks_infeasible_budgets_with_the_reason(tmp_path, capsys):
    """A method x budget the registry cannot make is blocked with the registry's reason, not dropped; the
    full row is always planned (the Rel. Avg. denominator)."""
    spec = _spec(tmp_path, "name: paper\nmodels: [llava15_7b]\nmethods: [dop, fastv]\nbudgets: [0.28, 0.23]\n"
                           "benchmarks: [TextVQA, GQA]\n")
    assert rrun.main(["--compare", str(spec), "--dry-run", "--work-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("comparison paper: 10 cells: 0 done, 8 to run, 2 blocked")
    assert "run   llava15_7b: TextVQA_VAL GQA_TestDev_Balanced" in out
    assert "block llava15_7b_fastv23 (2 cells): entry 'llava15_7b_fastv23' does not exist: fastv" in out
    assert "note  llava15_7b -> llava15_7b: Rel. Avg. denominator" in out


def test_example_spec_plans_on_the_tiny_demo(tmp_path, capsys):
    assert rrun.main(["--compare", str(ROOT / "reproduce" / "compare_example.yaml"), "--dry-run",
                      "--work-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("comparison compare_example: 8 cells: 0 done, 8 to run, 0 blocked")
    assert "run   tiny_llava15_divprune80: DOP_Demo" in out and "run   tiny_llava15_dop: DOP_Demo" in out


def test_paper_table_paths_unchanged(capsys):
    with pytest.raises(SystemExit):  # argparse: --table or --compare is required
        rrun.main(["--dry-run"])
    assert "one of the arguments --table --compare is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        aggregate.main(["--scores", "x.csv"])
    assert "the following arguments are required: --base" in capsys.readouterr().err


@pytest.fixture()
def user_methods(tmp_path):
    """docs/adding_a_baseline.md's one-file example (a seeded random vision-side method `rand`, a decoder-side
    `l2norm`) written to a folder outside the repository, next to the spec; the method registry, loaded
    plugins and modules are restored afterwards, and the repository must be untouched."""
    from test_user_methods import _git_status, guide_module_source
    from vlmeval_dop import methods, plugins, registry

    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "my_methods.py").write_text(guide_module_source(), encoding="utf-8")
    before, loaded, status = dict(methods._REGISTRY), dict(plugins._LOADED), _git_status()
    yield folder
    sys.modules.pop("my_methods", None)
    plugins._LOADED.clear()
    plugins._LOADED.update(loaded)
    methods._REGISTRY.clear()
    methods._REGISTRY.update(before)
    registry.load_entries.cache_clear()
    assert _git_status() == status, "a comparison of the user's methods must not change the repository"


def test_user_methods_from_an_outside_module_with_two_seeds(user_methods, in_process, capsys):
    """`plugins:` names a module next to the spec: its seeded method runs once per seed, the others once, a
    budget below the model's floor is blocked with the reason, and the table's seeded cells are mean and
    sample std of the two runs (checked on injected scores by hand)."""
    from vlmeval_dop.flops import full_flops, schedule_flops

    spec = _spec(user_methods, "name: user\nplugins: [my_methods]\nmodels: [tiny_llava15]\n"
                               "methods: [full, rand, l2norm]\nbudgets: [0.9, 0.5]\nbenchmarks: [DOP_Demo]\n"
                               "seeds: [0, 1]\n")
    work = user_methods / "w"
    assert rrun.main(["--compare", str(spec), "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("comparison user: 7 cells: 0 done, 4 to run, 3 blocked")
    assert ("block tiny_llava15_rand50 (2 cells): entry 'tiny_llava15_rand50' does not exist: 50 % TFLOPs is "
            "below tiny_llava15's floor") in out and "block tiny_llava15_l2norm50 (1 cells)" in out
    called = [a[a.index("--model") + 1] for a in in_process]
    assert called == ["tiny_llava15", "tiny_llava15_rand90.s0", "tiny_llava15_rand90.s1", "tiny_llava15_l2norm90"]
    assert all(a[a.index("--plugins") + 1] == str(user_methods / "my_methods.py") for a in in_process)

    assert aggregate.main(["--compare", str(spec), "--work-dir", str(work)]) == 0
    res = work / "comparisons" / "user"
    table = pd.read_csv(res / "user.csv").set_index("entry")
    assert table.at["tiny_llava15_rand90", "runs"] == 2 and table.at["tiny_llava15_rand90", "DOP_Demo_n"] == 2
    assert table.at["tiny_llava15_l2norm90", "runs"] == 1
    assert table.at["tiny_llava15_rand50", "DOP_Demo_status"] == "missing"
    assert "below tiny_llava15's floor" in table.at["tiny_llava15_rand50", "DOP_Demo_reason"]
    runs = pd.read_csv(res / "user_runs.csv")
    assert sorted(runs[runs["row"] == "tiny_llava15_rand90"]["seed"]) == [0, 1]
    # TFLOPs: rand keeps n_e tokens in every layer, n_e = the most whose (L, L, n) count stays within 90 %
    spec_, t = _arch(), 92
    full = full_flops(spec_, t)
    n_e = max(n for n in range(65) if schedule_flops(spec_, [(t + n, t + n)] * 4) <= 0.9 * full)
    assert table.at["tiny_llava15_rand90", "tflops"] == pytest.approx(
        schedule_flops(spec_, [(t + n_e, t + n_e)] * 4) / 1e12, rel=1e-12)
    for stem in ("DOP_Demo", "rel_avg"):
        assert (res / f"user_{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # injected scores: base 80; the seeds 30 and 50 -> 40 +- sqrt(200); Rel. Avg. 50 % +- 100 sqrt(200) / 80
    for entry, value in (("tiny_llava15", 80), ("tiny_llava15_rand90.s0", 30), ("tiny_llava15_rand90.s1", 50)):
        _score(work, entry, "DOP_Demo", value)
    t2 = {tr.row.label: tr for tr in compare.compare_table(compare.prepare(spec), work).rows}
    rand = t2["tiny_llava15_rand90"]
    assert (rand.cells["DOP_Demo"].mean, rand.cells["DOP_Demo"].n) == (40.0, 2)
    assert rand.cells["DOP_Demo"].std == pytest.approx(math.sqrt(200))
    assert rand.rel.mean == pytest.approx(50.0) and rand.rel.std == pytest.approx(100 * math.sqrt(200) / 80)
