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
    B, N, _ = ctx.hidden_in.shape
    hd = attn.head_dim
    dev = ctx.hidden_in.device
    # keys: only the tokens that took part in the layer (the layer never computed the others)
    usable = ctx.alive & ctx.pad_valid
    K = int(usable.sum(1).max())
    key_idx = torch.sort(usable.to(torch.int8), dim=1, stable=True).indices[:, N - K :]  # kept, in order
    key_ok = torch.gather(usable, 1, key_idx)
    x_keys = layer.input_layernorm(torch.gather(ctx.hidden_in, 1, key_idx[..., None].expand(-1, -1, ctx.hidden_in.shape[-1])))
    x_q = layer.input_layernorm(ctx.hidden_in[:, query_positions])
    q = attn.q_proj(x_q).view(B, x_q.shape[1], -1, hd).transpose(1, 2)
    k = attn.k_proj(x_keys).view(B, K, -1, hd).transpose(1, 2)
    cos, sin = (t.expand(B, -1, -1) for t in ctx.position_embeddings)
    q, _ = apply_rotary_pos_emb(q, q, cos[:, query_positions], sin[:, query_positions])
    k_cos = torch.gather(cos, 1, key_idx[..., None].expand(-1, -1, cos.shape[-1]))
    k_sin = torch.gather(sin, 1, key_idx[..., None].expand(-1, -1, sin.shape[-1]))
    _, k = apply_rotary_pos_emb(k, k, k_cos, k_sin)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    scores = (q @ k.transpose(-1, -2)).float() * attn.scaling  # (B, heads, Q, K)
    qp = query_positions.to(dev)
    causal = key_idx[:, None, :] <= qp[None, :, None]  # (B, Q, K)
    if ctx.order is not None:  # a pruner reordered the sequence: causality follows its keys (ties: index)
        k_ord = torch.gather(ctx.order, 1, key_idx)[:, None, :]
        q_ord = ctx.order[:, qp][:, :, None]
        causal = (k_ord < q_ord) | ((k_ord == q_ord) & causal)
    scores = scores.masked_fill(~(key_ok[:, None, :] & causal)[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).mean(dim=1)  # (B, Q, K)
    out = torch.zeros(B, probs.shape[1], N, dtype=probs.dtype, device=dev)
    return out.scatter(2, key_idx[:, None, :].expand(-1, probs.shape[1], -1), probs * key_ok[:, None, :])
