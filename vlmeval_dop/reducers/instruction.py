"""The instruction text of a sample, for text-conditioned reducers (CDPruner, TRIM).

The official LLaVA implementations receive the question string from their evaluation scripts. Inside a
model forward we only have token ids, so we decode the tokens of the sample after its last image span up
to its last real token with the model's own tokenizer (special tokens skipped) and remove a trailing llava
chat-template generation prompt ("ASSISTANT:"). With llava-hf's template ("USER: <image>\\n{question}
ASSISTANT:") this is exactly the question the official evaluation passes. Callers may override it with
`text_fn(ctx, span) -> str`.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from .base import ImageSpan, ReducerError, ReductionContext

_ASSISTANT_SUFFIX = re.compile(r"\s*ASSISTANT:\s*$")


def instruction_ids(ctx: ReductionContext, span: ImageSpan) -> torch.Tensor:
    """Token ids of the sample after its last image span, up to its last real token."""
    b = span.batch_index
    last_end = max(int(s.positions[-1]) for s in ctx.images if s.batch_index == b) + 1
    ids = ctx.input_ids[b, last_end:]
    if ctx.attention_mask is not None:
        ids = ids[ctx.attention_mask[b, last_end:].bool().to(ids.device)]
    return ids


class InstructionText:
    """Decodes a sample's instruction (see module docstring); the tokenizer loads lazily from the model.

    Args:
        tokenizer: the MLLM's tokenizer (default: `AutoTokenizer.from_pretrained(model.name_or_path)`).
        text_fn: `(ctx, span) -> str` overriding the decoded text.
        who: reducer name for error messages.
    """

    def __init__(self, tokenizer: Any = None, text_fn: Callable[[ReductionContext, ImageSpan], str] | None = None, who: str = "reducer"):
        self.tokenizer, self.text_fn, self.who = tokenizer, text_fn, who

    def _tokenizer(self, model) -> Any:
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            src = getattr(model, "name_or_path", None)
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(src)
            except (OSError, ValueError, TypeError) as exc:
                raise ReducerError(
                    f"{self.who} decodes the instruction with the model's tokenizer but could not load it from "
                    f"{src!r}: {exc}; pass tokenizer=..."
                ) from exc
        return self.tokenizer

    def __call__(self, ctx: ReductionContext, span: ImageSpan) -> str:
        if self.text_fn is not None:
            return self.text_fn(ctx, span)
        text = self._tokenizer(ctx.model).decode(instruction_ids(ctx, span).tolist(), skip_special_tokens=True)
        return _ASSISTANT_SUFFIX.sub("", text).strip()
