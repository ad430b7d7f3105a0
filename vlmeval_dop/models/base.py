"""Common part of the VLMEvalKit wrappers: lazy loading, greedy generation, DOP around `generate`.

A wrapper is a `vlmeval.vlm.base.BaseModel` built on a stock transformers model. Family modules supply
the prompt (as VLMEvalKit's own wrapper of that model does) and the processor call at the paper's input
resolution; this class does the rest:

- weights load at the first `generate` (or `load()`), by Hugging Face id or from a tiny checkpoint, never
  at construction: registering and listing entries stays cheap, and VLMEvalKit builds a model only when
  predictions are missing;
- `generate_inner` runs `model.generate` greedily inside `apply_dop(model, policy, reducer)`. The
  unpruned model (policy None or the full policy) runs without the executor: the full policy is
  bit-identical to stock transformers by contract, so installing it would only add overhead;
- the image-side reduction `resize` (DOP_R, paper Appendix D.4.2) is done here, before the processor:
  the image is resized so that the processor yields about `n_v` visual tokens, then the executor runs the
  depths with all of those tokens (`n_v=None`);
- per-layer token counts recorded by the executor are kept (`last_layer_tokens`, `layer_tokens_sum`)
  as evidence of what ran.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any

import torch
from vlmeval.smp import get_logger
from vlmeval.vlm.base import BaseModel

from ..executor import apply_dop
from ..images import open_image
from ..policy import DOPPolicy, OperationMask, PolicyError
from ..reducers.instruction import prompt_text
from .weights import WeightsUnavailableError, resolve_weights, weights_unavailable

# a child of VLMEvalKit's root logger "vlmeval": same console and run log file as VLMEvalKit's messages
# (get_logger("vlmeval_dop") would not be a child: the name merely starts with "vlmeval")
logger = get_logger("vlmeval.dop")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class DOPWrapper(BaseModel):
    """VLMEvalKit model running a stock transformers MLLM, optionally under a DOP policy.

    Args:
        model_path: Hugging Face id or local checkpoint directory (paper models).
        tiny: a `vlmeval_dop.tiny` family instead of `model_path` (tests and demo; built offline).
        entry: the registry entry name (used in messages and logs).
        policy: DOP policy; None = the unpruned model.
        reducer: visual token reducer for `policy.n_v` (a `vlmeval_dop.reducers` name or `resize`).
        baseline, baseline_args: a decoder-side baseline (`vlmeval_dop.baselines.BASELINES`) instead of DOP.
        op_mask: visual MHA/MLP operations pruned at single layers on top of `policy` (`OperationMask`).
        max_new_tokens: generation length (default: that of VLMEvalKit's wrapper of this model).
        device: torch device (default: cuda if available, else cpu).
        dtype: `float16`, `bfloat16`, `float32` (default: the family's GPU dtype on cuda, float32 on cpu).
        attn_implementation: `sdpa` (default) or `eager` (what the DOP executor supports).
    """

    INSTALL_REQ = False
    INTERLEAVE = True
    FAMILY = ""  # vlmeval_dop.arch family key
    MODEL_CLASS = ""  # transformers class name
    CUDA_DTYPE = torch.float16
    DEFAULT_MAX_NEW_TOKENS = 2048
    SUPPORTS_RESIZE = False  # the image-side `resize` reduction (DOP_R) is implemented in build_inputs

    def __init__(
        self,
        model_path: str | None = None,
        *,
        tiny: str | None = None,
        entry: str | None = None,
        policy: DOPPolicy | None = None,
        reducer: str | None = None,
        baseline: str | None = None,
        baseline_args: dict[str, Any] | None = None,
        op_mask: OperationMask | None = None,
        max_new_tokens: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        attn_implementation: str = "sdpa",
    ):
        super().__init__()
        if (model_path is None) == (tiny is None):
            raise ValueError("give exactly one of model_path (Hugging Face id or directory) and tiny (a tiny family)")
        if policy is not None and policy.n_v is not None and reducer is None:
            raise PolicyError(f"policy {policy} keeps n_v={policy.n_v} visual tokens but no reducer was given")
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} unknown; valid: {', '.join(_DTYPES)}")
        self.model_path = model_path
        self.tiny = tiny
        self.entry = entry or tiny or model_path
        self.policy = policy
        self.reducer = reducer
        self.baseline = baseline
        self.baseline_args = dict(baseline_args or {})
        self.op_mask = op_mask
        self.max_new_tokens = int(max_new_tokens or self.DEFAULT_MAX_NEW_TOKENS)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _DTYPES[dtype] if dtype else (self.CUDA_DTYPE if self.device.type == "cuda" else torch.float32)
        self.attn_implementation = attn_implementation
        self._model = None
        self._processor = None
        self._gen_cache = None  # (max_new_tokens, GenerationConfig)
        self._resize_override: int | None = None  # set by `resized()`
        # evidence of what ran, from the executor (not from the configuration)
        self.last_layer_tokens: list[tuple[int, int]] | None = None
        self.last_visual_tokens: int | None = None
        self.layer_tokens_sum: list[list[int]] | None = None
        self.pruned_samples = 0
        self.samples = 0

    # ------------------------------------------------------------------ loading
    @property
    def resize_tokens(self) -> int | None:
        """Target visual tokens of the image-side `resize` reduction (DOP_R), None otherwise."""
        if self._resize_override is not None:
            return self._resize_override
        if self.reducer == "resize" and self.policy is not None and self.policy.n_v is not None:
            return self.policy.n_v
        return None

    def _checkpoint(self) -> str:
        if self.tiny is not None:
            from ..tiny import tiny_path

            return str(tiny_path(self.tiny))
        return resolve_weights(self.model_path, self.entry)

    def load(self) -> "DOPWrapper":
        """Load processor and weights now (idempotent); WeightsUnavailableError names the entry if offline."""
        if self._model is not None:
            return self
        import transformers
        from transformers import AutoProcessor

        path = self._checkpoint()
        try:
            processor = AutoProcessor.from_pretrained(path)
            model = getattr(transformers, self.MODEL_CLASS).from_pretrained(
                path, dtype=self.dtype, attn_implementation=self.attn_implementation
            )
        except OSError as exc:  # e.g. a partial cache while offline: same clear message, not the HF one
            if isinstance(exc, WeightsUnavailableError) or self.tiny is not None:
                raise
            raise weights_unavailable(path, self.entry, f"loading failed ({exc.__class__.__name__})") from exc
        model = model.to(self.device).eval()
        self._configure(model, processor)
        num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        if self.policy is not None:
            self.policy.validate(num_layers)
        self._model, self._processor = model, processor
        self._num_layers = num_layers
        return self

    @contextmanager
    def resized(self, n_v: int):
        """Within this context `build_inputs` resizes images for about `n_v` visual tokens (DOP_R), whatever
        the wrapper's own policy: the policy search's `D_v` points of the resize reduction."""
        if not self.SUPPORTS_RESIZE:
            raise ValueError(f"the resize reduction (DOP_R) is not implemented for {type(self).__name__}; "
                             "it is for the qwen2_5_vl and internvl wrappers")
        if n_v < 1:
            raise ValueError(f"n_v must be >= 1, got {n_v}")
        saved, self._resize_override = self._resize_override, int(n_v)
        try:
            yield self
        finally:
            self._resize_override = saved

    def _configure(self, model, processor) -> None:
        """Family hook: set the paper's input resolution on model/processor after loading."""

    @property
    def model(self):
        return self.load()._model

    @property
    def processor(self):
        return self.load()._processor

    # ------------------------------------------------------------------ prompts / inputs (family hooks)
    def build_inputs(self, message: list[dict], dataset: str | None):
        """Processor outputs (BatchFeature) for one VLMEvalKit message at the paper's resolution."""
        raise NotImplementedError

    @staticmethod
    def split_message(message: list[dict]) -> list[tuple[str, Any]]:
        """[(type, value)] with images opened as RGB PIL images, in message order; images over
        `images.MAX_SIDE` px are downscaled before any padding (never an out-of-memory canvas)."""
        out = []
        for item in message:
            if item["type"] == "image":
                out.append(("image", open_image(item["value"])))  # size rule: vlmeval_dop/images.py
            elif item["type"] == "text":
                out.append(("text", item["value"]))
            else:
                raise ValueError(f"{type(item).__name__} {item['type']!r} is not supported; image and text only")
        return out

    # ------------------------------------------------------------------ generation
    def generation_config(self):
        """Greedy decoding (VLMEvalKit's wrappers of these models decode greedily as well).

        Built once per `max_new_tokens` value (it is per-sample work otherwise).
        """
        if self._gen_cache is not None and self._gen_cache[0] == self.max_new_tokens:
            return self._gen_cache[1]
        cfg = copy.deepcopy(self.model.generation_config)
        cfg.update(do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens, repetition_penalty=1.0,
                   temperature=None, top_p=None, top_k=None)
        if cfg.pad_token_id is None:
            eos = cfg.eos_token_id
            cfg.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
        self._gen_cache = (self.max_new_tokens, cfg)
        return cfg

    def _pruning(self):
        """The context that wraps generate: the baseline, apply_dop, or nothing for the unpruned model."""
        if self.baseline is not None:
            from ..registry import _baselines

            available = _baselines()
            if self.baseline not in available:
                raise KeyError(
                    f"baseline {self.baseline!r} is not registered; available: {', '.join(sorted(available)) or 'none'}"
                )
            return available[self.baseline](self.model, **self.baseline_args)
        if self.policy is None and not self.op_mask:
            return nullcontext(None)
        policy, reducer = self.policy or DOPPolicy.full(self._num_layers), self.reducer
        if reducer == "resize":  # the image already has ~n_v tokens; the executor prunes depths only
            policy, reducer = replace(policy, n_v=None), None
        if policy.is_full(self._num_layers) and not self.op_mask:
            return nullcontext(None)
        return apply_dop(self.model, policy, reducer=reducer, op_mask=self.op_mask)

    def model_inputs(self, message, dataset=None):
        """`build_inputs` on the model's device, images in the model's dtype: what `generate` is called with."""
        inputs = self.build_inputs(message, dataset).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    @staticmethod
    def prompt_of(message: list[dict]) -> str:
        """The message's text items joined by newlines (as the prompts place them): the exact prompt
        text-conditioned reducers read (`vlmeval_dop.reducers.instruction.prompt_text`) instead of decoding
        it back from token ids; CDPruner reduces it to the official bare question."""
        return "\n".join(item["value"] for item in message if item["type"] == "text")

    def generate_inner(self, message, dataset=None):
        inputs = self.model_inputs(message, dataset)
        gen = self.generation_config()
        with torch.inference_mode(), self._pruning() as handle, prompt_text(self.prompt_of(message)):
            # a pruner that re-ranks at every new token (FastV per_step, the official FastV evaluation) needs
            # each step to rerun the whole sequence: no KV cache
            per_step = getattr(getattr(handle, "token_pruner", None), "per_step", False)
            out = self.model.generate(**inputs, generation_config=gen, **({"use_cache": False} if per_step else {}))
        self._record(inputs, handle)
        new = out[0, inputs["input_ids"].shape[1]:]
        return self.decode(new)

    def decode(self, token_ids: torch.Tensor) -> str:
        tok = getattr(self.processor, "tokenizer", self.processor)
        return tok.decode(token_ids, skip_special_tokens=True).strip()

    def _record(self, inputs, handle) -> None:
        self.last_visual_tokens = int((inputs["input_ids"] == self.model.config.image_token_id).sum())
        self.samples += 1
        counts = getattr(handle, "last_layer_tokens", None)
        if not counts:
            self.last_layer_tokens = None
            return
        self.last_layer_tokens = [tuple(c) for c in counts]
        if self.layer_tokens_sum is None:
            self.layer_tokens_sum = [[0, 0] for _ in counts]
            logger.info(
                "[%s] DOP %s (%s): visual tokens in the prompt %d; tokens per layer (MHA, MLP) of the first "
                "sample: %s", self.entry, self.policy, self.reducer or self.baseline, self.last_visual_tokens,
                self.last_layer_tokens,
            )
        for acc, (a, m) in zip(self.layer_tokens_sum, counts):
            acc[0] += a
            acc[1] += m
        self.pruned_samples += 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}(entry={self.entry!r}, policy={self.policy}, reducer={self.reducer!r})"
