"""PyramidDrop (Xing et al., 2024, "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction"), decoder-side, as the official code does it
(Cooperx521/PyramidDrop, `llava/model/modeling_llama_pdrop.py`: `LlamaModel.pdrop_forward`,
`LlamaModel.pdrop_rank_drop`; settings from `llava/eval/model_vqa_loader.py` and `scripts/v1_5/pdrop_eval`).

The decoder is split into stages by `layer_list` (here `boundaries`, LLaVA-1.5 official: [8, 16, 24]). At
the start of stage s (after layer b_s - 1), with N the sample's image tokens and `ratio_list[s]` the
official `image_token_ratio_list` (official: [0.5, 0.25, 0.125], i.e. lambda^s with lambda = 0.5):

- scores: the *next* layer's `input_layernorm` and q/k projections (layer b_s) are applied to layer
  b_s - 1's output, with the RoPE positions the current (already rebuilt) sequence uses; the last
  instruction token (the prompt's last token) attends over the whole current sequence (softmax in float32,
  cast back to the model dtype, then averaged over heads, as the official eager code does);
- keep: the top `int(N * ratio_list[s])` image tokens of the current sequence by that score, in sequence
  order; the others leave every later layer and its KV cache;
- positions: the official code rebuilds the sequence, so from layer b_s on the survivors are renumbered
  0..n-1 (`PruneDecision(renumber=True)`), and during decoding the new token's position in each stage is
  shifted by the image tokens dropped so far (the executor continues each layer from its own sequence
  length, which is the same number).

`tests/test_golden_pdrop.py` checks kept sets, order, positions, logits and greedy tokens against fixtures
produced by the official code (`tests/golden/pdrop/README.md`). Differences from the official code that
cannot change a result: only the query's attention row is computed (the official code computes every row
and reads one; the q projection still runs over the whole current sequence, as there, so half-precision
GEMMs round alike), and GQA decoders are supported by repeating K/V heads (the official code is MHA only).
PyramidDrop ranks one image per sample; with several images in a sample all image tokens form one pool (N
= their total). Needs 1D RoPE (LLaVA, LLaVA-NeXT, InternVL3 decoders); M-RoPE models are refused.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers.models.llama.modeling_llama import repeat_kv

from ..executor.families import renumbering_families
from ..executor.token_pruner import DecoderPruneContext, PruneDecision
from .attention import project_keys, project_queries, rope_function
from ..methods import register_method


def pdrop_ratio_list(boundaries: Sequence[int], ratio: float = 0.5, ratios: Sequence[float] | None = None) -> list[float]:
    """The official `image_token_ratio_list` without its leading 1.0: `ratios`, or lambda^s per stage s >= 1."""
    if ratios is None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"PDrop ratio (lambda) must be in (0, 1], got {ratio}")
        ratios = [ratio**s for s in range(1, len(boundaries) + 1)]
    ratios = [float(r) for r in ratios]
    if len(ratios) != len(boundaries):
        raise ValueError(f"PDrop needs one ratio per stage boundary: {len(boundaries)} boundaries, ratios {ratios}")
    if any(not 0.0 <= r <= 1.0 for r in ratios) or any(b > a for a, b in zip([1.0] + ratios, ratios)):
        raise ValueError(f"PDrop ratios must be non-increasing in [0, 1], got {ratios}")
    return ratios


def pdrop_kept_counts(n_image: int, ratios: Sequence[float]) -> list[int]:
    """Image tokens kept at each stage boundary: the official `int(N * image_token_ratio_list[s])`."""
    return [int(n_image * r) for r in ratios]


def pdrop_scores(ctx: DecoderPruneContext) -> torch.Tensor:
    """(B, N) official PDrop scores after layer `ctx.layer_idx`: the last token's attention in the next layer.

    The next layer's `input_layernorm`, q and k projections are applied to this layer's output with the
    positions this layer used; softmax over the tokens of the current sequence in float32, cast to the
    model dtype, mean over heads. Tokens not in the current sequence score 0.
    """
    layer = ctx.next_layer
    if layer is None:
        raise ValueError(f"PDrop scores with the next layer's projections; layer {ctx.layer_idx} is the last one")
    if ctx.position_embeddings is None:
        raise ValueError("PDrop needs the layer's RoPE tables (1D-RoPE LLaMA-style decoders)")
    attn = layer.self_attn
    x = ctx.hidden_out
    B, N, H = x.shape
    hd = attn.head_dim
    usable = ctx.alive & ctx.pad_valid
    K = int(usable.sum(1).max())
    key_idx = torch.sort(usable.to(torch.int8), dim=1, stable=True).indices[:, N - K :]  # current sequence, in order
    key_ok = torch.gather(usable, 1, key_idx)
    # the query: each sample's last token of the current sequence (the official prompt_len + image_tokens - 1)
    q_idx = key_idx[:, -1:]
    x_seq = layer.input_layernorm(torch.gather(x, 1, key_idx[..., None].expand(-1, -1, H)))
    # q over the whole current sequence, then the query's row: the official computation, so that GPU
    # half-precision runs round like the official GEMM does (a 1-row product may round differently)
    q = project_queries(attn, x_seq)[:, :, -1:]
    k = project_keys(attn, x_seq)
    rope = rope_function(attn)
    cos, sin = (t.expand(B, -1, -1) for t in ctx.position_embeddings)

    def at(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.gather(t, 1, idx[..., None].expand(-1, -1, t.shape[-1]))

    q, _ = rope(q, q, at(cos, q_idx), at(sin, q_idx))
    _, k = rope(k, k, at(cos, key_idx), at(sin, key_idx))
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd)  # (B, heads, 1, K), model dtype as official
    scores = scores.masked_fill(~key_ok[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    avg = probs.mean(dim=1)[:, 0]  # (B, K): mean over heads in the model dtype, as official
    out = torch.zeros(B, N, dtype=avg.dtype, device=x.device)
    return out.scatter(1, key_idx, avg * key_ok)


def pdrop_selection_flops(spec, n_tokens: int) -> float:
    """FLOPs of one PDrop ranking over `n_tokens` (the current sequence): the next layer's q and k
    projections of every token (as the official code computes them) and one score row per head."""
    return 2.0 * n_tokens * spec.hidden_size * (spec.q_dim + spec.kv_dim) + 2.0 * n_tokens * spec.q_dim


def _pdrop_cost(spec, args: dict, counts, n_visual: int, text_tokens: int) -> float:
    """Selection FLOPs of one sample: the next layer's q/k of the whole current sequence, one score row,
    per stage boundary (registration's cost model)."""
    return sum(pdrop_selection_flops(spec, counts[b - 1][0]) for b in args.get("boundaries", (8, 16, 24)))


@register_method("pdrop", kind="decoder", budget_knob="ratio", knob_range=(0.0001, 0.9999), selection_cost=_pdrop_cost)
class PDrop:
    """PyramidDrop for `apply_dop(..., token_pruner=PDrop(boundaries=[8, 16, 24], ratio=0.5))`.

    Args:
        boundaries: the official `layer_list`: first layer (0-based) of each new stage; tokens are ranked
            with that layer's projections and dropped before it runs.
        ratio: lambda; stage s keeps `int(N * lambda^s)` of the sample's N image tokens (official 0.5). The
            knob the budget entries solve.
        ratios: the official `image_token_ratio_list` given explicitly (one per boundary, without the
            leading 1.0); overrides `ratio`.
    """

    families = renumbering_families()  # it renumbers positions: 1D RoPE, no sliding windows

    name = "pdrop"

    def __init__(self, boundaries: Sequence[int] = (8, 16, 24), ratio: float = 0.5, ratios: Sequence[float] | None = None):
        boundaries = list(boundaries)
        if not boundaries or any(b < 1 for b in boundaries) or boundaries != sorted(set(boundaries)):
            raise ValueError(f"PDrop stage boundaries must be increasing layers >= 1, got {boundaries}")
        self.boundaries, self.ratio = boundaries, ratio
        self.ratios = pdrop_ratio_list(boundaries, ratio, ratios)
        self.layers = tuple(b - 1 for b in boundaries)

    def select(self, ctx: DecoderPruneContext) -> PruneDecision:
        """Drop all but the official top image tokens of each sample and renumber positions (prefill only)."""
        stage = self.layers.index(ctx.layer_idx)
        candidates = ctx.visual & ctx.alive
        n_image = ctx.visual.sum(1).tolist()  # N: the sample's image tokens entering the decoder
        score = pdrop_scores(ctx)
        drop = candidates.clone()
        for b in range(candidates.shape[0]):
            pos = torch.nonzero(candidates[b]).flatten()  # the current image span, in sequence order
            keep = pdrop_kept_counts(n_image[b], [self.ratios[stage]])[0]
            if pos.numel() == 0:
                continue
            if keep > pos.numel():
                raise ValueError(f"PDrop stage {stage} keeps {keep} of {pos.numel()} image tokens (ratios {self.ratios})")
            drop[b, pos[torch.topk(score[b, pos], keep).indices]] = False
        return PruneDecision(drop=drop, renumber=True)

    @staticmethod
    def layer_tokens(
        num_layers: int,
        n_visual: int,
        text_tokens: int,
        boundaries: Sequence[int] = (8, 16, 24),
        ratio: float = 0.5,
        ratios: Sequence[float] | None = None,
    ) -> list[tuple[int, int]]:
        """Per-layer (n_A, n_P) for the analytic TFLOPs (used to match baselines to a budget)."""
        return pdrop_layer_tokens(num_layers, list(boundaries), n_visual, ratio, text_tokens, ratios)


def pdrop_layer_tokens(
    num_layers: int,
    boundaries: list[int],
    n_visual: int,
    ratio: float,
    text_tokens: int,
    ratios: Sequence[float] | None = None,
) -> list[tuple[int, int]]:
    """Per-layer (n_A, n_P) of PDrop for the analytic FLOPs model (official int() counts per stage)."""
    kept = dict(zip(boundaries, pdrop_kept_counts(n_visual, pdrop_ratio_list(boundaries, ratio, ratios))))
    n, out = n_visual, []
    for i in range(num_layers):
        n = kept.get(i, n)
        out.append((text_tokens + n,) * 2)
    return out
