"""The six paper models as data: reads eval_configs/models.yaml and eval_configs/policies.yaml."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


from .arch import ArchSpec
from .policy import DOPPolicy

CONFIG_DIR = Path(__file__).resolve().parents[1] / "eval_configs"


@dataclass(frozen=True)
class PaperModel:
    """One paper model: checkpoint, decoder shape and the paper's search/budget facts."""

    name: str
    hf_id: str
    arch: ArchSpec
    text_tokens: int
    sampling_depths: list[int]
    sampling_visual: list[int]
    alpha: float
    budgets: dict[float, int]  # TFLOPs label (fraction) -> uniform visual tokens it stands for


def _read(name: str, config_dir: Path | None) -> dict:
    path = (config_dir or CONFIG_DIR) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (eval_configs/ ships with the repository; install with pip -e .)")
    from .fileio import read_yaml  # a syntax error names the file and the fix

    return read_yaml(path, "it ships with the repository: restore it (git checkout -- eval_configs/) or fix the syntax")


@lru_cache(maxsize=None)
def load_models(config_dir: Path | None = None) -> dict[str, PaperModel]:
    """All paper models keyed by short name (llava15_7b, ..., internvl3_8b)."""
    out = {}
    for name, d in _read("models.yaml", config_dir).items():
        out[name] = PaperModel(
            name=name,
            hf_id=d["hf_id"],
            arch=ArchSpec.from_dict(d["arch"]),
            text_tokens=int(d["text_tokens"]),
            sampling_depths=list(d["sampling_depths"]),
            sampling_visual=list(d["sampling_visual"]),
            alpha=float(d["alpha"]),
            budgets={float(k): int(v) for k, v in d["budgets"].items()},
        )
    return out


def get_model(name: str, config_dir: Path | None = None) -> PaperModel:
    """One paper model; an unknown name lists the valid ones (closest first)."""
    models = load_models(config_dir)
    if name not in models:
        close = difflib.get_close_matches(name, models, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise KeyError(f"unknown model {name!r}{hint}; valid models: {', '.join(models)}")
    return models[name]


@lru_cache(maxsize=None)
def load_paper_policies(config_dir: Path | None = None) -> dict[str, dict[float, DOPPolicy]]:
    """The paper's policies (Tables 15/16): model -> budget label -> DOPPolicy."""
    raw = _read("policies.yaml", config_dir)
    return {m: {float(b): DOPPolicy(*p) for b, p in d.items()} for m, d in raw.items()}


PAPER_POLICIES = load_paper_policies()
