"""SmolVLM-256M / 500M / 2.2B-Instruct (`Idefics3ForConditionalGeneration` checkpoints) as VLMEvalKit models.

The inputs are exactly those of VLMEvalKit's `SmolVLM` wrapper: its `generate_inner` (the per-dataset prompt
builders: MMBench / MMMU / MathVista / ChartQA / DocVQA / TextVQA / MCQ / default prompts, `<|im_start|>User:`
... `<end_of_utterance>\\nAssistant:`) and its processor call are run as they are, with a stand-in for its model
that hands back the inputs instead of generating. The processor does SmolVLM's own resolution handling (each
image rescaled to a longest edge of 4 tiles, split into tiles + a global view). float32, 2048 new tokens, as
VLMEvalKit; greedy decoding.

Only the `uniform` reducer (and depths) apply: the image-side `resize` (DOP_R) is refused, since SmolVLM's token
count moves in whole tiles (64 or 81 tokens, at least the global view) and its processor rescales every image
to the same longest edge, so resizing the image cannot reach a budget's token count.
"""
from __future__ import annotations

import torch
from vlmeval.vlm.smolvlm import SmolVLM

from .base import DOPWrapper
from .reuse import refuse_resize, vlmeval_inputs


class SmolVLMDOP(DOPWrapper):
    """SmolVLM v1 checkpoints (`Idefics3ForConditionalGeneration`), VLMEvalKit's `SmolVLM` inputs."""

    FAMILY = "smolvlm"
    MODEL_CLASS = "Idefics3ForConditionalGeneration"
    CUDA_DTYPE = torch.float32  # VLMEvalKit's SmolVLM runs in float32
    DEFAULT_MAX_NEW_TOKENS = 2048

    def __init__(self, *args, **kwargs):
        refuse_resize(kwargs, "SmolVLM", "its tokens come in whole tiles and the processor rescales every image to "
                      "the same longest edge")  # fmt: skip
        super().__init__(*args, **kwargs)

    def build_inputs(self, message, dataset=None):
        stub = SmolVLM.__new__(SmolVLM)
        stub.processor, stub.kwargs = self.processor, {}
        return vlmeval_inputs(SmolVLM.generate_inner, stub, message, dataset)
