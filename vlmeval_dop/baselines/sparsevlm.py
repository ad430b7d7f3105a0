"""SparseVLM (Zhang et al., ICML 2025, "SparseVLM: Visual Token Sparsification for Efficient
Vision-Language Model Inference"), decoder-side, text-guided progressive sparsification with recycling.

This is the official method as released in Gumpest/SparseVLMs (commit 26a5f48, `USE_VERSION=1_0`, the
default; files `llava/model/language_model/modelling_sparse_llama.py` (`LlamaDynamicvitModel.forward`),
`score.py` (`attn_postprocess_topk`), `utils.py` (`cluster_and_merge`); 2_0 is SparseVLM+), proven on golden
outputs of that code (tests/golden/sparsevlm/, tests/test_golden_sparsevlm.py: kept sets, recycled tokens and
their order, merged rows, sequence order, positions and logits of prefill and decoding all equal, in float32
and in float16, see below):
1. Raters, once per prefill, from the decoder input: for the visual embeddings V and the text embeddings
   T after the image, `s = softmax(V T^T, over text).mean(over visual)`; raters are the text tokens with
   `s > mean(s)`.
2. After each sparsification layer (official: 0-based layers 2, 6, 15; that layer runs on all its tokens),
   the visual tokens present are scored by the raters' softmax attention in that layer (mean over heads,
   then over raters) and `torch.topk(score, min(keep, present - 1))` survive.
3. Recycling: of the deleted tokens, the `int(0.3 n_del) + 1` best scored (`torch.topk` order) are
   clustered by DPC-kNN on that layer's output hidden states (`int(n_rec / 10) + 1` clusters, k = the cluster
   count; densities + `torch.rand * 1e-6` tie-breaking noise) and each cluster becomes one aggregated
   token (its members weighted 1 / (size + 1e-6)).
4. The sequence is rebuilt as prefix, kept visual tokens (in order), aggregated tokens (in the clustering's
   center order), text; positions are renumbered 0..n-1 for the later layers, and in decoding each layer's
   new token takes that layer's own cache length as position (official `get_usable_length`). Aggregated
   tokens are visual tokens for the later stages (they can be kept, deleted and recycled again).
Here step 4 is a `PruneDecision(renumber=True, order=keys)`: the aggregated rows take over the slots of
tokens deleted at this layer (`update_mask/update_values`) with order keys after the last kept visual token;
the executor renumbers positions in that order and continues decoding positions per layer.

Tie-breaking noise: the official code draws `torch.rand((1, n_rec)) * 1e-6` from torch's default generator
(on the hidden states' device, in their dtype) once per stage; so does this module, in the same order, so a
run seeded like the official one (`torch.manual_seed(s)` before the prefill, nothing else drawing random
numbers in between, as in inference) adds the same noise. `noise_seed=s` draws it from a private generator
seeded with s at each prefill instead (the same numbers as the official run after `torch.manual_seed(s)`,
independent of other uses of the global generator). The noise decides near-equal densities (mutual nearest
neighbours have exactly equal ones): on the golden fixtures, other noise changes the aggregated tokens in 4 of 18 cases.

Per-stage kept counts (official `score.py`, LLaVA-1.5, 576 visual tokens): RETAIN_TOKN 192 -> [300, 200,
110], 128 -> [303, 110, 36], 96 -> [238, 48, 26], 64 -> [66, 30, 17]. The paper's adaptive deletion count
(from the rank of the text-visual attention matrix, the first release 91fb6d9) is replaced by these fixed
schedules in the code that produced the published LLaVA numbers; fixed counts make the per-layer token
counts (and so the TFLOPs) a function of the arguments, which the matched-TFLOPs comparison needs. For other
`retain` values the schedule is interpolated linearly between the official ones (scaled proportionally below
64 and above 192) -- the official README says to edit score.py's lists for other token counts; this is the
only knob solved for a TFLOPs label -- and for other visual token counts (LLaVA-NeXT) everything is scaled by
`n_visual / 576`; the official code has no LLaVA-NeXT schedule. Layers 0-2 run all visual tokens: the
official layer 2 computes its full output before pruning it (its score.py comment "2*576 4*300 10*200
16*110" counts one full layer less than the code runs; we count what the code runs). Aggregated tokens
count as tokens of the later layers (`stage_counts`, `layer_tokens`). The paper-budget entries solve `retain`
against the analytic TFLOPs (eval_configs/baselines.yaml); three full layers make LLaVA-1.5 23 % and
LLaVA-NeXT 9 % infeasible.

Float16 (the official inference dtype): the official code computes every layer's attention explicitly
(`utils.scaled_dot_product_attention`: q k^T * (1 / sqrt(d)), softmax, @ v, all in the model dtype) and
its raters, scores, clustering and merging in the model dtype. This module follows it: rows as that
attention (`query_attention(multiply_scale=True)`: float16 scores, softmax cast back to float16, mean over
heads in float16), the mean over raters in float16 (so float16 ties reach `torch.topk` as there), DPC-kNN
and merging in float16 (the 1e-6 density noise vanishes in float16 there as here). Measured against the
official code run in float16 (tests/golden/sparsevlm/float16.json: 3 seeds x RETAIN_TOKN 192/96/64, all
three stages, prefill + 3 greedy steps, CPU): with the decoder on eager attention (HF eager does the same
arithmetic) everything is bit for bit equal -- raters, kept sets, recycled tokens and order, merged rows,
sequence order, positions, greedy tokens -- and logits within 3e-3 (a few float16 ulps). The tiny model's head_dim 16 makes
1 / sqrt(d) exact, so multiplying and dividing agree there; for head_dim 128 the multiply is the official form.
With stock sdpa attention (fused kernels, other float16 rounding of the hidden states) near-ties fall
otherwise: kept sets equal in 14 of 27 stages, overlap >= 0.765 (>= 0.985 at the first stage), recycled
order rarely equal, greedy tokens equal in 9/9 cases, logits within 0.14. So a float16 run that must be
the official one uses `attn_implementation="eager"` for the decoder. (Measured causes of disagreement, each
alone, decoder on eager: the rater mean in float32 changes the first stage's kept set in 3 of 9 cases and
the recycled order in 23 of 27 stages; gathering the survivors in slot order instead of sequence order
rounds later hidden states otherwise by float16 ulps, changing later stages' kept sets; `.half()` on the
model rounds RoPE's `inv_freq`, which real checkpoints keep in float32.)

Differences from the official code that do not change its results on the fixtures (float32 and float16):
- Attention rows are recomputed from the layer's q/k for the raters only (`attention.query_attention`)
  instead of the layer's full attention matrix (the same values, see above).
- The rebuilt sequence is not materialised: the executor keeps every slot, gathers the survivors in the
  pruner's sequence order (`PruneDecision.order`), so attention and the cache add in the official order.
- Batches (the official code supports batch size 1): every sample is handled on its own (noise drawn per
  sample, in batch order); text tokens are the real tokens after the sample's last visual token; with several
  images the visual tokens of a sample form one set. Fallbacks the official code lacks: no text after the
  image -> the last real token rates; no token above the mean -> all text tokens rate.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..executor.families import renumbering_families
from ..executor.token_pruner import DecoderPruneContext, PruneDecision
from ..methods import register_method
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

    `softmax(V T^T, dim=text).mean(dim=visual) > its mean`, computed in the inputs' dtype as the official
    code does; all text tokens if none is above the mean (the official code would have no rater).
    """
    rel = torch.softmax(visual_embeds @ text_embeds.T, dim=-1).mean(0)
    raters = rel > rel.mean()
    return raters if bool(raters.any()) else torch.ones_like(raters)


def pairwise_distance(x: torch.Tensor, chunk_bytes: int = 1 << 28) -> torch.Tensor:
    """(m, m) Euclidean distances / sqrt(C) of the rows of x (m, C), in x's dtype.

    Computed from the row differences as the official `cluster_and_merge` does (not from a Gram matrix),
    so the distances, hence the densities and their ties, are the official values bit for bit; the rows
    are processed in chunks of at most `chunk_bytes` of differences (the same values, bounded memory).
    """
    m, C = x.shape
    rows = max(1, chunk_bytes // max(1, m * C * x.element_size()))
    dist = torch.cat([(x[i : i + rows, None, :] - x[None, :, :]).norm(dim=-1, p=2) for i in range(0, m, rows)])
    return dist / (C**0.5)


def density_noise(m: int, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(m,) official density tie-breaking noise: `torch.rand((1, m)) * 1e-6` in `like`'s dtype and device.

    With `generator=None` this draws from torch's default generator exactly as the official code does, so
    a run seeded like the official one (`torch.manual_seed(s)` before the prefill) draws the same numbers.
    """
    return (torch.rand((1, m), generator=generator, device=like.device, dtype=like.dtype) * 1e-6)[0]


def dpc_knn(x: torch.Tensor, k: int, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of the official `cluster_and_merge`: (centers (k,), assignment (m,) in 0..k-1).

    density_i = exp(-mean of the squared distances to the k nearest rows, itself included) + noise_i
    (official: `density_noise`; None adds nothing); delta_i = distance to the nearest strictly denser row
    (the largest distance overall if none); centers = `torch.topk(delta x density, k)` in that order; every
    row joins its nearest center (`argmin`), centers their own. All in x's dtype, as the official code.
    """
    m = x.shape[0]
    if not 1 <= k <= m:
        raise ValueError(f"DPC-kNN needs 1 <= k <= {m} tokens, got k={k}")
    dist = pairwise_distance(x)
    nearest = torch.topk(dist, k=k, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    if noise is not None:
        density = density + noise
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    delta = torch.where(denser, dist, dist.max()).min(dim=-1).values
    centers = torch.topk(delta * density, k=k, dim=-1).indices
    assign = dist[centers].argmin(dim=0)
    assign[centers] = torch.arange(k, device=x.device)
    return centers, assign


def merge_clusters(x: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """(k, C) cluster means in x's dtype: each row weighted 1 / (cluster size + 1e-6), then summed, as the
    official `cluster_and_merge` averages (so the means are its values, not exact means)."""
    size = x.new_zeros(k).index_add_(0, assign, x.new_ones(x.shape[0])) + 1e-6
    return x.new_zeros(k, x.shape[-1]).index_add_(0, assign, x * (1.0 / size[assign])[:, None])


@dataclass
class Stage:
    """One sample's decision at one sparsification layer, in local indices of the visual tokens present
    (in sequence order)."""

    kept: torch.Tensor  # kept by score (ascending = sequence order)
    deleted: torch.Tensor  # not kept by score (ascending)
    recycled: torch.Tensor  # deleted tokens that are clustered, in the official order (best score first)
    centers: torch.Tensor  # cluster centers (local indices), in the order of `merged`
    merged: torch.Tensor  # (clusters, C) aggregated tokens in the official order (appended in this order)


def sparsify_stage(
    score: torch.Tensor, hidden: torch.Tensor, keep: int, recycle: bool = True,
    recycle_ratio: float = RECYCLE_RATIO, cluster_ratio: float = CLUSTER_RATIO,
    generator: torch.Generator | None = None,
) -> Stage:  # fmt: skip
    """One official stage on the visual tokens present, in sequence order: keep `torch.topk(score,
    min(keep, n - 1))`; of the deleted ones recycle the `int(ratio n_del) + 1` best (`torch.topk` order)
    and cluster their rows of `hidden` (n, C) with `dpc_knn` (k = `int(cluster_ratio n_rec) + 1`, noise
    from `density_noise(generator)`) into aggregated tokens."""
    n = score.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=score.device)
    mask[torch.topk(score, min(keep, n - 1)).indices] = True
    kept, deleted = torch.nonzero(mask).flatten(), torch.nonzero(~mask).flatten()
    n_rec, n_clu = recycle_counts(deleted.numel(), recycle_ratio, cluster_ratio) if recycle else (0, 0)
    if n_rec == 0:
        empty = deleted[:0]
        return Stage(kept, deleted, empty, empty, hidden.new_zeros(0, hidden.shape[-1]))
    recycled = deleted[torch.topk(score[deleted], n_rec).indices]
    x = hidden[recycled]
    centers, assign = dpc_knn(x, n_clu, density_noise(n_rec, x, generator))
    return Stage(kept, deleted, recycled, recycled[centers], merge_clusters(x, assign, n_clu))


def sparsevlm_selection_flops(spec, stats: Sequence[dict]) -> float:
    """FLOPs of our selection work for one sample's `SparseVLM.last_stats` (matmuls only, as measured).

    Raters: V T^T (2 N_v T H). Each stage: K projection of the keys in the layer, Q projection of the
    raters and their score rows (as `query_attention`). The recycled tokens' distances are elementwise
    (row differences, as the official code), not matmuls, and are not counted.
    """
    h, total = spec.hidden_size, 0.0
    for s in stats:
        if s["layer"] is None:
            total += 2.0 * s["visual"] * s["text"] * h
        else:
            q, n = s["queries"], s["keys"]
            total += 2.0 * n * h * spec.kv_dim + 2.0 * q * h * spec.q_dim + 2.0 * q * n * spec.q_dim
    return total


def _sparsevlm_cost(spec, args: dict, counts, n_visual: int, text_tokens: int) -> float:
    """Selection FLOPs of one sample (registration's cost model); every instruction token counted as a rater
    (the raters are data-dependent: an upper bound)."""
    stats = [{"layer": None, "visual": n_visual, "text": text_tokens}]
    for layer in args.get("layers", OFFICIAL_LAYERS):
        stats.append({"layer": layer, "queries": text_tokens, "keys": counts[layer][0]})
    return sparsevlm_selection_flops(spec, stats)


@register_method("sparsevlm", kind="decoder", budget_knob="retain", knob_range=(1, "n_visual"),
                 selection_cost=_sparsevlm_cost)
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
        noise_seed: draw the density tie-breaking noise from a generator seeded with this at each prefill
            (None, the default: torch's default generator, as the official code; see the module docstring).

    The rater selection needs the decoder input, so the hook also calls `select` after layer 0 (dropping
    nothing there unless 0 is a sparsification layer). `last_stats[b]` records, per sample, the work done
    (for `sparsevlm_selection_flops`) and the counts of each stage; `last_stages[s][b]` the slots of stage
    s (last prefill): `visual` (in sequence order), `kept`, `recycled` (official order), `merged_slots`
    (ascending; row j of `merged` lives in slot j) and `merged` (official order).
    """

    official_attention = "eager"  # the official code reads the layers' eager attention weights

    families = renumbering_families()  # it renumbers positions: 1D RoPE, no sliding windows

    name = "sparsevlm"
    # the density noise is one stream drawn sample after sample (torch's default generator, or one private
    # generator per prefill): in a batch a sample gets other numbers than in a one-sample run, so batched
    # VLMEvalKit inference (run.py --batch-size) runs this method one sample at a time
    batch_exact = False

    def __init__(
        self, layers: Sequence[int] = OFFICIAL_LAYERS, retain: float = 192, keep: Sequence[int] | None = None,
        n_visual: int = OFFICIAL_VISUAL, recycle: bool = True, recycle_ratio: float = RECYCLE_RATIO,
        cluster_ratio: float = CLUSTER_RATIO, noise_seed: int | None = None,
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
        self.noise_seed = noise_seed
        self._raters: torch.Tensor | None = None
        self._generator: torch.Generator | None = None
        self.last_stats: list[list[dict]] = []
        self.last_stages: list[dict[int, dict]] = []

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
        self.last_stages = []
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
        used (union of the raters over the batch). For float16/bfloat16 models the mean over raters is taken
        in that dtype (official `relation_vis_text.mean(1)` on the model-dtype weights), so its rounding and
        the ties `torch.topk` then breaks are the official ones."""
        rows = torch.nonzero(raters.any(0)).flatten()
        # official v1.0 attention (utils.scaled_dot_product_attention): q k^T * (1 / sqrt(d)), softmax, mean over heads
        attn = query_attention(ctx, rows, multiply_scale=True)  # (B, Q, N), values of the model dtype
        dt = ctx.hidden_in.dtype
        if dt in (torch.float16, torch.bfloat16):
            sel = raters[:, rows]
            return torch.stack([
                attn[b, sel[b]].to(dt).mean(0) if bool(sel[b].any()) else attn.new_zeros(attn.shape[-1], dtype=dt)
                for b in range(attn.shape[0])
            ]), rows  # fmt: skip
        own = raters[:, rows].to(attn.dtype)  # (B, Q): which rows are this sample's raters
        rel = (attn * own[..., None]).sum(1) / own.sum(1).clamp_min(1)[:, None]
        return rel, rows

    def select(self, ctx: DecoderPruneContext) -> PruneDecision | None:
        if ctx.layer_idx == 0:
            self._raters = self.raters(ctx)
            self._generator = None
            if self.noise_seed is not None:
                self._generator = torch.Generator(device=ctx.hidden_out.device).manual_seed(self.noise_seed)
        if ctx.layer_idx not in self.schedule or self._raters is None or not bool(self._raters.any()):
            return None
        keep = self.schedule[ctx.layer_idx]
        rel, rows = self.relation(ctx, self._raters)
        B, N = ctx.visual.shape
        drop = torch.zeros(B, N, dtype=torch.bool, device=ctx.visual.device)
        update = torch.zeros_like(drop)
        order = ctx.order.clone()
        values = []
        keys = (ctx.alive & ctx.pad_valid).sum(1).tolist()
        self.last_stages.append({})
        for b in range(B):
            vis = torch.nonzero(ctx.visual[b] & ctx.alive[b]).flatten()
            if vis.numel() == 0:
                continue
            vis = vis[torch.sort(ctx.order[b, vis], stable=True).indices]  # sequence order
            st = sparsify_stage(
                rel[b, vis], ctx.hidden_out[b, vis], keep, self.recycle, self.recycle_ratio, self.cluster_ratio,
                self._generator,
            )  # fmt: skip
            drop[b, vis[st.deleted]] = True
            m = st.merged.shape[0]
            # the aggregated tokens take over slots of tokens deleted now (row j -> j-th slot by index, as
            # update_values are ordered) with keys that sort them, in their official order, right after
            # the kept visual tokens: the official sequence is prefix, kept, aggregated, text
            slots = torch.sort(vis[st.deleted[:m]]).values
            if m:
                order[b, slots] = _append_keys(ctx.order[b], vis[st.kept], vis, ctx.alive[b] & ~drop[b], m)
                drop[b, slots] = False
                update[b, slots] = True
                values.append(st.merged)
            self.last_stages[-1][b] = {
                "layer": ctx.layer_idx, "visual": vis, "kept": vis[st.kept], "recycled": vis[st.recycled],
                "merged_slots": slots, "merged": st.merged,
            }  # fmt: skip
            self.last_stats[b].append({
                "layer": ctx.layer_idx, "keys": keys[b], "queries": rows.numel(), "present": vis.numel(),
                "kept": st.kept.numel(), "recycled": st.recycled.numel(), "clusters": m,
            })  # fmt: skip
        vals = torch.cat(values) if values else None
        return PruneDecision(
            drop=drop, update_mask=update if values else None, update_values=vals,
            renumber=True, order=order,
        )  # fmt: skip


def _append_keys(
    order: torch.Tensor, kept: torch.Tensor, visual: torch.Tensor, survivors: torch.Tensor, m: int,
) -> torch.Tensor:  # fmt: skip
    """(m,) sort keys placing m new tokens, in this order, right after the last kept visual token (or the
    last survivor before the visual tokens if none is kept) and before the next survivor (`survivors`:
    (N,) bool, the tokens that stay, not counting the new ones)."""
    if kept.numel():
        lo = order[kept].max()
    else:
        before = order[survivors & (order < order[visual].min())]
        lo = before.max() if before.numel() else order[visual].min() - 1
    later = order[survivors & (order > lo)]
    hi = later.min() if later.numel() else lo + m + 1
    return lo + (hi - lo) * torch.arange(1, m + 1, dtype=order.dtype, device=order.device) / (m + 1)
