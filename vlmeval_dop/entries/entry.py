"""The Entry record (one `run.py --model` name) and what makes it runnable. No vlmeval import."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..policy import DOPPolicy, OperationMask

IMAGE_SIDE_REDUCERS = ("resize",)  # done by the wrappers before the processor (see models/base.py)
RESIZE_WRAPPERS = ("qwen2_5_vl", "internvl", "qwen2_vl", "internvl35", "qwen3_vl")  # wrappers doing `resize` (DOP_R)


class EntryError(KeyError):
    """An unknown or malformed entry; the message names the valid values."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ModelSpec:
    """One model an entry runs: its wrapper family and where its weights come from."""

    name: str
    wrapper: str
    hf_id: str | None = None  # Hugging Face id (paper models) ...
    tiny: str | None = None  # ... or a vlmeval_dop.tiny family (built offline)
    args: dict[str, Any] = field(default_factory=dict)
    text_tokens: int | None = None  # tiny models: non-visual tokens of the DOP_Demo prompt (for TFLOPs)

    @property
    def paper(self) -> bool:
        return self.tiny is None


@dataclass(frozen=True)
class Entry:
    """One evaluation entry.

    Attributes:
        name: the name `run.py --model` accepts.
        model: the ModelSpec it runs.
        method: `full`, `dop`, `dopv`, `dopcd`, `dopr` or a registered method's name.
        budget: the TFLOPs label as a fraction (0.28 for `..._dop28`), None for unlabelled entries.
        policy: the DOP policy, None for the unpruned model.
        reducer: visual token reduction (a vision-side method's name or `resize`), None if none.
        reducer_args: the reducer's constructor arguments (an entry's `.s3` seed, entries.yaml `reducer_args`).
        baseline: decoder-side method name (`vlmeval_dop.baselines.BASELINES`), None if none.
        baseline_args: its constructor arguments (solved budget knob, fixed arguments, seed).
        seed: the seed of a method that takes one (`{entry}.s3`), also in reducer_args / baseline_args.
        source: `paper` (generated from eval_configs/), `entries.yaml`, `searched/<file>` (a policy installed
            by `vlmeval-dop search --install`), `on demand` (any registered method at any budget), ...
    """

    name: str
    model: ModelSpec
    method: str
    budget: float | None = None
    policy: DOPPolicy | None = None
    reducer: str | None = None
    baseline: str | None = None
    baseline_args: dict[str, Any] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)
    source: str = "entries.yaml"
    required_file: str | None = None  # a file fitted offline that the entry needs (FitPrune's schedule)
    op_mask: OperationMask | None = None  # single visual operations pruned on top (`{entry}__mha4-6` names)
    reducer_args: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None

    # ------------------------------------------------------------------ availability
    def missing(self) -> tuple[str, str] | None:
        """(`reducer` | `baseline` | `file`, name) of the first thing the entry lacks, else None."""
        from ..methods import registered

        if self.reducer is not None and self.reducer not in IMAGE_SIDE_REDUCERS:
            if self.reducer not in registered("vision"):
                return "reducer", self.reducer
        if self.baseline is not None and self.baseline not in registered("decoder"):
            return "baseline", self.baseline
        if self.required_file is not None and not Path(self.required_file).exists():
            return "file", self.required_file
        return None

    def unavailable_reason(self) -> str | None:
        """None if the entry can run now, else why not (the missing reducer or baseline, by name)."""
        missing = self.missing()
        if missing is None:
            return None
        kind, name = missing
        if kind == "file":
            return (
                f"the fitted schedule {name} does not exist yet: fit it with `vlmeval-dop fitprune --model "
                f"{self.model.name} --budget {self.budget} --data <validation dataset>`"
            )
        return f"{kind} {name!r} is not registered yet ({registered_text(kind)})"

    @property
    def runnable(self) -> bool:
        return self.unavailable_reason() is None

    # ------------------------------------------------------------------ compute
    def tflops(self) -> dict[str, float] | None:
        """Paper-count TFLOPs of the entry (`vlmeval_dop.entries.budgets.entry_tflops`)."""
        from .budgets import entry_tflops

        return entry_tflops(self)

    def describe_policy(self) -> str:
        """What runs, in short: `fastv(k=2,keep=123)`, `(26,19,97) cdpruner`, `full`."""
        if self.baseline is not None:
            args = ",".join(f"{k}={Path(v).name if k == 'schedule' and isinstance(v, str) else v}"
                            for k, v in self.baseline_args.items() if k != "n_visual")
            return f"{self.baseline}({args})"
        if self.policy is None:
            return "full"
        p = self.policy
        n_v = "all" if p.n_v is None else str(p.n_v)
        extra = "".join(f",{k}={v}" for k, v in self.reducer_args.items())
        return f"({p.d_A},{p.d_P},{n_v})" + (f" {self.reducer}" if self.reducer else "") + (f"({extra[1:]})" if extra else "")


def registered_text(kind: str) -> str:
    """`registered reducers: ...` / `registered baselines: ...` for error messages."""
    from ..methods import registered

    if kind == "reducer":
        names = sorted(registered("vision")) + list(IMAGE_SIDE_REDUCERS)
        return f"registered reducers: {', '.join(names)}"
    return f"registered baselines: {', '.join(sorted(registered('decoder'))) or 'none yet'}"


@lru_cache(maxsize=None)
def tiny_arch(family: str):
    """ArchSpec of a tiny checkpoint (its config.json; the checkpoint is built offline if missing)."""
    from transformers import AutoConfig

    from ..arch import ArchSpec
    from ..tiny import TINY_VIDEO_FAMILIES, TINY_VISUAL_TOKENS, tiny_path

    config = AutoConfig.from_pretrained(tiny_path(family), local_files_only=True)
    # a video family's reference input is a video (the class's own default count: frames x patches)
    visual = None if family in TINY_VIDEO_FAMILIES else TINY_VISUAL_TOKENS[family]
    return ArchSpec.from_config(config, visual_tokens=visual)
