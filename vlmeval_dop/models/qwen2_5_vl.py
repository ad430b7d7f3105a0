"""Qwen2.5-VL-7B-Instruct as a VLMEvalKit model, at a fixed pixel count (1008x1008 -> 1296 tokens).

Prompts: VLMEvalKit's `Qwen2VLPromptMixin` (mixed in as is), configured as VLMEvalKit's
`Qwen2.5-VL-7B-Instruct` entry configures it (`use_custom_prompt=False`: every dataset keeps its own
prompt). The conversation is Qwen's chat format with its default system prompt, images in message
order as `<|vision_start|><|image_pad|><|vision_end|>`. Greedy decoding (VLMEvalKit samples with top_k=1,
which is greedy too; its repetition_penalty=1.0 overrides the checkpoint's 1.05, so does ours).

Resolution (paper Appendix D.4.2): every image is resized to a fixed pixel count of
`visual_tokens x 28^2` (1,016,064 = 1008^2 for 1296 tokens) with Qwen's own `smart_resize` (sides
multiples of 28, aspect ratio kept), by setting the processor's min and max pixels to that count. DOP_R
(`reducer="resize"`) uses `n_v x 28^2` instead, the paper's resizing for n_v tokens; the token count is
then approximately n_v (exactly n_v for a square image whose side is a multiple of 28).
"""
from __future__ import annotations

import torch
from vlmeval.vlm.qwen2_vl.prompt import Qwen2VLPromptMixin

from .base import DOPWrapper

QWEN_SYSTEM = "You are a helpful assistant."


class Qwen25VLDOP(Qwen2VLPromptMixin, DOPWrapper):
    """Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`).

    Args:
        visual_tokens: LLM visual tokens per image at full resolution (1296 = the paper's 1008x1008).
        use_custom_prompt: VLMEvalKit's Qwen2-VL prompt switch (False, as VLMEvalKit's Qwen2.5-VL entry).
    """

    FAMILY = "qwen2_5_vl"
    MODEL_CLASS = "Qwen2_5_VLForConditionalGeneration"
    CUDA_DTYPE = torch.bfloat16
    SUPPORTS_RESIZE = True
    DEFAULT_MAX_NEW_TOKENS = 2048

    def __init__(self, *args, visual_tokens: int = 1296, use_custom_prompt: bool = False, **kwargs):
        super().__init__(*args, use_custom_prompt=use_custom_prompt, **kwargs)
        if visual_tokens < 1:
            raise ValueError(f"visual_tokens must be >= 1, got {visual_tokens}")
        self.visual_tokens = int(visual_tokens)

    @property
    def pixel_count(self) -> int:
        """Pixels per image fed to the processor (min = max), from the target token count."""
        ip = self.processor.image_processor
        unit = int(ip.patch_size) * int(ip.merge_size)  # 28 px per LLM token side
        tokens = self.resize_tokens or self.visual_tokens
        return tokens * unit * unit

    def build_inputs(self, message, dataset=None):
        parts = self.split_message(message)
        images = [v for t, v in parts if t == "image"]
        tok = self.processor.tokenizer
        cfg = self.model.config
        # vision start/end markers by id: M-RoPE finds images through them, so they must be the config's
        start, end = tok.convert_ids_to_tokens([cfg.vision_start_token_id, cfg.vision_end_token_id])
        vision = f"{start}{self.processor.image_token}{end}"
        content = "".join(vision if t == "image" else v for t, v in parts)
        prompt = (
            f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
        pixels = self.pixel_count
        return self.processor(
            images=images or None, text=prompt, return_tensors="pt",
            size={"shortest_edge": pixels, "longest_edge": pixels},
        )
