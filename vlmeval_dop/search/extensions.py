"""Extensions of the search (paper Appendices E.1, F.3, F.5, F.6).

* :func:`optimize_with_system` -- Eq. 14: system-token depths ``d_A_sys, d_P_sys`` as two more additive terms.
* :func:`optimize_accuracy` -- Eq. 13: the same search on accuracy-drop curves instead of divergences.
* :func:`joint_grid_search` -- F.3: evaluate the *joint* divergence of every budget-feasible policy of a
  coarse grid (a callable does the model runs; search/joint.py measures them with prefix sharing) and pick
  the best; :func:`grid_additive_search` is the additive optimum on the same grid (Table 22's two rows).
* :func:`spearman_additive_vs_joint` -- E.1 / Table 7: rank correlation between ``D_sum`` and ``D``.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
from scipy import stats

from ..arch import ArchSpec
from ..flops import BudgetError, full_flops, policy_flops, uniform_tokens_for_budget
from ..policy import DOPPolicy
from .curves import DivergenceProfile, DivergenceTables
from .optimize import (
    InfeasibleBudgetError,
    SearchResult,
    _as_tables,
    _n_lo,
    _result,
    _smallest_feasible_budget,
    admissible_depths,
    cheapest_depths,
    closed_form_flops,
    optimize,
    resolve_n_min,
)


# ---------------------------------------------------------------------------------------------- Eq. 14
def _prefix_argmin(values: np.ndarray, start: int) -> np.ndarray:
    """``out[j]`` = the smallest index ``i`` in ``start..j`` with ``values[i] = min(values[start..j])``."""
    out = np.zeros(values.size, dtype=np.int64)
    if start >= values.size:
        return out
    v = values[start:]
    running = np.minimum.accumulate(v)
    prev = np.concatenate(([np.inf], running[:-1]))
    new = v < prev  # a strictly smaller value starts a new argmin (ties keep the earlier, cheaper n_v)
    new[0] = True
    idx = np.maximum.accumulate(np.where(new, np.arange(v.size), 0))
    out[start:] = idx + start
    return out


def optimize_with_system(
    curves: DivergenceProfile | DivergenceTables,
    spec: ArchSpec,
    budget: float,
    *,
    text_tokens: int,
    system_tokens: int,
    alpha: float,
    outside: str = "inf",
    clamp_n_min: bool = True,
    n_min: float | None = None,
    model: str | None = None,
) -> SearchResult:
    """Eq. 14: minimise ``D_A_sys + D_P_sys + D_A + D_P + D_v`` over ``(d_A_sys, d_P_sys, d_A, d_P, n_v)``.

    The same rules as :mod:`.optimize` (range, dominance for both groups: ``d_P <= max(d_A - 1, 0)`` unless
    ``d_A = L``, likewise for the system depths, :func:`.optimize.admissible_depths`; ties: fewer FLOPs, then the lexicographically smallest
    ``(d_A, d_P, n_v, d_A_sys, d_P_sys)``). ``system_tokens`` are part of ``text_tokens``.

    Exact but not a 5-D broadcast ((L+1)^4 N_v is 8e9 cells for LLaVA-NeXT-13B): for fixed depths the
    FLOPs grow with ``n_v``, so the feasible ``n_v`` form a range ``n_lo..n_hi`` and the best one is a prefix
    argmin of ``D_v``. ``n_hi`` comes from the quadratic FLOPs(n_v), corrected with exact integer FLOPs, for
    all ((L+1)(L+2)/2)^2 depth cells at once.
    """
    tables = _as_tables(curves, spec, outside)
    if model is None and isinstance(curves, DivergenceProfile) and curves.model:
        model = curves.model
    if not tables.has_system:
        raise ValueError("the curves have no system-token curves (D_A_sys, D_P_sys); use search.optimize instead")
    if not 0 < system_tokens <= text_tokens:
        raise ValueError(f"system_tokens must be in 1..text_tokens={text_tokens}, got {system_tokens}")
    if not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise BudgetError(f"budget must be a fraction of the full model's FLOPs in (0, 1], got {budget!r}")
    L, N_v = spec.num_layers, spec.visual_tokens
    n_e, n_min_eff = resolve_n_min(spec, budget, text_tokens, alpha, clamp_n_min=clamp_n_min)
    if n_min is not None:
        n_min_eff = float(n_min)
    n_lo = _n_lo(n_min_eff)
    full = full_flops(spec, text_tokens)
    limit = budget * full
    T = text_tokens

    a, p = (x.astype(np.float64) for x in np.nonzero(admissible_depths(L)))  # undominated pairs, (d_A, d_P) order
    A, P = a[None, :], p[None, :]  # visual pairs along axis 1
    As, Ps = a[:, None], p[:, None]  # system pairs along axis 0

    def F(n):
        return closed_form_flops(spec, T, A, P, n, system_tokens=system_tokens, d_A_sys=As, d_P_sys=Ps)

    c0 = F(0.0)
    c1 = F(1.0) - c0  # F(n) = c0 + c1' n + c2 n^2 with c1' = c1 + c2; only used for the first guess
    c2 = (F(2.0) - 2 * F(1.0) + c0) / 2.0
    c1 = c1 - c2
    with np.errstate(divide="ignore", invalid="ignore"):
        disc = np.maximum(c1 * c1 + 4.0 * c2 * (limit - c0), 0.0)
        quad = (-c1 + np.sqrt(disc)) / (2.0 * c2)
        lin = (limit - c0) / c1
        root = np.where(c2 > 0, quad, np.where(c1 > 0, lin, np.where(c0 <= limit, N_v, -1.0)))
    root = np.where(limit < c0, -1.0, root)
    n_hi = np.clip(np.floor(np.nan_to_num(root, nan=-1.0, posinf=N_v, neginf=-1.0)), n_lo - 1, N_v).astype(np.int64)
    n_hi = np.maximum(n_hi, n_lo - 1)
    while True:  # the float root is within a step or two; settle it with exact integer FLOPs
        up = (n_hi < N_v) & (F(n_hi + 1.0) <= limit)
        down = (n_hi >= n_lo) & (F(n_hi.astype(np.float64)) > limit)
        if not up.any() and not down.any():
            break
        n_hi = n_hi + up - down
    feasible = n_hi >= n_lo
    best_n = _prefix_argmin(tables.D_v, n_lo)[np.clip(n_hi, 0, N_v)]
    ia, ip = np.nonzero(admissible_depths(L))
    sys_part = tables.D_A_sys[ia] + tables.D_P_sys[ip]
    obj = ((sys_part[:, None] + tables.D_A[ia][None, :]) + tables.D_P[ip][None, :]) + tables.D_v[best_n]
    obj = np.where(feasible & np.isfinite(obj), obj, np.inf)
    best = obj.min()
    if not np.isfinite(best):
        raise _infeasible_system(spec, tables, budget, T, system_tokens, alpha, clamp_n_min, n_min, n_e, n_min_eff, model)
    cand = np.argwhere(obj == best)  # (k, 2) [system pair, visual pair]
    fl = F(best_n.astype(np.float64))[cand[:, 0], cand[:, 1]]
    cand = cand[fl == fl.min()]
    keys = np.stack([ia[cand[:, 1]], ip[cand[:, 1]], best_n[cand[:, 0], cand[:, 1]], ia[cand[:, 0]], ip[cand[:, 0]]])
    k = np.lexsort(keys[::-1])[0]  # lexsort: last key is primary
    sa, va = cand[k]
    policy = DOPPolicy(int(ia[va]), int(ip[va]), int(best_n[sa, va]), int(ia[sa]), int(ip[sa]))
    terms = {
        "D_A": float(tables.D_A[policy.d_A]), "D_P": float(tables.D_P[policy.d_P]), "D_v": float(tables.D_v[policy.n_v]),
        "D_A_sys": float(tables.D_A_sys[policy.d_A_sys]), "D_P_sys": float(tables.D_P_sys[policy.d_P_sys]),
    }
    # feasible 5-tuples: per cell, the finite D_v entries in n_lo..n_hi (a prefix count, no 5-D grid)
    finite_v = np.concatenate(([0], np.cumsum(np.isfinite(tables.D_v[1:]))))  # finite_v[n] = #finite in 1..n
    depth_ok = np.isfinite((sys_part[:, None] + tables.D_A[ia][None, :]) + tables.D_P[ip][None, :])
    counts = np.where(feasible & depth_ok, finite_v[np.clip(n_hi, 0, N_v)] - finite_v[min(n_lo - 1, N_v)], 0)
    return _result(
        spec, T, policy, float(best), terms, budget, n_e, n_min_eff, int(counts.sum()), full, limit,
        system_tokens=system_tokens,
    )


def _infeasible_system(spec, tables, budget, T, s, alpha, clamp_n_min, n_min_override, n_e, n_min_eff, model):
    vis = cheapest_depths(tables.D_A, tables.D_P)
    sys = cheapest_depths(tables.D_A_sys, tables.D_P_sys)
    best = None
    if vis is not None and sys is not None:
        best = _smallest_feasible_budget(
            spec, T, alpha, clamp_n_min, n_min_override, tables.D_v,
            lambda n: float(closed_form_flops(spec, T, vis[0], vis[1], n, system_tokens=s, d_A_sys=sys[0], d_P_sys=sys[1])),
        )
    # no visual and no system token anywhere
    floor = float(closed_form_flops(spec, T, 0, 0, 0, system_tokens=s, d_A_sys=0, d_P_sys=0)) / full_flops(spec, T)
    if budget < floor:
        why = f"it is below the floor {floor:.6f} (no visual or system token anywhere)"
    else:
        why = f"no policy with n_v >= n_min={n_min_eff:g} (n_e={n_e}) and finite estimates fits within it"
    tail = f"the smallest feasible budget is {best!r}" if best is not None else "no budget is feasible with these curves"
    return InfeasibleBudgetError(f"budget {budget!r} is infeasible for {model or spec.family} (system tokens): {why}; {tail}", best)


def brute_force_optimize_with_system(
    tables: DivergenceTables,
    spec: ArchSpec,
    budget: float,
    *,
    text_tokens: int,
    system_tokens: int,
    alpha: float,
    clamp_n_min: bool = True,
) -> tuple[DOPPolicy, float]:
    """Plain-loop reference for :func:`optimize_with_system` (tests only; tiny grids).

    Every 5-tuple, dominated ones scored by their effective policy; ties by (objective, FLOPs, then the
    order ``(d_A, d_P, n_v, d_A_sys, d_P_sys)``).
    """
    L, N_v = spec.num_layers, spec.visual_tokens
    n_e = uniform_tokens_for_budget(spec, budget, text_tokens)
    n_min = min(alpha * n_e, N_v) if clamp_n_min else alpha * n_e
    limit = budget * full_flops(spec, text_tokens)
    best = None
    for a, p, n, sa, sp in itertools.product(range(L + 1), range(L + 1), range(1, N_v + 1), range(L + 1), range(L + 1)):
        if n < n_min:
            continue
        eff = DOPPolicy(a, p, n, sa, sp).effective(L)  # dominated policies score as their effective form
        obj = (
            float(tables.D_A_sys[sa]) + float(tables.D_P_sys[eff.d_P_sys]) + float(tables.D_A[a])
            + float(tables.D_P[eff.d_P]) + float(tables.D_v[n])
        )
        if not math.isfinite(obj):
            continue
        pol = DOPPolicy(a, p, n, sa, sp)
        f = policy_flops(spec, pol, text_tokens, system_tokens=system_tokens)
        if f <= limit and (best is None or (obj, f) < best[0]):
            best = ((obj, f), pol)
    if best is None:
        raise BudgetError(f"budget {budget} infeasible (brute force)")
    return best[1], best[0][0]


# ---------------------------------------------------------------------------------------------- Eq. 13
def optimize_accuracy(profile: DivergenceProfile, spec: ArchSpec, budget: float, **kwargs) -> SearchResult:
    """Eq. 13: Eq. 7 on accuracy-drop curves (``profile.objective == "acc_drop"``).

    The curves come from :func:`divergence.accuracy_drop` at the same sampling points; interpolation and
    the implied full point (a drop of exactly 0) are unchanged. Drops can be negative and non-monotone; the
    search does not assume otherwise.
    """
    if profile.objective != "acc_drop":
        raise ValueError(f"profile objective is {profile.objective!r}; Eq. 13 needs accuracy-drop curves ('acc_drop')")
    return optimize(profile, spec, budget, **kwargs)


# ---------------------------------------------------------------------------------------------- F.3
@dataclass(frozen=True)
class JointRecord:
    """One evaluated grid policy (its effective form) with its joint divergence and Eq. 11 FLOPs ratio."""

    policy: DOPPolicy
    divergence: float
    paper_ratio: float


@dataclass(frozen=True)
class JointGridResult:
    """Outcome of :func:`joint_grid_search`.

    Attributes:
        best: the feasible grid policy with the smallest joint divergence (ties: fewer FLOPs, then order).
        records: every evaluated policy, in enumeration order.
        n_feasible: grid policies satisfying budget and n_min (before merging dominated ones).
    """

    best: DOPPolicy
    best_divergence: float
    records: tuple[JointRecord, ...]
    n_feasible: int
    n_e: int
    n_min: float

    @property
    def n_evaluated(self) -> int:
        return len(self.records)


def f3_grid(L: int, N_v: int, *, depth_step: int = 2, n_step: int = 16) -> tuple[list[int], list[int]]:
    """The F.3 subspace: depths every ``depth_step`` layers, ``n_v`` every ``n_step`` tokens.

    The paper writes ``d_A, d_P in {1, 3, 5, 7, ...}`` but reports policies with even depths (26/20, 24/18,
    Table 22), so its numbering is unclear; we use ``{2, 4, ..., L}`` (``step``, ``2 step``, ..., up to L) and
    ``n_v in {16, 32, ..., <= N_v}`` (``n_v = 0`` is not a runnable policy). Pass your own lists to change it.
    """
    return list(range(depth_step, L + 1, depth_step)), list(range(n_step, N_v + 1, n_step))


@dataclass(frozen=True)
class GridPolicies:
    """The budget-feasible policies of an F.3 grid (:func:`grid_policies`).

    Attributes:
        policies: the distinct effective forms, in enumeration order (each one set of model runs).
        n_feasible: grid points satisfying the budget and ``n_min`` before merging dominated ones.
        n_e, n_min: Appendix C.4 for the budget.
    """

    policies: tuple[DOPPolicy, ...]
    n_feasible: int
    n_e: int
    n_min: float


def grid_policies(
    spec: ArchSpec,
    budget: float,
    *,
    text_tokens: int,
    alpha: float,
    depths: Sequence[int] | None = None,
    n_values: Sequence[int] | None = None,
    clamp_n_min: bool = True,
    n_min: float | None = None,
) -> GridPolicies:
    """Every grid policy ``(d_A, d_P, n_v)`` within the Eq. 11 budget and ``n_v >= n_min`` (Eq. 7's
    constraints), as its effective form (``DOPPolicy.effective``: a grid point with ``d_P >= d_A`` has the
    outputs of ``(d_A, d_A - 1, n_v)`` and is run as that). Default grid: :func:`f3_grid`."""
    L, N_v = spec.num_layers, spec.visual_tokens
    if depths is None or n_values is None:
        dd, nn = f3_grid(L, N_v)
        depths = dd if depths is None else depths
        n_values = nn if n_values is None else n_values
    n_e, n_min_eff = resolve_n_min(spec, budget, text_tokens, alpha, clamp_n_min=clamp_n_min)
    if n_min is not None:
        n_min_eff = float(n_min)
    limit = budget * full_flops(spec, text_tokens)
    grid = [(a, p, n) for a in depths for p in depths for n in n_values if n >= max(n_min_eff, 1)]
    if grid:
        g = np.asarray(grid, dtype=np.float64)
        fl = closed_form_flops(spec, text_tokens, g[:, 0], g[:, 1], g[:, 2])
        grid = [t for t, f in zip(grid, fl) if f <= limit]
    seen: dict[DOPPolicy, None] = {}
    for a, p, n in grid:
        seen.setdefault(DOPPolicy(int(a), int(p), int(n)).validate(L, N_v).effective(L), None)
    return GridPolicies(tuple(seen), len(grid), n_e, n_min_eff)


def joint_grid_search(
    joint_divergence: Callable[[DOPPolicy], float], spec: ArchSpec, budget: float, *, text_tokens: int, **grid_kw
) -> JointGridResult:
    """F.3: direct grid search on the joint divergence ``D(d_A, d_P, n_v)`` under Eq. 7's constraints
    (``grid_kw``: ``alpha`` and the other keyword arguments of :func:`grid_policies`).

    ``joint_divergence(policy)`` runs the pruned model on the validation set and returns the mean Eq. 10
    divergence (the costly part; it is called once per distinct *effective* feasible policy of
    :func:`grid_policies`; `vlmeval-dop search --joint-grid` measures them all with prefix sharing first,
    search/joint.py). Ties: fewer Eq. 11 FLOPs, then the smallest ``(d_A, d_P, n_v)``. The paper reports
    658 / 384 feasible policies at 28 % / 23 % on LLaVA-1.5-7B; we could not reproduce those counts with
    any reading of its grid (see docs/search.md), so compare optima, not counts.
    """
    grid = grid_policies(spec, budget, text_tokens=text_tokens, **grid_kw)
    full = full_flops(spec, text_tokens)
    records = [JointRecord(pol, float(joint_divergence(pol)), policy_flops(spec, pol, text_tokens) / full)
               for pol in grid.policies]
    if not records:
        raise BudgetError(f"no grid policy satisfies budget {budget!r} and n_v >= {grid.n_min:g}; widen the grid or the budget")
    best = min(records, key=lambda r: (r.divergence, r.paper_ratio, (r.policy.d_A, r.policy.d_P, r.policy.n_v)))
    return JointGridResult(best.policy, best.divergence, tuple(records), grid.n_feasible, grid.n_e, grid.n_min)


def grid_additive_search(
    tables: DivergenceTables | DivergenceProfile, spec: ArchSpec, budget: float, *, text_tokens: int,
    outside: str = "inf", **grid_kw
) -> JointGridResult:
    """F.3's "w/ Additive Approximation" row: Eq. 7 restricted to the same grid, i.e. the feasible grid
    policy (effective form) with the smallest ``D_A(d_A) + D_P(d_P) + D_v(n_v)``; ties and ``grid_kw`` as
    :func:`joint_grid_search`. No model run: the estimates come from the profile's interpolated curves."""
    t = _as_tables(tables, spec, outside)
    return joint_grid_search(lambda pol: float(additive_divergence(t, [pol])[0]), spec, budget,
                             text_tokens=text_tokens, **grid_kw)


# ---------------------------------------------------------------------------------------------- E.1
@dataclass(frozen=True)
class SpearmanResult:
    rho: float
    pvalue: float
    n: int


def spearman(x: Iterable[float], y: Iterable[float]) -> SpearmanResult:
    """Spearman's rank correlation of ``x`` and ``y``: ``scipy.stats.spearmanr`` (the Pearson correlation of
    the average ranks) with its two-sided p-value.

    App. E.1 prints the no-ties formula ``rho = 1 - 6 sum d_i^2 / (n (n^2 - 1))`` and says it uses scipy when
    ranks are tied. We always use scipy: without ties it *is* that formula (tests check both), and Table 7's
    joint divergences do tie: every combination with ``d_P >= d_A - 1`` (``d_A < L``) has the outputs of
    ``(d_A, d_A - 1, n_v)``, and with ``d_A = 0`` all ``n_v`` give the same outputs, so equal ``D`` values
    occur by construction, where the printed formula with arbitrary tie-breaking would give an
    order-dependent, wrong value.
    """
    x = np.asarray(list(x), dtype=np.float64)
    y = np.asarray(list(y), dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(f"need two 1-D sequences of equal length >= 2, got {x.shape} and {y.shape}")
    res = stats.spearmanr(x, y)
    return SpearmanResult(float(res.statistic), float(res.pvalue), int(x.size))


def additive_divergence(tables: DivergenceTables, policies: Iterable[DOPPolicy | tuple[int, int, int]]) -> np.ndarray:
    """``D_sum = D_A(d_A) + D_P(d_P) + D_v(n_v)`` of each policy, read from the (interpolated) tables.

    As in E.1 the literal policy is used (no mapping to the effective one), so ``D_sum`` is the paper's.
    """
    out = []
    for pol in policies:
        a, p, n = (pol.d_A, pol.d_P, pol.n_v) if isinstance(pol, DOPPolicy) else pol
        n = tables.N_v if n is None else n
        out.append((tables.D_A[a] + tables.D_P[p]) + tables.D_v[n])
    return np.asarray(out, dtype=np.float64)


def table7_policies(depths: Sequence[int], n_values: Sequence[int]) -> list[DOPPolicy]:
    """E.1's combinations ``S_d x S_d x S_v`` (6 x 6 x 6 = 216 with the paper's sampling points)."""
    return [DOPPolicy(a, p, n) for a, p, n in itertools.product(depths, depths, n_values)]


def spearman_additive_vs_joint(
    tables: DivergenceTables, policies: Sequence[DOPPolicy | tuple[int, int, int]], joint: Sequence[float]
) -> SpearmanResult:
    """Table 7: rank correlation between the additive ``D_sum`` and measured joint ``D`` over ``policies``."""
    if len(policies) != len(joint):
        raise ValueError(f"{len(policies)} policies but {len(joint)} joint divergences")
    return spearman(additive_divergence(tables, policies), joint)
