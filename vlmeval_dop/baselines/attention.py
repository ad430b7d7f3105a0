"""Recompute a few attention rows of a stock decoder layer from its q/k projections.

Decoder-side baselines rank tokens by attention scores (FastV: the last token's attention). Asking the
model for attention weights would force eager attention on every layer; recomputing the rows a method
needs from `self_attn.q_proj/k_proj` and the layer's RoPE is exact and costs one extra (1 x N) product.
"""
from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from ..executor.token_pruner import DecoderPruneContext


def query_attention(ctx: DecoderPruneContext, query_positions: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the given query positions in layer `ctx.layer_idx`, averaged over heads.

    Args:
        ctx: the pruner context (the layer's input hidden states and RoPE tables are used).
        query_positions: (Q,) sequence positions (same for every sample), e.g. `tensor([N - 1])`.

    Returns:
        (B, Q, N) float32 probabilities over keys; keys that did not take part in the layer (or are
        padding, or lie after the query) get 0, exactly as in the layer's own attention.
    """
    layer, attn = ctx.layer, ctx.layer.self_attn
    x = layer.input_layernorm(ctx.hidden_in)
    B, N, _ = x.shape
    hd = attn.head_dim
    qx = x[:, query_positions]
    q = attn.q_proj(qx).view(B, qx.shape[1], -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(B, N, -1, hd).transpose(1, 2)
    cos, sin = ctx.position_embeddings
    cos, sin = cos.expand(B, -1, -1), sin.expand(B, -1, -1)
    q, _ = apply_rotary_pos_emb(q, q, cos[:, query_positions], sin[:, query_positions])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    scores = (q @ k.transpose(-1, -2)).float() * attn.scaling  # (B, heads, Q, N)
    visible = (ctx.alive & ctx.pad_valid)[:, None, None, :]
    causal = torch.arange(N, device=x.device)[None, :] <= query_positions.to(x.device)[:, None]
    scores = scores.masked_fill(~(visible & causal[None, None]), float("-inf"))
    return torch.softmax(scores, dim=-1).mean(dim=1)
