"""reproduce/efficiency.py runs end to end (shrunk shapes, CPU) and reports the paper-shape TFLOPs."""
from __future__ import annotations

import json

import pytest

from reproduce import efficiency


def test_efficiency_smoke(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert efficiency.main(["--model", "llavanext_7b", "--budget", "0.14", "--reducer", "uniform", "--shrink", "32",
                            "--reps", "1", "--new-tokens", "2", "--attn", "sdpa", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"].split(" ")[0] for r in rows] == ["unpruned", "uniform", "DOP"]
    assert rows[0]["tflops_ratio"] == pytest.approx(1.0)
    assert rows[1]["tflops_ratio"] == pytest.approx(0.137, abs=0.005)  # n_e = 330 tokens meets the 14 % label
    assert rows[2]["tflops_ratio"] <= 0.14  # the paper's policy (29, 16, 485)
    assert rows[0]["image_placeholders"] == 2928  # 672x672: 5 x 576 + 48 row newlines (llava-hf)
    assert "SMOKE TEST" in capsys.readouterr().out


def test_efficiency_with_cdpruner_offline(tmp_path):
    """The paper's setting (CDPruner rows) runs offline on random weights: random CLIP text tower, fixed text."""
    out = tmp_path / "rows.json"
    assert efficiency.main(["--model", "llava15_7b", "--budget", "0.28", "--shrink", "32", "--reps", "1",
                            "--new-tokens", "2", "--attn", "sdpa", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"].split(" ")[0] for r in rows] == ["unpruned", "cdpruner", "DOP"]
    assert all(r["prefill_ms"] > 0 for r in rows)


def test_efficiency_bad_input(capsys):
    assert efficiency.main(["--model", "llava15_7b", "--budget", "0.5", "--shrink", "32"]) == 2
    assert "valid: [0.23, 0.28, 0.37]" in capsys.readouterr().err
