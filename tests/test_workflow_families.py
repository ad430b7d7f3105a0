"""The issue's three-command workflow, offline on the tiny Qwen3-VL and SmolVLM models:

    vlmeval-dop search --model tiny_qwen3vl --reducer resize --data DOP_Demo --budget 0.6 --install mine
    python run.py --model tiny_qwen3vl_dopr60_mine --data DOP_Demo
    vlmeval-dop flops --model tiny_qwen3vl --policy <the installed policy>

(SmolVLM with `--reducer uniform`: resizing is refused there, see vlmeval_dop/models/smolvlm.py), and the same for
the other families beyond the paper (search works on each). The search's
policies are installed into a copy of eval_configs/ (the repository's stays untouched), from which run.py builds
the entry; the entry runs pruned with the installed policy, and `flops` reports the TFLOPs the search solved for.
"""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from test_plugin_e2e import N_DEMO, _outputs, built  # noqa: F401  (the run.py fixture)
from vlmeval_dop.policy import DOPPolicy


@pytest.fixture()
def config_copy(tmp_path, monkeypatch):
    """eval_configs/ copied to a temporary folder and made the registry's (install target and entry source)."""
    from vlmeval_dop import models_config, registry

    cfg = tmp_path / "eval_configs"
    shutil.copytree(models_config.CONFIG_DIR, cfg, ignore=shutil.ignore_patterns("searched"))
    monkeypatch.setattr(models_config, "CONFIG_DIR", cfg)
    monkeypatch.setattr(registry, "CONFIG_DIR", cfg)
    for cached in (registry.load_entries, models_config.load_models):
        cached.cache_clear()
    yield cfg
    for cached in (registry.load_entries, models_config.load_models):
        cached.cache_clear()


WORKFLOWS = [("qwen3vl", "resize", "dopr"), ("smolvlm", "uniform", "dopuniform"), ("qwen2vl", "resize", "dopr"),
             ("internvl35", "resize", "dopr"), ("llavaov", "uniform", "dopuniform"), ("gemma3", "uniform", "dopuniform")]


@pytest.mark.parametrize("family,reducer,method", WORKFLOWS)
def test_search_install_run_flops(family, reducer, method, config_copy, built, tmp_path, capsys):  # noqa: F811
    from vlmeval_dop.cli import main

    model = f"tiny_{family}"
    argv = ["search", "--model", model, "--reducer", reducer, "--data", "DOP_Demo", "--budget", "0.6",
            "--samples", "2", "--seed", "1", "--out-dir", str(tmp_path / "profiles"), "--install", "mine", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    entry = f"{model}_{method}60_mine"
    assert summary["installed"] == {"0.6": entry}
    policy = DOPPolicy.from_dict(summary["results"]["0.6"]["policy"])
    installed = yaml.safe_load((config_copy / "searched" / f"mine.{reducer}.yaml").read_text())
    assert installed == {model: {0.6: [policy.d_A, policy.d_P, policy.n_v]}}

    models = built("--model", entry, "--data", "DOP_Demo", "--work-dir", str(tmp_path / "work"))
    pred, acc = _outputs(tmp_path / "work", entry)
    assert pred.exists() and acc.exists()
    (wrapper,) = models[entry]
    assert wrapper.policy == policy and wrapper.samples == N_DEMO
    counts = wrapper.last_layer_tokens
    if not policy.is_full(4):
        assert counts is not None and wrapper.pruned_samples == N_DEMO
    if reducer == "resize" and policy.n_v is not None:  # the image itself was resized to ~n_v tokens
        if family == "internvl35":  # one square tile of round(sqrt(n_v))^2 tokens
            assert wrapper.last_visual_tokens == round(policy.n_v**0.5) ** 2
        else:  # n_v x 32^2 (28^2) pixels
            assert wrapper.last_visual_tokens <= policy.n_v

    capsys.readouterr()  # run.py's own output
    # the search counted the text tokens of its first sample (the model is not in models.yaml): find that count
    # from its full-model TFLOPs, then `flops` gives the ratio the search solved for
    from vlmeval_dop.flops import full_flops
    from vlmeval_dop.registry import _tiny_arch

    spec = _tiny_arch(family)
    r = summary["results"]["0.6"]
    (text,) = [t for t in range(400) if abs(full_flops(spec, t) - r["full_tflops"] * 1e12) < 0.5]
    n_v = "all" if policy.n_v is None else policy.n_v
    argv = ["flops", "--model", model, "--policy", f"{policy.d_A},{policy.d_P},{n_v}", "--text-tokens", str(text), "--json"]
    assert main(argv) == 0
    flops = json.loads(capsys.readouterr().out)
    assert flops["ratio"] == pytest.approx(r["paper_ratio"], rel=1e-9) and flops["ratio"] <= 0.6
