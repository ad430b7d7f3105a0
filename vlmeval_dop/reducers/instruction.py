"""The instruction text of a sample, for text-conditioned reducers (CDPruner, TRIM).

The official LLaVA implementations receive a text string from their evaluation scripts. Where it comes from
here, in order:

1. `text_fn(ctx, span) -> str` given to the reducer (caller override);
2. the prompt text the VLMEvalKit wrapper is answering (`prompt_text(...)`, set by
   `vlmeval_dop.models.base.DOPWrapper.generate_inner` around `generate`): the exact string, no decoding;
3. otherwise (a reducer called outside VLMEvalKit, or policy search replaying stored inputs): the tokens of
   the sample after its last image span up to its last real token, decoded with the model's own tokenizer
   (special tokens skipped), with a trailing llava chat-template generation prompt ("ASSISTANT:") removed.
   With llava-hf's template ("USER: <image>\\n{prompt} ASSISTANT:") this is the prompt again.

Reducers built with `official_question=True` (CDPruner) then reduce the prompt to the *bare question* the
official CDPruner evaluation passes as `texts` (`bare_question`): its scripts remove the answer-format
instruction they append to the question, `model_vqa_loader.py` (TextVQA, GQA, VQAv2, VizWiz, POPE, MME)
"\\nAnswer the question using a single word or phrase.", `model_vqa_science.py` (ScienceQA) "\\nAnswer with
the option's letter from the given choices directly.", and `model_vqa_mmbench.py` (MMBench, MMBench-CN)
passes `hint\\nquestion\\nA. ...\\nB. ...` without its English / Chinese ("\\n请直接回答选项字母。")
instruction. VLMEvalKit's LLaVA prompts are built the same way (the MCQ prompt is exactly
`hint\\nquestion\\nA. ...` plus the instruction), so removing these instructions wherever they occur gives
every script's text on its own dataset type; none of them occurs in another type's prompt.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from .base import ImageSpan, ReducerError, ReductionContext

_ASSISTANT_SUFFIX = re.compile(r"\s*ASSISTANT:\s*$")

# the answer-format instructions the official CDPruner eval scripts strip from (or never add to) `texts`
ANSWER_INSTRUCTIONS: tuple[str, ...] = (
    "\nAnswer the question using a single word or phrase.",  # model_vqa_loader.py
    "\nAnswer with the option's letter from the given choices directly.",  # model_vqa_science.py / _mmbench.py
    "\n请直接回答选项字母。",  # model_vqa_mmbench.py, --lang cn
)

# prompt text of the sample(s) being generated: one string for every sample, or one per batch index
_PROMPT: ContextVar[str | tuple[str, ...] | None] = ContextVar("vlmeval_dop_prompt_text", default=None)


def bare_question(prompt: str) -> str:
    """`prompt` without the answer-format instructions of `ANSWER_INSTRUCTIONS` (removed wherever they
    occur, as the official scripts' `str.replace` does): the text the official CDPruner gives CLIP."""
    for suffix in ANSWER_INSTRUCTIONS:
        prompt = prompt.replace(suffix, "")
    return prompt


@contextmanager
def prompt_text(text: str | Sequence[str] | None) -> Iterator[None]:
    """Within this context, text-conditioned reducers read the instruction from `text` (the prompt of the
    sample, or one prompt per batch index) instead of decoding tokens. None leaves decoding in place."""
    token = _PROMPT.set(text if text is None or isinstance(text, str) else tuple(text))
    try:
        yield
    finally:
        _PROMPT.reset(token)


def _given_prompt(batch_index: int) -> str | None:
    given = _PROMPT.get()
    if given is None or isinstance(given, str):
        return given
    if batch_index >= len(given):
        raise ReducerError(f"prompt_text holds {len(given)} prompts but the batch has sample {batch_index}")
    return given[batch_index]


def instruction_ids(ctx: ReductionContext, span: ImageSpan) -> torch.Tensor:
    """Token ids of the sample after its last image span, up to its last real token."""
    b = span.batch_index
    last_end = max(int(s.positions[-1]) for s in ctx.images if s.batch_index == b) + 1
    ids = ctx.input_ids[b, last_end:]
    if ctx.attention_mask is not None:
        ids = ids[ctx.attention_mask[b, last_end:].bool().to(ids.device)]
    return ids


class InstructionText:
    """The instruction of a sample (see module docstring); the tokenizer loads lazily from the model.

    Args:
        tokenizer: the MLLM's tokenizer (default: `AutoTokenizer.from_pretrained(model.name_or_path)`).
        text_fn: `(ctx, span) -> str` overriding everything else.
        who: reducer name for error messages.
        official_question: use the wrapper's prompt when given and reduce the text to `bare_question`
            (CDPruner's official CLIP text); False keeps the decoded text as it is.
    """

    def __init__(self, tokenizer: Any = None, text_fn: Callable[[ReductionContext, ImageSpan], str] | None = None,
                 who: str = "reducer", official_question: bool = False):  # fmt: skip
        self.tokenizer, self.text_fn, self.who = tokenizer, text_fn, who
        self.official_question = official_question

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

    def decoded(self, ctx: ReductionContext, span: ImageSpan) -> str:
        """The sample's tokens after its last image, decoded, without a trailing "ASSISTANT:"."""
        text = self._tokenizer(ctx.model).decode(instruction_ids(ctx, span).tolist(), skip_special_tokens=True)
        return _ASSISTANT_SUFFIX.sub("", text).strip()

    def __call__(self, ctx: ReductionContext, span: ImageSpan) -> str:
        if self.text_fn is not None:
            return self.text_fn(ctx, span)
        if not self.official_question:
            return self.decoded(ctx, span)
        given = _given_prompt(span.batch_index)
        return bare_question(given if given is not None else self.decoded(ctx, span))
