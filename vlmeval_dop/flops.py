"""Analytic decoder prefill FLOPs (paper Appendix C.3, Eq. 11), budgets, `n_e` and `n_min` (Appendix C.4).

Per layer, with `n_A` tokens in attention and `n_P` in the MLP, hidden size h, query width q = heads x
head_dim, key/value width d_kv = kv_heads x head_dim and MLP width m::

    FLOPs = 4 n_A h q + 4 n_A h d_kv + 4 n_A^2 q  +  6 n_P h m
            (Q,O proj)  (K,V proj)   (QK^T, AV)     (gate, up, down)

For the MHA LLaMA decoders of LLaVA (q = d_kv = h) this is exactly Eq. 11, `8 n_A h d + 4 n_A^2 d + 6 n_P h m`.
For the GQA Qwen2-style LLMs of Qwen2.5-VL and InternVL3 (d_kv = h/7) the K/V projections shrink while
the score/value products keep the query width; Eq. 11 with `d = d_kv` would undercount them, and the paper
only says it "adjusts" for Qwen. A matmul of (a x b) by (b x c) counts 2abc, the convention of
`torch.utils.flop_counter.FlopCounterMode`, which the tests use as the independent reference. Norms,
RoPE, softmax and biases are not counted (neither by the paper nor by FlopCounterMode).

Counts include system, instruction and output tokens (`text_tokens`), not only visual ones; the paper's
budget labels need a representative non-visual count per model (eval_configs/models.yaml).

Two counts exist for a policy: the paper's (Eq. 11 as printed, which still counts the dead work on visual
tokens whose results nothing reads: their MLP in layers `d_A-1 .. d_P-1` and their query, attention
output and `o_proj` at layer `d_A-1`) and the executed one (what the executor runs:
`DOPPolicy.effective(L)`, with the visual tokens as keys/values only at layer `d_A-1`, for which
`n_q = n_A - n_kv` queries attend over `n_A` keys:
`4 n_q h q + 4 n_A h d_kv + 4 n_q n_A q + 6 n_P h m`). Budgets and the paper's tables use the paper's count.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .arch import ArchSpec
from .policy import DOPPolicy


class BudgetError(ValueError):
    """An infeasible or malformed compute budget."""


def layer_flops(spec: ArchSpec, n_attn, n_mlp, n_kv_only=0):
    """FLOPs of one decoder layer with `n_attn` tokens in MHA and `n_mlp` in the MLP (numpy-broadcastable).

    `n_kv_only` of the `n_attn` tokens take part as keys/values only (no query, attention row or o_proj).
    """
    n_attn = np.asarray(n_attn, dtype=np.float64)
    n_mlp = np.asarray(n_mlp, dtype=np.float64)
    n_q = n_attn - np.asarray(n_kv_only, dtype=np.float64)
    h, q, kv, m = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.intermediate_size
    attn = 4.0 * n_q * h * q + 4.0 * n_attn * h * kv + 4.0 * n_q * n_attn * q
    mlp = 6.0 * n_mlp * h * m
    out = attn + mlp
    return float(out) if out.ndim == 0 else out


def layer_token_counts(
    spec: ArchSpec,
    policy: DOPPolicy,
    text_tokens: int,
    *,
    n_visual: int | None = None,
    system_tokens: int = 0,
    executed: bool = False,
    op_mask=None,
) -> list[tuple[int, int]]:
    """Per-layer `(n_A, n_P)` token counts of `policy`.

    Args:
        text_tokens: all non-visual tokens (system + instruction + output).
        n_visual: visual tokens before reduction (default `spec.visual_tokens`).
        system_tokens: how many of `text_tokens` form the system group (only used when the policy sets
            system-token depths, Eq. 14).
        executed: count what the executor runs (`policy.effective(L)`) instead of the paper's Eq. 11
            (`n_A` counts the tokens taking part in attention, keys/values-only ones included, see
            `kv_only_token_counts`).
        op_mask: `policy.OperationMask` of single visual operations pruned on top of the depths.
    """
    n_visual = spec.visual_tokens if n_visual is None else n_visual
    p = policy.effective(spec.num_layers) if executed else policy
    L = spec.num_layers
    n_v = p.resolved_n_v(n_visual)
    sys_n = system_tokens if p.has_system_depths else 0
    d_A_sys = L if p.d_A_sys is None else p.d_A_sys
    d_P_sys = L if p.d_P_sys is None else p.d_P_sys
    rest = text_tokens - sys_n
    counts = []
    for layer in range(L):
        a_in, m_in = op_mask.visual_in(layer) if op_mask else (True, True)
        n_a = rest + (n_v if layer < p.d_A and a_in else 0) + (sys_n if layer < d_A_sys else 0)
        n_p = rest + (n_v if layer < p.d_P and m_in else 0) + (sys_n if layer < d_P_sys else 0)
        counts.append((n_a, n_p))
    return counts


def kv_only_token_counts(
    spec: ArchSpec,
    policy: DOPPolicy,
    *,
    n_visual: int | None = None,
    system_tokens: int = 0,
    op_mask=None,
) -> list[int]:
    """Per layer, how many tokens the executor runs as keys/values only (visual at `d_A-1`, system at
    `d_A_sys-1`; see `DOPPolicy.kv_only_layers`). An operation mask that removes the visual MHA at `d_A-1`
    leaves nothing keys-only there."""
    n_visual = spec.visual_tokens if n_visual is None else n_visual
    L = spec.num_layers
    vis_layer, sys_layer = policy.kv_only_layers(L)
    out = [0] * L
    if vis_layer is not None and (op_mask is None or op_mask.visual_in(vis_layer)[0]):
        out[vis_layer] += policy.resolved_n_v(n_visual)
    if sys_layer is not None and policy.has_system_depths:
        out[sys_layer] += system_tokens
    return out


def schedule_flops(spec: ArchSpec, counts: Sequence[tuple[int, ...]]) -> float:
    """Total FLOPs of an explicit per-layer `(n_A, n_P)` or `(n_A, n_P, n_kv_only)` schedule (used by
    decoder-side baselines too)."""
    if len(counts) != spec.num_layers:
        raise ValueError(f"schedule has {len(counts)} layers, the model has {spec.num_layers}")
    arr = np.asarray(counts, dtype=np.float64)
    kv_only = arr[:, 2] if arr.shape[1] > 2 else 0.0
    return float(np.sum(layer_flops(spec, arr[:, 0], arr[:, 1], kv_only)))


def policy_flops(
    spec: ArchSpec,
    policy: DOPPolicy,
    text_tokens: int,
    *,
    n_visual: int | None = None,
    system_tokens: int = 0,
    executed: bool = False,
) -> float:
    """Decoder prefill FLOPs of `policy` (absolute count, not tera)."""
    counts = layer_token_counts(
        spec, policy, text_tokens, n_visual=n_visual, system_tokens=system_tokens, executed=executed
    )
    if executed:
        kv = kv_only_token_counts(spec, policy, n_visual=n_visual, system_tokens=system_tokens)
        counts = [(a, m, k) for (a, m), k in zip(counts, kv)]
    return schedule_flops(spec, counts)


def full_flops(spec: ArchSpec, text_tokens: int, *, n_visual: int | None = None) -> float:
    """FLOPs of the unpruned model (the 100% reference)."""
    return policy_flops(spec, DOPPolicy.full(spec.num_layers), text_tokens, n_visual=n_visual)


def policy_tflops(
    spec: ArchSpec,
    policy: DOPPolicy,
    text_tokens: int,
    *,
    n_visual: int | None = None,
    system_tokens: int = 0,
) -> dict[str, float]:
    """Paper and executed TFLOPs (units of 1e12) of `policy` and their ratios to the full model."""
    full = full_flops(spec, text_tokens, n_visual=n_visual)
    paper = policy_flops(spec, policy, text_tokens, n_visual=n_visual, system_tokens=system_tokens)
    executed = policy_flops(
        spec, policy, text_tokens, n_visual=n_visual, system_tokens=system_tokens, executed=True
    )
    return {
        "tflops": paper / 1e12,
        "executed_tflops": executed / 1e12,
        "full_tflops": full / 1e12,
        "ratio": paper / full,
        "executed_ratio": executed / full,
    }


def uniform_flops_curve(spec: ArchSpec, text_tokens: int) -> np.ndarray:
    """FLOPs of `(L, L, n)` for every n in 0..N_v (vectorised; index = n)."""
    n = np.arange(spec.visual_tokens + 1, dtype=np.float64) + text_tokens
    return spec.num_layers * layer_flops(spec, n, n)


def uniform_tokens_for_budget(spec: ArchSpec, budget: float, text_tokens: int) -> int:
    """`n_e`: visual tokens that, kept in every layer, meet `budget` (a fraction of full FLOPs).

    Appendix C.4: `TFLOPs(L, L, n_e) = tau`; if no integer meets it exactly, the closest one.
    """
    if not 0.0 < budget <= 1.0:
        raise BudgetError(f"budget must be a fraction of the full model's FLOPs in (0, 1], got {budget}")
    curve = uniform_flops_curve(spec, text_tokens)
    ratios = curve / curve[-1]
    return int(np.argmin(np.abs(ratios - budget)))


def min_visual_tokens(spec: ArchSpec, budget: float, text_tokens: int, alpha: float) -> float:
    """`n_min = alpha * n_e` (Appendix C.4); a real number, the constraint is `n_v >= n_min`."""
    return alpha * uniform_tokens_for_budget(spec, budget, text_tokens)


def budget_floor(spec: ArchSpec, text_tokens: int) -> float:
    """The smallest reachable ratio: no visual token anywhere (the paper's 'Lower Bound' row)."""
    curve = uniform_flops_curve(spec, text_tokens)
    return float(curve[0] / curve[-1])
