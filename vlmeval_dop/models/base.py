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
  as evidence of what ran;
- `generate_batch` answers several messages with one `generate` exactly as `generate_inner` answers each
  (same `build_inputs`, pruning context and generation config; rows left-padded by `collate_inputs`, each
  cut at its own stop token): what `run.py --batch-size N` runs (`vlmeval_dop/batched_inference.py`).
  `batch_blocker()` says why a wrapper or method cannot be batched exactly (it then runs one sample at a time).
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


def _official_attention(baseline: str | None) -> str | None:
    """The attention implementation a decoder-side baseline's official code ran (`official_attention`), if any."""
    if baseline is None:
        return None
    from ..methods import registered

    info = registered("decoder").get(baseline)
    return getattr(info.cls, "official_attention", None) if info else None


class BatchingError(ValueError):
    """Samples whose inputs cannot be put into one batch (the batched loop then runs them one at a time)."""


def _left_pad(t: torch.Tensor, width: int, fill: int) -> torch.Tensor:
    """(1, N, ...) -> (1, width, ...) with `fill` before the tokens."""
    pad = t.new_full((1, width - t.shape[1], *t.shape[2:]), fill)
    return torch.cat([pad, t], dim=1)


class DOPWrapper(BaseModel):
    """VLMEvalKit model running a stock transformers MLLM, optionally under a DOP policy.

    Args:
        model_path: Hugging Face id or local checkpoint directory (paper models).
        tiny: a `vlmeval_dop.tiny` family instead of `model_path` (tests and demo; built offline).
        entry: the registry entry name (used in messages and logs).
        policy: DOP policy; None = the unpruned model.
        reducer: visual token reducer for `policy.n_v` (a `vlmeval_dop.reducers` name or `resize`).
        reducer_args: the reducer's constructor arguments (an entry's seed: `{entry}.s3`).
        baseline, baseline_args: a decoder-side baseline (`vlmeval_dop.baselines.BASELINES`) instead of DOP.
        op_mask: visual MHA/MLP operations pruned at single layers on top of `policy` (`OperationMask`).
        max_new_tokens: generation length (default: that of VLMEvalKit's wrapper of this model).
        device: torch device (default: cuda if available, else cpu).
        dtype: `float16`, `bfloat16`, `float32` (default: the family's GPU dtype on cuda, float32 on cpu).
        attn_implementation: `sdpa` or `eager` (what the DOP executor supports). Default: `eager` for a decoder-side
            baseline whose official code ran eager attention (the class's `official_attention`: FastV, SparseVLM,
            FitPrune read eager attention weights, so their float16 hidden states round as eager does; under sdpa
            SparseVLM's float16 kept sets overlap the official ones by >= 76.5 % only), else `sdpa`.
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
        reducer_args: dict[str, Any] | None = None,
        baseline: str | None = None,
        baseline_args: dict[str, Any] | None = None,
        op_mask: OperationMask | None = None,
        max_new_tokens: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        attn_implementation: str | None = None,
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
        self.reducer_args = dict(reducer_args or {})
        self.baseline = baseline
        self.baseline_args = dict(baseline_args or {})
        self.op_mask = op_mask
        self.max_new_tokens = int(max_new_tokens or self.DEFAULT_MAX_NEW_TOKENS)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _DTYPES[dtype] if dtype else (self.CUDA_DTYPE if self.device.type == "cuda" else torch.float32)
        self.attn_implementation = attn_implementation or _official_attention(baseline) or "sdpa"
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
            from ..baselines import BASELINES as available

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
        if reducer is not None and self.reducer_args:  # constructed with the entry's arguments (a seed)
            from ..reducers import get_reducer

            reducer = get_reducer(reducer, **self.reducer_args)
        return apply_dop(self.model, policy, reducer=reducer, op_mask=self.op_mask)

    def pruning_description(self) -> str:
        """What runs, for the log: `DOP (2,1,8) with uniform`, `fastv k=2 keep=16 (decoder-side)`, `unpruned`."""
        if self.baseline is not None:
            args = " ".join(f"{k}={v}" for k, v in self.baseline_args.items() if k != "n_visual")
            return f"{self.baseline} {args} (decoder-side)".replace("  ", " ")
        if self.policy is None and not self.op_mask:
            return "unpruned"
        args = "".join(f" {k}={v}" for k, v in self.reducer_args.items())
        how = f" with {self.reducer}{args}" if self.reducer else ""
        return f"DOP {self.policy or 'full'}{how}" + (f" + {self.op_mask}" if self.op_mask else "")

    def model_inputs(self, message, dataset=None):
        """`build_inputs` on the model's device, images in the model's dtype: what `generate` is called with."""
        return self._on_device(self.build_inputs(message, dataset))

    def _on_device(self, inputs):
        """Processor outputs (one sample or a collated batch) on the model's device, images in its dtype."""
        inputs = inputs.to(self.device)
        for key in ("pixel_values", "pixel_values_videos"):  # videos: Video-LLaVA
            if key in inputs:
                inputs[key] = inputs[key].to(self.dtype)
        return inputs

    @staticmethod
    def prompt_of(message: list[dict]) -> str:
        """The message's text items joined by newlines (as the prompts place them): the exact prompt
        text-conditioned reducers read (`vlmeval_dop.reducers.instruction.prompt_text`) instead of decoding
        it back from token ids; CDPruner reduces it to the official bare question."""
        return "\n".join(item["value"] for item in message if item["type"] == "text")

    def generate_inner(self, message, dataset=None):
        inputs = self.model_inputs(message, dataset)
        out, handle = self._generate_ids(inputs, self.prompt_of(message))
        self._record(inputs, handle)
        new = out[0, inputs["input_ids"].shape[1]:]
        return self.decode(new)

    def _generate_ids(self, inputs, prompt):
        """`model.generate` on prepared inputs under the entry's pruning; (output ids, DOP handle or None).

        `prompt`: the text-conditioned reducers' instruction (one string, or one per batch row)."""
        gen = self.generation_config()
        with torch.inference_mode(), self._pruning() as handle, prompt_text(prompt):
            # a pruner that re-ranks at every new token (FastV per_step, the official FastV evaluation) needs
            # each step to rerun the whole sequence: no KV cache
            per_step = getattr(getattr(handle, "token_pruner", None), "per_step", False)
            out = self.model.generate(**inputs, generation_config=gen, **({"use_cache": False} if per_step else {}))
        return out, handle

    def decode(self, token_ids: torch.Tensor) -> str:
        tok = getattr(self.processor, "tokenizer", self.processor)
        return tok.decode(token_ids, skip_special_tokens=True).strip()

    def _record(self, inputs, handle) -> None:
        self._record_sample(self._visual_count(inputs["input_ids"]), getattr(handle, "last_layer_tokens", None))

    def _visual_count(self, input_ids: torch.Tensor) -> int:
        """Visual placeholders in `input_ids` (every id of the family: Video-LLaVA's `<image>` and `<video>`)."""
        ids = torch.tensor(sorted(self._image_token_ids()), device=input_ids.device)
        return int(torch.isin(input_ids, ids).sum())

    def _record_sample(self, visual_tokens: int, counts) -> None:
        """Keep one sample's evidence: its visual tokens and the executor's per-layer (MHA, MLP) counts."""
        self.last_visual_tokens = visual_tokens
        self.samples += 1
        if not counts:
            self.last_layer_tokens = None
            return
        self.last_layer_tokens = [tuple(c) for c in counts]
        if self.layer_tokens_sum is None:
            self.layer_tokens_sum = [[0, 0] for _ in counts]
            logger.info(
                "[%s] %s: visual tokens in the prompt %d; tokens per layer (MHA, MLP) of the first "
                "sample: %s", self.entry, self.pruning_description(), self.last_visual_tokens,
                self.last_layer_tokens,
            )
        for acc, (a, m) in zip(self.layer_tokens_sum, counts):
            acc[0] += a
            acc[1] += m
        self.pruned_samples += 1

    # ------------------------------------------------------------------ batched generation (run.py --batch-size)
    # what the batched path stands in for: a wrapper that overrides one of these runs one sample at a time
    BATCH_REPLACES = ("generate", "generate_inner", "model_inputs", "_generate_ids", "_record")
    # processor outputs aligned with the tokens (left-padded when collating); other tensors are per image
    TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")

    def prepare_message(self, message):
        """The message as VLMEvalKit's `BaseModel.generate` hands it to `generate_inner` (same checks, same
        conversion by its own `check_content` / `preproc_content`)."""
        assert self.check_content(message) in ["str", "dict", "liststr", "listdict"], f"Invalid input type: {message}"
        message = self.preproc_content(message)
        assert message is not None and self.check_content(message) == "listdict"
        for item in message:
            assert item["type"] in self.allowed_types, f"Invalid input type: {item['type']}"
        return message

    def batch_blocker(self) -> str | None:
        """None if `generate_batch` answers exactly as `generate` does sample by sample, else the reason.

        Not batched: a wrapper overriding a method of the one-sample path (`BATCH_REPLACES`), generation that
        stops on strings (transformers marks such a row finished but the cut is not by token), a padding id
        that is an image token (padding would count as visual), and a reducer or decoder-side pruner that
        declares `batch_exact = False`.
        """
        cls = type(self)
        for name in self.BATCH_REPLACES:
            if getattr(cls, name) is not getattr(DOPWrapper, name):
                return f"{cls.__name__} overrides {name}(), which the batched path does not call"
        if getattr(self.generation_config(), "stop_strings", None):
            return "its generation config stops on strings (stop_strings)"
        if self._pad_id() in self._image_token_ids():
            return f"its padding token id {self._pad_id()} is an image token"
        with self._pruning() as handle:
            for part in (getattr(handle, "token_pruner", None), getattr(handle, "reducer", None)):
                if part is not None and not getattr(part, "batch_exact", True):
                    return f"{getattr(part, 'name', type(part).__name__)} declares batch_exact = False"
        return None

    def _pad_id(self) -> int:
        tok = getattr(self.processor, "tokenizer", self.processor)
        pad = getattr(tok, "pad_token_id", None)
        return int(pad if pad is not None else self.generation_config().pad_token_id)

    def _image_token_ids(self) -> set[int]:
        from ..executor.families import adapter_for

        return {int(i) for i in adapter_for(self.model).image_token_ids(self.model)}

    def collate_inputs(self, samples: list) -> Any:
        """One left-padded batch from per-sample `build_inputs` outputs (BatchFeatures of batch 1).

        Token-aligned tensors (`TOKEN_KEYS`, or any other (1, N, ...) tensor with N = the sample's length) are
        left-padded: `input_ids` with the padding id, the others with 0 (attention_mask 0 = padding). Every
        other tensor (pixel values, image sizes, grids) is concatenated along dim 0 in sample order,
        zero-padded in later dims where samples differ (as the processors pad LLaVA-NeXT crops and SmolVLM's
        image slots when they batch); samples without images add none.
        Inputs that cannot be batched (a non-tensor value, a token tensor of another length) raise
        `BatchingError`.
        """
        from transformers import BatchFeature

        width = max(s["input_ids"].shape[1] for s in samples)
        out = {}
        for key in dict.fromkeys(k for s in samples for k in s.keys()):
            parts = [s[key] for s in samples if key in s]
            if not all(isinstance(p, torch.Tensor) for p in parts):
                raise BatchingError(f"{type(self).__name__}.build_inputs returns {key!r} as a non-tensor")
            aligned = len(parts) == len(samples) and all(  # (1, N, ...) with N = the sample's own length
                p.dim() >= 2 and p.shape[0] == 1 and p.shape[1] == s["input_ids"].shape[1]
                for p, s in zip(parts, samples)
            )
            if key in self.TOKEN_KEYS or (aligned and key != "pixel_values"):
                if not aligned:
                    raise BatchingError(f"{type(self).__name__}.build_inputs: {key!r} is not aligned with input_ids")
                fill = self._pad_id() if key == "input_ids" else 0
                out[key] = torch.cat([_left_pad(p, width, fill) for p in parts], dim=0)
                continue
            shape = [max(p.shape[d] for p in parts) for d in range(parts[0].dim())]
            padded = []
            for p in parts:
                pad = []
                for d in range(p.dim() - 1, 0, -1):  # F.pad lists the last dim first
                    pad += [0, shape[d] - p.shape[d]]
                padded.append(torch.nn.functional.pad(p, pad) if any(pad) else p)
            out[key] = torch.cat(padded, dim=0)
        return BatchFeature(out)

    def generate_batch(self, messages: list, dataset: str | None = None, inputs: list | None = None) -> list[str]:
        """Answers to several messages in one `generate`, exactly as `generate_inner` answers each one.

        The one-sample code runs per message (`build_inputs`: prompt, image preprocessing, resolution), the
        samples are left-padded into one batch (`collate_inputs`), and generation runs once under the same
        pruning context, generation config and per-row instruction texts. Every row stops at its own stop
        token (transformers fills finished rows with the padding id until the batch ends); its answer is cut
        there, so it holds the tokens the one-sample run generates.

        Args:
            messages: VLMEvalKit messages, already through `prepare_message`.
            inputs: their `build_inputs` outputs when the caller has them (the batched loop builds them once
                to sort by length); built here otherwise.
        """
        if inputs is None:
            inputs = [self.build_inputs(m, dataset) for m in messages]
        if len(inputs) != len(messages) or not messages:
            raise ValueError(f"{len(messages)} messages and {len(inputs)} inputs")
        batch = self._on_device(self.collate_inputs(inputs))
        out, handle = self._generate_ids(batch, [self.prompt_of(m) for m in messages])
        width = batch["input_ids"].shape[1]
        stops = torch.tensor(sorted(self._stop_ids()), device=out.device)
        per_sample = getattr(handle, "last_sample_layer_tokens", None) or None
        answers = []
        for b, sample in enumerate(inputs):
            new = out[b, width:]
            hit = torch.isin(new, stops).nonzero()
            if len(hit):
                new = new[: int(hit[0, 0]) + 1]  # up to and with its own stop token, as a one-sample run ends
            answers.append(self.decode(new))
            pad = width - sample["input_ids"].shape[1]
            # the executor counts this row's padding in every layer (padding is never visual nor dropped)
            counts = [(a - pad, m - pad) for a, m in (layer[b] for layer in per_sample)] if per_sample else None
            self._record_sample(self._visual_count(sample["input_ids"]), counts)
        return answers

    def _stop_ids(self) -> set[int]:
        eos = self.generation_config().eos_token_id
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(entry={self.entry!r}, policy={self.policy}, reducer={self.reducer!r})"
