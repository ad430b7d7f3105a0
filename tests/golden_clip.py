"""Seeded inputs of the VisPruner / CDPruner golden fixtures (tests/golden/{vispruner,cdpruner}/).

A CLIP-shaped vision tower with the real token grid (image 336, patch 14: 1 [CLS] + 576 patches, feature
layer -2) at a tiny width, a LLaVA projector, a CLIP text tower and pixel values, all generated from a seed.
The fixture generator (run out of tree on the official code under transformers 4.37.2, see the READMEs)
imports the pure-torch part of this file (`fill_`, `pixel_values`, the config dicts) so both sides build
bit-identical weights and images; the model builders at the end are for the tests (transformers 5).

Weights are filled per parameter *name* (`fill_`), so a tensor is the same whichever model holds it (the
official `CLIPVisionModel` + `nn.Sequential` projector, or llava-hf's `LlavaForConditionalGeneration`).
"""
from __future__ import annotations

import math
import zlib

import torch

# CLIP ViT-L/14-336 token grid at a tiny width; 4 heads of 16 (scale 1/4, a power of two like the real 1/8)
TOWER = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3, image_size=336,
             patch_size=14, projection_dim=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)  # fmt: skip
TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32)  # fmt: skip
LLM_HIDDEN = 256  # projector output width (> every per-crop budget, so the DPP kernel never runs out of rank)
SIDE = 24  # patches per crop side
CROP_PIXELS = 336
# official packing of LLaVA-NeXT in both repos: 672x672 canvas, 2x2 grid + base = 5 crops
NEXT_GRID = (2, 2)

# The projector's parameters under one name on both sides (official mm_projector = Sequential(Linear, GELU,
# Linear) keys 0.* / 2.*; llava-hf multi_modal_projector.linear_1 / linear_2)
PROJECTOR_NAMES = {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias", "2.weight": "linear_2.weight",
                   "2.bias": "linear_2.bias"}  # fmt: skip


def seeded_tensor(name: str, shape, seed: int) -> torch.Tensor:
    """A float32 tensor determined by (`name`, `seed`) only; the scale follows the parameter's role."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    x = torch.randn(tuple(shape), generator=g)
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name or "layrnorm" in name:
        return 1.0 + 0.1 * x if leaf == "weight" else 0.05 * x
    if leaf == "bias":
        return 0.05 * x
    if name.endswith("position_embedding.weight") or name.endswith("token_embedding.weight"):
        return 0.5 * x
    if name.endswith("class_embedding") or name.endswith("image_newline"):
        return x
    if x.ndim >= 2:  # linear / conv weights: unit-variance outputs for unit-variance inputs
        return x / math.sqrt(math.prod(x.shape[1:]))
    return x


@torch.no_grad()
def fill_(module: torch.nn.Module, seed: int, prefix: str = "", rename: dict | None = None) -> torch.nn.Module:
    """Overwrite every parameter of `module` with `seeded_tensor(prefix + name, ...)` (names mapped by
    `rename` first, and without the `vision_model.` / `text_model.` level that transformers 4 has and 5
    does not); buffers are left alone."""
    for name, p in module.named_parameters():
        name = (rename or {}).get(name, name)
        key = prefix + name.replace("vision_model.", "").replace("text_model.", "")
        p.copy_(seeded_tensor(key, p.shape, seed).to(p.dtype))
    return module


@torch.no_grad()
def zero_positions_(tower: torch.nn.Module) -> torch.nn.Module:
    """Zero the tower's position embeddings: duplicate patches (`pixel_values(tiles=...)`) then give exactly
    equal features, attentions and similarities (the tie fixtures)."""
    getattr(tower, "vision_model", tower).embeddings.position_embedding.weight.zero_()
    return tower


def pixel_values(seed: int, crops: int, pad_rows: tuple[int, int] | None = None, tiles: int | None = None) -> torch.Tensor:
    """(crops, 3, 336, 336) float32 normalised pixels.

    `pad_rows=(top, bottom)`: rows of the stitched 2x2 grid canvas (672 px, crops 1..4) set to a constant, as
    the padding of a wide image (the base crop 0 is the whole image resized, not padded). `tiles=k`: every
    14x14 patch is one of k random tiles (exact duplicate patches: ties in attention and similarity).
    """
    g = torch.Generator().manual_seed(10_007 + seed)
    if tiles:
        bank = torch.randn(tiles, 3, 14, 14, generator=g)
        pick = torch.randint(0, tiles, (crops, SIDE, SIDE), generator=g)
        x = bank[pick].permute(0, 3, 1, 4, 2, 5).reshape(crops, 3, CROP_PIXELS, CROP_PIXELS)
    else:
        x = torch.randn(crops, 3, CROP_PIXELS, CROP_PIXELS, generator=g)
    if pad_rows is not None:
        rows, cols = NEXT_GRID
        canvas = x[1:].reshape(rows, cols, 3, CROP_PIXELS, CROP_PIXELS).permute(2, 0, 3, 1, 4)
        canvas = canvas.reshape(3, rows * CROP_PIXELS, cols * CROP_PIXELS).clone()
        top, bottom = pad_rows
        canvas[:, :top] = -1.5
        canvas[:, canvas.shape[1] - bottom:] = -1.5
        grid = canvas.reshape(3, rows, CROP_PIXELS, cols, CROP_PIXELS).permute(1, 3, 0, 2, 4)
        x = torch.cat([x[:1], grid.reshape(rows * cols, 3, CROP_PIXELS, CROP_PIXELS)])
    return x.contiguous()


def next_pad_rows(height: int, width: int) -> tuple[int, int]:
    """Pixel rows (top, bottom) of the 672x672 canvas that are padding for a (height, width) image resized to
    fit it (wide images; tall images would pad columns and are not used here)."""
    side = NEXT_GRID[0] * CROP_PIXELS
    if width < height:
        raise ValueError("only wide images are generated")
    new_h = min(math.ceil(height * side / width), side)
    top = (side - new_h) // 2
    return top, side - new_h - top


# --- test-side builders (transformers 5) -------------------------------------------------------------
def tiny_llava(seed: int, next_: bool = False, ties: bool = False, dtype: torch.dtype = torch.float32):
    """A LLaVA-1.5 (or LLaVA-NeXT with the official 672x672 grid) model around the seeded golden tower and
    projector: 1-layer LLaMA of width LLM_HIDDEN, vocabulary of 64 ids, image token 63, eager attention."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    text = LlamaConfig(vocab_size=64, hidden_size=LLM_HIDDEN, intermediate_size=LLM_HIDDEN, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    vision = CLIPVisionConfig(**TOWER)
    common = dict(vision_config=vision, text_config=text, image_token_id=63, projector_hidden_act="gelu",
                  vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=SIDE * SIDE,
                  tie_word_embeddings=False)  # fmt: skip
    if next_:
        pin = NEXT_GRID[0] * CROP_PIXELS
        config = LlavaNextConfig(image_grid_pinpoints=[[pin, pin]], **common)
        cls = LlavaNextForConditionalGeneration
    else:
        config = LlavaConfig(**common)
        cls = LlavaForConditionalGeneration
    config._attn_implementation = "eager"
    for sub in (config.vision_config, config.text_config):
        sub._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(config).eval()
    mm = model.model
    fill_(mm.vision_tower, seed)
    if ties:
        zero_positions_(mm.vision_tower)
    fill_(mm.multi_modal_projector, seed, prefix="mm_projector.")
    if next_:
        with torch.no_grad():
            mm.image_newline.copy_(seeded_tensor("image_newline", mm.image_newline.shape, seed))
    return model.to(dtype)


def llava_inputs(model, n_image_tokens: int, pixels: torch.Tensor, image_size=None) -> dict:
    """input_ids [1, 5, 6, <image> x n, 7, 8] and the pixel inputs of one image (batch of one)."""
    img = model.config.image_token_id
    ids = torch.tensor([[1, 5, 6] + [img] * n_image_tokens + [7, 8]])
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if image_size is None:
        out["pixel_values"] = pixels
    else:
        out["pixel_values"] = pixels[None]
        out["image_sizes"] = torch.tensor([list(image_size)])
    return out


def save_tiny_clip(seed: int, path) -> str:
    """A CLIPModel directory (text tower, projections, the character-level CLIP tokenizer of
    `vlmeval_dop.reducers.clip_text`) with the seeded text tower and visual projection; returns the path."""
    from transformers import CLIPConfig, CLIPModel

    from vlmeval_dop.reducers.clip_text import _tiny_clip_tokenizer

    tok = _tiny_clip_tokenizer()
    text = dict(TEXT, vocab_size=len(tok), bos_token_id=0, eos_token_id=2, pad_token_id=1)
    config = CLIPConfig(text_config=text, vision_config=dict(TOWER), projection_dim=TOWER["projection_dim"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = CLIPModel(config).eval()
    fill_(clip.text_model, seed, prefix="text.")
    fill_(clip.text_projection, seed, prefix="text_projection.")
    fill_(clip.visual_projection, seed, prefix="visual_projection.")
    clip.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
