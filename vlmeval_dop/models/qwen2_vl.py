"""Qwen2-VL-7B-Instruct as a VLMEvalKit model, with VLMEvalKit's own inputs.

Everything up to the processor call is VLMEvalKit's `Qwen2VLChat` transformers path, reused, not rewritten:
its prompts (`Qwen2VLPromptMixin`, custom prompts on, as its `Qwen2-VL-7B-Instruct` entry), its message
content (`Qwen2VLChat._prepare_content`: per-image `min_pixels` / `max_pixels`, OCRBench's 10x10x28^2
minimum), the checkpoint's chat template and `qwen_vl_utils.process_vision_info` (Qwen's own image loading
and `smart_resize`). Resolution: VLMEvalKit's entry, `min_pixels = 1280 x 28^2`, `max_pixels = 16384 x 28^2`
(every image gets 1280 to 16384 visual tokens; a square one at least 1296). Greedy decoding (VLMEvalKit samples
with top_k=1, which is greedy too).

DOP_R (`reducer="resize"`): every image at the fixed pixel count `n_v x 28^2` (min = max pixels, aspect ratio
kept by Qwen's `smart_resize`), the paper's resizing for n_v tokens, as the Qwen2.5-VL wrapper does.
"""
from __future__ import annotations

import torch
from vlmeval.vlm.qwen2_vl.model import Qwen2VLChat
from vlmeval.vlm.qwen2_vl.prompt import Qwen2VLPromptMixin

from .base import DOPWrapper

TOKEN_PIXELS = 28 * 28  # one LLM visual token: a 2x2 merge of 14 px patches


class Qwen2VLDOP(Qwen2VLPromptMixin, DOPWrapper):
    """Qwen2-VL (`Qwen2VLForConditionalGeneration`).

    Args:
        min_pixels, max_pixels: per-image pixel bounds (VLMEvalKit's Qwen2-VL-7B-Instruct entry by default).
        use_custom_prompt: VLMEvalKit's Qwen2-VL prompt switch (True, as that entry).
        system_prompt: optional system message (VLMEvalKit's default None: the chat template's own).
    """

    FAMILY = "qwen2_vl"
    MODEL_CLASS = "Qwen2VLForConditionalGeneration"
    CUDA_DTYPE = torch.bfloat16
    SUPPORTS_RESIZE = True
    DEFAULT_MAX_NEW_TOKENS = 2048

    # VLMEvalKit's message -> Qwen content (pixel bounds per image), reused; reads the attributes set below
    _prepare_content = Qwen2VLChat._prepare_content

    def __init__(
        self,
        *args,
        min_pixels: int = 1280 * TOKEN_PIXELS,
        max_pixels: int = 16384 * TOKEN_PIXELS,
        use_custom_prompt: bool = True,
        system_prompt: str | None = None,
        **kwargs,
    ):
        super().__init__(*args, use_custom_prompt=use_custom_prompt, **kwargs)
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.system_prompt = system_prompt
        # attributes `_prepare_content` consults for videos / total pixels (images only here)
        self.total_pixels, self.fps, self.nframe = None, 2, 128

    def messages(self, message, dataset=None) -> list[dict]:
        """The Qwen chat messages VLMEvalKit builds (with DOP_R's fixed pixel count on every image)."""
        content = self._prepare_content(message, dataset=dataset)
        if self.resize_tokens is not None:
            pixels = self.resize_tokens * TOKEN_PIXELS
            for item in content:
                if item["type"] == "image":
                    item["min_pixels"] = item["max_pixels"] = pixels
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        return messages + [{"role": "user", "content": content}]

    def build_inputs(self, message, dataset=None):
        from qwen_vl_utils import process_vision_info

        messages = self.messages(message, dataset)
        text = self.processor.apply_chat_template([messages], tokenize=False, add_generation_prompt=True)
        images, videos = process_vision_info([messages])
        return self.processor(text=text, images=images, videos=videos, padding=True, return_tensors="pt")
