"""Policy optimisation, paper Eq. 7: exhaustive enumeration over all integer policies.

    (d_A*, d_P*, n_v*) = argmin  D^_A(d_A) + D^_P(d_P) + D^_v(n_v)
                         s.t.    TFLOPs(d_A, d_P, n_v) <= tau * TFLOPs(L, L, N_v),   n_v >= n_min

Choices (the paper leaves them open or gets them wrong):

* **Range.** ``d_A, d_P in 0..L`` and ``n_v in 1..N_v``. Eq. 3 allows ``n_v = 0``, but ``(d_A, d_P, 0)`` has the
  same outputs *and* the same FLOPs as ``(0, 0, n_v)`` for any ``n_v`` (no visual token is processed
  anywhere), and the executor/DOPPolicy need ``n_v >= 1``; so ``n_v = 0`` adds nothing.
* **Dominance** (DESIGN "Effective policy"). For ``d_A < L`` a visual token's output of layer ``d_A - 1`` is
  read by nobody (the keys/values it gives there come from that layer's input), so a policy with
  ``d_P >= d_A`` computes dead MLP work in layers ``d_A-1..d_P-1``: it has the outputs of
  ``(d_A, max(d_A-1, 0), n_v)`` (:meth:`DOPPolicy.effective`), whose Eq. 11 count is strictly lower. The
  additive estimate wrongly credits it with ``D_P(d_P) < D_P(d_A-1)`` (``D_P`` was measured with
  ``d_A = L``). So the search enumerates ``d_P <= max(d_A - 1, 0)`` for ``d_A < L`` and any ``d_P`` for
  ``d_A = L`` (:func:`admissible_depths`); this loses no policy with distinct outputs and never returns a
  dominated one. The executed count is still lower than the paper's: at ``d_A - 1`` the visual tokens are
  keys/values only. The paper's own policies (Tables 15/16/22) all have ``d_P <= d_A - 2``.
* **FLOPs** are the paper's Eq. 11 count (:mod:`vlmeval_dop.flops`), decoder prefill, including the
  non-visual ``text_tokens``; the constraint is ``FLOPs <= budget * full`` with both sides in float64
  (all FLOP counts are integers below 2**53, so they are exact).
* **n_min** ``= alpha * n_e`` with ``n_e = uniform_tokens_for_budget`` (Appendix C.4), a real number, the
  constraint ``n_v >= n_min``. For budgets where ``alpha * n_e > N_v`` (e.g. tau near 1) the paper's rule
  would exclude every policy including the original model; we cap ``n_min`` at ``N_v``
  (``clamp_n_min=True``, switch off for the literal rule).
* **Ties.** Among policies with equal objective (exact float equality; the sum is always formed as
  ``(D_A + D_P) + D_v``) the one with fewer Eq. 11 FLOPs wins, then the lexicographically smallest
  ``(d_A, d_P, n_v)``.
* **Budgets.** ``budget`` is a fraction of the full model's FLOPs. The paper's labels (0.28 ...) are rounded
  ratios of uniform token counts (64 tokens in every layer = 27.4 % on LLaVA-1.5-7B); the paper's n_min
  (96 there) needs the exact ratio, which :func:`budget_for_uniform_tokens` / :func:`optimize_for_model` use.

Enumeration is vectorised: the FLOPs of every policy are ``A[d_A, n_v] + P[d_P, n_v]`` (attention and MLP
parts of Eq. 11 separate), broadcast to ``(L+1) x (L+1) x N_v``. For LLaVA-NeXT-13B (41 x 41 x 2880 = 4.8M
cells) building the grid takes ~0.1-0.2 s once and each budget ~0.1 s (CPU, numpy).

Known limit of the additive estimate (not fixed here, the paper has it too): with ``d_A = 0`` no visual token
is read by anything, so ``n_v`` does not change the outputs, yet ``D_v(n_v)`` still enters the sum; at budgets
near the floor the optimum is then ``(0, 0, N_v)``, whose outputs equal ``(0, 0, 1)`` at the same Eq. 11 cost.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import yaml

from ..arch import ArchSpec
from ..flops import BudgetError, budget_floor, full_flops, policy_flops, uniform_flops_curve, uniform_tokens_for_budget
from ..policy import DOPPolicy
from .curves import DivergenceProfile, DivergenceTables


class InfeasibleBudgetError(BudgetError):
    """No policy satisfies the budget and the n_min constraint; ``smallest_feasible_budget`` says what would."""

    def __init__(self, message: str, smallest_feasible_budget: float | None):
        super().__init__(message)
        self.smallest_feasible_budget = smallest_feasible_budget


@dataclass(frozen=True)
class SearchResult:
    """The chosen policy and what the search knows about it.

    Attributes:
        policy: the optimum (never dominated: ``d_P <= max(d_A - 1, 0)`` or ``d_A = L``).
        objective: predicted divergence, the sum of ``terms``.
        terms: the individual interpolated divergences, ``{"D_A": .., "D_P": .., "D_v": ..}`` (+ system terms).
        budget: the budget searched for (fraction of full FLOPs).
        paper_ratio / executed_ratio: Eq. 11 FLOPs / executed FLOPs of the policy over the full model's.
        tflops / full_tflops: the policy's and the full model's Eq. 11 count in units of 1e12.
        n_e, n_min: Appendix C.4 (``n_min`` after the optional cap at N_v).
        n_feasible: how many non-dominated policies satisfied both constraints with a finite estimate.
    """

    policy: DOPPolicy
    objective: float
    terms: Mapping[str, float]
    budget: float
    paper_ratio: float
    executed_ratio: float
    tflops: float
    full_tflops: float
    n_e: int
    n_min: float
    n_feasible: int
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy.to_dict(),
            "objective": self.objective,
            "terms": dict(self.terms),
            "budget": self.budget,
            "paper_ratio": self.paper_ratio,
            "executed_ratio": self.executed_ratio,
            "tflops": self.tflops,
            "full_tflops": self.full_tflops,
            "n_e": self.n_e,
            "n_min": self.n_min,
            "n_feasible": self.n_feasible,
            **({"extra": dict(self.extra)} if self.extra else {}),
        }


# ---------------------------------------------------------------------------------------------- FLOPs grid
def closed_form_flops(spec: ArchSpec, text_tokens: int, d_A, d_P, n_v, *, system_tokens: int = 0, d_A_sys=None, d_P_sys=None):
    """Eq. 11 (GQA form of :mod:`vlmeval_dop.flops`) summed over layers in closed form, numpy-broadcastable.

    With ``r`` non-visual non-system tokens, ``s`` system tokens and per-layer counts
    ``n_A,l = r + n_v [l < d_A] + s [l < d_A_sys]`` (likewise ``n_P,l``)::

        sum_l n_A,l   = L r + d_A n_v + d_A_sys s
        sum_l n_A,l^2 = L r^2 + d_A n_v^2 + d_A_sys s^2 + 2 r (d_A n_v + d_A_sys s) + 2 n_v s min(d_A, d_A_sys)

    Paper count (no dominance mapping). ``system_tokens`` are part of ``text_tokens`` and only matter when
    system depths are given; values are exact integers in float64.
    """
    L = spec.num_layers
    c_lin = 4.0 * spec.hidden_size * (spec.q_dim + spec.kv_dim)
    c_q = 4.0 * spec.q_dim
    c_m = 6.0 * spec.hidden_size * spec.intermediate_size
    a = np.asarray(d_A, dtype=np.float64)
    p = np.asarray(d_P, dtype=np.float64)
    n = np.asarray(n_v, dtype=np.float64)
    if d_A_sys is None and d_P_sys is None:
        s, as_, ps = 0.0, 0.0, 0.0
    else:
        s = float(system_tokens)
        as_ = np.asarray(L if d_A_sys is None else d_A_sys, dtype=np.float64)
        ps = np.asarray(L if d_P_sys is None else d_P_sys, dtype=np.float64)
    r = float(text_tokens) - s
    sum_a = L * r + a * n + as_ * s
    sum_a2 = L * r * r + a * n * n + as_ * s * s + 2.0 * r * (a * n + as_ * s) + 2.0 * n * s * np.minimum(a, as_)
    sum_p = L * r + p * n + ps * s
    return c_lin * sum_a + c_q * sum_a2 + c_m * sum_p


def budget_for_uniform_tokens(spec: ArchSpec, n_tokens: int, text_tokens: int) -> float:
    """The exact budget a paper label stands for: FLOPs of ``(L, L, n_tokens)`` over the full model's."""
    if not 0 <= n_tokens <= spec.visual_tokens:
        raise BudgetError(f"uniform token count {n_tokens} outside 0..{spec.visual_tokens}")
    curve = uniform_flops_curve(spec, text_tokens)
    return float(curve[n_tokens] / curve[-1])


def resolve_n_min(spec: ArchSpec, budget: float, text_tokens: int, alpha: float, *, clamp_n_min: bool = True) -> tuple[int, float]:
    """``(n_e, n_min)`` of Appendix C.4, ``n_min`` capped at N_v when ``clamp_n_min``."""
    n_e = uniform_tokens_for_budget(spec, budget, text_tokens)  # also rejects budgets outside (0, 1]
    n_min = alpha * n_e
    if clamp_n_min:
        n_min = min(n_min, float(spec.visual_tokens))
    return n_e, n_min


def _n_lo(n_min: float) -> int:
    """Smallest admissible integer n_v for a real n_min (n_v >= 1 always)."""
    return max(1, math.ceil(n_min))


def _as_tables(curves: DivergenceProfile | DivergenceTables, spec: ArchSpec, outside: str) -> DivergenceTables:
    tables = curves.tables(outside=outside) if isinstance(curves, DivergenceProfile) else curves
    if not isinstance(tables, DivergenceTables):
        raise TypeError(f"expected a DivergenceProfile or DivergenceTables, got {type(curves).__name__}")
    if tables.L != spec.num_layers or tables.N_v != spec.visual_tokens:
        raise ValueError(
            f"divergence curves are for L={tables.L}, N_v={tables.N_v} but the model has L={spec.num_layers}, "
            f"N_v={spec.visual_tokens}; measure them on this model or transfer them (search.transfer, Eq. 12)"
        )
    return tables


def _min_finite(values: np.ndarray, at_least: int = 0) -> int | None:
    idx = np.flatnonzero(np.isfinite(values[at_least:]))
    return None if idx.size == 0 else int(idx[0]) + at_least


def admissible_depths(L: int) -> np.ndarray:
    """(L+1, L+1) bool, ``[d_A, d_P]`` True where the pair is not dominated by its effective form:
    ``d_P <= max(d_A - 1, 0)`` for ``d_A < L``, every ``d_P`` for ``d_A = L``."""
    a = np.arange(L + 1)[:, None]
    p = np.arange(L + 1)[None, :]
    return (p <= np.maximum(a - 1, 0)) | (a == L)


def cheapest_depths(D_A: np.ndarray, D_P: np.ndarray) -> tuple[int, int] | None:
    """Componentwise-smallest admissible ``(d_A, d_P)`` (:func:`admissible_depths`) with finite estimates.

    FLOPs grow with each depth, so this pair is the cheapest non-dominated one: every admissible pair has
    ``d_P >= p0`` and then ``d_A >= min(p0 + 1, L)`` (``d_A >= 0`` when ``p0 = 0``) with ``D_A(d_A)`` finite,
    hence ``d_A >= a0``.
    """
    L = len(D_A) - 1
    p0 = _min_finite(D_P)
    if p0 is None:
        return None
    a0 = _min_finite(D_A, 0 if p0 == 0 else min(p0 + 1, L))
    return None if a0 is None else (a0, p0)


def _smallest_feasible_budget(
    spec: ArchSpec,
    text_tokens: int,
    alpha: float,
    clamp_n_min: bool,
    n_min_override: float | None,
    D_v: np.ndarray,
    cheapest_flops: Callable[[int], float],
) -> float | None:
    """The smallest budget for which the search has a solution (None if there is none).

    ``cheapest_flops(n)``: FLOPs of the cheapest finite-estimate policy with ``n_v = n``. Feasibility is
    ``min_{n >= n_lo(tau), D_v(n) finite} cheapest_flops(n) <= tau * full`` where ``n_lo`` depends on tau
    through ``n_e``; it need not be monotone in tau, so we test the candidates ``C(n_lo) / full`` in
    increasing order (the minimum is always one of them: within a range of tau with fixed n_e the feasible
    part starts at ``C / full`` or the range is fully feasible, and then so is the tail of the range before).
    """
    full = full_flops(spec, text_tokens)
    N_v = spec.visual_tokens
    finite_n = [n for n in range(1, N_v + 1) if np.isfinite(D_v[n])]
    if not finite_n:
        return None
    costs = {n: cheapest_flops(n) for n in finite_n}
    # C(n_lo): cheapest cost over admissible n >= n_lo (suffix minimum; FLOPs grow with n, so the first
    # finite n >= n_lo is enough, but take the minimum to stay independent of that argument)
    suffix = np.full(N_v + 2, np.inf)
    for n in range(N_v, 0, -1):
        suffix[n] = min(suffix[n + 1], costs.get(n, np.inf))

    def n_lo_of(tau: float) -> int:
        if n_min_override is not None:
            return _n_lo(n_min_override)
        return _n_lo(resolve_n_min(spec, tau, text_tokens, alpha, clamp_n_min=clamp_n_min)[1])

    def ok(tau: float) -> bool:
        if not 0.0 < tau <= 1.0:
            return False
        lo = n_lo_of(tau)
        return lo <= N_v and suffix[lo] <= tau * full

    candidates = sorted({float(c) for c in suffix[1 : N_v + 1] if np.isfinite(c)})
    for c in candidates:
        tau = c / full
        while tau * full < c:  # make tau * full >= c despite rounding
            tau = float(np.nextafter(tau, 2.0))
        if ok(tau):
            nice = math.ceil(tau * 1e6) / 1e6  # a printable value, if it is still feasible
            return nice if ok(nice) else tau
    return None


# ---------------------------------------------------------------------------------------------- search
class PolicySearch:
    """Eq. 7 for one model and one set of curves; the grid is built once and reused for every budget.

    Args:
        curves: a :class:`DivergenceProfile` (interpolated with ``outside``) or ready :class:`DivergenceTables`.
        spec: the target model's ArchSpec (L and N_v must match the curves).
        text_tokens: non-visual tokens counted by the FLOPs model (``eval_configs/models.yaml``).
        alpha: the n_min factor (1.5 LLaVA, 1.25 Qwen2.5-VL / InternVL3); 0 disables the constraint.
        clamp_n_min: cap n_min at N_v (see module doc).
        model: a name for error messages.
    """

    def __init__(
        self,
        curves: DivergenceProfile | DivergenceTables,
        spec: ArchSpec,
        *,
        text_tokens: int,
        alpha: float,
        outside: str = "inf",
        clamp_n_min: bool = True,
        model: str | None = None,
    ):
        self.spec = spec
        self.tables = _as_tables(curves, spec, outside)
        self.text_tokens = int(text_tokens)
        self.alpha = float(alpha)
        self.clamp_n_min = clamp_n_min
        self.model = model or (curves.model if isinstance(curves, DivergenceProfile) and curves.model else spec.family)
        L, N_v = spec.num_layers, spec.visual_tokens
        d = np.arange(L + 1, dtype=np.float64)
        n = np.arange(1, N_v + 1, dtype=np.float64)
        # Eq. 11 separates into an attention part (d_A, n_v) and an MLP part (d_P, n_v); zero depths carry
        # the non-visual tokens of all layers in the attention part.
        attn = closed_form_flops(spec, text_tokens, d[:, None], 0.0, n[None, :])
        mlp = closed_form_flops(spec, text_tokens, 0.0, d[:, None], n[None, :]) - closed_form_flops(spec, text_tokens, 0.0, 0.0, 0.0)
        self.flops = attn[:, None, :] + mlp[None, :, :]  # (L+1, L+1, N_v), index [d_A, d_P, n_v - 1]
        t = self.tables
        # (D_A + D_P) + D_v, with dominated pairs set to +inf; tables hold finite values or +inf only, so
        # every inadmissible cell ends up +inf without a separate mask
        pair = t.D_A[:, None] + t.D_P[None, :]
        pair[~admissible_depths(L)] = np.inf
        self.objective = pair[:, :, None] + t.D_v[None, None, 1:]
        self.full = full_flops(spec, text_tokens)

    def n_min(self, budget: float) -> tuple[int, float]:
        return resolve_n_min(self.spec, budget, self.text_tokens, self.alpha, clamp_n_min=self.clamp_n_min)

    def smallest_feasible_budget(self, n_min_override: float | None = None) -> float | None:
        """Smallest budget with a solution (see :func:`_smallest_feasible_budget`)."""
        t = self.tables
        depths = cheapest_depths(t.D_A, t.D_P)
        if depths is None:
            return None
        a0, p0 = depths
        return _smallest_feasible_budget(
            self.spec, self.text_tokens, self.alpha, self.clamp_n_min, n_min_override, t.D_v,
            lambda n: float(closed_form_flops(self.spec, self.text_tokens, a0, p0, n)),
        )

    def infeasible(self, budget: float, n_e: int | None, n_min: float | None, n_min_override: float | None) -> InfeasibleBudgetError:
        floor = budget_floor(self.spec, self.text_tokens)
        best = self.smallest_feasible_budget(n_min_override)
        if budget < floor:
            why = f"it is below the floor {floor:.6f} (no visual token anywhere)"
        else:
            why = (
                f"no policy with n_v >= n_min={n_min:g} (alpha={self.alpha:g} x n_e={n_e}) and a finite "
                f"divergence estimate fits within it"
            )
        tail = f"the smallest feasible budget is {best!r}" if best is not None else "no budget is feasible with these curves"
        return InfeasibleBudgetError(f"budget {budget!r} is infeasible for {self.model}: {why}; {tail}", best)

    def solve(self, budget: float, *, n_min: float | None = None) -> SearchResult:
        """The Eq. 7 optimum for ``budget`` (fraction of full FLOPs); ``n_min`` overrides Appendix C.4.

        Raises:
            InfeasibleBudgetError (a BudgetError) naming the smallest feasible budget.
        """
        if not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
            raise BudgetError(f"budget must be a fraction of the full model's FLOPs in (0, 1], got {budget!r}")
        override = n_min
        n_e, n_min_eff = self.n_min(budget)
        if override is not None:
            n_min_eff = float(override)
        limit = budget * self.full
        lo = _n_lo(n_min_eff) - 1  # index of n_v = n_lo; only n_v >= n_lo is looked at
        if lo >= self.spec.visual_tokens:
            raise self.infeasible(budget, n_e, n_min_eff, override)
        flops = self.flops[:, :, lo:]
        masked = np.where(flops <= limit, self.objective[:, :, lo:], np.inf)
        best = masked.min()
        if not np.isfinite(best):
            raise self.infeasible(budget, n_e, n_min_eff, override)
        # ties: fewest FLOPs, then the first (d_A, d_P, n_v) in C order = lexicographically smallest
        flops_at_best = np.where(masked == best, flops, np.inf)
        flat = int(np.flatnonzero(flops_at_best == flops_at_best.min())[0])
        a, p, ni = np.unravel_index(flat, masked.shape)
        ni = int(ni) + lo
        policy = DOPPolicy(int(a), int(p), ni + 1)
        t = self.tables
        terms = {"D_A": float(t.D_A[a]), "D_P": float(t.D_P[p]), "D_v": float(t.D_v[ni + 1])}
        return _result(
            self.spec, self.text_tokens, policy, float(best), terms, budget, n_e, n_min_eff,
            int(np.isfinite(masked).sum()), self.full, limit,
        )


def _result(spec, text_tokens, policy, objective, terms, budget, n_e, n_min, n_feasible, full, limit, system_tokens=0) -> SearchResult:
    paper = policy_flops(spec, policy, text_tokens, system_tokens=system_tokens)
    executed = policy_flops(spec, policy, text_tokens, system_tokens=system_tokens, executed=True)
    if paper > limit:  # the closed form and the per-layer count disagree: a bug, never a user error
        raise RuntimeError(f"internal error: {policy} costs {paper} > budget {limit}")
    return SearchResult(
        policy=policy, objective=objective, terms=terms, budget=budget, paper_ratio=paper / full,
        executed_ratio=executed / full, tflops=paper / 1e12, full_tflops=full / 1e12, n_e=n_e, n_min=n_min,
        n_feasible=n_feasible,
    )


def optimize(
    curves: DivergenceProfile | DivergenceTables,
    spec: ArchSpec,
    budget: float,
    *,
    text_tokens: int,
    alpha: float,
    outside: str = "inf",
    clamp_n_min: bool = True,
    n_min: float | None = None,
    model: str | None = None,
) -> SearchResult:
    """Solve Eq. 7 for one budget (see :class:`PolicySearch` for the arguments, module doc for the rules)."""
    search = PolicySearch(curves, spec, text_tokens=text_tokens, alpha=alpha, outside=outside, clamp_n_min=clamp_n_min, model=model)
    return search.solve(budget, n_min=n_min)


def optimize_for_model(
    curves: DivergenceProfile | DivergenceTables,
    model: str,
    labels: list[float] | None = None,
    *,
    outside: str = "inf",
    clamp_n_min: bool = True,
    config_dir: Path | None = None,
) -> dict[float, SearchResult]:
    """Eq. 7 for a paper model at its budget labels (default: all of ``eval_configs/models.yaml``).

    Each label is searched at its exact uniform-token budget (e.g. llava15_7b 0.28 -> 64 tokens ->
    0.2742...), which gives the paper's n_e and n_min; ``text_tokens`` and ``alpha`` come from the config.
    """
    from ..models_config import get_model

    pm = get_model(model, config_dir)
    search = PolicySearch(curves, pm.arch, text_tokens=pm.text_tokens, alpha=pm.alpha, outside=outside, clamp_n_min=clamp_n_min, model=model)
    out = {}
    for label in labels if labels is not None else list(pm.budgets):
        if label not in pm.budgets:
            raise KeyError(f"{model} has no budget label {label}; valid: {sorted(pm.budgets, reverse=True)}")
        out[label] = search.solve(budget_for_uniform_tokens(pm.arch, pm.budgets[label], pm.text_tokens))
    return out


# ---------------------------------------------------------------------------------------------- reference
def brute_force_optimize(
    tables: DivergenceTables,
    spec: ArchSpec,
    budget: float,
    *,
    text_tokens: int,
    alpha: float,
    clamp_n_min: bool = True,
    n_min: float | None = None,
) -> tuple[DOPPolicy, float]:
    """Independent reference for tests: plain loops over every ``(d_A, d_P, n_v)``, ``d_P`` in ``0..L``.

    Uses the per-layer FLOPs count (:func:`flops.policy_flops`) and scores a dominated policy with its
    effective policy's estimate, so the "never dominated" rule is checked, not assumed. Slow; small grids only.
    Returns ``(policy, objective)``; raises BudgetError when nothing is feasible.
    """
    L, N_v = spec.num_layers, spec.visual_tokens
    n_e = uniform_tokens_for_budget(spec, budget, text_tokens)
    n_min_eff = n_min if n_min is not None else (min(alpha * n_e, N_v) if clamp_n_min else alpha * n_e)
    limit = budget * full_flops(spec, text_tokens)
    best = None
    for a in range(L + 1):
        for p in range(L + 1):
            for n in range(1, N_v + 1):
                if n < n_min_eff:
                    continue
                eff = DOPPolicy(a, p, n).effective(L)  # a dominated policy scores as its effective form
                obj = float(tables.D_A[a]) + float(tables.D_P[eff.d_P]) + float(tables.D_v[n])
                if not math.isfinite(obj):
                    continue
                f = policy_flops(spec, DOPPolicy(a, p, n), text_tokens)
                if f > limit:
                    continue
                if best is None or (obj, f) < best[0]:
                    best = ((obj, f), DOPPolicy(a, p, n))
    if best is None:
        raise BudgetError(f"budget {budget} infeasible (brute force)")
    return best[1], best[0][0]


# ---------------------------------------------------------------------------------------------- policies.yaml
def _flow_line(model: str, entry: Mapping[float, list[int]], width: int) -> str:
    items = ", ".join(f"{float(b)!r}: [{', '.join(str(int(v)) for v in pol)}]" for b, pol in entry.items())
    return f"{(model + ':').ljust(width)} {{{items}}}"


def write_policy(path: str | Path, model: str, budget: float, policy: DOPPolicy) -> Path:
    """Set ``{model: {budget: [d_A, d_P, n_v]}}`` in an ``eval_configs/policies.yaml``-style file.

    Other models and budgets are kept. The file's one-line-per-model flow style and its comments are kept
    by replacing (or appending) only that model's line; a file in another layout is rewritten in that
    style, keeping its leading comment block. Budgets of a model are ordered from largest to smallest (the
    paper's tables). Policies with system depths are written as 5-lists ``[d_A, d_P, n_v, d_A_sys,
    d_P_sys]``; ``n_v=None`` (all tokens) cannot be written in this form and is an error. The file is
    replaced atomically (temporary file + rename) and is world-readable (0644).
    """
    from ..fileio import atomic_write_text

    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return atomic_write_text(path, policies_yaml(text, model, {budget: policy}, path))


def policies_yaml(text: str, model: str, policies: Mapping[float, DOPPolicy], path: Any = "policies") -> str:
    """`text` (a policies.yaml-style file's content) with ``policies`` {budget: policy} set for `model`,
    laid out as `write_policy` describes; `path` only names the file in errors."""
    from ..fileio import parse_yaml

    data = parse_yaml(text, path, "fix the file or delete it") or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a mapping of model -> {{budget: policy}}")
    old = data.get(model)
    entry = {float(b): list(v) for b, v in (old or {}).items()}
    for budget, policy in policies.items():
        if policy.n_v is None:
            raise ValueError("policies.yaml needs an explicit n_v; use the model's visual token count")
        values = [policy.d_A, policy.d_P, policy.n_v]
        if policy.has_system_depths:
            values += [policy.d_A_sys, policy.d_P_sys]
        entry[float(budget)] = values
    entry = dict(sorted(entry.items(), key=lambda kv: -kv[0]))
    new_data = dict(data)
    new_data[model] = entry

    lines = text.splitlines()
    width = max([len(m) + 1 for m in new_data] + [1])
    pattern = re.compile(rf"^{re.escape(model)}\s*:")
    hits = [i for i, ln in enumerate(lines) if pattern.match(ln)]
    new_line = _flow_line(model, entry, width)
    single_line = len(hits) == 1 and _parses_to(lines[hits[0]], {model: old})
    if old is None and not hits:
        if lines and not lines[-1].strip():
            while lines and not lines[-1].strip():
                lines.pop()
        lines.append(new_line)
        out = "\n".join(lines) + "\n"
    elif single_line:
        lines[hits[0]] = new_line
        out = "\n".join(lines) + "\n"
    else:  # unfamiliar layout: rewrite everything in the compact form
        header = []
        for ln in lines:
            if ln.startswith("#") or not ln.strip():
                header.append(ln)
            else:
                break
        body = [_flow_line(m, {float(b): list(v) for b, v in e.items()}, width) for m, e in new_data.items()]
        out = "\n".join(header + body) + "\n"
    if yaml.safe_load(out) != {m: {float(b): list(v) for b, v in e.items()} for m, e in new_data.items()}:
        raise RuntimeError(f"internal error: rewriting {path} would change other entries")
    return out


def _parses_to(line: str, expected: Any) -> bool:
    try:
        return yaml.safe_load(line) == expected
    except yaml.YAMLError:
        return False
