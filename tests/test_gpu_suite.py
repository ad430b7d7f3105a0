"""benchmarks/gpu_suite.py: `--smoke` runs every part on the CPU (tiny models) and writes the JSON and markdown;
caps, the total cap and CUDA out-of-memory errors skip work with a stated reason instead of failing the run."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _run(suite, tmp_path, *args) -> tuple[dict, str]:
    assert suite.main(["--smoke", "--out", str(tmp_path), *args]) == 0
    (json_path,) = tmp_path.glob("*-cpu-smoke.json")
    md = json_path.with_suffix(".md").read_text()
    return json.loads(json_path.read_text()), md


ROW_KEYS = {
    "latency": {"model", "attn", "budget", "policy", "tflops_ratio", "executed_ratio", "prefill_ms", "full_ms",
                "latency_ratio", "latency_over_executed"},
    "cdpruner": {"model", "attn", "budget", "cdpruner_policy", "cdpruner_ms", "dop_cd_policy", "dop_cd_ms",
                 "dop_cd_tflops_ratio", "cdpruner_tflops_ratio", "dop_cd_over_cdpruner", "dop_cd_over_full"},
    "overhead": {"model", "attn", "phase", "stock_ms", "dop_full_ms", "overhead_pct", "paired_overhead_pct", "met"},
    "memory": {"model", "method", "policy", "prefill_peak_gib", "decode_peak_gib", "measured", "note"},
    "reducers": {"model", "setting", "reducer", "reducer_ms", "prefill_ms", "ratio"},
    "search": {"model", "procedure", "samples", "seconds", "seconds_per_sample", "seconds_for_target",
               "layer_equivalents_per_sample", "projected"},
    "throughput": {"model", "policy", "samples", "batch_size", "seconds", "samples_per_s", "speedup_vs_loop",
                   "same_predictions"},
}
SECTIONS = {"latency": "## Prefill latency", "cdpruner": "## DOP_CD vs CDPruner", "overhead": "## Full-policy overhead",
            "memory": "## Peak memory", "reducers": "## Reducer cost", "search": "## Search profiling cost",
            "throughput": "## Evaluation throughput"}


def test_smoke_runs_every_part(suite, tmp_path):
    threads = torch.get_num_threads()
    report, md = _run(suite, tmp_path)
    assert torch.get_num_threads() == threads  # the smoke's single thread does not leak into the caller
    assert report["environment"]["device"] == "cpu" and report["settings"]["smoke"]
    assert [b["model"] for b in report["builds"]] == list(suite.MODELS)
    assert report["total_seconds"] <= report["total_cap_s"] + 15  # its own clock; one unit may overrun a deadline
    assert set(report["parts"]) == set(suite.PARTS)
    for name, part in report["parts"].items():
        assert part["status"] in ("ok", "partial", "skipped", "error"), name
        if part["status"] == "ok":
            assert part["reason"] is None and part["rows"], name
        else:  # whatever did not run says why
            assert part["reason"], name
        for row in part["rows"]:
            assert ROW_KEYS[name] <= set(row), (name, set(ROW_KEYS[name]) - set(row))
        assert SECTIONS[name] in md
        assert [seg["model"] for seg in part["segments"]] == list(suite.MODELS)
    # on an idle 2-core CPU the smoke fits its caps with room to spare: every part ran on both models
    ran = {name: {r["model"] for r in p["rows"]} for name, p in report["parts"].items()}
    assert sum(len(v) for v in ran.values()) >= len(suite.PARTS), ran
    latency = report["parts"]["latency"]["rows"]
    for row in latency:
        if row["policy"] != "stock (unpruned)":
            assert 0 < row["executed_ratio"] <= row["tflops_ratio"] + 1e-9 < 1  # executed never above Eq. 11
    for row in report["parts"]["memory"]["rows"]:
        assert row["measured"] is False and row["prefill_peak_gib"] is None  # CUDA only; no invented numbers
    for row in report["parts"]["search"]["rows"]:
        assert row["samples"] >= 1 and row["layer_equivalents_per_sample"] > 0
    # batched evaluation answers exactly as VLMEvalKit's one-sample loop (fp32)
    throughput = report["parts"]["throughput"]["rows"]
    assert [r["batch_size"] for r in throughput] == list(suite.THROUGHPUT_BATCHES)
    assert all(r["same_predictions"] for r in throughput[1:])
    assert "CPU run" in md


def test_part_cap_skips_with_reason(suite, tmp_path):
    report, md = _run(suite, tmp_path, "--parts", "latency,overhead", "--models", "llava15_7b", "--caps", "latency=0")
    latency, overhead = report["parts"]["latency"], report["parts"]["overhead"]
    assert latency["status"] == "skipped" and not latency["rows"]
    assert "latency cap used up" in latency["reason"]
    assert overhead["rows"]  # the other part still ran
    assert "latency: llava15_7b: all: latency cap used up" in md


def test_total_cap_skips_everything_without_building(suite, tmp_path):
    report, _ = _run(suite, tmp_path, "--parts", "memory,search", "--total-cap", "0")
    assert report["builds"] == []
    for part in report["parts"].values():
        assert part["status"] == "skipped" and "total cap reached" in part["reason"]


def test_cuda_oom_skips_the_unit_and_the_suite_goes_on(suite, tmp_path, monkeypatch):
    def oom(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(suite, "repeat_ms", oom)
    report, _ = _run(suite, tmp_path, "--parts", "latency,memory", "--models", "llava15_7b", "--attn", "sdpa")
    latency = report["parts"]["latency"]
    assert latency["status"] == "skipped" and not latency["rows"]
    assert "CUDA out of memory: CUDA out of memory. Tried to allocate 20.00 GiB" in latency["reason"]
    assert report["parts"]["memory"]["rows"]  # the next part ran


def test_search_halves_the_batch_on_oom(suite, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import search_cost

    real = search_cost.profile_ours

    def fussy(model, one, depths, visual, samples, batch, *a, **k):
        if batch > 1:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return real(model, one, depths, visual, samples, batch, *a, **k)

    monkeypatch.setattr(search_cost, "profile_ours", fussy)
    report, _ = _run(suite, tmp_path, "--parts", "search", "--models", "llava15_7b", "--search-samples", "2")
    ours = [r for r in report["parts"]["search"]["rows"] if r["procedure"].startswith("ours")]
    assert len(ours) == 1 and ours[0]["batch"] == 1 and ours[0]["samples"] == 2
    assert ours[0]["notes"] == ["CUDA out of memory at batch 2: halved"]


def test_bad_arguments(suite, capsys):
    for args in (["--smoke", "--parts", "latency,bogus"], ["--smoke", "--caps", "nope=3"], ["--smoke", "--shrink", "4"]):
        with pytest.raises(SystemExit) as exc:
            suite.main(args)
        assert exc.value.code == 2
    assert "unknown part bogus" in capsys.readouterr().err


def test_scale_policy_is_identity_at_the_real_shape(suite):
    from vlmeval_dop.models_config import PAPER_POLICIES, get_model
    from vlmeval_dop.policy import DOPPolicy

    arch = get_model("llavanext_7b").arch
    p = PAPER_POLICIES["llavanext_7b"][0.14]
    assert suite.scale_policy(p, arch.num_layers, arch.num_layers, arch.visual_tokens, arch.visual_tokens) is p
    assert suite.scale_policy(p, 32, 4, 2880, 320) == DOPPolicy(4, 2, 54)  # (29, 16, 485) on the tiny NeXT
