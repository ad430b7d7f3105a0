"""InternVL3-8B (the `-hf` checkpoint, `InternVLForConditionalGeneration`) as a VLMEvalKit model.

Prompts: VLMEvalKit's `InternVLChat` prompt logic, reused as is (`use_custom_prompt`/`build_prompt`:
MCQ options with "Answer with the option's letter from the given choices directly.", "Answer the question
using a single word or phrase." for short-answer VQA, MME's suffix, ...) and its `reorganize_prompt`
(image placeholders first: `<image>\\n<prompt>`). The conversation is InternVL3's chat format
(`internvl2_5` template of the remote-code model VLMEvalKit runs, including its system message). CoT and
MPO prompting are off, as in VLMEvalKit's `InternVL3-8B` entry. Greedy decoding.

Resolution (paper Section D.1): every image is resized to 896x896 (twice the 448 tile) and tiled as
InternVL does (2x2 tiles + a thumbnail = 5 x 256 = 1280 tokens); `max_patches` is VLMEvalKit's default
`max_num=6`, which for a square 896 input always selects the 2x2 grid. DOP_R (`reducer="resize"`) feeds
a single tile of side `28 * round(sqrt(n_v))` instead (the paper's pixel count `n_v x 28^2` for a square
image: 361 tokens -> 532x532, 169 -> 364x364); the vision tower interpolates its position embeddings,
and the processor's per-tile token count is set to match. Images are squared, as at 896x896, because
transformers' InternVL pixel shuffle assumes square tiles.
"""
from __future__ import annotations

import math

import torch
from vlmeval.vlm.internvl.internvl_chat import InternVLChat
from vlmeval.vlm.internvl.utils import reorganize_prompt

from .base import DOPWrapper

INTERNVL_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)


class InternVL3DOP(DOPWrapper):
    """InternVL3 (`InternVLForConditionalGeneration`).

    Args:
        image_size: square input side in pixels; default twice the vision tile (896 for InternVL3).
        max_patches: InternVL's `max_num` tiles (VLMEvalKit's default 6).
    """

    FAMILY = "internvl"
    MODEL_CLASS = "InternVLForConditionalGeneration"
    CUDA_DTYPE = torch.bfloat16
    SUPPORTS_RESIZE = True
    DEFAULT_MAX_NEW_TOKENS = 4096

    # VLMEvalKit's InternVL prompt logic, reused; it reads the attributes set in __init__
    use_custom_prompt = InternVLChat.use_custom_prompt
    build_prompt = InternVLChat.build_prompt

    def __init__(self, *args, image_size: int | None = None, max_patches: int = 6, **kwargs):
        super().__init__(*args, **kwargs)
        self.image_size = image_size
        self.max_patches = int(max_patches)
        # attributes InternVLChat.build_prompt consults (VLMEvalKit's InternVL3-8B configuration)
        self._use_custom_prompt = True
        self.use_mpo_prompt = False
        self.use_cot = False
        self.cot_prompt = None
        self.screen_parse = True
        self.kwargs = {"max_new_tokens": self.max_new_tokens}

    def _configure(self, model, processor) -> None:
        vision = model.config.vision_config
        tile = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
        patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
        self._tile = int(tile)
        self._unit = int(round(patch / model.config.downsample_ratio))  # pixels per LLM token side (28)
        self._tile_tokens = int(processor.image_seq_length)
        self.image_size = int(self.image_size or 2 * self._tile)

    def build_inputs(self, message, dataset=None):
        parts = self.split_message(message)
        images = [v for t, v in parts if t == "image"]
        prompt = reorganize_prompt(message, len(images), dataset=dataset)
        prompt = prompt.replace("<image>", self.processor.image_token)
        text = (
            f"<|im_start|>system\n{INTERNVL_SYSTEM}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
        proc = self.processor
        if self.resize_tokens is None:
            images = [im.resize((self.image_size, self.image_size), resample=3) for im in images]
            return proc(images=images or None, text=text, return_tensors="pt",
                        crop_to_patches=True, max_patches=self.max_patches)
        k = max(1, round(math.sqrt(self.resize_tokens)))
        side = k * self._unit
        images = [im.resize((side, side), resample=3) for im in images]
        # one tile of k x k tokens: the processor must write k*k placeholders per image, not 256
        saved = proc.image_seq_length
        proc.image_seq_length = k * k
        try:
            return proc(images=images or None, text=text, return_tensors="pt",
                        crop_to_patches=False, size={"height": side, "width": side})
        finally:
            proc.image_seq_length = saved
