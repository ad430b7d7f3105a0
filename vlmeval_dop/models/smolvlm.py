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


class _InputsReady(Exception):
    def __init__(self, inputs):
        super().__init__("inputs built")
        self.inputs = inputs


class _InputsOnly:
    """Stands in for VLMEvalKit's loaded model: `generate` returns control with the inputs it was given."""

    device = torch.device("cpu")

    def generate(self, **inputs):
        raise _InputsReady(inputs)


class SmolVLMDOP(DOPWrapper):
    """SmolVLM v1 checkpoints (`Idefics3ForConditionalGeneration`), VLMEvalKit's `SmolVLM` inputs."""

    FAMILY = "smolvlm"
    MODEL_CLASS = "Idefics3ForConditionalGeneration"
    CUDA_DTYPE = torch.float32  # VLMEvalKit's SmolVLM runs in float32
    DEFAULT_MAX_NEW_TOKENS = 2048

    def __init__(self, *args, **kwargs):
        if kwargs.get("reducer") == "resize":
            raise ValueError(
                "the resize reduction (DOP_R) is not meaningful for SmolVLM: its tokens come in whole tiles and the "
                "processor rescales every image to the same longest edge; use reducer 'uniform'"
            )
        super().__init__(*args, **kwargs)

    def build_inputs(self, message, dataset=None):
        from transformers import BatchFeature

        stub = SmolVLM.__new__(SmolVLM)
        stub.processor, stub.model, stub.kwargs = self.processor, _InputsOnly(), {}
        try:
            SmolVLM.generate_inner(stub, message, dataset=dataset)
        except _InputsReady as ready:
            return BatchFeature(dict(ready.inputs))
        raise RuntimeError("VLMEvalKit's SmolVLM.generate_inner returned without calling generate")
