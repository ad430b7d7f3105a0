"""FitPrune (Ye et al., AAAI 2025, "Fit and Prune: Fast and Training-free Visual Token Pruning for
Multi-modal Large Language Models"; official code github.com/ywh187/FitPrune), decoder-side.

Two parts, as in the paper:

* Fitting (offline, `fit_fitprune_schedule`): on a small calibration set, the attention the visual tokens
  receive is measured in every layer of the unpruned model, from the instruction tokens after the image
  ("cross") and from the visual tokens themselves ("self"), on the head-wise maximum attention map. For a
  tolerance alpha, every layer drops the visual tokens whose removal keeps the remaining cross and self mass
  above (1 - alpha) x the unpruned mass (the intersection of the two lowest-ranked sets); pruning stops at
  the first layer where the FLOPs of "no more pruning from here" fit the budget. A binary search over alpha
  in [0, 1] (official step 0.01) finds the smallest alpha that meets the budget; the result, the per-layer
  visual token counts averaged over the calibration set, is the recipe (JSON/YAML data).
* Inference (`FitPrune`): each layer where the recipe shrinks drops the visual tokens with the smallest
  cross x self attention product (head-wise maximum map, as the official `attn_cross_attention *
  attn_self_attention`) down to the recipe's count.

Attention rows are recomputed from the layer's q/k projections (like `attention.query_attention`, but the
official code reduces heads by max, not mean), so the model keeps sdpa attention.

Matched against the official code on golden inputs (tests/golden/fitprune/README.md, a 16-layer LLaMA decoder
under a LLaVA-1.5-shaped sequence): with the official delete schemes of 50 / 70 / 90 % (first 16 layers, via
`FitPruneSchedule.from_official_scheme`) the tokens dropped at every layer and the logits equal the official
inference for 3 seeds; the fitting rule drops the same tokens at every layer as the official `fit_model` for 3
calibration samples x alpha 0.02 / 0.05 / 0.1. Kept tokens keep their original positions, as in the official code.

Differences from the official code (`llava/eval/statistical_analysis.py`, `modeling_llama.py`):
- Timing: the official code removes tokens inside layer l, after its attention (so layer l's MLP already
  runs without them); this executor drops after layer l (layer l+1 on). The MLP is per token, so the kept
  tokens, their states and the outputs are the same; only layer l's MLP also runs on the dropped tokens (in
  our FLOPs count). The fitting simulates exactly what the executor runs, so recipe and FLOPs agree.
- Budget: a fraction of the full decoder prefill FLOPs of `flops.schedule_flops` with `text_tokens`
  non-visual tokens (default: the calibration mean). `text_tokens=0` gives the official accounting, which
  counts visual tokens only (its MAC formula is proportional to ours).
- Aggregation: the official recipe is the floor of the mean per-layer deletions, checked against the mean
  per-sample FLOPs, so the applied recipe can exceed the budget slightly; here the recipe is the floor of
  the mean per-layer kept counts and the stop rule is checked on that recipe itself, so it always fits.
- The official search returns the recipe of the last alpha tried (possibly one over budget); here the one of
  the smallest alpha found to meet the budget. The official per-layer search also never deletes every
  token (and reads a stale count in that case); here up to all of them.
- Calibration samples with different visual token counts (LLaVA-NeXT anyres) are rescaled to the largest
  count; at inference a sample with n visual tokens keeps round(kept x n / n_visual) per layer.
- No instruction tokens after the image (cross undefined): the self term alone ranks the tokens.
- Fitting precision: for float16/bfloat16 models the fitting rule reads the maps in the model dtype too (the
  same `visual_attention`), with its sums and deletion search in float32; checked against the official
  `fit_model` in float32 only.

Precision: the maps follow the model dtype as the official code reads its eager layer's weights (float16 on GPU):
float32 models in float32; float16/bfloat16 models with scores, head max, self and cross sums and the
`sort(cross * self)` in that dtype (`VisualAttention.rank`). Matched in float16 too (tests/golden/fitprune/README.md,
the official inference on the float16 model: the tokens dropped at every layer and the logits equal for the 3
seeds x 50 / 70 / 90 %; with float32 maps 7 / 9 cases, 130 / 135 per-layer sets).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers.models.llama.modeling_llama import repeat_kv

from ..executor.families import causal_families
from ..executor.token_pruner import DecoderPruneContext
from .attention import (
    eager_scores,
    eager_softmax,
    project_keys,
    project_queries,
    refuse_bidirectional_or_windowed,
    rope_function,
)
from ..methods import register_method

# ---------------------------------------------------------------------------------------- attention


@dataclass
class VisualAttention:
    """Head-max attention the live visual tokens of one sample receive in one layer.

    Attributes:
        positions: (c,) sequence positions of the live visual tokens (ascending).
        cross: (c,) attention from the instruction tokens after the first visual token, summed over those
            queries and divided by their count (official `focus_attn_weights`).
        self_: (c,) attention from the live visual tokens, summed and divided by c (official
            `attn_weights_img_part`).
        n_text: instruction queries used (0: no cross term).
        rank: (c,) the official inference score in the model's dtype for float16/bfloat16 models (undivided
            cross sum x self, both summed in that dtype, as the official code computes it), else None (then
            `cross * self_` in float32 ranks).
    """

    positions: torch.Tensor
    cross: torch.Tensor
    self_: torch.Tensor
    n_text: int
    rank: torch.Tensor | None = None


def visual_attention(ctx: DecoderPruneContext) -> list[VisualAttention | None]:
    """Per sample, the cross/self attention received by the live visual tokens in layer `ctx.layer_idx`.

    Recomputed from `input_layernorm`, `q_proj`, `k_proj` and the layer's RoPE tables: softmax over the
    keys that took part in the layer (causal, no padding), then the maximum over heads. None for a sample
    without live visual tokens.
    """
    refuse_bidirectional_or_windowed(ctx, "FitPrune")  # its visual queries would need both
    layer, attn = ctx.layer, ctx.layer.self_attn
    rope = rope_function(attn)
    usable = ctx.alive & ctx.pad_valid
    cos_all, sin_all = ctx.position_embeddings
    out: list[VisualAttention | None] = []
    for b in range(ctx.hidden_in.shape[0]):
        vis = torch.nonzero(ctx.visual[b] & usable[b]).flatten()
        if vis.numel() == 0:
            out.append(None)
            continue
        keys = torch.nonzero(usable[b]).flatten()
        after = torch.arange(usable.shape[1], device=vis.device) > vis[0]
        txt = torch.nonzero(~ctx.visual[b] & usable[b] & after).flatten()
        queries = torch.cat([vis, txt])
        cb, sb = cos_all[min(b, cos_all.shape[0] - 1)], sin_all[min(b, sin_all.shape[0] - 1)]
        x = layer.input_layernorm(ctx.hidden_in[b])
        q, k = project_queries(attn, x[None, queries]), project_keys(attn, x[None, keys])
        q, _ = rope(q, q, cb[None, queries], sb[None, queries])
        _, k = rope(k, k, cb[None, keys], sb[None, keys])
        k = repeat_kv(k, q.shape[1] // k.shape[1])
        # float32 models: float32 maps; float16/bfloat16: the official eager weights in the model dtype (scores
        # q k^T / sqrt(d), softmax in float32 cast back, head max and the sums in that dtype)
        low = q.dtype in (torch.float16, torch.bfloat16)
        scores = eager_scores((q @ k.transpose(-1, -2))[0], attn)  # (heads, Q, K)
        scores = scores.masked_fill(~(keys[None, :] <= queries[:, None])[None], float("-inf"))
        probs = eager_softmax(scores, q.dtype).amax(dim=0)  # head-wise max, the official "mix attention map"
        on_vis = probs[:, torch.searchsorted(keys, vis)]  # (Q, c) columns of the visual keys
        c, t = vis.numel(), txt.numel()
        if low:  # official order: self = ([vis, vis] / n).sum(0), cross = [txt, vis].sum(0), rank = cross * self
            self_, cross_sum = (on_vis[:c] / c).sum(0), on_vis[c:].sum(0)
            cross = cross_sum.float() / t if t else torch.zeros(c, device=probs.device)
            out.append(VisualAttention(vis, cross, self_.float(), t, rank=cross_sum * self_ if t else self_))
            continue
        cross = on_vis[c:].sum(0) / t if t else torch.zeros(c, device=probs.device)
        out.append(VisualAttention(vis, cross, on_vis[:c].sum(0) / c, t))
    return out


def fitprune_selection_flops(spec, n_tokens: int, n_queries: int) -> float:
    """FLOPs of one recomputed attention map (Q and K projections, Q x K scores per head) in one layer.

    `n_tokens`: keys (the sample's tokens in that layer); `n_queries`: live visual + instruction tokens.
    The official code reads the maps from eager attention instead.
    """
    h, q, kv = spec.hidden_size, spec.q_dim, spec.kv_dim
    return 2.0 * n_queries * h * q + 2.0 * n_tokens * h * kv + 2.0 * n_queries * n_tokens * q


def rank_for_drop(stats: VisualAttention) -> torch.Tensor:
    """Local indices (into `stats.positions`) from first to last to drop at inference: ascending
    cross x self (official), or self alone without instruction tokens; ties by position. With `stats.rank`
    (float16/bfloat16 models) the official `torch.sort(cross * self)` on it in the model dtype, ties included."""
    if stats.rank is not None:
        return torch.sort(stats.rank, dim=-1).indices
    score = stats.cross * stats.self_ if stats.n_text else stats.self_
    return torch.sort(score, stable=True).indices


def max_deletions(values: torch.Tensor, floor: float) -> tuple[torch.Tensor, int]:
    """Ascending order of `values` and the most of the smallest that can go while the sum of the rest
    stays >= `floor` (the official per-layer rule `sum - removed >= W - alpha W`)."""
    order = torch.sort(values, stable=True).indices
    sorted_vals = values[order].double()
    # remaining[k] = sum of the values left after deleting the k smallest (remaining[c] = 0 exactly)
    remaining = torch.cat([torch.flip(torch.cumsum(torch.flip(sorted_vals, [0]), 0), [0]), sorted_vals.new_zeros(1)])
    return order, int((remaining[1:] >= floor).sum())


def fit_deletions(stats: VisualAttention, ref_cross: float, ref_self: float, alpha: float) -> torch.Tensor:
    """Local indices FitPrune's fitting deletes in one layer of one sample for tolerance alpha.

    The intersection of the largest low-cross set and the largest low-self set whose removal keeps each
    mass >= (1 - alpha) x its unpruned value (`ref_*`); without instruction tokens, the self set alone.
    """
    self_order, n_self = max_deletions(stats.self_, (1.0 - alpha) * ref_self)
    del_self = self_order[:n_self]
    if not stats.n_text:
        return del_self.sort().values
    cross_order, n_cross = max_deletions(stats.cross, (1.0 - alpha) * ref_cross)
    both = torch.zeros(stats.positions.numel(), dtype=torch.int8, device=stats.positions.device)
    both[cross_order[:n_cross]] += 1
    both[del_self] += 1
    return torch.nonzero(both == 2).flatten()


# ---------------------------------------------------------------------------------------- schedule


@dataclass
class FitPruneSchedule:
    """A fitted FitPrune recipe: `kept[i]` visual tokens per sample in decoder layer i.

    Attributes:
        kept: per layer (MHA and MLP alike), non-increasing, `kept[0] == n_visual`.
        n_visual: visual tokens the recipe was fitted for (samples with other counts are rescaled).
        budget / alpha / text_tokens / n_samples: how it was fitted (metadata; None when hand-written).
    """

    kept: list[int]
    n_visual: int | None = None
    budget: float | None = None
    alpha: float | None = None
    text_tokens: int | None = None
    n_samples: int | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.kept, (str, bytes)) or not hasattr(self.kept, "__len__") or len(self.kept) < 1:
            raise ValueError(f"FitPrune schedule needs a non-empty list of per-layer visual token counts, got {self.kept!r}")
        if any(not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0 for v in self.kept):
            raise ValueError(f"FitPrune schedule counts must be integers >= 0, got {list(self.kept)}")
        self.kept = [int(v) for v in self.kept]
        if any(b > a for a, b in zip(self.kept, self.kept[1:])):
            raise ValueError(f"FitPrune schedule must be non-increasing (tokens are only dropped), got {self.kept}")
        if self.n_visual is None:
            self.n_visual = self.kept[0]
        if self.kept[0] != self.n_visual:
            raise ValueError(
                f"FitPrune schedule must keep all n_visual={self.n_visual} tokens in layer 0 (the decoder-side "
                f"hook drops after a layer), got kept[0]={self.kept[0]}"
            )

    @property
    def num_layers(self) -> int:
        return len(self.kept)

    def kept_for(self, n_visual: int) -> list[int]:
        """Per-layer kept counts for a sample with `n_visual` visual tokens (rescaled, rounded half up)."""
        if n_visual == self.n_visual or self.n_visual == 0:
            return [min(v, n_visual) for v in self.kept]
        return [min(n_visual, math.floor(v * n_visual / self.n_visual + 0.5)) for v in self.kept]

    def layer_tokens(self, text_tokens: int, n_visual: int | None = None) -> list[tuple[int, int]]:
        """Per-layer (n_A, n_P) for the analytic FLOPs model (`flops.schedule_flops`)."""
        kept = self.kept if n_visual is None else self.kept_for(n_visual)
        return [(text_tokens + v,) * 2 for v in kept]

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and v != {}}

    @classmethod
    def from_dict(cls, data: dict) -> "FitPruneSchedule":
        valid = {"kept", "n_visual", "budget", "alpha", "text_tokens", "n_samples", "meta"}
        bad = set(data) - valid
        if bad or "kept" not in data:
            raise ValueError(f"FitPrune schedule data needs 'kept' and only keys {sorted(valid)}; got {sorted(data)}")
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        """Write as JSON, or YAML for a .yaml/.yml suffix."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FitPruneSchedule":
        """Read a schedule written by `save` (.json, .yaml or .yml)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"FitPrune schedule file {str(path)!r} does not exist")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return cls.from_dict(yaml.safe_load(path.read_text()))
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_official_scheme(cls, delete_scheme: dict[int, int], n_visual: int = 576) -> "FitPruneSchedule":
        """Convert an official `delete_scheme` ({layer: tokens removed inside that layer}) to our form.

        Deletions of layer l take effect from layer l+1 here (see the module docstring); those of the last
        layer change nothing and are ignored.
        """
        L = len(delete_scheme)
        kept, n = [n_visual], n_visual
        for layer in range(L - 1):
            n = max(0, n - int(delete_scheme[layer]))
            kept.append(n)
        return cls(kept, n_visual=n_visual)


def as_schedule(schedule) -> FitPruneSchedule:
    """Accept a FitPruneSchedule, a list of kept counts, its dict form or a .json/.yaml path."""
    if isinstance(schedule, FitPruneSchedule):
        return schedule
    if isinstance(schedule, (str, Path)):
        return FitPruneSchedule.load(schedule)
    if isinstance(schedule, dict):
        return FitPruneSchedule.from_dict(schedule)
    if isinstance(schedule, (list, tuple)):
        return FitPruneSchedule(list(schedule))
    raise ValueError(
        f"FitPrune schedule must be a FitPruneSchedule, a list of per-layer kept counts, its dict form or a "
        f".json/.yaml path; got {type(schedule).__name__}"
    )


# ---------------------------------------------------------------------------------------- inference


def _fitprune_cost(spec, args: dict, counts, n_visual: int, text_tokens: int) -> float:
    """Selection FLOPs of one sample (registration's cost model): the visual attention rows of every layer
    after which the fitted schedule drops tokens."""
    return sum(fitprune_selection_flops(spec, counts[i][0], counts[i][0])
               for i in range(len(counts) - 1) if counts[i + 1][0] < counts[i][0])  # fmt: skip


@register_method("fitprune", kind="decoder", budget_arg="budget", selection_cost=_fitprune_cost)
class FitPrune:
    """FitPrune at inference: `apply_dop(model, DOPPolicy.full(L), token_pruner=FitPrune(schedule))`.

    Args:
        schedule: the fitted recipe (`fit_fitprune_schedule`'s result, a list of per-layer kept visual
            token counts, its dict form or a saved .json/.yaml path). Its length must be the decoder's L.
        budget: optional; if given it must match the budget the schedule was fitted for (a guard for
            entries that name a budget). Without a schedule, a ValueError explains how to fit one.
    """

    official_attention = "eager"  # the official code reads every layer's eager attention weights

    families = causal_families()  # its visual queries' rows model plain causal attention only

    name = "fitprune"

    def __init__(self, schedule=None, budget: float | None = None):
        if schedule is None:
            raise ValueError(
                "FitPrune needs a fitted schedule: run vlmeval_dop.baselines.fitprune.fit_fitprune_schedule("
                f"model, calibration_inputs, budget={budget}) and pass schedule=<the result, its list of kept "
                "counts or a saved .json/.yaml path>"
            )
        self.schedule = as_schedule(schedule)
        if budget is not None and self.schedule.budget is not None and abs(budget - self.schedule.budget) > 1e-9:
            raise ValueError(f"FitPrune schedule was fitted for budget {self.schedule.budget}, not {budget}")
        kept = self.schedule.kept
        self.layers = tuple(i for i in range(len(kept) - 1) if kept[i + 1] < kept[i])

    def select(self, ctx: DecoderPruneContext) -> torch.Tensor:
        """Drop, per sample, the live visual tokens with the smallest cross x self attention in this
        layer down to the recipe's count for the next layer."""
        L = ctx.model.config.get_text_config(decoder=True).num_hidden_layers
        if L != self.schedule.num_layers:
            raise ValueError(f"FitPrune schedule has {self.schedule.num_layers} layers, the model has {L}")
        drop = torch.zeros_like(ctx.visual)
        n_vis = ctx.visual.sum(1).tolist()
        for b, stats in enumerate(visual_attention(ctx)):
            if stats is None:
                continue
            target = self.schedule.kept_for(int(n_vis[b]))[ctx.layer_idx + 1]
            excess = stats.positions.numel() - target
            if excess > 0:
                drop[b, stats.positions[rank_for_drop(stats)[:excess]]] = True
        return drop

    @staticmethod
    def layer_tokens(num_layers: int, n_visual: int, text_tokens: int, schedule=None, budget=None) -> list[tuple[int, int]]:
        """Per-layer (n_A, n_P) for the analytic TFLOPs of a given schedule."""
        s = FitPrune(schedule, budget).schedule
        if s.num_layers != num_layers:
            raise ValueError(f"FitPrune schedule has {s.num_layers} layers, the model has {num_layers}")
        return s.layer_tokens(text_tokens, n_visual)


# ---------------------------------------------------------------------------------------- fitting


class _Recorder:
    """Pruner used while fitting: records per-layer visual attention and, with `alpha`, applies the
    fitting rule (`fit_deletions`) after every layer but the last."""

    name = "fitprune_fit"

    def __init__(self, num_layers: int, alpha: float | None = None, reference=None):
        self.layers = tuple(range(num_layers - 1))
        self.alpha, self.reference = alpha, reference
        self.batch = 0  # index of the calibration input being run
        self.records: dict[tuple[int, int], dict[int, tuple[float, float, int]]] = {}

    def select(self, ctx: DecoderPruneContext) -> torch.Tensor | None:
        drop = torch.zeros_like(ctx.visual) if self.alpha is not None else None
        for b, stats in enumerate(visual_attention(ctx)):
            key = (self.batch, b)
            if stats is None:
                continue
            rec = self.records.setdefault(key, {})
            rec[ctx.layer_idx] = (float(stats.cross.sum()), float(stats.self_.sum()), stats.positions.numel())
            if self.alpha is not None:
                ref_cross, ref_self, _ = self.reference[key][ctx.layer_idx]
                gone = fit_deletions(stats, ref_cross, ref_self, self.alpha)
                drop[b, stats.positions[gone]] = True
                rec[ctx.layer_idx + 1] = (0.0, 0.0, stats.positions.numel() - gone.numel())
        return drop


def _run(model, calibration_inputs, recorder: _Recorder) -> None:
    from .. import DOPPolicy, apply_dop

    L = model.config.get_text_config(decoder=True).num_hidden_layers
    with apply_dop(model, DOPPolicy.full(L), token_pruner=recorder), torch.no_grad():
        for i, inputs in enumerate(calibration_inputs):
            recorder.batch = i
            model(**inputs, use_cache=False)


def _aggregate(counts: dict, n_visual: dict, n_ref: int, L: int) -> list[int]:
    """Floor of the mean per-layer kept counts, each sample rescaled to `n_ref` visual tokens."""
    per_sample = []
    for key, rec in counts.items():
        scale = n_ref / n_visual[key]
        row, n = [], n_visual[key]
        for layer in range(L):
            n = rec.get(layer, (0, 0, n))[2]
            row.append(n * scale)
        per_sample.append(row)
    mean = np.mean(np.asarray(per_sample), axis=0)
    return [int(math.floor(v + 1e-9)) for v in mean]


def _stop(kept: list[int], spec, text_tokens: int, limit: float) -> list[int] | None:
    """The official stop rule on a recipe: the first layer l where pruning nothing from l on fits the
    budget; the recipe with layers l.. frozen at kept[l], or None if no layer does."""
    from ..flops import schedule_flops

    L = len(kept)
    for layer in range(L):
        frozen = kept[:layer] + [kept[layer]] * (L - layer)
        if schedule_flops(spec, [(text_tokens + v,) * 2 for v in frozen]) <= limit:
            return frozen
    return None


def fit_fitprune_schedule(
    model,
    calibration_inputs,
    budget: float,
    *,
    text_tokens: int | None = None,
    tol: float = 0.01,
) -> FitPruneSchedule:
    """Fit FitPrune's per-layer recipe on a calibration set so that it meets a FLOPs budget.

    Args:
        model: a supported MLLM (any attention implementation the executor supports).
        calibration_inputs: a list of processor outputs (dicts of tensors, any batch size), e.g. the
            paper's small validation set (the official default: ~0.01 % of LLaVA-665k).
        budget: fraction of the full decoder prefill FLOPs (0, 1] the recipe may use.
        text_tokens: non-visual tokens counted by the FLOPs model; default the calibration mean, 0 for the
            official visual-only accounting.
        tol: binary-search resolution on alpha (official 0.01).

    Returns:
        The recipe of the smallest alpha found to meet the budget; `schedule_flops` of its
        `layer_tokens(text_tokens)` is <= budget x the full model's. Deterministic for fixed inputs.

    Raises:
        ValueError: budget outside (0, 1], no calibration input or visual token, tol outside (0, 1), or a
            budget below the cheapest recipe (all visual tokens dropped after layer 0).
    """
    from ..arch import ArchSpec
    from ..flops import schedule_flops

    if not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise ValueError(f"FitPrune budget must be a fraction of the full model's FLOPs in (0, 1], got {budget!r}")
    if not 0.0 < tol < 1.0:
        raise ValueError(f"FitPrune tol must be in (0, 1), got {tol!r}")
    calibration_inputs = list(calibration_inputs)
    if not calibration_inputs:
        raise ValueError("fit_fitprune_schedule needs at least one calibration input")
    L = model.config.get_text_config(decoder=True).num_hidden_layers

    reference = _Recorder(L)
    _run(model, calibration_inputs, reference)
    if not reference.records:
        raise ValueError("fit_fitprune_schedule: the calibration inputs contain no visual tokens")
    n_visual = {key: rec[0][2] for key, rec in reference.records.items()}
    n_ref = max(n_visual.values())
    if text_tokens is None:
        texts = []
        for i, inputs in enumerate(calibration_inputs):
            real = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones_like(inputs["input_ids"], dtype=torch.bool)
            for b in range(inputs["input_ids"].shape[0]):
                if (i, b) in n_visual:
                    texts.append(int(real[b].sum()) - n_visual[(i, b)])
        text_tokens = int(round(float(np.mean(texts))))
    spec = ArchSpec.from_model(model)
    limit = budget * schedule_flops(spec, [(text_tokens + n_ref,) * 2] * L)

    meta = dict(n_visual=n_ref, budget=float(budget), text_tokens=text_tokens, n_samples=len(n_visual))
    if _stop([n_ref] * L, spec, text_tokens, limit) is not None:  # budget >= 1: nothing to prune
        return FitPruneSchedule([n_ref] * L, alpha=0.0, **meta)
    cheapest = [n_ref] + [0] * (L - 1)
    if _stop(cheapest, spec, text_tokens, limit) is None:
        floor = schedule_flops(spec, [(text_tokens + v,) * 2 for v in cheapest]) / (limit / budget)
        raise ValueError(
            f"FitPrune budget {budget} is below the cheapest recipe (all visual tokens dropped after layer 0: "
            f"{floor:.4f} of the full FLOPs)"
        )

    def attempt(alpha: float) -> list[int] | None:
        rec = _Recorder(L, alpha, reference.records)
        _run(model, calibration_inputs, rec)
        return _stop(_aggregate(rec.records, n_visual, n_ref, L), spec, text_tokens, limit)

    lo, hi, best = 0.0, 1.0, cheapest  # alpha = 1 drops every token after layer 0: the cheapest recipe
    while hi - lo > tol + 1e-9:
        mid = (lo + hi) / 2
        found = attempt(mid)
        if found is not None:
            hi, best = mid, found
        else:
            lo = mid
    return FitPruneSchedule(best, alpha=hi, **meta)
