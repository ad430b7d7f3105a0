"""The model and inputs of the decoder-side golden fixtures (tests/golden/{fastv,dart,fitprune}/).

A tiny LlavaForConditionalGeneration shaped like LLaVA-1.5 where the official code hard-codes it (35 tokens
before the image, 576 visual tokens from a 336 px / patch-14 CLIP tower) with a 16-layer LLaMA decoder, so the
official layer settings run (FastV / DART K=2, FitPrune's per-layer schemes). Every weight and input comes from
a seed through `torch.Generator` (no transformers initialiser involved), so the fixture generator, which
imports this module to dump the decoder inputs and weights for the official code, and the tests build the
very same model. The official code ran on the decoder inputs (`inputs_embeds`) this model builds.
"""
from __future__ import annotations

import zlib

import pytest
import torch

SEEDS = (0, 1, 2)
NUM_LAYERS = 16
SYS_LEN = 35  # tokens before the image, as the official LLaVA-1.5 code assumes (system prompt + "USER: ")
N_VISUAL = 576
VOCAB = 128
BOS, EOS, PAD, IMAGE_TOKEN_ID = 1, 2, 0, 127
TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, hidden_act="silu",
    bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False,
)  # fmt: skip
VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=336,
    patch_size=14, projection_dim=64, hidden_act="quick_gelu",
)  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module to run it on one intra-op thread: these forwards are many small ops (631 x 64),
    where a second thread costs more than it gains, by far on a busy machine (measured 40x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def text_len(seed: int) -> int:
    """Tokens after the image (question + "ASSISTANT:" in a real prompt): 20, 28 or 36."""
    return 20 + 8 * (seed % 3)


def golden_model(seed: int, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32):
    """The tiny LLaVA-1.5 of `seed`, in eval mode; weights N(0, 0.1), norms 1 + N(0, 0.1), biases
    N(0, 0.02), token embeddings N(0, 1), each parameter from its own generator (seed, name), drawn in float32.

    `dtype` float16/bfloat16 casts the parameters only, as `from_pretrained(dtype=...)` loads a checkpoint: the
    RoPE `inv_freq` buffer stays float32 (`model.half()` would round it, and every position's cos/sin with it)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION), text_config=LlamaConfig(**TEXT), image_token_id=IMAGE_TOKEN_ID,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=N_VISUAL, tie_word_embeddings=False,
    )  # fmt: skip
    config._attn_implementation = attn_implementation
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(seed * 2**32 + zlib.crc32(name.encode()))
            noise = torch.randn(p.shape, generator=g)
            if "embed_tokens" in name:
                p.copy_(noise)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.02 * noise)
            else:
                p.copy_(0.1 * noise)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    model.generation_config.update(bos_token_id=BOS, eos_token_id=None, pad_token_id=PAD)
    return model.eval()


def golden_inputs(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """input_ids = [BOS, 34 text ids, 576 x <image>, text_len(seed) text ids], one 336 x 336 image of noise
    (`pixel_values` in `dtype`)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    before = torch.randint(3, VOCAB - 8, (SYS_LEN - 1,), generator=g)
    after = torch.randint(3, VOCAB - 8, (text_len(seed),), generator=g)
    ids = torch.cat([torch.tensor([BOS]), before, torch.full((N_VISUAL,), IMAGE_TOKEN_ID), after])[None]
    pixel_values = torch.randn(1, 3, VISION["image_size"], VISION["image_size"], generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixel_values.to(dtype)}


def decoder_inputs(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(1, N, 64) embeddings the multimodal model hands its decoder (what the official code ran on)."""
    grabbed = {}

    def hook(module, args, kwargs):
        grabbed["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return grabbed["embeds"]


class SameContext:
    """A decoder-side pruner that lets several pruners decide on the same context (one forward, several budgets).

    `main` decides what the model drops; every pruner in `pruners` (main included) is asked too, and the visual
    positions it would keep are recorded per call in `kept[key]` (sample 0) and its drop masks in `drops[key]`.
    """

    def __init__(self, main, pruners: dict):
        self.name, self.layers, self.main, self.pruners = main.name, main.layers, main, pruners
        self.kept: dict = {key: [] for key in pruners}
        self.drops: dict = {key: [] for key in pruners}

    def select(self, ctx):
        decided = None
        for key, pruner in self.pruners.items():
            drop = pruner.select(ctx)
            self.drops[key].append(drop)
            self.kept[key].append(torch.nonzero(ctx.visual[0] & ctx.alive[0] & ~drop[0]).flatten().tolist())
            if pruner is self.main:
                decided = drop
        return decided
