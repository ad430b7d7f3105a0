"""InternVL3.5-8B (the `-HF` checkpoint, `InternVLForConditionalGeneration` with a Qwen3 decoder) as a
VLMEvalKit model, with the inputs of VLMEvalKit's `InternVL3_5-8B` entry (`InternVLChat`, version V2.0).

Reused from VLMEvalKit as they are: the prompts (`InternVLChat.use_custom_prompt` / `build_prompt`, CoT and
MPO prompting off), `reorganize_prompt` (image placeholders first), the per-dataset tile budget
(`InternVLChat.set_max_num`: 6 tiles, 12 for ChartQA / MMMU / ..., 24 for OCRBench / InfoVQA, at most 64 over
all images of a sample) and the tiling itself (`vlmeval.vlm.internvl.utils.load_image`: InternVL's
`dynamic_preprocess` into 448 px tiles + a thumbnail, MMMU's 2x upscale). Each `<image>` then becomes
`<img>` + 256 `<IMG_CONTEXT>` per tile + `</img>`, as InternVL's own `chat()` expands it, and the turn goes
through the checkpoint's chat template (the -HF checkpoint's conversation format). Greedy decoding.

DOP_R (`reducer="resize"`) as for InternVL3 (models/internvl3.py): one square tile of side
`28 * round(sqrt(n_v))` (the paper's pixel count `n_v x 28^2`), `round(sqrt(n_v))^2` tokens.
"""
from __future__ import annotations

import math

import torch
from vlmeval.vlm.internvl.internvl_chat import InternVLChat
from vlmeval.vlm.internvl.utils import build_transform, load_image, reorganize_prompt

from .internvl3 import InternVL3DOP


class InternVL35DOP(InternVL3DOP):
    """InternVL3.5 (`InternVLForConditionalGeneration`, Qwen3 decoder) with VLMEvalKit's dynamic tiling."""

    # VLMEvalKit's per-dataset tile budget, reused (sets self.max_num / self.total_max_num)
    set_max_num = InternVLChat.set_max_num

    def __init__(self, *args, **kwargs):
        kwargs.pop("image_size", None)  # the tiling follows each image (VLMEvalKit), not a fixed canvas
        super().__init__(*args, **kwargs)

    def prompt(self, message, dataset=None) -> tuple[str, torch.Tensor | None]:
        """(chat-formatted prompt with expanded image tokens, pixel values) for one VLMEvalKit message."""
        proc = self.processor
        paths = [x["value"] for x in message if x["type"] == "image"]
        prompt = reorganize_prompt(message, len(paths), dataset=dataset)
        tiles, per_tile = [], self._tile_tokens
        if self.resize_tokens is None:
            self.set_max_num(dataset)
            max_num = max(1, min(self.max_num, self.total_max_num // max(1, len(paths))))
            for i, path in enumerate(paths):
                upscale = dataset is not None and "MMMU" in dataset and (len(paths) == 1 or i == 0)
                tiles.append(load_image(path, input_size=self._tile, max_num=max_num, upscale=upscale))
        else:
            k = max(1, round(math.sqrt(self.resize_tokens)))
            side, per_tile = k * self._unit, k * k
            transform = build_transform(input_size=side)
            from PIL import Image

            tiles = [transform(Image.open(p).convert("RGB"))[None] for p in paths]
        for t in tiles:
            expanded = proc.start_image_token + proc.image_token * (per_tile * t.shape[0]) + proc.end_image_token
            prompt = prompt.replace("<image>", expanded, 1)
        text = proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": prompt}]}], add_generation_prompt=True,
            tokenize=False,
        )  # fmt: skip
        return text, torch.cat(tiles) if tiles else None

    def build_inputs(self, message, dataset=None):
        from transformers import BatchFeature

        text, pixel_values = self.prompt(message, dataset)
        enc = self.processor.tokenizer(text, return_tensors="pt")
        data = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if pixel_values is not None:
            data["pixel_values"] = pixel_values
        return BatchFeature(data)
