"""Issue 18 (reliability) through the real commands on tiny models and DOP_Demo-style TSVs: arguments and
datasets checked before the model loads (E, F, G, H, J), a search resumed after a full disk and re-keyed
after changed points or an edited dataset row (A, C), run.py's failure summary and exit codes (D, G) and
the image size rule inside a wrapper (I)."""
from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from vlmeval_dop import fileio

SMALL = ["--depths", "3", "1", "--visual", "32", "8"]  # few sampling points: fast


@pytest.fixture()
def lmu(tmp_path, monkeypatch):
    root = tmp_path / "LMUData"
    root.mkdir()
    monkeypatch.setenv("LMUData", str(root))  # VLMEvalKit's own data root setting
    return root


@pytest.fixture()
def no_model(monkeypatch):
    """Any attempt to load weights fails the test: the checks must come first."""
    from vlmeval_dop.models.base import DOPWrapper

    def refuse(self):
        raise AssertionError("the model was loaded before the arguments/dataset were checked")

    monkeypatch.setattr(DOPWrapper, "load", refuse)


def _b64(seed, size=(64, 48)):
    from vlmeval.smp import encode_image_to_base64

    from vlmeval_dop.tiny import tiny_image

    return encode_image_to_base64(tiny_image(seed, size), fmt="PNG")


def _tsv(root: Path, name: str, rows: list[dict] | None = None, text: str | None = None) -> Path:
    path = root / f"{name}.tsv"
    if text is not None:
        path.write_text(text)
    else:
        pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def _rows(n, **override):
    rows = [{"index": i, "question": f"What is shown in picture {i}?", "answer": "x", "image": _b64(i)}
            for i in range(n)]
    for i, changes in override.items():
        rows[int(i[1:])].update(changes)
    return rows


def _one_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if "warn" not in ln.lower()]
    assert len(err) == 1, err
    return err[0]


# ------------------------------------------------------------------------------------------ E/F: arguments
@pytest.mark.parametrize("extra, message", [
    (["--budget", "0"], "--budget 0.0: a TFLOPs budget is a fraction of the full model in (0, 1]"),
    (["--budget", "nan"], "in (0, 1]"),
    (["--budget", "1.5"], "in (0, 1]"),
    (["--alpha", "nan"], "--alpha nan: n_min = alpha * n_e needs a finite alpha >= 0"),
    (["--alpha", "-1"], "finite alpha >= 0"),
    (["--text-tokens", "-5"], "--text-tokens -5: must be >= 0"),
    (["--samples", "0"], "--samples 0: must be >= 1"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
    (["--reducer", "bogus"], "unknown reducer 'bogus'; valid reducers: "),
    (["--depths", "9", "1"], "--depths 9: sampling depths of tiny_llava15 are in 0..4"),
    (["--visual", "0"], "--visual 0: sampling n_v values are in 1..64"),
    (["--device", "bogus"], "--device 'bogus' is not a device; use cpu, cuda or cuda:N"),
    (["--device", "cuda:99"], "--device cuda:99: "),
    (["--device", "cuda"], "--device cuda: no CUDA GPU is available on this machine; use --device cpu"),
    (["--install", "Bad__Tag"], "search tag 'Bad__Tag'"),
])
def test_search_arguments_are_checked_before_the_model_loads(extra, message, tmp_path, lmu, no_model, capsys):
    """E/F/G: one line naming the argument, exit 2, no model load, nothing written."""
    import torch

    from vlmeval_dop.cli import main

    if extra == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")

    out = tmp_path / "out"
    argv = ["search", "--model", "tiny_llava15", "--data", "DOP_Demo", "--out-dir", str(out), *extra]
    assert main(argv) == 2
    assert message in _one_line(capsys)
    assert not out.exists()


def test_unusable_out_dir_and_other_commands(tmp_path, lmu, no_model, capsys, monkeypatch):
    """G/E: an out-dir that is a file or not writable; fitprune's arguments; all before any model loads."""
    from vlmeval_dop.cli import main

    base = ["search", "--model", "tiny_llava15", "--data", "DOP_Demo"]
    (tmp_path / "file").write_text("")
    assert main(base + ["--out-dir", str(tmp_path / "file")]) == 2
    assert "exists and is not a folder" in _one_line(capsys)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    assert main(base + ["--out-dir", str(tmp_path / "new")]) == 2
    assert "is not writable" in _one_line(capsys)
    monkeypatch.setattr(os, "access", real)
    for extra, message in ((["--samples", "0"], "--samples 0"), (["--budget", "2"], "--budget 2.0"),
                           (["--device", "bogus"], "--device 'bogus'")):
        assert main(["fitprune", "--model", "llava15_7b", "--data", "DOP_Demo", *extra]) == 2
        assert message in _one_line(capsys)


# ------------------------------------------------------------------------------------------ G/H/J: datasets
DATASET_CASES = {
    "noimage": (lambda: [{"index": 0, "question": "q", "answer": "a"}], "missing column(s) image or image_path"),
    "noindex": (lambda: [{"question": "q", "answer": "a", "image": _b64(0)}], "missing column(s) index"),
    "headeronly": ("index\tquestion\tanswer\timage\n", "has a header but no rows"),
    "empty": ("", "is empty"),
    "dupindex": (lambda: _rows(3, r2={"index": 1}), "index 1 appears 2 times (rows 2, 3)"),
    "emptyq": (lambda: _rows(2, r1={"question": " "}), "row 2 (index 1): empty question"),
    "badb64": (lambda: _rows(2, r0={"image": "A" * 70 + "="}), "row 1 (index 0): the image does not decode"),
    "notimage": (lambda: _rows(2, r1={"image": "aGVsbG8gd29ybGQsIHRoaXMgaXMgbm90IGFuIGltYWdlIGF0IGFsbCwganVzdCB0ZXh0Lg=="}),
                 "row 2 (index 1): the image does not decode"),
    "multi": (lambda: _rows(2, r0={"image": str([_b64(5), _b64(6)])}),
              "row 1 (index 0): the prompt has 2 images; the search profiles single-image prompts"),
}


@pytest.mark.parametrize("name", sorted(DATASET_CASES))
def test_dataset_problems_are_named_before_the_model_loads(name, tmp_path, lmu, no_model, capsys):
    """G/H/J: each problem is one line naming the file (and the row), exit 2, before the weights load."""
    from vlmeval_dop.cli import main

    content, message = DATASET_CASES[name]
    data = f"rel_{name}"
    path = _tsv(lmu, data, text=content) if isinstance(content, str) else _tsv(lmu, data, content())
    out = tmp_path / "out"
    assert main(["search", "--model", "tiny_llava15", "--data", data, "--samples", "3", "--out-dir", str(out)]) == 2
    line = _one_line(capsys)
    assert str(path) in line and message in line, line
    assert not out.exists()


def test_truncated_tsv_names_the_row(tmp_path, lmu, no_model, capsys):
    """H: a TSV cut in the middle of its last image (was "Incorrect padding")."""
    from vlmeval_dop.cli import main

    path = _tsv(lmu, "rel_cut", _rows(3))
    text = path.read_text()
    path.write_text(text[: len(text) - len(_b64(2)) // 2])
    assert main(["search", "--model", "tiny_llava15", "--data", "rel_cut", "--samples", "3",
                 "--out-dir", str(tmp_path / "o")]) == 2
    line = _one_line(capsys)
    assert f"{path} row 3 (index 2): the image does not decode" in line and "truncated" in line


# ------------------------------------------------------------------------------------------ A/C: resume
def _profile(run_dir: Path) -> dict:
    return {c: v["values"] for c, v in json.loads((run_dir / "profile.json").read_text())["curves"].items()}


def test_search_survives_a_full_disk_and_rekeys_changed_points(tmp_path, lmu, capsys, monkeypatch):
    """C: ENOSPC mid-record -> one line, exit 1, no torn line; the same command resumes with the finished
    sample kept. A: rerun with other sampling points into the same --out-dir recomputes every sample (was:
    "(0 new)" and old samples mapped onto the new points) and equals a fresh directory."""
    from vlmeval_dop.cli import main

    out = tmp_path / "p"
    argv = ["search", "--model", "tiny_llava15", "--data", "DOP_Demo", "--samples", "2", "--seed", "1",
            "--budget", "0.6", "--out-dir", str(out), "--json"]
    real, writes = fileio._os_write, []

    def disk_fills(fd, data):
        writes.append(1)
        if len(writes) == 2:  # the second sample's record: half written, then the disk is full
            real(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(fileio, "_os_write", disk_fills)
    assert main(argv + SMALL) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "No space left on device" in err and "rerun the same command to resume" in err
    run_dir = out / "tiny_llava15-uniform-DOP_Demo-2-1"
    lines = (run_dir / "samples.rank0.jsonl").read_bytes()
    assert lines.endswith(b"\n") and len(lines.splitlines()) == 1  # the finished sample, nothing torn
    monkeypatch.setattr(fileio, "_os_write", real)
    assert main(argv + SMALL) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["newly_profiled"] == 1 and first["recomputed_stale"] == 0  # resumed

    other = ["--depths", "3", "2", "0", "--visual", "48", "16"]
    assert main(argv + other) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["newly_profiled"] == 2 and again["recomputed_stale"] == 2
    assert main(argv[:-3] + ["--out-dir", str(tmp_path / "fresh"), "--json"] + other) == 0
    fresh = json.loads(capsys.readouterr().out)
    assert _profile(run_dir) == _profile(Path(fresh["dir"])) and again["results"] == fresh["results"]


def test_search_recomputes_only_an_edited_dataset_row(tmp_path, lmu, capsys):
    """A: editing one row of the TSV recomputes that sample only (was: the old policy kept); the profile
    equals a fresh directory's."""
    from vlmeval_dop.cli import main

    _tsv(lmu, "rel_edit", _rows(2))
    argv = ["search", "--model", "tiny_llava15", "--data", "rel_edit", "--samples", "2", "--seed", "0",
            "--budget", "0.6", "--json", *SMALL]
    assert main(argv + ["--out-dir", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    _tsv(lmu, "rel_edit", _rows(2, r1={"question": "How many shapes are there?", "image": _b64(9)}))
    assert main(argv + ["--out-dir", str(tmp_path / "a")]) == 0
    edited = json.loads(capsys.readouterr().out)
    assert edited["newly_profiled"] == 1 and edited["recomputed_stale"] == 1
    assert main(argv + ["--out-dir", str(tmp_path / "b")]) == 0
    fresh = json.loads(capsys.readouterr().out)
    assert _profile(Path(edited["dir"])) == _profile(Path(fresh["dir"]))


# ------------------------------------------------------------------------------------------ D/G: run.py
@pytest.fixture()
def run_main(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("dop_run_rel", Path(__file__).resolve().parents[1] / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv0 = list(sys.argv)
    yield mod
    sys.argv[:] = argv0


def test_run_py_summarises_failed_benchmarks(tmp_path, lmu, run_main, capsys):
    """D: every requested benchmark failed -> summary + exit 1; one of two failed -> summary, VLMEvalKit's
    exit code (0)."""
    _tsv(lmu, "rel_runbad", _rows(2, r0={"image": "A" * 70 + "="}, r1={"image": "B" * 70 + "="}))
    work = tmp_path / "w"
    with pytest.raises(SystemExit) as exc:
        run_main.main(["--model", "tiny_llava15", "--data", "rel_runbad", "--work-dir", str(work)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "run.py: 1 of 1 benchmark run(s) failed:" in err and "tiny_llava15 x rel_runbad: " in err
    assert run_main.main(["--model", "tiny_llava15", "--data", "DOP_Demo", "rel_runbad",
                          "--work-dir", str(work)]) is None
    err = capsys.readouterr().err
    assert "run.py: 1 of 2 benchmark run(s) failed:" in err and "x DOP_Demo" not in err
    assert (work / "tiny_llava15" / "tiny_llava15_DOP_Demo_acc.csv").exists()


def test_run_py_bad_arguments_and_ctrl_c(tmp_path, lmu, run_main, capsys, monkeypatch):
    """G: run.py without --data/--model, with an unwritable --work-dir, and Ctrl-C: one line each."""
    for argv in (["--model", "tiny_llava15"], ["--data", "DOP_Demo"]):
        with pytest.raises(SystemExit) as exc:
            run_main.main(argv + ["--work-dir", str(tmp_path / "w")])
        assert exc.value.code == 2
        assert "give --model <entry ...> and --data <benchmark ...>" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exc:
        run_main.main(["--model", "tiny_llava15", "--data", "DOP_Demo", "--work-dir", str(tmp_path / "file")])
    assert exc.value.code == 2 and "--work-dir" in capsys.readouterr().err
    import vlmeval.run as vrun

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(vrun, "main", interrupted)
    with pytest.raises(SystemExit) as exc:
        run_main.main(["--model", "tiny_llava15", "--data", "DOP_Demo", "--work-dir", str(tmp_path / "w")])
    assert exc.value.code == 130
    assert capsys.readouterr().err.endswith("interrupted; rerun the same command to resume\n")


# ------------------------------------------------------------------------------------------ I: images
def test_wrapper_downscales_an_extreme_image_before_padding(tmp_path):
    """I: a 100000x100 image (VLMEvalKit's encoding of a 10000x10 one) goes through LLaVA-1.5's square
    padding without a 10^10-pixel canvas: downscaled to 8192x8 first, same processor output shape."""
    from PIL import Image

    from vlmeval_dop.images import MAX_SIDE
    from vlmeval_dop.registry import load_entry

    path = tmp_path / "wide.png"
    Image.new("RGB", (100000, 100), (10, 200, 30)).save(path)
    wrapper = load_entry("tiny_llava15", device="cpu").load()
    seen = []
    real = wrapper.prepare_image
    wrapper.prepare_image = lambda im: seen.append(im.size) or real(im)
    inputs = wrapper.model_inputs([{"type": "image", "value": str(path)}, {"type": "text", "value": "What?"}])
    assert seen == [(MAX_SIDE, 8)]
    normal = wrapper.model_inputs([{"type": "image", "value": str(_small(tmp_path))}, {"type": "text", "value": "What?"}])
    assert inputs["pixel_values"].shape == normal["pixel_values"].shape


def _small(tmp_path):
    from vlmeval_dop.tiny import tiny_image

    p = tmp_path / "small.png"
    tiny_image(0).save(p)
    return p
