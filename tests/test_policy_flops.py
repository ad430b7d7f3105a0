"""Policy validation/serialisation and the analytic FLOPs model against the paper's numbers."""
from __future__ import annotations

import pytest
import yaml

from vlmeval_dop.arch import ArchSpec, UnsupportedModelError
from vlmeval_dop.flops import (
    BudgetError,
    budget_floor,
    layer_flops,
    min_visual_tokens,
    policy_flops,
    policy_tflops,
    uniform_tokens_for_budget,
)
from vlmeval_dop.models_config import PAPER_POLICIES, load_models
from vlmeval_dop.policy import DOPPolicy, PolicyError

MODELS = load_models()


def test_policy_parse_and_roundtrip():
    p = DOPPolicy.parse("26,19,97")
    assert p == DOPPolicy(26, 19, 97)
    assert DOPPolicy.parse("32, 32, all") == DOPPolicy(32, 32, None)
    for q in (p, DOPPolicy(3, 5, None, 1, 2)):
        assert DOPPolicy.from_json(q.to_json()) == q
        assert DOPPolicy.from_yaml(q.to_yaml()) == q
    assert DOPPolicy.from_yaml("[26, 19, 97]") == p
    with pytest.raises(PolicyError, match="d_A,d_P,n_v"):
        DOPPolicy.parse("26,19")
    with pytest.raises(PolicyError, match="unknown policy keys"):
        DOPPolicy.from_dict({"d_A": 1, "d_P": 1, "nv": 3})


def test_policy_validation_messages():
    with pytest.raises(PolicyError, match=r"0 <= d_A <= L=32"):
        DOPPolicy(33, 3, 10).validate(32, 576)
    with pytest.raises(PolicyError, match=r"valid: 1..576"):
        DOPPolicy(3, 3, 577).validate(32, 576)
    with pytest.raises(PolicyError, match=">= 1"):
        DOPPolicy(3, 3, 0).validate(32, 576)
    assert DOPPolicy(0, 32, 1).validate(32, 576) == DOPPolicy(0, 32, 1)


def test_effective_drops_dead_mlp_work():
    assert DOPPolicy(10, 20, 5).effective(32) == DOPPolicy(10, 9, 5)
    assert DOPPolicy(20, 10, 5).effective(32) == DOPPolicy(20, 10, 5)
    assert DOPPolicy(20, 20, 5).effective(32) == DOPPolicy(20, 19, 5)
    assert DOPPolicy(32, 32, 5).effective(32) == DOPPolicy(32, 32, 5)  # d_A = L: the outputs are the model's
    assert DOPPolicy(1, 1, 5).effective(32) == DOPPolicy(1, 0, 5)
    assert DOPPolicy(0, 3, 5).effective(32) == DOPPolicy(0, 0, 5)
    assert DOPPolicy(4, 6, 5, 2, 3).effective(32) == DOPPolicy(4, 3, 5, 2, 1)


def test_eq11_by_hand():
    """Eq. 11 for one MHA layer, written out: 8 n h d + 4 n^2 d + 6 n h m with d = h."""
    s = MODELS["llava15_7b"].arch
    n, h, m = 711, 4096, 11008
    assert layer_flops(s, n, n) == 8 * n * h * h + 4 * n * n * h + 6 * n * h * m


def test_gqa_formula_by_hand():
    s = MODELS["qwen25vl_7b"].arch
    n, h, q, kv, m = 100, 3584, 28 * 128, 4 * 128, 18944
    assert layer_flops(s, n, n) == 2 * n * h * q * 2 + 2 * n * h * kv * 2 + 2 * n * n * q * 2 + 6 * n * h * m


# budget label -> uniform visual tokens, as the paper's tables state ("= 64 Visual Tokens Every Layer")
@pytest.mark.parametrize("model", sorted(MODELS))
def test_budget_labels_reproduced(model):
    cfg = MODELS[model]
    for label, tokens in cfg.budgets.items():
        ratio = policy_tflops(cfg.arch, DOPPolicy(cfg.arch.num_layers, cfg.arch.num_layers, tokens), cfg.text_tokens)
        assert abs(ratio["ratio"] - label) <= 0.01, (model, label, tokens, ratio["ratio"])


def test_lower_bound_matches_table8():
    """Table 8 prints 'Lower Bound: Retain 18.6% TFLOPs (= 0 Visual Token)' for LLaVA-1.5-7B."""
    cfg = MODELS["llava15_7b"]
    assert round(budget_floor(cfg.arch, cfg.text_tokens) * 100, 1) == 18.6


@pytest.mark.parametrize("model", sorted(PAPER_POLICIES))
def test_paper_policies_within_budget(model):
    cfg = MODELS[model]
    for label, pol in PAPER_POLICIES[model].items():
        pol.validate(cfg.arch.num_layers, cfg.arch.visual_tokens)
        r = policy_tflops(cfg.arch, pol, cfg.text_tokens)
        assert r["ratio"] <= label, (model, label, pol, r["ratio"])
        assert r["executed_ratio"] <= r["ratio"]


def test_n_e_and_n_min():
    cfg = MODELS["llava15_7b"]
    n_e = uniform_tokens_for_budget(cfg.arch, 0.28, cfg.text_tokens)
    # brute force: the integer whose uniform ratio is closest to the budget
    full = policy_flops(cfg.arch, DOPPolicy(32, 32, None), cfg.text_tokens)
    ratios = [policy_flops(cfg.arch, DOPPolicy(32, 32, n), cfg.text_tokens) / full for n in range(1, 577)]
    best = 1 + min(range(576), key=lambda i: abs(ratios[i] - 0.28))
    assert n_e == best
    assert min_visual_tokens(cfg.arch, 0.28, cfg.text_tokens, 1.5) == 1.5 * n_e
    with pytest.raises(BudgetError, match=r"\(0, 1\]"):
        uniform_tokens_for_budget(cfg.arch, 1.5, cfg.text_tokens)


def test_executed_count_skips_dead_mlp():
    cfg = MODELS["llava15_7b"]
    p = DOPPolicy(10, 20, 100)
    paper = policy_flops(cfg.arch, p, 135)
    executed = policy_flops(cfg.arch, p, 135, executed=True)
    # by hand: MLP on 100 visual tokens in layers 9..19 (11 layers), and at layer 9 (= d_A-1, keys/values
    # only) their Q and O projections (2 x 2*100*4096*4096) and their score/value rows over 235 keys
    dead = 11 * 6 * 100 * 4096 * 11008 + 4 * 100 * 4096 * 4096 + 4 * 100 * 235 * 4096
    assert paper - executed == dead
    # d_A = L: nothing is dead
    assert policy_flops(cfg.arch, DOPPolicy(32, 32, 100), 135, executed=True) == policy_flops(cfg.arch, DOPPolicy(32, 32, 100), 135)


def test_system_depths_count():
    s = MODELS["llava15_7b"].arch
    base = policy_flops(s, DOPPolicy(32, 32, 64), 135)
    with_sys = policy_flops(s, DOPPolicy(32, 32, 64, 16, 8), 135, system_tokens=35)
    n = 135 + 64
    per_layer_attn_saving = layer_flops(s, n, 0) - layer_flops(s, n - 35, 0)
    per_layer_mlp_saving = layer_flops(s, 0, n) - layer_flops(s, 0, n - 35)
    assert base - with_sys == pytest.approx(16 * per_layer_attn_saving + 24 * per_layer_mlp_saving)


def test_arch_from_config_and_unsupported():
    from transformers import LlavaConfig

    spec = ArchSpec.from_config(LlavaConfig())
    assert (spec.num_layers, spec.hidden_size, spec.visual_tokens, spec.image_token_ids) == (32, 4096, 576, (32000,))
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        ArchSpec.from_model(object())


def test_models_yaml_consistent_with_paper_data():
    paper = yaml.safe_load(open(MODELS_PAPER_DATA)) if (MODELS_PAPER_DATA := _paper_data("models.yaml")) else None
    if paper is None:
        pytest.skip("../shared/paper_data not present")
    assert set(paper) <= set(MODELS)  # every paper model is configured; models beyond the paper have no paper data
    for name in paper:
        cfg = MODELS[name]
        assert cfg.arch.num_layers == paper[name]["layers"]
        assert cfg.sampling_depths == paper[name]["sampling_depths"]
        assert cfg.sampling_visual == paper[name]["sampling_visual"]
        assert sorted(cfg.budgets) == sorted(paper[name]["budgets"])


def _paper_data(name):
    from pathlib import Path

    p = Path(__file__).resolve().parents[2] / "shared" / "paper_data" / name
    return p if p.exists() else None


def test_cli_flops_json_matches_hand_count(capsys):
    import json

    from vlmeval_dop.cli import main

    assert main(["flops", "--model", "llava15_7b", "--policy", "26,19,97", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    h, m, t = 4096, 11008, 135

    def layer(n_a, n_p):  # Eq. 11 written out, MHA (d = h)
        return 8 * n_a * h * h + 4 * n_a * n_a * h + 6 * n_p * h * m

    vis = t + 97
    paper = 19 * layer(vis, vis) + 7 * layer(vis, t) + 6 * layer(t, t)
    full = 32 * layer(t + 576, t + 576)
    assert out["tflops"] == pytest.approx(paper / 1e12)
    assert out["full_tflops"] == pytest.approx(full / 1e12)
    assert out["ratio"] == pytest.approx(paper / full)
    assert len(out["layer_tokens"]) == 32


def test_cli_bad_input_is_one_clear_line(capsys):
    from vlmeval_dop.cli import main

    assert main(["flops", "--model", "llava15_7", "--policy", "1,1,1"]) == 2
    err = capsys.readouterr().err
    assert "did you mean llava15_7b" in err and "internvl3_8b" in err and "Traceback" not in err
    assert main(["flops", "--model", "qwen25vl_7b", "--policy", "29,1,1"]) == 2
    assert "0 <= d_A <= L=28" in capsys.readouterr().err


def test_transformers_version_gate():
    from vlmeval_dop._compat import check_transformers_version

    check_transformers_version("5.24.0")
    for bad in ("5.23.0", "5.25.0", "4.57.1"):
        with pytest.raises(ImportError, match=r"transformers >=5.24.0,<5.25.0.*found " + bad.replace(".", r"\.")):
            check_transformers_version(bad)
