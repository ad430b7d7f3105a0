"""Recompute a few attention rows of a stock decoder layer from its q/k projections.

Decoder-side baselines rank tokens by attention scores (FastV: the last token's attention). Asking the
model for attention weights would force eager attention on every layer; recomputing the rows a method
needs from `self_attn.q_proj/k_proj` and the layer's RoPE is exact and costs one extra (1 x N) product.

Exact for every family of the executor, as the stock layer computes it: per-head q/k norms (Qwen3 decoders,
Gemma 3), the family's own RoPE function and scaling (Gemma's `query_pre_attn_scalar`), logit soft-capping where
a config sets it, sliding windows (Gemma 3's local layers). Image blocks that attend bidirectionally (Gemma 3)
only change rows whose query is an image token: such queries are refused rather than approximated.
"""
from __future__ import annotations

import math
import sys

import torch
from transformers.models.llama.modeling_llama import repeat_kv

from ..executor.families import adapter_for, causal_families
from ..executor.token_pruner import DecoderPruneContext


def _heads(proj: torch.Tensor, norm, head_dim: int) -> torch.Tensor:
    """(B, n, heads*hd) projection -> (B, heads, n, hd), through the layer's per-head norm if it has one."""
    x = proj.view(*proj.shape[:2], -1, head_dim)
    if norm is not None:
        x = norm(x)
    return x.transpose(1, 2)


def project_queries(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE queries (B, heads, n, hd) of normed inputs `x` (B, n, H), as the stock attention computes them
    (with its per-head `q_norm` where the family has one: Qwen3 decoders, Gemma 3)."""
    return _heads(attn.q_proj(x), getattr(attn, "q_norm", None), attn.head_dim)


def project_keys(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE keys (B, kv_heads, n, hd) of normed inputs `x` (B, n, H), with the family's `k_norm` if any."""
    return _heads(attn.k_proj(x), getattr(attn, "k_norm", None), attn.head_dim)


def rope_function(attn: torch.nn.Module):
    """The RoPE function of the attention's own modeling module, `(q, k, cos, sin) -> (q, k)`."""
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb


def refuse_bidirectional_or_windowed(ctx: DecoderPruneContext, method: str) -> None:
    """Raise for families whose image tokens attend bidirectionally or whose layers use sliding windows
    (Gemma 3), for methods whose recomputed attention rows model neither."""
    adapter = adapter_for(ctx.model)
    if adapter.family not in causal_families():
        raise ValueError(f"{method} does not support family {adapter.family!r} (bidirectional image attention / "
                         "sliding windows are not modelled by its attention rows)")


def eager_scores(raw: torch.Tensor, attn: torch.nn.Module, multiply_scale: bool = False) -> torch.Tensor:
    """Scaled scores from raw `q @ k^T` in the precision the official methods read eager attention weights:
    float32 models in float32 (`* scaling`); float16/bfloat16 models in that dtype, `/ sqrt(head_dim)` as the
    LLaMA-era eager attention of the official code where the scaling is 1/sqrt(head_dim), or with
    `multiply_scale` `* (1 / sqrt(head_dim))` (SparseVLM's own attention, HF eager); the two round differently
    when 1 / sqrt(head_dim) is not a power of two (head_dim 128)."""
    if raw.dtype not in (torch.float16, torch.bfloat16):
        return raw.float() * attn.scaling
    if math.isclose(attn.scaling, attn.head_dim**-0.5, rel_tol=1e-6):
        if multiply_scale:
            return raw * (1 / math.sqrt(attn.head_dim))  # SparseVLM's scaled_dot_product_attention
        return raw / math.sqrt(attn.head_dim)  # the LLaMA-era eager attention of the official code
    return raw * attn.scaling


def eager_softmax(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Softmax over the last dim as eager attention computes it for a model of `dtype`: float32, cast back
    to float16/bfloat16 for such models (the weights the official methods then reduce in that dtype)."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    return torch.softmax(scores, dim=-1)


def query_attention(ctx: DecoderPruneContext, query_positions: torch.Tensor, multiply_scale: bool = False) -> torch.Tensor:
    """Softmax attention of the given query positions in layer `ctx.layer_idx`, averaged over heads.

    Args:
        ctx: the pruner context (the layer's input hidden states and RoPE tables are used).
        query_positions: (Q,) sequence positions (same for every sample), e.g. `tensor([N - 1])`.
        multiply_scale: float16/bfloat16 only: scores `(q k^T) * (1 / sqrt(d))` (SparseVLM's own attention,
            and HF eager) instead of `(q k^T) / sqrt(d)` (LLaMA-era eager, FastV); the two round differently
            when 1 / sqrt(d) is not a power of two (head_dim 128).

    Returns:
        (B, Q, N) float32 probabilities over keys; keys that did not take part in the layer (or are
        padding, or lie after the query) get 0, exactly as in the layer's own attention. For float16/bfloat16
        models the values are those of eager attention weights in that dtype averaged in that dtype (what the
        official FastV/SparseVLM code ranks), so near-ties round as there.
    """
    layer, attn = ctx.layer, ctx.layer.self_attn
    B, N, _ = ctx.hidden_in.shape
    dev = ctx.hidden_in.device
    # keys: only the tokens that took part in the layer (the layer never computed the others)
    usable = ctx.alive & ctx.pad_valid
    K = int(usable.sum(1).max())
    key_idx = torch.sort(usable.to(torch.int8), dim=1, stable=True).indices[:, N - K :]  # kept, in order
    key_ok = torch.gather(usable, 1, key_idx)
    x_keys = layer.input_layernorm(torch.gather(ctx.hidden_in, 1, key_idx[..., None].expand(-1, -1, ctx.hidden_in.shape[-1])))
    x_q = layer.input_layernorm(ctx.hidden_in[:, query_positions])
    adapter = adapter_for(ctx.model)
    qp = query_positions.to(dev)
    if adapter.bidirectional_images and bool(ctx.visual[:, qp].any()):
        raise ValueError(
            f"family {adapter.family!r}: image tokens attend to each other bidirectionally; attention rows of "
            "image-token queries are not recomputed (only text queries are supported)"
        )
    q, k = project_queries(attn, x_q), project_keys(attn, x_keys)
    rope = rope_function(attn)
    cos, sin = (t.expand(B, -1, -1) for t in ctx.position_embeddings)
    q, _ = rope(q, q, cos[:, qp], sin[:, qp])
    k_cos = torch.gather(cos, 1, key_idx[..., None].expand(-1, -1, cos.shape[-1]))
    k_sin = torch.gather(sin, 1, key_idx[..., None].expand(-1, -1, sin.shape[-1]))
    _, k = rope(k, k, k_cos, k_sin)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    # precision as the official methods read eager attention weights: in the model's dtype (scores, softmax in
    # float32 cast back, mean over heads in that dtype) for float16/bfloat16 models, float32 otherwise
    low = q.dtype in (torch.float16, torch.bfloat16)
    scores = eager_scores(q @ k.transpose(-1, -2), attn, multiply_scale)  # (B, heads, Q, K)
    softcap = getattr(attn, "attn_logit_softcapping", None)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    causal = key_idx[:, None, :] <= qp[None, :, None]  # (B, Q, K)
    if ctx.order is not None:  # a pruner reordered the sequence: causality follows its keys (ties: index)
        k_ord = torch.gather(ctx.order, 1, key_idx)[:, None, :]
        q_ord = ctx.order[:, qp][:, :, None]
        causal = (k_ord < q_ord) | ((k_ord == q_ord) & causal)
    window = adapter.sliding_window(ctx.model, ctx.layer_idx)
    if window is not None:  # local layer: keys within the window of the query's RoPE position
        if ctx.position_ids is None:
            raise ValueError(f"family {adapter.family!r}: a sliding window needs 1D positions")
        k_pos = torch.gather(ctx.position_ids, 1, key_idx)[:, None, :]
        causal = causal & (k_pos > ctx.position_ids[:, qp][:, :, None] - window)
    scores = scores.masked_fill(~(key_ok[:, None, :] & causal)[:, None], float("-inf"))
    probs = eager_softmax(scores, q.dtype).mean(dim=1)  # (B, Q, K), the head mean in the model dtype if low
    probs = probs.float() if low else probs
    out = torch.zeros(B, probs.shape[1], N, dtype=probs.dtype, device=dev)
    return out.scatter(2, key_idx[:, None, :].expand(-1, probs.shape[1], -1), probs * key_ok[:, None, :])
