"""Seeded inputs of the VisPruner-on-video golden fixtures (tests/golden/vispruner_video/).

A CLIP-shaped video tower with Video-LLaVA's real frame grid (224 px, patch 14: 1 [CLS] + 256 patches per frame,
feature layer -2) at a tiny width, and the 8 frames of a video, all from a seed. The out-of-tree generator (the
official VisPruner / FasterVLM code under transformers 4.37.2, see the README there) imports the pure-torch part
(`TOWER`, `frames`, and `golden_clip.fill_` for the weights) so both sides build bit-identical towers and pixels;
`tiny_video_llava` at the end is the test side (transformers 5).
"""
from __future__ import annotations

import torch

from golden_clip import fill_, zero_positions_  # tests/golden_clip.py: weights filled per parameter name

# Video-LLaVA's LanguageBind towers: CLIP ViT-L/14 at 224 px (16x16 patches), here 64 wide, 4 heads, 3 layers
TOWER = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3, image_size=224,
             patch_size=14, projection_dim=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)  # fmt: skip
SIDE = 16  # patches per frame side
PIXELS = 224
FRAMES = 8
LLM_HIDDEN = 64


def frames(seed: int, tiles: int | None = None) -> torch.Tensor:
    """(8, 3, 224, 224) float32 normalised frames of one video: a linear morph between two random images (so
    consecutive frames are similar, not equal). `tiles=k`: both images are made of k random 14x14 tiles
    (exact duplicate patches within and across frames: ties in attention and similarity)."""
    g = torch.Generator().manual_seed(20_011 + seed)
    if tiles:
        bank = torch.randn(tiles, 3, 14, 14, generator=g)
        pick = torch.randint(0, tiles, (2, SIDE, SIDE), generator=g)
        ends = bank[pick].permute(0, 3, 1, 4, 2, 5).reshape(2, 3, PIXELS, PIXELS)
        # a morph would blend tiles into new patches; tiles alternate between the two images instead
        return torch.stack([ends[f % 2] for f in range(FRAMES)]).contiguous()
    ends = torch.randn(2, 3, PIXELS, PIXELS, generator=g)
    w = torch.linspace(0.0, 1.0, FRAMES)[:, None, None, None]
    return ((1 - w) * ends[0] + w * ends[1]).contiguous()


# --- test side (transformers 5) ----------------------------------------------------------------------------
def tiny_video_llava(seed: int, ties: bool = False):
    """A VideoLlavaForConditionalGeneration whose video tower (and image tower) is the seeded golden tower:
    1-layer LLaMA of width LLM_HIDDEN, vocabulary of 64 ids, <image> 62, <video> 63, eager attention."""
    from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=64, hidden_size=LLM_HIDDEN, intermediate_size=LLM_HIDDEN, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    config = VideoLlavaConfig(
        vision_config=CLIPVisionConfig(**TOWER), text_config=text, image_token_index=62, video_token_index=63,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=SIDE * SIDE, video_seq_length=FRAMES * (SIDE * SIDE + 1), tie_word_embeddings=False,
    )  # fmt: skip
    config._attn_implementation = "eager"
    for sub in (config.vision_config, config.text_config):
        sub._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VideoLlavaForConditionalGeneration(config).eval()
    for tower in (model.model.video_tower, model.model.image_tower):
        fill_(tower, seed)
        if ties:
            zero_positions_(tower)
    return model


def video_inputs(model, pixels: torch.Tensor) -> dict:
    """input_ids [1, 5, 6, <video> x 8 x 257, 7, 8] and the frames of one video (batch of one)."""
    vid = model.config.video_token_id
    ids = torch.tensor([[1, 5, 6] + [vid] * (FRAMES * (SIDE * SIDE + 1)) + [7, 8]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels[None]}
