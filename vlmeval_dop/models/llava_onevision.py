"""LLaVA-OneVision-7B (llava-hf, `LlavaOnevisionForConditionalGeneration`) as a VLMEvalKit model.

Inputs are those of VLMEvalKit's `LLaVA_OneVision_HF` (its `llava-onevision-qwen2-7b-ov-hf` entry; image
path of `generate_inner_image`): no custom prompts (each dataset's own), the message flattened in order into
one text with `<image>\\n` in place of each image, one user turn through the checkpoint's chat template, and
the images as they are (the processor's anyres_max_9 tiling: base tile + up to 6x6 crops of 384 px, one
newline token per feature row). VLMEvalKit's method runs its model at once, so its few lines of prompt
assembly are mirrored in `prompt()`; tests/test_wrappers_families.py checks that they give the same string as
VLMEvalKit's own method. float16 on GPU and 2048 new tokens, as VLMEvalKit; greedy decoding.

Only the `uniform` reducer (and decoder-side depths) apply: the image-side `resize` (DOP_R) is refused,
since anyres tiling keeps at least a base tile and one crop (2 x 729 tokens + newlines) whatever the image
size, so resizing cannot reach the token counts of the budgets.
"""
from __future__ import annotations

import torch
from PIL import Image

from .base import DOPWrapper
from .reuse import refuse_resize


class LLaVAOneVisionDOP(DOPWrapper):
    """LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`), VLMEvalKit's `LLaVA_OneVision_HF` inputs."""

    FAMILY = "llava_onevision"
    MODEL_CLASS = "LlavaOnevisionForConditionalGeneration"
    CUDA_DTYPE = torch.float16
    DEFAULT_MAX_NEW_TOKENS = 2048
    IMAGE_TOKEN = "<image>"  # LLaVA_OneVision_HF.DEFAULT_IMAGE_TOKEN

    def __init__(self, *args, **kwargs):
        refuse_resize(kwargs, "LLaVA-OneVision", "anyres tiling keeps a base tile and at least one crop whatever the "
                      "image size")  # fmt: skip
        super().__init__(*args, **kwargs)

    def use_custom_prompt(self, dataset):
        return False  # LLaVA_OneVision_HF keeps VLMEvalKit's default (dataset prompts)

    def prompt(self, message) -> tuple[str, list[Image.Image]]:
        """(chat-formatted prompt, images) as `LLaVA_OneVision_HF.generate_inner_image` builds them."""
        content, images = "", []
        for item in message:
            if item["type"] == "text":
                content += item["value"]
            elif item["type"] == "image":
                images.append(Image.open(item["value"]).convert("RGB"))
                content += self.IMAGE_TOKEN + "\n"
        conversation = [{"role": "user", "content": [{"type": "text", "text": content}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True), images

    def build_inputs(self, message, dataset=None):
        text, images = self.prompt(message)
        return self.processor(images=images or None, text=text, return_tensors="pt")
