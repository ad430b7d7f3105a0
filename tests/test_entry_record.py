"""The record of what made an entry's results (vlmeval_dop/entry_record.py): written by run.py next to VLMEvalKit's
outputs; results made by the same name with other settings are refused (run.py) and planned as blocked
(reproduce/run.py). The end-to-end path with a user's plugin is in tests/test_user_methods.py."""
from __future__ import annotations

import json

from reproduce import run as rrun
from vlmeval_dop.entry_record import RECORD_FILE, entry_settings, record_mismatch, write_record


def test_record_round_trip_and_mismatch(tmp_path):
    name = "tiny_llava15_dop"
    assert record_mismatch(tmp_path, name) is None  # no record (results from before records existed): adopted
    path = write_record(tmp_path, name)
    assert path == tmp_path / name / RECORD_FILE
    record = json.loads(path.read_text())
    assert record == json.loads(json.dumps(entry_settings(name)))
    assert record["policy"] == [2, 1, 8, None, None] and record["reducer"] == "uniform"
    assert record["model"]["tiny"] == "llava15" and "method_sources" not in record  # a built-in method
    assert record_mismatch(tmp_path, name) is None

    record["policy"][2] = 16  # results made when the entry kept 16 tokens
    path.write_text(json.dumps(record))
    reason = record_mismatch(tmp_path, name)
    assert reason.startswith(f"the results in {tmp_path / name} were made by {name!r} with other settings")
    assert "policy: [2, 1, 16, null, null] -> [2, 1, 8, null, null]" in reason
    assert reason.endswith(f"give another --work-dir, or remove {tmp_path / name} to redo them")
    cell = rrun._cell("row", name, "DOP_Demo", "DOP_Demo", "", tmp_path)
    assert cell.status == "blocked" and cell.reason == reason


def test_decoder_side_arguments_are_recorded(tmp_path):
    record = json.loads(write_record(tmp_path, "tiny_llava15_fastv").read_text())
    assert record["baseline"] == "fastv" and record["baseline_args"] == {"k": 2, "keep": 16}
