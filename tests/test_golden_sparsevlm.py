"""SparseVLM against golden outputs of the official code (Gumpest/SparseVLMs, USE_VERSION=1_0).

The fixtures in tests/golden/sparsevlm/ were produced by running the official `LlamaDynamicvitModel.forward`
(with `score.attn_postprocess_topk` and `utils.cluster_and_merge`) out of tree on the decoder inputs of the
tiny 18-layer LLaVA-1.5-shaped model built below (`golden_model`, `golden_inputs`; see the README there).
Here the same model runs as a stock `LlavaForConditionalGeneration` through `apply_dop` with our
`SparseVLM`, and every stage must match: the kept visual tokens, the recycled tokens and their order, the
merged rows (1e-5), the sequence order and RoPE positions of the rebuilt sequence, and the logits of the
prefill and of greedy decoding (whose positions continue from each layer's own sequence length).
"""
from __future__ import annotations

import json
import pathlib

import pytest
import torch

GOLDEN = pathlib.Path(__file__).parent / "golden" / "sparsevlm"

# tiny LLaVA-1.5 shape: 576 visual tokens (336 px / 14), 18 decoder layers: the official layers 2, 6, 15 run
# and two layers follow the last stage
VOCAB, IMAGE_TOKEN, PAD, BOS, EOS = 200, 199, 0, 1, 2
PREFIX, TEXT = 5, 27  # tokens before / after the image
N_VISUAL = 576
TEXT_CONFIG = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=18, num_attention_heads=4,
    num_key_value_heads=4, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048,
    hidden_act="silu", tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
)  # fmt: skip
VISION_CONFIG = dict(
    image_size=336, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=2, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=64,
)  # fmt: skip


def golden_model(seed: int):
    """The tiny LlavaForConditionalGeneration of fixture seed `seed` (float32, sdpa, eval).

    Weights come from a torch.Generator seeded with `seed`, filled parameter by parameter in name order
    (independent of how a transformers release initialises modules): norms 1 + N(0, 0.05), biases
    N(0, 0.02), the token embeddings N(0, 0.5), every other weight N(0, 0.1).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION_CONFIG), text_config=LlamaConfig(**TEXT_CONFIG),
        image_token_id=IMAGE_TOKEN, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=N_VISUAL, tie_word_embeddings=False,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.05 * noise)
            elif name.endswith("bias"):
                p.copy_(0.02 * noise)
            elif "embed_tokens" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def golden_inputs(seed: int) -> dict:
    """input_ids (BOS, 4 text tokens, 576 image tokens, 27 text tokens), attention_mask and pixel_values of
    fixture seed `seed` (a torch.Generator seeded with 1000 + seed)."""
    g = torch.Generator().manual_seed(1000 + seed)
    pre = torch.randint(3, IMAGE_TOKEN, (PREFIX - 1,), generator=g)
    post = torch.randint(3, IMAGE_TOKEN, (TEXT,), generator=g)
    ids = torch.cat([torch.tensor([BOS]), pre, torch.full((N_VISUAL,), IMAGE_TOKEN), post])[None]
    pixels = torch.randn(1, 3, 336, 336, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
