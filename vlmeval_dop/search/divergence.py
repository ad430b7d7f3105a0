"""Output divergence of a pruned model (paper Appendix C.2, Eq. 9-10) and the accuracy-drop objective (Eq. 13).

Eq. 9-10, for one sample with the original first-token distribution ``Pr_org`` over the vocabulary::

    X_top = argtop-k(Pr_org)                       # ids of the original's k most likely tokens
    p_org = Pr_org[X_top],  p = Pr_pruned[X_top]   # both gathered at the *original's* ids
    p~_org = (p_org + eps) / ||p_org + eps||_1     # eps is added to every entry, zeros included,
    p~     = (p + eps)     / ||p + eps||_1         # then each vector is renormalised to sum 1
    D = KL(p~_org || p~) = sum_i p~_org[i] log(p~_org[i] / p~[i])

with ``k = 10`` and ``eps = 1e-8``. Because eps is added before renormalising, a zero probability (in either
distribution) is an ordinary small positive entry and D is finite. With ``eps = 0`` the usual conventions
apply: a term with ``p~_org[i] = 0`` is 0, and ``p~_org[i] > 0`` with ``p~[i] = 0`` makes D infinite.

Everything is computed in float64 (bf16/fp16 logits are upcast before the softmax) so that the profile a
GPU run writes does not depend on the model's compute dtype more than the logits themselves do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

TOP_K = 10
EPS = 1e-8


@dataclass(frozen=True)
class SampleStat:
    """A per-sample statistic and its mean over the samples (the value a profile stores)."""

    per_sample: torch.Tensor  # (B,) float64
    mean: float

    @classmethod
    def of(cls, per_sample: torch.Tensor) -> "SampleStat":
        per_sample = per_sample.detach().to(torch.float64).reshape(-1)
        return cls(per_sample, float(per_sample.mean()) if per_sample.numel() else float("nan"))

    def tolist(self) -> list[float]:
        return [float(v) for v in self.per_sample.tolist()]


def _as_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (B, V) or (V,), got {tuple(x.shape)}")
    return x.detach().to(torch.float64)


def _check_probs(p: torch.Tensor, name: str) -> None:
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError(f"{name} must be finite non-negative probabilities (pass logits=True for logits)")


def probs_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the full vocabulary in float64 (Eq. 9 gathers from the full distribution)."""
    return torch.softmax(_as_batch(logits, "logits"), dim=-1)


def _normalise(p: torch.Tensor, eps: float) -> torch.Tensor:
    p = p + eps
    return p / p.sum(dim=-1, keepdim=True)


def _kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    # 0 * log(0 / q) = 0 by convention (only reachable with eps = 0); p > 0, q = 0 gives +inf.
    terms = torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))
    return terms.sum(dim=-1)


@dataclass(frozen=True)
class TopKReference:
    """The original model's side of Eq. 9-10, computed once and reused for every pruned policy.

    Attributes:
        ids: (B, k) the original's top-k token ids per sample (descending probability; ties resolved
            towards the lower token id so the selection is deterministic).
        p: (B, k) float64, ``p~_org`` (top-k probabilities + eps, renormalised).
    """

    ids: torch.Tensor
    p: torch.Tensor
    vocab_size: int
    k: int = TOP_K
    eps: float = EPS

    @classmethod
    def from_probs(cls, probs: torch.Tensor, *, k: int = TOP_K, eps: float = EPS) -> "TopKReference":
        """Reference from the original's probabilities, shape (B, V) or (V,).

        If the vocabulary is smaller than ``k`` (tiny test models), all V entries are used.
        """
        probs = _as_batch(probs, "original probabilities")
        _check_probs(probs, "original probabilities")
        if k < 1 or eps < 0:
            raise ValueError(f"need k >= 1 and eps >= 0, got k={k}, eps={eps}")
        k_eff = min(k, probs.shape[-1])
        # stable descending sort: among equal probabilities the lower id comes first (torch.topk does
        # not promise an order for ties, and the chosen ids change the divergence).
        ids = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k_eff]
        p = _normalise(torch.gather(probs, -1, ids), eps)
        return cls(ids=ids, p=p, vocab_size=probs.shape[-1], k=k_eff, eps=eps)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, *, k: int = TOP_K, eps: float = EPS) -> "TopKReference":
        """Reference from the original's first-token logits (softmax over the full vocabulary first)."""
        return cls.from_probs(probs_from_logits(logits), k=k, eps=eps)

    def kl(self, pruned_probs: torch.Tensor) -> SampleStat:
        """``KL(p~_org || p~_pruned)`` per sample (Eq. 10) and its mean."""
        q_full = _as_batch(pruned_probs, "pruned probabilities")
        _check_probs(q_full, "pruned probabilities")
        if q_full.shape[0] != self.ids.shape[0]:
            raise ValueError(f"batch size mismatch: reference has {self.ids.shape[0]}, pruned has {q_full.shape[0]}")
        if q_full.shape[1] != self.vocab_size:
            raise ValueError(f"vocabulary mismatch: reference has {self.vocab_size} entries, pruned has {q_full.shape[1]}")
        q = _normalise(torch.gather(q_full, -1, self.ids.to(q_full.device)), self.eps)
        return SampleStat.of(_kl_rows(self.p.to(q.device), q))

    def kl_logits(self, pruned_logits: torch.Tensor) -> SampleStat:
        """As :meth:`kl`, from the pruned model's first-token logits."""
        return self.kl(probs_from_logits(pruned_logits))


def topk_kl(
    original: torch.Tensor,
    pruned: torch.Tensor,
    *,
    k: int = TOP_K,
    eps: float = EPS,
    logits: bool = False,
) -> SampleStat:
    """Top-k KL divergence of the first output token, Eq. 9-10.

    Args:
        original, pruned: (B, V) or (V,) probabilities (or logits with ``logits=True``) of the first
            generated token for the original and the pruned model.
        k, eps: the paper's k = 10 and eps = 1e-8.

    Returns:
        :class:`SampleStat` with the per-sample divergences (float64, shape (B,)) and their mean.
    """
    make = TopKReference.from_logits if logits else TopKReference.from_probs
    ref = make(original, k=k, eps=eps)
    return ref.kl_logits(pruned) if logits else ref.kl(pruned)


def accuracy_drop(full_scores, pruned_scores) -> SampleStat:
    """Accuracy-drop objective of Appendix F.5 (Eq. 13): ``Accuracy(L, L, N_v) - Accuracy(policy)``.

    Args:
        full_scores, pruned_scores: per-sample scores (0/1 correctness or a soft score such as VQA accuracy)
            of the original and the pruned model on the same samples, in the same order.

    Returns:
        Per-sample drops ``full - pruned`` and their mean, which equals ``mean(full) - mean(pruned)``.
        Unlike the KL divergence it can be negative (a pruned model may answer a sample better); the
        optimiser minimises it all the same.
    """
    full = torch.as_tensor(full_scores, dtype=torch.float64).reshape(-1)
    pruned = torch.as_tensor(pruned_scores, dtype=torch.float64).reshape(-1)
    if full.shape != pruned.shape:
        raise ValueError(f"score vectors differ in length: {full.numel()} vs {pruned.numel()}")
    return SampleStat.of(full - pruned)
