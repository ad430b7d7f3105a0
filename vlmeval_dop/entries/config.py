"""Reading and validating the entry configuration in eval_configs/ (data, not code). No vlmeval import.

- entries.yaml:   models (wrapper, weights), DOP variants (`methods`), the paper's DOP entries (`paper`),
                  explicit entries (`entries`), benchmark aliases;
- baselines.yaml: the paper's configuration of each baseline (`baselines`: reducer, or decoder-side fixed
                  args / fallbacks / fitted schedule file) and which baselines the paper reports per model;
- searched/<tag>.<reducer>.yaml: policies installed by `vlmeval-dop search|solve --install`.

Unknown keys, unknown models and malformed policies raise EntryError naming the valid values.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import read_yaml
from ..policy import DOPPolicy
from .entry import EntryError, ModelSpec

ENTRIES_FILE = "entries.yaml"
BASELINES_FILE = "baselines.yaml"
SEARCHED_DIR = "searched"  # eval_configs/searched/<tag>.<reducer>.yaml, written by `vlmeval-dop search --install`
SEARCH_TAG_RE = re.compile(r"^[a-z0-9]+(?:_[a-z0-9]+)*$")
CONFIG_FIX = "it ships with the repository: restore it (git checkout -- eval_configs/) or fix the syntax"

# baselines.yaml per method: a vision-side `reducer`, or a decoder-side `baseline` with fixed `args`,
# `solve_fallback` (argument changes tried when the budget cannot be met) and a fitted `schedule_file`.
# The knob the solver sets is the method's registration (vlmeval_dop.methods.register_method).
BASELINE_KEYS = {"reducer", "baseline", "args", "solve_fallback", "schedule_file"}
ENTRY_KEYS = {"model", "method", "budget", "policy", "reducer", "reducer_args", "baseline", "baseline_args", "args"}
MODEL_KEYS = {"wrapper", "tiny", "hf_id", "args", "text_tokens"}
METHOD_KEYS = {"reducer", "label"}
PAPER_KEYS = {"methods", "dop"}


def check_keys(what: str, data: Any, known: set[str]) -> dict:
    """`data` if it is a mapping with only `known` keys, else EntryError naming the valid keys."""
    if not isinstance(data, dict):
        raise EntryError(f"{what}: expected a mapping, got {data!r}")
    unknown = set(data) - known
    if unknown:
        raise EntryError(f"{what}: unknown keys {sorted(unknown)}; valid keys: {sorted(known)}")
    return data


def parse_policy(what: str, raw: Any) -> DOPPolicy | None:
    """[d_A, d_P, n_v] (or with system depths, or a mapping) -> DOPPolicy; None stays None."""
    if raw is None:
        return None
    if isinstance(raw, (list, tuple)) and len(raw) in (3, 5):
        return DOPPolicy(*raw)
    if isinstance(raw, dict):
        return DOPPolicy.from_dict(raw)
    raise EntryError(f"{what}: policy must be [d_A, d_P, n_v] (or a mapping), got {raw!r}")


@dataclass(frozen=True)
class EntriesConfig:
    """eval_configs/entries.yaml, validated."""

    path: Path
    models: dict[str, ModelSpec]
    methods: dict[str, dict]  # DOP variants: name -> {reducer, label}
    paper: dict[str, dict]  # paper model -> {methods, dop}
    entries: dict[str, dict]  # explicit entries, keys checked
    benchmarks: dict[str, str] = field(default_factory=dict)


def read_entries_config(cfg_dir: Path, config_dir: Path | None = None) -> EntriesConfig:
    """Parse entries.yaml of `cfg_dir` (models with known wrappers; paper models take their checkpoint from
    models.yaml, read from `config_dir`, None = models_config's default)."""
    from ..models import WRAPPERS
    from ..models_config import load_models

    path = cfg_dir / ENTRIES_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (eval_configs/ ships with the repository)")
    raw = read_yaml(path, CONFIG_FIX) or {}
    check_keys(str(path), raw, {"models", "methods", "paper", "entries", "benchmarks"})
    paper_models = load_models(config_dir)
    models: dict[str, ModelSpec] = {}
    for name, d in (raw.get("models") or {}).items():
        d = check_keys(f"models.{name}", d, MODEL_KEYS)
        if d.get("wrapper") not in WRAPPERS:
            raise EntryError(f"models.{name}: wrapper {d.get('wrapper')!r} unknown; valid: {', '.join(WRAPPERS)}")
        hf_id, tiny = d.get("hf_id"), d.get("tiny")
        if tiny is None and hf_id is None:
            if name not in paper_models:
                raise EntryError(
                    f"models.{name}: give `hf_id` or `tiny`, or use a paper model name ({', '.join(paper_models)})"
                )
            hf_id = paper_models[name].hf_id
        models[name] = ModelSpec(
            name, d["wrapper"], hf_id=hf_id, tiny=tiny, args=dict(d.get("args") or {}), text_tokens=d.get("text_tokens")
        )
    methods = {name: check_keys(f"methods.{name}", d, METHOD_KEYS) for name, d in (raw.get("methods") or {}).items()}
    paper = {name: check_keys(f"paper.{name}", d, PAPER_KEYS) for name, d in (raw.get("paper") or {}).items()}
    entries = {name: check_keys(f"entries.{name}", d, ENTRY_KEYS) for name, d in (raw.get("entries") or {}).items()}
    return EntriesConfig(path, models, methods, paper, entries, dict(raw.get("benchmarks") or {}))


@dataclass(frozen=True)
class BaselinesConfig:
    """eval_configs/baselines.yaml, validated: per-method configuration and the paper's lists."""

    path: Path
    recipes: dict[str, dict]
    paper: dict[str, list[str]]


def read_baselines_config(cfg_dir: Path) -> BaselinesConfig:
    """Parse baselines.yaml (an absent file: no paper baselines)."""
    path = cfg_dir / BASELINES_FILE
    if not path.exists():
        return BaselinesConfig(path, {}, {})
    raw = check_keys(str(path), read_yaml(path, CONFIG_FIX) or {}, {"baselines", "paper"})
    recipes = {n: check_keys(f"{path.name}: baselines.{n}", d, BASELINE_KEYS)
               for n, d in (raw.get("baselines") or {}).items()}
    for n, d in recipes.items():
        if bool(d.get("reducer")) == bool(d.get("baseline")):
            raise EntryError(f"{path.name}: baselines.{n} needs exactly one of `reducer` (vision side) or "
                             "`baseline` (decoder side)")
    return BaselinesConfig(path, recipes, {m: list(v or []) for m, v in (raw.get("paper") or {}).items()})


def read_searched_file(path: Path) -> tuple[str, str, dict[str, dict]]:
    """(tag, reducer, {model: {budget: raw policy}}) of eval_configs/searched/<tag>.<reducer>.yaml."""
    tag, _, reducer = path.stem.partition(".")
    if not reducer or not SEARCH_TAG_RE.match(tag):
        raise EntryError("searched policy files are named <tag>.<reducer>.yaml")
    data = read_yaml(path, "fix the file or delete it") or {}
    if not isinstance(data, dict):
        raise EntryError(f"expected a mapping of model -> {{budget: [d_A, d_P, n_v]}}, got {type(data).__name__}")
    for model_name, budgets in data.items():
        if not isinstance(budgets, dict):
            raise EntryError(f"{model_name}: expected a mapping of budget -> [d_A, d_P, n_v], got {budgets!r}")
    return tag, reducer, data
