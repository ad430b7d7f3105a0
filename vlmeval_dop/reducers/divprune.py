"""DivPrune (Alvar et al., CVPR 2025, "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models"): keep the visual tokens that solve the max-min diversity problem greedily.

Official code: vbdi/divprune, `LlavaMetaForCausalLM.DivPrune` in LLaVA/llava/model/llava_arch.py, called
at the end of `prepare_inputs_labels_for_multimodal` (LAYER_INDEX=0) on the decoder inputs of the image
(after the projector; LLaVA-1.5: the 576 tokens; LLaVA-1.6: the whole packed feature, base image +
unpadded crops + row newline tokens). This module reproduces it step by step (golden fixtures from that
function: tests/golden/divprune/):

- Distances d(i, j) = 1 - cos(f_i, f_j): rows divided by their L2 norm, one matrix product.
- First token: the largest *second-smallest* entry of its column (the smallest is normally the token's
  own distance ~0; it is not masked out, so a near-duplicate can take that place).
- Then repeatedly the token whose smallest distance to the tokens picked so far is largest. Picked
  tokens are not excluded: their own score is their self-distance (~0, rounding may make it slightly
  positive), so the official greedy can pick a token twice once every remaining token is a
  near-duplicate of a picked one (in practice only near a full budget, e.g. the identical newline tokens
  of LLaVA-NeXT). The official code then feeds that row twice; so do we (`ReplacedSpan`).
- Ties: the lowest index (`torch.argmax`). The kept tokens go to the LLM in their original order.

Compute dtype: the official code applies these steps to the decoder inputs as they are, without a cast;
its evaluation loads LLaVA in float16, so its GPU runs compute in float16. Default (`compute_dtype=None`):
float16 decoder inputs -> float16 (our LLaVA models load in float16 on CUDA, models/base.py, so GPU runs
compute the official fp16 steps); float32 inputs (CPU) -> float32, what the official function computes on
float32 inputs (casting to fp16 there would not reproduce an official run either: its fp16 features
differ already); bfloat16 inputs (Qwen2.5-VL / InternVL3 on CUDA, no official code) -> float16, the
official arithmetic (bf16 values within the fp16 range convert exactly; bf16 arithmetic would round
distances to 8 bits), or float32 if a row norm does not fit float16 (>= 65504).
Rounding matters. Named option `compute_dtype=torch.float32`: the steps in float32 whatever the model
dtype (this module's behaviour before the golden fixtures); against the official float16 selection of the
same float16 inputs (tests/golden/divprune/) it keeps the same set in 4/12 LLaVA-1.5-shaped cases (kept-set
Jaccard mean 0.872, min 0.697), 2/9 LLaVA-NeXT-shaped (0.971 / 0.924), 3/9 tiny LLaVA-NeXT (0.911 /
0.459), 9/9 tiny LLaVA-1.5.

Qwen2.5-VL (no official code): M-RoPE gives every placeholder its own (t, h, w) position, so a repeated
pick cannot be fed twice; there a pick never repeats (picked tokens are skipped), which gives the same
tokens as the official rule whenever that rule does not repeat a pick.

Budget: the official knob is SUBSET_RATIO, `int(round(ratio * n_tokens))` tokens per image; the entries
give the count n_e directly: on LLaVA-1.5 (576 tokens) that is the same thing; on LLaVA-NeXT every image
keeps n_e of its packed span instead of a fraction of it (the span length varies with the aspect ratio),
so the entry's TFLOPs label holds for every image. For a given count the selection is the official one.
"""
from __future__ import annotations

import torch

from .base import ReducerError, ReductionContext, ReplacedSpan, Selection
from ..methods import register_method


def cosine_distances(features: torch.Tensor, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(N, N) matrix 1 - cos(f_i, f_j), computed in `compute_dtype` (None: the dtype of `features`).

    The official operation order (row / row norm, then one matrix product) is kept on purpose: in float16
    another order rounds differently and changes selections.
    """
    f = features if compute_dtype is None else features.to(compute_dtype)
    f = f / f.norm(dim=1, keepdim=True)
    return 1.0 - f @ f.T


def official_compute_dtype(features: torch.Tensor) -> torch.dtype:
    """The dtype the selection of `features` runs in by default (module docstring)."""
    if features.dtype != torch.bfloat16:
        return features.dtype
    fits = bool(features.float().norm(dim=-1).max() < torch.finfo(torch.float16).max)
    return torch.float16 if fits else torch.float32


def divprune_order(
    features: torch.Tensor, n_keep: int, compute_dtype: torch.dtype | None = None, *, distinct: bool = False
) -> torch.Tensor:
    """The official greedy picks, in pick order: (n_keep,) long indices into the rows of `features` (N, D).

    Distances in `compute_dtype` (None: the dtype of `features`, as the official function). A row can be
    picked twice (module docstring) unless `distinct`, which skips picked rows (identical picks otherwise).
    """
    N = features.shape[0]
    if not 0 <= n_keep <= N:
        raise ReducerError(f"DivPrune cannot keep {n_keep} of {N} tokens; valid: 0..{N}")
    if n_keep == 0:
        return torch.empty(0, dtype=torch.long, device=features.device)
    if N == 1:  # the official second-smallest lookup needs two rows; one token is simply kept
        return torch.zeros(1, dtype=torch.long, device=features.device)
    dist = cosine_distances(features, compute_dtype)
    first_scores = torch.topk(dist, 2, dim=0, largest=False).values[1]
    picks = [int(torch.argmax(first_scores))]
    nearest = dist[picks[0]].clone()  # min over picked rows, per column: the official score, updated in place
    for _ in range(1, n_keep):
        if distinct:
            nearest[picks[-1]] = float("-inf")  # stays -inf under the minimum below
        nxt = int(torch.argmax(nearest))
        picks.append(nxt)
        nearest = torch.minimum(nearest, dist[nxt])
    return torch.tensor(picks, dtype=torch.long, device=features.device)


def divprune_select(
    features: torch.Tensor, n_keep: int, compute_dtype: torch.dtype | None = None, *, distinct: bool = False
) -> torch.Tensor:
    """The official kept tokens of `features` (N, D) in sequence order: the sorted picks of `divprune_order`.

    Normally `n_keep` distinct indices; a repeated pick stays repeated, as in the official sequence.
    """
    return torch.sort(divprune_order(features, n_keep, compute_dtype, distinct=distinct)).values


@register_method("divprune", kind="vision")
class DivPrune:
    """Reducer: official DivPrune over each image's decoder-input visual features.

    Args:
        compute_dtype: dtype of the distance matrix and greedy steps; None (default, official): the
            decoder inputs' dtype, float16 for bfloat16 inputs. `torch.float32`: the named float32 option.
    """

    name = "divprune"
    families = None  # content-only: every family

    def __init__(self, compute_dtype: torch.dtype | None = None):
        self.compute_dtype = compute_dtype

    def select(self, ctx: ReductionContext, n_keep: int) -> list[Selection]:
        from ..executor.families import FAMILIES  # lazy: the executor imports the reducers

        distinct = not FAMILIES[ctx.family].contiguous_positions
        out: list[Selection] = []
        for span in ctx.images:
            feats = ctx.image_embeds(span)
            dtype = self.compute_dtype or official_compute_dtype(feats)
            idx = divprune_select(feats, min(n_keep, span.num_tokens), dtype, distinct=distinct)
            if idx.numel() > 1 and bool((idx[1:] == idx[:-1]).any()):
                out.append(ReplacedSpan(feats[idx], sources=idx.cpu()))  # the official sequence repeats the row
            else:
                out.append(idx.cpu())
        return out
