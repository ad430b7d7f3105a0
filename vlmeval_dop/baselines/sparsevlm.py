"""SparseVLM (Zhang et al., ICML 2025, "SparseVLM: Visual Token Sparsification for Efficient
Vision-Language Model Inference"), decoder-side, text-guided progressive sparsification with recycling.

Method (official LLaVA-1.5 code, Gumpest/SparseVLMs, `USE_VERSION=1_0`; the 2_0 path is SparseVLM+):
1. Raters, once per prefill, from the decoder input: for the visual embeddings V and the text embeddings
   T after the image, `s = softmax(V T^T, over text).mean(over visual)`; raters are the text tokens with
   `s > mean(s)`.
2. After each sparsification layer (official: 0-based layers 2, 6, 15, scores from that layer's attention),
   the visual tokens still present are scored by the raters' softmax attention to them (mean over heads,
   then over raters) and the top `keep` (stage schedule, at most present - 1) survive.
3. Recycling: of the deleted tokens, the `int(0.3 n_del) + 1` best scored are clustered (DPC-kNN on that
   layer's output hidden states, `int(n_rec / 10) + 1` clusters, k = the cluster count) and each cluster
   is averaged into one aggregated token that stays in the sequence.

Per-stage kept counts (official `score.py`, LLaVA-1.5, 576 visual tokens): RETAIN_TOKN 192 -> [300, 200,
110], 128 -> [303, 110, 36], 96 -> [238, 48, 26], 64 -> [66, 30, 17]. The paper's adaptive deletion count
(from the rank of the text-visual attention matrix) is replaced by these fixed schedules, as in the official
code that produced the published LLaVA numbers: fixed counts make the per-layer token counts (and so the
TFLOPs) a function of the arguments, which the matched-TFLOPs comparison needs. For other `retain` values
the schedule is interpolated linearly between the official ones (scaled proportionally below 64 and above
192), and for other visual token counts (LLaVA-NeXT) everything is scaled by `n_visual / 576`; the official
code has no LLaVA-NeXT schedule. Layers 0-2 run all visual tokens: the official layer 2 computes its full
output before pruning it (its score.py comment "2*576 4*300 10*200 16*110" counts one full layer less than
the code runs; we count what the code runs). The paper-budget entries solve `retain` against the analytic
TFLOPs (eval_configs/baselines.yaml); three full layers make LLaVA-1.5 23 % and LLaVA-NeXT 9 % infeasible.

Deviations from the official code (and why):
- Positions: the official code rebuilds the sequence and renumbers positions contiguously, appending the
  aggregated tokens right after the kept visual tokens. Here, as for FastV/PDrop in this package, every
  token keeps its original RoPE position (dropped tokens leave the later layers), and an aggregated token
  takes the place (position and slot) of its cluster center, its *representative*: the center's hidden
  state is overwritten by the cluster mean through `PruneDecision` (executor/token_pruner.py).
- The attention rows are recomputed from the layer's q/k (`attention.query_attention`) instead of running
  eager attention, exactly the same probabilities.
- DPC-kNN: the official code adds uniform noise (1e-6) to the densities to break ties; here of two equal
  densities the earlier token counts as the denser one (deterministic, same effect: one peak per tie).
  The cluster mean is exact (the official divides by count + 1e-6).
- Batches (the official code supports batch size 1): every sample is handled on its own; text tokens are
  the real tokens after the sample's last visual token. Fallbacks the official code lacks: no text after
  the image -> the last real token rates; no token above the mean -> all text tokens rate.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..executor.token_pruner import DecoderPruneContext, PruneDecision
from .attention import query_attention

# official score.py (version 1_0), LLaVA-1.5 with 576 visual tokens: RETAIN_TOKN -> kept per stage
OFFICIAL_SCHEDULES: dict[int, tuple[int, int, int]] = {
    64: (66, 30, 17),
    96: (238, 48, 26),
    128: (303, 110, 36),
    192: (300, 200, 110),
}
OFFICIAL_LAYERS = (2, 6, 15)  # official pruning_loc (0-based: pruning after these layers)
OFFICIAL_VISUAL = 576
RECYCLE_RATIO = 0.3  # official: top 30 % of the deleted tokens are recycled
CLUSTER_RATIO = 0.1  # official: int(n_recycled / 10) + 1 clusters


def official_keep_counts(retain: float, n_visual: int = OFFICIAL_VISUAL) -> list[int]:
    """Per-stage kept visual tokens for the official RETAIN_TOKN setting `retain`.

    `retain` counts visual tokens of this model: for 576 tokens the official settings 64/96/128/192 give
    the official lists exactly; in between the lists are interpolated linearly, below 64 (above 192) the
    64 (192) list is scaled by retain/64 (retain/192). For `n_visual` != 576 retain and counts are scaled by
    n_visual / 576 (no official schedule exists there).
    """
    if not retain > 0 or n_visual < 1:
        raise ValueError(f"SparseVLM retain must be > 0 and n_visual >= 1, got retain={retain}, n_visual={n_visual}")
    scale = n_visual / OFFICIAL_VISUAL
    r = retain / scale
    keys = sorted(OFFICIAL_SCHEDULES)
    if r <= keys[0]:
        base = [c * r / keys[0] for c in OFFICIAL_SCHEDULES[keys[0]]]
    elif r >= keys[-1]:
        base = [c * r / keys[-1] for c in OFFICIAL_SCHEDULES[keys[-1]]]
    else:
        hi = next(k for k in keys if k >= r)
        lo = keys[keys.index(hi) - 1]
        t = (r - lo) / (hi - lo)
        base = [a + t * (b - a) for a, b in zip(OFFICIAL_SCHEDULES[lo], OFFICIAL_SCHEDULES[hi])]
    return [int(math.floor(c * scale + 0.5)) for c in base]


@dataclass(frozen=True)
class StageCounts:
    """Token counts of one sparsification stage (one sample)."""

    present: int  # visual tokens in the layer that scores
    kept: int  # kept by score
    deleted: int
    recycled: int  # deleted tokens that are clustered
    clusters: int  # aggregated tokens added back
    after: int  # visual tokens in the following layers (kept + clusters)


def recycle_counts(n_deleted: int, recycle_ratio: float = RECYCLE_RATIO, cluster_ratio: float = CLUSTER_RATIO) -> tuple[int, int]:
    """(recycled, clusters) for `n_deleted` deleted tokens, the official formulas (0 deleted -> (0, 0))."""
    if n_deleted <= 0:
        return 0, 0
    recycled = min(n_deleted, int(n_deleted * recycle_ratio) + 1)
    return recycled, min(recycled, int(recycled * cluster_ratio) + 1)


def stage_counts(
    n_visual: int, keep: Sequence[int], recycle: bool = True,
    recycle_ratio: float = RECYCLE_RATIO, cluster_ratio: float = CLUSTER_RATIO,
) -> list[StageCounts]:  # fmt: skip
    """Visual token counts through the stages: each keeps min(keep, present - 1) (official cap)."""
    out, n = [], n_visual
    for k in keep:
        if n == 0:
            out.append(StageCounts(0, 0, 0, 0, 0, 0))
            continue
        kept = min(k, n - 1)
        rec, clu = recycle_counts(n - kept, recycle_ratio, cluster_ratio) if recycle else (0, 0)
        out.append(StageCounts(n, kept, n - kept, rec, clu, kept + clu))
        n = kept + clu
    return out


def sparsevlm_layer_tokens(
    num_layers: int, layers: Sequence[int], keep: Sequence[int], n_visual: int, text_tokens: int,
    recycle: bool = True, recycle_ratio: float = RECYCLE_RATIO, cluster_ratio: float = CLUSTER_RATIO,
) -> list[tuple[int, int]]:  # fmt: skip
    """Per-layer (n_A, n_P) of SparseVLM for the analytic FLOPs model (`flops.schedule_flops`)."""
    stages = stage_counts(n_visual, keep, recycle, recycle_ratio, cluster_ratio)
    after = {layer + 1: s.after for layer, s in zip(layers, stages)}
    n, out = n_visual, []
    for i in range(num_layers):
        n = after.get(i, n)
        out.append((text_tokens + n,) * 2)
    return out


def select_raters(visual_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(T,) bool: text tokens rating the visual ones (official "Select Text Raters", SparseVLM Sec. 3.2).

    `softmax(V T^T, dim=text).mean(dim=visual) > its mean`; all text tokens if none is above the mean.
    """
    rel = torch.softmax(visual_embeds.float() @ text_embeds.float().T, dim=-1).mean(0)
    raters = rel > rel.mean()
    return raters if bool(raters.any()) else torch.ones_like(raters)


def pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """(m, m) Euclidean distances / sqrt(C) (official scaling), via one Gram product (memory O(m^2))."""
    x = x.float()
    sq = (x * x).sum(-1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
    d2 = (d2 + d2.T) / 2  # exactly symmetric, so mutual neighbours get exactly equal densities
    d2.fill_diagonal_(0.0)
    return d2.sqrt() / math.sqrt(x.shape[-1])


def dpc_knn(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of the official `cluster_and_merge`: (centers (k,), assignment (m,) in 0..k-1).

    density_i = exp(-mean of the squared distances to the k nearest tokens (itself included));
    delta_i = distance to the nearest denser token (the largest distance overall if none; of equal
    densities the earlier token counts as denser);
    centers = top-k of density x delta; every token joins its nearest center, centers their own.
    """
    m = x.shape[0]
    if not 1 <= k <= m:
        raise ValueError(f"DPC-kNN needs 1 <= k <= {m} tokens, got k={k}")
    dist = pairwise_distance(x)
    density = torch.exp(-(torch.topk(dist, k, dim=-1, largest=False).values ** 2).mean(-1))
    # [i, j]: j is denser than i; equal densities (mutual nearest neighbours at k=2 are common) count the
    # earlier token as denser, where the official code breaks them with 1e-6 random noise
    idx = torch.arange(m, device=x.device)
    tie = (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None])
    denser = (density[None, :] > density[:, None]) | tie
    delta = torch.where(denser, dist, dist.max()).min(-1).values
    centers = torch.sort(delta * density, descending=True, stable=True).indices[:k]
    assign = dist[centers].argmin(0)
    assign[centers] = torch.arange(k, device=x.device)
    return centers, assign


def merge_clusters(x: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """(k, C) mean of each cluster's tokens (every cluster is non-empty: it holds its center)."""
    sums = torch.zeros(k, x.shape[-1], dtype=torch.float32, device=x.device).index_add_(0, assign, x.float())
    counts = torch.bincount(assign, minlength=k).to(sums)
    return sums / counts[:, None]


@dataclass
class Stage:
    """One sample's decision at one sparsification layer, in local indices of the visual tokens present."""

    kept: torch.Tensor  # kept by score (ascending)
    deleted: torch.Tensor  # not kept by score (ascending), representatives included
    recycled: torch.Tensor  # deleted tokens that are clustered (ascending)
    representatives: torch.Tensor  # cluster centers (ascending): they stay and carry the cluster means
    merged: torch.Tensor  # (clusters, C) float32 means, rows in the order of `representatives`


def sparsify_stage(
    score: torch.Tensor, hidden: torch.Tensor, keep: int, recycle: bool = True,
    recycle_ratio: float = RECYCLE_RATIO, cluster_ratio: float = CLUSTER_RATIO,
) -> Stage:  # fmt: skip
    """Keep the top min(keep, n - 1) of `score` (n,), recycle the best-scored deleted tokens of `hidden`
    (n, C) into DPC-kNN cluster means placed at their centers. Ties go to the earlier token."""
    n = score.numel()
    order = torch.sort(score, descending=True, stable=True).indices
    kept = torch.sort(order[: min(keep, n - 1)]).values
    deleted = torch.sort(order[min(keep, n - 1) :]).values
    n_rec, n_clu = recycle_counts(deleted.numel(), recycle_ratio, cluster_ratio) if recycle else (0, 0)
    empty = deleted[:0]
    if n_rec == 0:
        return Stage(kept, deleted, empty, empty, hidden.new_zeros(0, hidden.shape[-1], dtype=torch.float32))
    best = torch.sort(score[deleted], descending=True, stable=True).indices[:n_rec]
    recycled = deleted[torch.sort(best).values]
    x = hidden[recycled]
    centers, assign = dpc_knn(x, n_clu)
    merged = merge_clusters(x, assign, n_clu)
    reps, perm = torch.sort(recycled[centers])
    return Stage(kept, deleted, recycled, reps, merged[perm])


def sparsevlm_selection_flops(spec, stats: Sequence[dict]) -> float:
    """FLOPs of our selection work for one sample's `SparseVLM.last_stats` (matmuls only, as measured).

    Raters: V T^T (2 N_v T H). Each stage: K projection of the keys in the layer, Q projection of the
    raters, their score rows (as `query_attention`), and the recycled tokens' Gram matrix (2 m^2 H).
    """
    h, total = spec.hidden_size, 0.0
    for s in stats:
        if s["layer"] is None:
            total += 2.0 * s["visual"] * s["text"] * h
        else:
            q, n = s["queries"], s["keys"]
            total += 2.0 * n * h * spec.kv_dim + 2.0 * q * h * spec.q_dim + 2.0 * q * n * spec.q_dim
            total += 2.0 * s["recycled"] ** 2 * h
    return total


class SparseVLM:
    """SparseVLM for `apply_dop(model, DOPPolicy.full(L), token_pruner=SparseVLM(retain=192))`.

    Args:
        layers: 0-based layers after which visual tokens are sparsified (official (2, 6, 15)); the scores
            come from these layers' attention.
        retain: official RETAIN_TOKN setting (192 default; 64/96/128/192 are the official schedules,
            others interpolated, see `official_keep_counts`); ignored when `keep` is given.
        keep: explicit kept visual tokens per stage (one per layer in `layers`).
        n_visual: visual tokens entering the decoder, to scale `retain` (576 for LLaVA-1.5).
        recycle: recycle deleted tokens into aggregated ones (official: on).
        recycle_ratio / cluster_ratio: official 0.3 / 0.1.

    The rater selection needs the decoder input, so the hook also calls `select` after layer 0 (dropping
    nothing there unless 0 is a sparsification layer). `last_stats[b]` records, per sample, the work done
    (for `sparsevlm_selection_flops`) and the counts of each stage.
    """

    name = "sparsevlm"

    def __init__(
        self, layers: Sequence[int] = OFFICIAL_LAYERS, retain: float = 192, keep: Sequence[int] | None = None,
        n_visual: int = OFFICIAL_VISUAL, recycle: bool = True, recycle_ratio: float = RECYCLE_RATIO,
        cluster_ratio: float = CLUSTER_RATIO,
    ):  # fmt: skip
        layers = [int(x) for x in layers]
        if not layers or any(x < 0 for x in layers) or sorted(set(layers)) != layers:
            raise ValueError(f"SparseVLM layers must be strictly increasing layer indices >= 0, got {layers}")
        if keep is None:
            if len(layers) != len(OFFICIAL_LAYERS):
                raise ValueError(
                    f"SparseVLM's official schedules have {len(OFFICIAL_LAYERS)} stages but {len(layers)} layers "
                    "were given; pass keep=[...] with one count per layer"
                )
            keep = official_keep_counts(retain, n_visual)
        keep = [int(k) for k in keep]
        if len(keep) != len(layers) or any(k < 0 for k in keep):
            raise ValueError(f"SparseVLM keep needs one count >= 0 per layer {layers}, got {keep}")
        if not (0.0 <= recycle_ratio <= 1.0 and 0.0 <= cluster_ratio <= 1.0):
            raise ValueError(
                f"SparseVLM recycle_ratio and cluster_ratio must be in [0, 1], got {recycle_ratio}, {cluster_ratio}"
            )
        self.schedule = dict(zip(layers, keep))
        self.recycle, self.recycle_ratio, self.cluster_ratio = recycle, recycle_ratio, cluster_ratio
        self.layers = tuple(sorted({0, *layers}))
        self._raters: torch.Tensor | None = None
        self.last_stats: list[list[dict]] = []

    @staticmethod
    def layer_tokens(
        num_layers: int, n_visual: int, text_tokens: int, layers: Sequence[int] = OFFICIAL_LAYERS,
        retain: float = 192, keep: Sequence[int] | None = None, recycle: bool = True,
        recycle_ratio: float = RECYCLE_RATIO, cluster_ratio: float = CLUSTER_RATIO,
    ) -> list[tuple[int, int]]:  # fmt: skip
        """Per-layer (n_A, n_P) for the analytic TFLOPs (used to match baselines to a budget)."""
        if keep is None:
            keep = official_keep_counts(retain, n_visual)
        return sparsevlm_layer_tokens(num_layers, list(layers), keep, n_visual, text_tokens, recycle, recycle_ratio, cluster_ratio)

    # ------------------------------------------------------------------ raters
    def raters(self, ctx: DecoderPruneContext) -> torch.Tensor:
        """(B, N) bool rater positions from the decoder input (`ctx.hidden_in` of layer 0)."""
        B, N, _ = ctx.hidden_in.shape
        out = torch.zeros(B, N, dtype=torch.bool, device=ctx.hidden_in.device)
        vis_all = ctx.visual & ctx.alive
        real = ctx.pad_valid & ctx.alive
        self.last_stats = [[] for _ in range(B)]
        for b in range(B):
            vis = torch.nonzero(vis_all[b]).flatten()
            if vis.numel() == 0:
                continue
            after = torch.arange(N, device=vis.device) > vis[-1]
            text = torch.nonzero(after & real[b] & ~ctx.visual[b]).flatten()
            if text.numel() == 0:  # image at the very end: the last real token rates
                out[b, torch.nonzero(real[b]).flatten()[-1]] = True
                continue
            sel = select_raters(ctx.hidden_in[b, vis], ctx.hidden_in[b, text])
            out[b, text[sel]] = True
            self.last_stats[b].append({"layer": None, "visual": vis.numel(), "text": text.numel(), "raters": int(sel.sum())})
        return out

    # ------------------------------------------------------------------ one stage
    def relation(self, ctx: DecoderPruneContext, raters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) mean attention of each sample's raters to every token in this layer, and the query rows
        used (union of the raters over the batch)."""
        rows = torch.nonzero(raters.any(0)).flatten()
        attn = query_attention(ctx, rows)  # (B, Q, N), mean over heads
        own = raters[:, rows].to(attn.dtype)  # (B, Q): which rows are this sample's raters
        rel = (attn * own[..., None]).sum(1) / own.sum(1).clamp_min(1)[:, None]
        return rel, rows

    def select(self, ctx: DecoderPruneContext) -> PruneDecision | None:
        if ctx.layer_idx == 0:
            self._raters = self.raters(ctx)
        if ctx.layer_idx not in self.schedule or self._raters is None or not bool(self._raters.any()):
            return None
        keep = self.schedule[ctx.layer_idx]
        rel, rows = self.relation(ctx, self._raters)
        B, N = ctx.visual.shape
        drop = torch.zeros(B, N, dtype=torch.bool, device=ctx.visual.device)
        update = torch.zeros_like(drop)
        values = []
        keys = (ctx.alive & ctx.pad_valid).sum(1).tolist()
        for b in range(B):
            vis = torch.nonzero(ctx.visual[b] & ctx.alive[b]).flatten()
            if vis.numel() == 0:
                continue
            st = sparsify_stage(rel[b, vis], ctx.hidden_out[b, vis], keep, self.recycle, self.recycle_ratio, self.cluster_ratio)
            drop[b, vis[st.deleted]] = True
            stat = {"layer": ctx.layer_idx, "keys": keys[b], "queries": rows.numel(), "present": vis.numel(),
                    "kept": st.kept.numel(), "recycled": st.recycled.numel(), "clusters": st.representatives.numel()}  # fmt: skip
            if st.representatives.numel():
                reps = vis[st.representatives]  # ascending, like the rows of st.merged
                drop[b, reps] = False
                update[b, reps] = True
                values.append(st.merged)
            self.last_stats[b].append(stat)
        vals = torch.cat(values) if values else None
        return PruneDecision(drop=drop, update_mask=update if values else None, update_values=vals)
