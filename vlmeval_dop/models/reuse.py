"""Helpers of the wrappers beyond the paper's families: VLMEvalKit's own input path run as it is, and the
refusal of the image-side `resize` where it cannot reach a budget."""
from __future__ import annotations

from typing import Any, Callable

import torch


class _InputsReady(Exception):
    def __init__(self, inputs: dict):
        super().__init__("inputs built")
        self.inputs = inputs


class _InputsOnly:
    """Stands in for a VLMEvalKit wrapper's loaded model: `generate` returns control with the inputs it was
    given (on the CPU; the DOP wrapper moves them to its own device)."""

    device = torch.device("cpu")

    def generate(self, **inputs):
        raise _InputsReady(inputs)


def vlmeval_inputs(method: Callable[..., Any], wrapper: Any, message: list[dict], dataset: str | None):
    """The model inputs (a BatchFeature) VLMEvalKit's `method` (e.g. `SmolVLM.generate_inner`) builds for
    `message`, run on `wrapper` (an instance of its class without a model) with a stand-in model."""
    from transformers import BatchFeature

    wrapper.model = _InputsOnly()
    try:
        method(wrapper, message, dataset=dataset)
    except _InputsReady as ready:
        return BatchFeature(dict(ready.inputs))
    raise RuntimeError(f"{method.__qualname__} returned without calling its model's generate")


def refuse_resize(kwargs: dict, model: str, why: str) -> None:
    """ValueError (before anything loads) for `reducer="resize"` on a model where resizing is not meaningful."""
    if kwargs.get("reducer") == "resize":
        raise ValueError(f"the resize reduction (DOP_R) is not meaningful for {model}: {why}; use reducer 'uniform'")
