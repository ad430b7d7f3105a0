"""Gemma-3-4B-it (`Gemma3ForConditionalGeneration`) as a VLMEvalKit model, with VLMEvalKit's own inputs.

The inputs are those of VLMEvalKit's `Gemma3` wrapper (`vlmeval/vlm/gemma.py`), its transformers path
`generate_inner_transformers` run as it is with a stand-in for its model that hands back the inputs: its messages
(`message2pipeline`: its default system prompt "You are a helpful assistant. ", images and texts interleaved in
one user turn, no per-dataset prompts), the checkpoint's chat template through `processor.apply_chat_template`,
and the processor's own resolution handling: every image resized to 896x896, pan-and-scan off (the processor's
default, which VLMEvalKit does not change), 256 image tokens. Its inputs are cast to bfloat16 as VLMEvalKit does
(`.to(device, dtype=torch.bfloat16)`: the pixel values), then to the wrapper's dtype. Greedy decoding, 4096 new
tokens at most, as VLMEvalKit's defaults (`do_sample=False, max_new_tokens=4096`). VLMEvalKit loads the model with
flash_attention_2, which transformers 5.24 refuses for Gemma 3 (it drops the bidirectional image mask); this
wrapper uses sdpa (eager on request), which computes the same attention as the stock masks.

One environment fallback: transformers decodes the image paths with torchvision, whose libpng fails on PNGs once
`decord` is loaded (VLMEvalKit imports it; a zlib clash, "libpng error: bad parameters to zlib"). An image whose
decoding fails that way is handed to the processor as a PIL image instead (same pixels for PNG, which is lossless).

Only the `uniform` reducer (and depths) apply: the image-side `resize` (DOP_R) is refused, since every image
becomes 896x896 and exactly `mm_tokens_per_image` = 256 tokens (a fixed 4x4 average pool of SigLIP's fixed 64x64
patch grid), so resizing the image cannot reach a budget's token count.
"""
from __future__ import annotations

import torch
from vlmeval.vlm.gemma import Gemma3

from .base import DOPWrapper
from .reuse import refuse_resize, vlmeval_inputs


class Gemma3DOP(DOPWrapper):
    """Gemma 3 (`Gemma3ForConditionalGeneration`), VLMEvalKit's `Gemma3` inputs.

    Args:
        system_prompt: VLMEvalKit's `Gemma3(system_prompt=...)` ("You are a helpful assistant. " by default;
            None for no system turn).
    """

    FAMILY = "gemma3"
    MODEL_CLASS = "Gemma3ForConditionalGeneration"
    CUDA_DTYPE = torch.bfloat16  # as VLMEvalKit's Gemma3
    DEFAULT_MAX_NEW_TOKENS = 4096

    def __init__(self, *args, system_prompt: str | None = "You are a helpful assistant. ", **kwargs):
        refuse_resize(kwargs, "Gemma 3", "every image is resized to 896x896 and always gives 256 tokens")
        super().__init__(*args, **kwargs)
        self.system_prompt = system_prompt

    def build_inputs(self, message, dataset=None):
        stub = Gemma3.__new__(Gemma3)
        stub.__dict__.update(processor=self.processor, system_prompt=self.system_prompt, kwargs={},
                             device=torch.device("cpu"), use_vllm=False)  # fmt: skip
        stub.message2pipeline = lambda msg: [_decodable(turn) for turn in Gemma3.message2pipeline(stub, msg)]
        return vlmeval_inputs(Gemma3.generate_inner_transformers, stub, message, dataset)


def _decodable(turn: dict) -> dict:
    """`turn` with every image path transformers' torchvision decoder cannot read replaced by its PIL image."""
    from PIL import Image
    from transformers.image_utils import load_image_as_tensor

    content = []
    for item in turn["content"]:
        if item.get("type") == "image" and isinstance(item.get("url"), str):
            try:
                load_image_as_tensor(item["url"])
            except RuntimeError:
                item = {"type": "image", "image": Image.open(item["url"]).convert("RGB")}
        content.append(item)
    return {**turn, "content": content}
