"""Greedy MAP inference for determinantal point processes (DPPs).

Fast greedy MAP of Chen, Zhang & Zhou, "Fast Greedy MAP Inference for Determinantal Point Process to
Improve Recommendation Diversity" (NeurIPS 2018), Algorithm 1: the greedy step picks the item with the
largest marginal gain of log det(L_S), and that gain is the squared pivot d_j^2 of an incremental Cholesky
factorisation of L_S, so each step costs O(N * |S|) instead of a fresh determinant. CDPruner (Zhang et
al. 2025) uses exactly this procedure on its conditional kernel; its official code runs it without a
stopping rule, see `dpp_greedy_map` for what we do once the kernel is numerically exhausted.
"""
from __future__ import annotations

import torch

from .base import ReducerError

# Relative pivot threshold: once every remaining d_j^2 is below this fraction of the largest diagonal entry,
# the chosen set already spans every other item to float64 precision and further pivots are rounding noise.
_EXHAUSTED_RTOL = 1e-10


def dpp_greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP subset of size `k` of the DPP with PSD kernel `kernel` (N, N); indices in pick order.

    Step i picks argmax_j log det(L_{S+j}) (ties: lowest index), maintained incrementally: `d2[j]` is
    det(L_{S+j}) / det(L_S) and `c[:, j]` the Cholesky row of item j against the chosen set (Chen et al.
    2018, Alg. 1). Computed in float64 (the official CDPruner code uses float32; only near-ties differ).

    When the kernel's rank is below `k` (e.g. more tokens requested than the feature dimension), every
    remaining gain eventually drops to rounding noise (below 1e-10 of the largest diagonal entry). The
    official code would then divide by sqrt of ~0 or a negative number; we instead fill the remaining picks
    with the unchosen items in decreasing order of their diagonal L_jj (for CDPruner: relevance^2), ties to
    the lowest index, so the result is always `k` distinct indices.

    Raises:
        ReducerError: `kernel` is not square, or `k` is outside 0..N.
    """
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ReducerError(f"DPP kernel must be a square matrix, got shape {tuple(kernel.shape)}")
    N = kernel.shape[0]
    if not 0 <= k <= N:
        raise ReducerError(f"DPP cannot select {k} of {N} items; valid: 0..{N}")
    L = kernel.detach().to(torch.float64)
    diag = torch.diagonal(L).clone()
    d2 = diag.clone()
    c = torch.zeros(k, N, dtype=torch.float64, device=L.device)
    chosen = torch.zeros(N, dtype=torch.bool, device=L.device)
    order: list[int] = []
    threshold = _EXHAUSTED_RTOL * max(float(diag.max()), 0.0) if N else 0.0
    for i in range(k):
        gains = d2.masked_fill(chosen, float("-inf"))
        j = int(torch.argmax(gains))
        if not float(gains[j]) > threshold:
            break  # numerically exhausted: fill below
        order.append(j)
        chosen[j] = True
        # new Cholesky row: e_n = (L_jn - <c_j, c_n>) / d_j for every item n
        e = (L[j] - c[:i, j] @ c[:i]) / d2[j].sqrt()
        c[i] = e
        d2 = d2 - e.square()
    if len(order) < k:
        rest = torch.nonzero(~chosen).flatten()
        # stable sort on -diag keeps the lowest index first among ties
        by_diag = rest[torch.sort(-diag[rest], stable=True).indices]
        order.extend(by_diag[: k - len(order)].tolist())
    return torch.tensor(order, dtype=torch.long, device=kernel.device)


def dpp_log_det(kernel: torch.Tensor, subset: torch.Tensor | list[int]) -> float:
    """log det(L_S) of the principal submatrix on `subset` in float64 (-inf if singular or not PD)."""
    idx = torch.as_tensor(subset, dtype=torch.long, device=kernel.device)
    if idx.numel() == 0:
        return 0.0
    sub = kernel.detach().to(torch.float64)[idx][:, idx]
    sign, logabs = torch.linalg.slogdet(sub)
    return float(logabs) if float(sign) > 0 else float("-inf")


__all__ = ["dpp_greedy_map", "dpp_log_det"]
