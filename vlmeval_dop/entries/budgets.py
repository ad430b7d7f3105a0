"""Budget solving and an entry's analytic compute. No vlmeval import.

A TFLOPs label (a fraction of the unpruned model's decoder prefill FLOPs, paper Eq. 11) is matched as the
paper matches its baselines ("our comparison matches actual TFLOPs and notes the per-layer token counts"):

- `n_e`: the uniform visual token count the label stands for: the model's table (eval_configs/models.yaml
  `budgets`) where it has the label, else the largest n whose policy (L, L, n) stays within the label.
- vision-side methods keep n_e tokens in every layer: policy (L, L, n_e);
- decoder-side methods get their registered budget knob set to the largest value whose analytic FLOPs
  (their class's `layer_tokens` + flops.schedule_flops) do not exceed those of n_e tokens in every layer.

Infeasible budgets raise BudgetInfeasible with the numbers.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

from ..methods import init_params
from ..policy import DOPPolicy
from .entry import Entry, EntryError, ModelSpec, tiny_arch


class BudgetInfeasible(EntryError):
    """A (model, method, budget) the method cannot meet; the message gives the numbers."""


@dataclass(frozen=True)
class ModelShape:
    """What budget solving needs of a model: decoder shape, representative text tokens, budget table."""

    name: str
    arch: Any  # ArchSpec
    text_tokens: int | None
    budgets: dict[float, int]


def model_shape(model: ModelSpec) -> ModelShape:
    """Paper models (and those beyond the paper): models.yaml shapes, text tokens and budget table. Tiny
    models: their checkpoint's config, the DOP_Demo image's visual tokens, entries.yaml `text_tokens`, no table."""
    from ..models_config import load_models

    if model.paper:
        pm = load_models().get(model.name)
        if pm is None:
            raise EntryError(f"model {model.name!r} has no shape in eval_configs/models.yaml")
        return ModelShape(model.name, pm.arch, pm.text_tokens, dict(pm.budgets))
    return ModelShape(model.name, tiny_arch(model.tiny), model.text_tokens, {})


def uniform_ratio(arch, text_tokens: int, n: int) -> float:
    """TFLOPs ratio of policy (L, L, n): n visual tokens in every layer."""
    from ..flops import full_flops, schedule_flops

    return schedule_flops(arch, [(text_tokens + n,) * 2] * arch.num_layers) / full_flops(arch, text_tokens)


def visual_budget(shape: ModelShape, budget: float) -> int:
    """n_e of `budget` on the model: its table's value, else the largest n with TFLOPs(L, L, n) <= budget."""
    if budget in shape.budgets:
        return shape.budgets[budget]
    if shape.text_tokens is None:
        raise EntryError(f"{shape.name}: no `text_tokens` in eval_configs/entries.yaml, so no TFLOPs to solve against")
    if not 0.0 < budget <= 1.0:
        raise BudgetInfeasible(f"budget {budget} is not a fraction of the full model's TFLOPs in (0, 1]")
    N, text = shape.arch.visual_tokens, shape.text_tokens
    floor = uniform_ratio(shape.arch, text, 0)
    if floor > budget:
        raise BudgetInfeasible(
            f"{100 * budget:g} % TFLOPs is below {shape.name}'s floor: without any visual token it runs "
            f"{100 * floor:.1f} % ({text} text tokens, {N} visual tokens unpruned)")
    lo, hi = 0, N  # largest n with ratio(n) <= budget (monotone in n)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if uniform_ratio(shape.arch, text, mid) <= budget else (lo, mid - 1)
    return lo


def solve_knob(info, shape: ModelShape, n_e: int, args: dict, label: str = "") -> dict:
    """`args` with the method's budget knob set to the largest value whose analytic FLOPs stay within n_e
    tokens in every layer (integers for integer bounds, ratios rounded down to 1e-4). BudgetInfeasible if
    even the smallest value exceeds it."""
    from ..flops import schedule_flops

    cls, knob = info.cls, info.budget_knob
    spec, L, N, text = shape.arch, shape.arch.num_layers, shape.arch.visual_tokens, shape.text_tokens
    target = schedule_flops(spec, [(text + n_e, text + n_e)] * L)
    lo, hi = [N if b == "n_visual" else b for b in (info.knob_range or [0, "n_visual"])]

    def cost(value) -> float:
        return schedule_flops(spec, call_layer_tokens(cls, L, N, text, {**args, knob: value}))

    integer = isinstance(lo, int) and isinstance(hi, int)
    if cost(lo) > target:
        full = schedule_flops(spec, [(text + N,) * 2] * L)
        raise BudgetInfeasible(
            f"{label or info.name}{args} cannot meet the TFLOPs of {n_e} visual tokens in every layer on "
            f"{shape.name} for any {knob} in [{lo}, {hi}] (at {knob}={lo}: {100 * cost(lo) / full:.1f} % of the "
            f"full model's TFLOPs, the budget allows {100 * target / full:.1f} %)")
    while (hi - lo > 1) if integer else (hi - lo > 1e-4):  # cost is monotone in the kept amount
        mid = (lo + hi) // 2 if integer else (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= target else (lo, mid)
    best = hi if cost(hi) <= target else lo
    params = init_params(cls)
    extra = {"n_visual": N} if params is not None and "n_visual" in params else {}
    # ratios rounded *down* to 4 decimals: still within the budget (cost grows with the kept amount)
    return {**args, **extra, knob: best if integer else math.floor(best * 1e4) / 1e4}


def call_layer_tokens(cls, num_layers: int, n_visual: int, text_tokens: int, args: dict) -> list:
    """`cls.layer_tokens(num_layers, n_visual, text_tokens, **args)` with the arguments it takes: entry
    arguments that do not change the counts (a seed, `n_visual` given to the constructor) are left out."""
    fn = cls.layer_tokens
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    if sig is not None and not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        names = list(sig.parameters)[3:]
        args = {k: v for k, v in args.items() if k in names}
    return fn(num_layers, n_visual, text_tokens, **args)


def entry_layer_tokens(entry: Entry) -> list[tuple[int, ...]] | None:
    """The entry's per-layer (n_A, n_P) prefill token counts for the analytic FLOPs; None when they cannot
    be known (a decoder-side method without a `layer_tokens` cost model, an unfitted FitPrune schedule, a
    tiny model without `text_tokens`)."""
    from ..flops import layer_token_counts
    from ..methods import registered

    try:
        shape = model_shape(entry.model)
    except EntryError:
        return None
    spec, text = shape.arch, shape.text_tokens
    if text is None:
        return None
    if entry.baseline is not None:
        args = {k: v for k, v in entry.baseline_args.items() if k not in ("n_visual", "budget")}
        try:
            if entry.baseline == "fitprune":
                from ..baselines.fitprune import as_schedule

                return as_schedule(args["schedule"]).layer_tokens(text, spec.visual_tokens)
            info = registered("decoder").get(entry.baseline)
            if info is None or not info.has_cost_model:
                return None
            return call_layer_tokens(info.cls, spec.num_layers, spec.visual_tokens, text, args)
        except (ValueError, KeyError, TypeError, OSError):  # e.g. a FitPrune schedule not fitted yet
            return None
    policy = entry.policy or DOPPolicy.full(spec.num_layers)
    return layer_token_counts(spec, policy, text)


def entry_tflops(entry: Entry) -> dict[str, float] | None:
    """Analytic decoder prefill TFLOPs of an entry (what `vlmeval-dop list` prints): {tflops, full_tflops,
    ratio, executed_tflops, executed_ratio}; None when its per-layer token counts cannot be known.

    Paper models use their shapes and representative text tokens (models.yaml). Tiny models use their
    checkpoint's config (built offline on first use), the visual tokens of a 224x224 image
    (`tiny.TINY_VISUAL_TOKENS`, the DOP_Demo image size) and `text_tokens` from entries.yaml. DOP policies
    count as paper Eq. 11 (`flops.policy_tflops`, with the executed variant); decoder-side methods by their
    class's per-layer token counts.
    """
    from ..flops import full_flops, policy_tflops, schedule_flops

    if entry.baseline is None:
        try:
            shape = model_shape(entry.model)
        except EntryError:
            return None
        if shape.text_tokens is None:
            return None
        policy = entry.policy or DOPPolicy.full(shape.arch.num_layers)
        return policy_tflops(shape.arch, policy, shape.text_tokens)
    counts = entry_layer_tokens(entry)
    if counts is None:
        return None
    shape = model_shape(entry.model)
    tf, full = schedule_flops(shape.arch, counts), full_flops(shape.arch, shape.text_tokens)
    return {"tflops": tf / 1e12, "full_tflops": full / 1e12, "ratio": tf / full,
            "executed_tflops": tf / 1e12, "executed_ratio": tf / full}
