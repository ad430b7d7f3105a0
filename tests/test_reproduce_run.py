"""reproduce/run.py: the plan of every accuracy table, resumability, bad input (no model runs)."""
from __future__ import annotations

import pytest

from reproduce import run as rrun
from reproduce.tables import TABLES, get_table, parse_row

ACCURACY = [n for n, t in TABLES.items() if t.kind == "accuracy"]


@pytest.mark.parametrize("number", ACCURACY)
def test_dry_run_lists_exactly_the_table_cells(number, tmp_path, capsys):
    spec = get_table(number)
    cells = rrun.plan_table(number, tmp_path)
    assert [(c.row, c.benchmark) for c in cells] == [(r, b) for r in spec.rows for b in spec.benchmarks]
    datasets = rrun.benchmark_datasets()
    for c in cells:
        searched = rrun.searched_row(parse_row(c.row))  # search ablations run their installed entry
        assert c.dataset == datasets[c.benchmark] and c.entry == (searched or (parse_row(c.row).entry,))[0]
        assert c.status in ("todo", "blocked") and (c.status == "blocked") == bool(c.reason)
    assert rrun.main(["--table", str(number), "--dry-run", "--work-dir", str(tmp_path)]) == 0
    assert f"table {number}: {len(cells)} cells" in capsys.readouterr().out


def test_unpruned_rows_are_runnable_and_blocked_rows_say_why(tmp_path):
    cells = {c.row: c for c in rrun.plan_table(8, tmp_path)}
    assert cells["llava15_7b"].status == "todo"
    assert "reducer 'cdpruner'" in cells["llava15_7b_dopcd28"].reason or cells["llava15_7b_dopcd28"].status == "todo"
    # baseline rows exist as entries (eval_configs/baselines.yaml); unregistered methods say which
    sparse = cells["llava15_7b_sparsevlm28"]
    assert sparse.status == "todo" or "baseline 'sparsevlm' is not registered" in sparse.reason
    assert cells["llava15_7b_fastv28"].status == "todo"


def test_finished_cells_are_reused_not_rerun(tmp_path, monkeypatch):
    (tmp_path / "llava15_7b").mkdir()
    (tmp_path / "llava15_7b" / "llava15_7b_TextVQA_VAL_acc.csv").write_text("Overall\n58.2\n")
    cells = rrun.plan_table(8, tmp_path)
    mine = [c for c in cells if c.entry == "llava15_7b"]
    assert [c.status for c in mine if c.dataset == "TextVQA_VAL"] == ["done"]
    calls = []

    def fake_run(cmd):  # run.py scoring every benchmark it was given (a cell without one is a failure)
        calls.append(cmd)
        entry = cmd[cmd.index("--model") + 1]
        (tmp_path / entry).mkdir(exist_ok=True)
        for d in cmd[cmd.index("--data") + 1 : cmd.index("--work-dir")]:
            (tmp_path / entry / f"{entry}_{d}_acc.csv").write_text("Overall\n1\n")
        return 0

    monkeypatch.setattr(rrun.subprocess, "call", fake_run)
    assert rrun.run_cells(cells, tmp_path, limit=3, gpus=1, extra=["--judge", "exact_matching"]) == 0
    (cmd,) = calls
    data = cmd[cmd.index("--data") + 1 : cmd.index("--work-dir")]
    assert data == ["VQAv2_TestDev", "GQA_TestDev_Balanced", "VizWiz"]  # first 3 unfinished, TextVQA skipped
    assert "--reuse" in cmd and cmd[-2:] == ["--judge", "exact_matching"]
    calls.clear()
    rrun.run_cells(cells, tmp_path, limit=None, gpus=4, extra=[])
    assert calls[0][:2] == ["torchrun", "--nproc-per-node=4"]
    assert "TextVQA_VAL" not in calls[0]


def test_bad_tables(capsys, tmp_path):
    assert rrun.main(["--table", "31", "--dry-run"]) == 2
    assert "numbered 1-30" in capsys.readouterr().err
    # a non-accuracy table: the dry run names the command that makes it; a real run has no cells to run
    assert rrun.main(["--table", "3", "--dry-run"]) == 0
    assert "reproduce/efficiency.py" in capsys.readouterr().out
    assert rrun.main(["--table", "3", "--work-dir", str(tmp_path)]) == 2
    assert "efficiency" in capsys.readouterr().err


def test_search_ablation_rows_run_their_installed_policies(tmp_path, monkeypatch):
    """Rows like `llava15_7b_dopcd28[objective=accuracy_drop]` become the entry a `search|solve --install TAG`
    makes; blocked with that command until it exists, then planned like any entry."""
    from vlmeval_dop import registry

    cells = {c.row: c for c in rrun.plan_table(24, tmp_path)}
    acc = cells["llava15_7b_dopcd28[objective=accuracy_drop]"]
    assert acc.entry == "llava15_7b_dopcd28_acc_drop" and acc.status == "blocked"
    assert "--objective acc_drop --budget 0.28 --install acc_drop" in acc.reason
    entry, command = rrun.searched_row(parse_row("qwen25vl_7b_dopr26[transfer_from=llava15_7b]"))
    assert entry == "qwen25vl_7b_dopr26_transfer_llava15_7b"
    assert "search --model llava15_7b --reducer cdpruner --data TextVQA_TRAIN --samples 100 --seed 42" in command
    assert "solve --profile profiles/llava15_7b-cdpruner-TextVQA_TRAIN-100-42/profile.json --model qwen25vl_7b " \
           "--reducer resize --budget 0.26 --install transfer_llava15_7b" in command
    entry, command = rrun.searched_row(parse_row("llava15_7b_dopcd28[search=grid_joint]"))
    assert entry == "llava15_7b_dopcd28_grid_joint" and "--joint-grid --budget 0.28 --install grid_joint" in command

    real = dict(registry.load_entries())
    base = real["llava15_7b_dopcd28"]
    installed = registry.Entry("llava15_7b_dopcd28_acc_drop", base.model, "dopcd", budget=0.28,
                               policy=base.policy, reducer="cdpruner", source="searched/acc_drop.cdpruner.yaml")
    monkeypatch.setattr(registry, "load_entries", lambda config_dir=None: {**real, installed.name: installed})
    cells = {c.row: c for c in rrun.plan_table(24, tmp_path)}
    assert cells["llava15_7b_dopcd28[objective=accuracy_drop]"].status == "todo"


def test_operation_tables_plan_masked_entries(tmp_path):
    """Tables 26-28: every (row, column) cell is the entry with that single operation pruned."""
    cells = rrun.plan_table(27, tmp_path)
    spec = get_table(27)
    assert len(cells) == len(spec.rows) * len(spec.columns)
    c = next(c for c in cells if c.row == "llava15_7b[prune=MLP;eval=SEED]" and c.benchmark == "l4-6")
    assert (c.entry, c.dataset, c.status) == ("llava15_7b__mlp4-6", "SEEDBench_IMG", "todo")
    from vlmeval_dop.registry import get_entry

    mask = get_entry(c.entry).op_mask
    assert mask.mlp == {3, 4, 5} and not mask.attn  # 1-based columns -> 0-based layers
    (tmp_path / "llava15_7b__mlp4-6").mkdir()
    (tmp_path / "llava15_7b__mlp4-6" / "llava15_7b__mlp4-6_SEEDBench_IMG_acc.csv").write_text("Overall\n0.6\n")
    again = {(c.row, c.benchmark): c.status for c in rrun.plan_table(27, tmp_path)}
    assert again[("llava15_7b[prune=MLP;eval=SEED]", "l4-6")] == "done"
    assert rrun.main(["--table", "28", "--dry-run", "--work-dir", str(tmp_path)]) == 0


def _plan_text(number, tmp_path, capsys) -> str:
    assert rrun.main(["--table", str(number), "--dry-run", "--work-dir", str(tmp_path)]) == 0
    return capsys.readouterr().out


def test_no_table_is_blocked_for_lack_of_a_cli(tmp_path, capsys):
    """Issue 19: every table's dry run plans cells or names the commands that make it; what blocks a cell is
    data, weights, a fitted schedule or a policy that a named `vlmeval-dop` command installs, never a
    missing command. Every `vlmeval-dop` command the plans name parses with the real CLI."""
    import re
    import shlex

    from vlmeval_dop.cli import build_parser

    parser = build_parser()
    commands = set()
    for number in sorted(TABLES):
        out = _plan_text(number, tmp_path, capsys)
        assert "needs a search/evaluation ablation" not in out and "dedicated experiment" not in out, number
        for line in out.splitlines():
            if "blocked" in line and line.lstrip().startswith("make"):
                assert "Video-LLaVA" in line or "TGIF-QA" in line or "for data" in line, line
        commands |= {c.strip() for c in re.findall(r"vlmeval-dop ((?:search|solve|fitprune) [^;`(\n]*)", out)}
    assert any("--joint-grid" in c for c in commands) and any("--spearman 216" in c for c in commands)
    assert any("--system-tokens" in c for c in commands) and any("--grid-additive" in c for c in commands)
    for command in commands:
        argv = shlex.split(re.sub(r"<[^>]*>", "DATA", command))
        parser.parse_args(argv)  # SystemExit on an unknown flag


def test_rel_avg_tables_plan_each_model_benchmarks_and_the_denominators(tmp_path):
    """Tables 5 and 21 print only Rel. Avg.: each row over its model's benchmark set, plus the unpruned
    models (the denominators); transferred rows are blocked until `search` + `solve --install` ran."""
    from reproduce.tables import LLAVA_BENCHMARKS, QI_BENCHMARKS

    cells = rrun.plan_table(5, tmp_path)
    by_row = {}
    for c in cells:
        by_row.setdefault(c.row, []).append(c)
    assert [c.benchmark for c in by_row["qwen25vl_7b_dopr26"]] == list(QI_BENCHMARKS)
    assert [c.benchmark for c in by_row["llava15_13b_dopcd28"]] == list(LLAVA_BENCHMARKS)
    assert all(c.status == "todo" for c in by_row["llavanext_13b_dopcd14"])
    moved = by_row["internvl3_8b_dopr27[transfer_from=llava15_7b]"]
    assert {c.entry for c in moved} == {"internvl3_8b_dopr27_transfer_llava15_7b"}
    assert all(c.status == "blocked" and "solve --profile" in c.reason for c in moved)
    for model in ("llava15_13b", "llavanext_7b", "llavanext_13b", "qwen25vl_7b", "internvl3_8b"):
        assert by_row[model] and all(c.note == "Rel. Avg. denominator" and c.entry == model for c in by_row[model])
    assert len(cells) == sum(len(v) for v in by_row.values()) == 6 * 10 + 4 * 7 + 3 * 10 + 2 * 7
    t21 = {c.row: c for c in rrun.plan_table(21, tmp_path)}
    assert t21["llava15_7b_dopcd28[samples=25]"].entry == "llava15_7b_dopcd28_samples25"
    assert t21["llava15_7b_cdpruner28"].status == "todo" and t21["llava15_7b"].note


def test_table19_runs_this_projects_cdpruner_port_labelled(tmp_path, capsys, monkeypatch):
    """Table 19's [impl=reproduced] rows: the CDPruner row is this project's port (the same entry as the
    paper row, labelled so); the DOP row is a DOP_CD search on Qwen2.5-VL with that port."""
    from vlmeval_dop import registry

    cells = {c.row: c for c in rrun.plan_table(19, tmp_path)}
    cd = cells["qwen25vl_7b_cdpruner16[impl=reproduced]"]
    assert (cd.entry, cd.status) == ("qwen25vl_7b_cdpruner16", "todo") and "port" in cd.note
    dop = cells["qwen25vl_7b_dopcd26[impl=reproduced]"]
    assert dop.entry == "qwen25vl_7b_dopcd26_cdpruner_port" and dop.status == "blocked" and "port" in dop.note
    assert "search --model qwen25vl_7b --reducer cdpruner --data TextVQA_TRAIN" in dop.reason
    assert "--budget 0.26 --install cdpruner_port" in dop.reason
    assert "this project's CDPruner port" in _plan_text(19, tmp_path, capsys)
    real = dict(registry.load_entries())
    base = real["qwen25vl_7b_cdpruner26"]
    installed = registry.Entry(dop.entry, base.model, "dopcd", budget=0.26, policy=base.policy, reducer="cdpruner",
                               source="searched/cdpruner_port.cdpruner.yaml")
    monkeypatch.setattr(registry, "load_entries", lambda config_dir=None: {**real, installed.name: installed})
    assert {c.row: c for c in rrun.plan_table(19, tmp_path)}["qwen25vl_7b_dopcd26[impl=reproduced]"].status == "todo"


def test_grid_system_and_seed_rows(tmp_path):
    """Table 22 (F.3 grid, joint and additive), Table 25 (system tokens) and Table 23 (five seeds)."""
    t22 = {c.row: c for c in rrun.plan_table(22, tmp_path)}
    assert t22["llava15_7b_dopcd23[search=grid_additive]"].entry == "llava15_7b_dopcd23_grid_additive"
    assert "--grid-additive --budget 0.23 --install grid_additive" in t22["llava15_7b_dopcd23[search=grid_additive]"].reason
    t25 = {c.row: c for c in rrun.plan_table(25, tmp_path)}
    sys_row = t25["llava15_7b_dopcd28[groups=visual+system]"]
    assert sys_row.entry == "llava15_7b_dopcd28_visual_system" and "--system-tokens --budget 0.28" in sys_row.reason
    t23 = rrun.plan_table(23, tmp_path)
    entries = sorted({c.entry for c in t23 if c.row == "llava15_7b_dopcd28[val_seeds=5]"})
    assert entries == [f"llava15_7b_dopcd28_seed{s}" for s in range(5)]
    assert len(t23) == 2 * 5 * 3
    assert any("--seed 3 --budget 0.28 --install seed3" in c.reason for c in t23)
