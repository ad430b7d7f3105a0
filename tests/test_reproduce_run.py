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


def test_bad_tables(capsys):
    assert rrun.main(["--table", "31", "--dry-run"]) == 2
    assert "numbered 1-30" in capsys.readouterr().err
    assert rrun.main(["--table", "3", "--dry-run"]) == 2
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
    assert rrun.searched_row(parse_row("llava15_7b_dopcd28[search=grid_joint]")) is None  # not a CLI search

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
