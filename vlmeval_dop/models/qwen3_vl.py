"""Qwen3-VL-2B / 4B / 8B-Instruct as VLMEvalKit models, with VLMEvalKit's own inputs.

The inputs are those of VLMEvalKit's `Qwen3VLChat` transformers path, run as it is (`generate_inner_transformers`
with a stand-in for its model that hands back the inputs): its prompts (`Qwen3VLPromptMixin`, custom prompts off
as its `Qwen3-VL-8B-Instruct` entry), its message content (`_prepare_content`: per-image pixel bounds, OCRBench's
10x10x32^2 minimum), the checkpoint's chat template and `qwen_vl_utils.process_vision_info(image_patch_size=16)`
(Qwen's image loading and `smart_resize`, processor called with `do_resize=False`). Resolution: that entry's, no
pixel bounds (qwen_vl_utils' defaults). VLMEvalKit's entry samples (temperature 0.7, top_p 0.8, via vLLM); the
wrapper decodes greedily, so its numbers are the greedy ones of the same inputs. 16384 new tokens at most, as
that entry.

DOP_R (`reducer="resize"`): every image at the fixed pixel count `n_v x 32^2` (min = max pixels, aspect ratio kept
by `smart_resize`), as the Qwen2-VL / Qwen2.5-VL wrappers do with 28 px.
"""
from __future__ import annotations

import torch
from vlmeval.vlm.qwen3_vl.model import Qwen3VLChat
from vlmeval.vlm.qwen3_vl.prompt import Qwen3VLPromptMixin

from .base import DOPWrapper
from .reuse import vlmeval_inputs

TOKEN_PIXELS = 32 * 32  # one LLM visual token: a 2x2 merge of 16 px patches


class Qwen3VLDOP(Qwen3VLPromptMixin, DOPWrapper):
    """Qwen3-VL (`Qwen3VLForConditionalGeneration`).

    Args:
        min_pixels, max_pixels: per-image pixel bounds (None: VLMEvalKit's Qwen3-VL entries set none).
        use_custom_prompt: VLMEvalKit's Qwen3-VL prompt switch (False, as its Qwen3-VL-8B-Instruct entry).
        system_prompt: optional system message (None, as VLMEvalKit's default).
    """

    FAMILY = "qwen3_vl"
    MODEL_CLASS = "Qwen3VLForConditionalGeneration"
    CUDA_DTYPE = torch.bfloat16
    SUPPORTS_RESIZE = True
    DEFAULT_MAX_NEW_TOKENS = 16384

    def __init__(self, *args, min_pixels: int | None = None, max_pixels: int | None = None,
                 use_custom_prompt: bool = False, system_prompt: str | None = None, **kwargs):  # fmt: skip
        super().__init__(*args, use_custom_prompt=use_custom_prompt, **kwargs)
        self.min_pixels, self.max_pixels, self.system_prompt = min_pixels, max_pixels, system_prompt

    def _vlmeval(self) -> Qwen3VLChat:
        """A `Qwen3VLChat` holding this wrapper's processor and settings, without a model of its own."""
        stub = Qwen3VLChat.__new__(Qwen3VLChat)
        stub.__dict__.update(
            model_path=self.model_path or str(self.tiny), processor=self.processor,
            system_prompt=self.system_prompt, verbose=False, min_pixels=self.min_pixels, max_pixels=self.max_pixels,
            total_pixels=None, fps=2, nframe=128, FRAME_FACTOR=2, use_audio_in_video=True, generate_kwargs={},
        )  # fmt: skip
        if self.resize_tokens is not None:  # DOP_R: one fixed pixel count for every image
            pixels = self.resize_tokens * TOKEN_PIXELS

            def content(inputs, dataset=None):
                items = Qwen3VLChat._prepare_content(stub, inputs, dataset=dataset)
                for item in items:
                    if item["type"] == "image":
                        item["min_pixels"] = item["max_pixels"] = pixels
                return items

            stub._prepare_content = content
        return stub

    def build_inputs(self, message, dataset=None):
        return vlmeval_inputs(Qwen3VLChat.generate_inner_transformers, self._vlmeval(), message, dataset)
