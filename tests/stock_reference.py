"""Independent references shared by tests: the stock model's own decoder inputs (for the masked references
of the executor and SparseVLM tests), the stock model run on a sequence rebuilt by hand (the replaced-span
reducers: VisionZip, PruMerge+, TRIM), and the seeded golden LLaVA models the golden fixtures were made with."""
from __future__ import annotations

import torch


def stock_decoder_inputs(model, inputs) -> tuple[dict, torch.Tensor]:
    """The keyword arguments the stock model passes to its decoder stack (inputs_embeds with the image
    features in place, position_ids, ...) and its logits, from one forward without cache."""
    seen: dict = {}

    def grab(module, args, kwargs):
        if not seen:
            seen.update(kwargs)

    from vlmeval_dop.executor.families import adapter_for

    h = adapter_for(model).language_model(model).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits
    finally:
        h.remove()
    return seen, logits


def stock_embeds(model, inputs):
    """The decoder inputs (image features in place) and logits of the stock model."""
    kwargs, logits = stock_decoder_inputs(model, inputs)
    return kwargs["inputs_embeds"], logits


def replaced_span_logits(model, emb, vis, rows):
    """Stock model on inputs_embeds with the image placeholders `vis` (one contiguous span) replaced by
    `rows`, in order: the sequence the official LLaVA code builds with len(rows) image tokens."""
    seq = torch.cat([emb[0, : vis[0]], rows.to(emb), emb[0, vis[-1] + 1 :]])[None]
    with torch.no_grad():
        return model(inputs_embeds=seq).logits[0, -1]


# --- golden CLIP inputs (VisionZip, TRIM golden tests) ----------------------------------------------------
# A CLIP-shaped vision tower with LLaVA's 577 tokens (336 px, patch 14: 24x24 patches + [CLS]) at a tiny
# width, weights and pixels from seeds. The out-of-tree generators of tests/golden/{visionzip,trim} rebuild
# exactly these (same recipe, see the READMEs there) under the official repos' transformers 4.37; the
# fixtures store a checksum of the feature layer so a drifting recipe fails loudly.

GOLDEN_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=4, image_size=336,
                     patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=16)  # fmt: skip
GOLDEN_IMAGE_TOKEN = 127


def golden_fill(module: torch.nn.Module, seed: int) -> None:
    """Seeded weights for every parameter of `module`, in name order (any "vision_model." prefix dropped, so
    transformers 4.37 and 5 name the tower's parameters alike): biases 0.1 N(0,1), LayerNorm weights
    1 + 0.1 N(0,1), other vectors N(0,1), matrices N(0,1) / sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    params = sorted((n.removeprefix("vision_model."), p) for n, p in module.named_parameters())
    with torch.no_grad():
        for name, p in params:
            if name.endswith("bias"):
                v = 0.1 * torch.randn(p.shape, generator=g)
            elif "norm" in name:
                v = 1 + 0.1 * torch.randn(p.shape, generator=g)
            elif p.ndim == 1:
                v = torch.randn(p.shape, generator=g)
            else:
                v = torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5
            p.copy_(v.to(p.dtype))


def golden_pixels(seed: int) -> torch.Tensor:
    """(1, 3, 336, 336) LLaVA-1.5 pixel values of golden seed `seed`."""
    return torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(1000 + seed))


def golden_next_pixels(seed: int, crops: int) -> torch.Tensor:
    """(crops, 3, 336, 336) LLaVA-NeXT crop pixel values (base crop first) of golden seed `seed`."""
    return torch.randn(crops, 3, 336, 336, generator=torch.Generator().manual_seed(4000 + seed))


def golden_checksum(features: torch.Tensor) -> torch.Tensor:
    """(sum, sum of |x|) in float64 of a feature tensor: what the fixtures record of their inputs."""
    f = features.double()
    return torch.stack([f.sum(), f.abs().sum()])


def golden_llava(seed: int, next_: bool = False):
    """A tiny LLaVA-1.5 (or LLaVA-NeXT) whose vision tower is the golden tower of `seed` (feature layer -2,
    'default' strategy as llava-hf); the projector and a 2-layer Llama get seeded weights too."""
    from transformers import CLIPVisionConfig, LlamaConfig

    text = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=4096)  # fmt: skip
    common = dict(
        vision_config=CLIPVisionConfig(**GOLDEN_VISION), text_config=text, image_token_id=GOLDEN_IMAGE_TOKEN,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )  # fmt: skip
    if next_:
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

        pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(image_grid_pinpoints=pins, **common))
    else:
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration(LlavaConfig(image_seq_length=576, **common))
    model.eval()
    golden_fill(model, 10_000 + seed)
    golden_fill(model.model.vision_tower, seed)
    return model


def golden_inputs(model, num_image_tokens: int, pixel_values: torch.Tensor, **extra) -> dict:
    """Prompt `[1, 5, 6] + image placeholders + [7, 8, 9, 10]` for a golden model."""
    ids = [1, 5, 6] + [GOLDEN_IMAGE_TOKEN] * num_image_tokens + [7, 8, 9, 10]
    return dict(input_ids=torch.tensor([ids]), pixel_values=pixel_values, **extra)
