"""Per-family facts the executor needs: where the decoder lives, how positions work, where images sit.

All supported families have decoder layers with `input_layernorm`, `self_attn`, `post_attention_layernorm` and
`mlp`, in transformers' layout `model.model.language_model.layers[i]` (SmolVLM: `model.model.text_model`). Adding a
family is one `FamilyAdapter` entry in `FAMILIES` (plus `arch.SUPPORTED_CLASSES`); override the methods below where
its layout differs (docs/adding_a_model.md). The generic hooks, each with the LLaMA pre-norm default:

- `attention_branch` / `mlp_branch` / `mlp_input_norm`: what a layer adds to the residual stream (Gemma 3 normalises
  the attention and MLP outputs too);
- `rotary_tables`: RoPE cos/sin per layer for positions the executor renumbers (Gemma 3: a base per layer type);
- `sliding_window`: a layer's attention window (Gemma 3's local layers), applied in the executor's explicit masks;
- `attention_groups`: tokens that attend to each other in both directions within a group (Gemma 3's images).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..arch import family_of
from ..reducers.base import ImageSpan

_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


@dataclass(frozen=True)
class FamilyAdapter:
    """How to run DOP on one model family.

    Attributes:
        family: family key (vlmeval_dop.arch).
        contiguous_positions: after token reduction, renumber 1D RoPE positions as if the sequence had
            been rebuilt with only the kept tokens (official LLaVA reducer behaviour). False for M-RoPE
            (Qwen2.5-VL), where kept tokens keep their (t, h, w) positions.
    """

    family: str
    contiguous_positions: bool = True
    # the family has sliding-window layers / image blocks attending bidirectionally (Gemma 3): declared here so
    # that methods can be refused by family before a model is loaded (`renumbering_families`, `causal_families`)
    sliding_windows: bool = False
    bidirectional_images: bool = False

    def multimodal_model(self, model: nn.Module) -> nn.Module:
        """The module whose forward sees `input_ids` and `pixel_values` (e.g. LlavaModel)."""
        return model.model

    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (e.g. LlamaModel / Qwen2Model / Qwen2_5_VLTextModel)."""
        return model.model.language_model

    def lm_head(self, model: nn.Module) -> nn.Module:
        """Final projection to the vocabulary (applied after the decoder stack's norm)."""
        return model.lm_head

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        layers = self.language_model(model).layers
        for i, layer in enumerate(layers):
            missing = [p for p in _LAYER_PARTS if not hasattr(layer, p)]
            if missing:
                raise TypeError(
                    f"decoder layer {i} ({type(layer).__name__}) lacks {missing}; the DOP executor needs "
                    f"pre-norm layers with {_LAYER_PARTS}"
                )
        return layers

    def image_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.image_token_id),)

    # --- layer computation: what a decoder layer adds to the residual stream (pre-norm LLaMA layout)
    def attention_branch(self, layer: nn.Module, x: torch.Tensor, **attn_kwargs: Any) -> torch.Tensor:
        """The attention's residual update of tokens `x` (B, K, H): `x + attention_branch(...)` is the stock
        layer's post-attention residual. `attn_kwargs` go to `layer.self_attn` (mask, cache, position tables)."""
        return layer.self_attn(hidden_states=layer.input_layernorm(x), **attn_kwargs)[0]

    def mlp_branch(self, layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """The MLP's residual update of post-attention residuals `y`."""
        return layer.mlp(layer.post_attention_layernorm(y))

    def mlp_input_norm(self, layer: nn.Module) -> nn.Module:
        """The module whose input is the layer's post-attention residual (hooked by the search's profiling)."""
        return layer.post_attention_layernorm

    # --- positions and masks
    def rotary_tables(self, language_model: nn.Module, x: torch.Tensor, positions: torch.Tensor) -> list:
        """Per decoder layer, the RoPE `(cos, sin)` of 1D `positions` (B, N): layers of one kind share one table."""
        table = language_model.rotary_emb(x, positions)
        return [table] * len(language_model.layers)

    def sliding_window(self, model: nn.Module, layer_idx: int) -> int | None:
        """Attention window of layer `layer_idx` (a key is visible if its position > the query's - window), or
        None for global attention."""
        return None

    def attention_groups(self, model: nn.Module, model_inputs: dict[str, Any], shape: tuple[int, int]):
        """(B, N) long group ids of this call's tokens (-1: none), or None: tokens of one group attend to each
        other in both directions on top of causal attention. `model_inputs` are the multimodal model's
        keyword inputs of this forward."""
        return None

    def image_spans(self, visual: torch.Tensor, input_ids: torch.Tensor | None = None) -> list[ImageSpan]:
        """One span per maximal run of consecutive visual placeholders, per sample.

        The paper's families write one image as one contiguous run (LLaVA-NeXT's newline placeholders and
        InternVL's tiles included) and separate images by text/marker tokens. `input_ids` (B, N) are for
        families whose image spans several runs (SmolVLM).
        """
        spans: list[ImageSpan] = []
        for b in range(visual.shape[0]):
            pos = torch.nonzero(visual[b], as_tuple=False).flatten()
            if pos.numel() == 0:
                continue
            breaks = torch.nonzero(pos[1:] != pos[:-1] + 1, as_tuple=False).flatten() + 1
            for i, run in enumerate(torch.tensor_split(pos, breaks.tolist())):
                spans.append(ImageSpan(batch_index=b, image_index=i, positions=run))
        return spans


@dataclass(frozen=True)
class SmolVLMAdapter(FamilyAdapter):
    """SmolVLM / Idefics3: the decoder is `model.model.text_model`, and one image is several runs of `<image>`
    placeholders, one per tile and one for the global view, separated by `<fake_token_around_image>`,
    `<row_i_col_j>`, newline and `<global-img>` text markers. The markers are text tokens (they take part in
    every layer); the image's span is all its runs together, so `n_v` counts per image as for every family."""

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.text_model

    def image_spans(self, visual: torch.Tensor, input_ids: torch.Tensor | None = None) -> list[ImageSpan]:
        """Runs grouped per image: an image ends with its global view, the run right after `<global-img>`.

        That token's id is read from the sequence itself (no tokenizer here): every image ends with its global
        view, so the token before a sample's last run is `<global-img>`; tile runs follow `<row_i_col_j>` tokens.
        """
        runs = super().image_spans(visual)
        if input_ids is None:
            raise ValueError("SmolVLM image spans need input_ids (runs of one image are grouped by their markers)")
        spans: list[ImageSpan] = []
        for b in range(visual.shape[0]):
            mine = [r for r in runs if r.batch_index == b]
            if not mine:
                continue
            before = [int(input_ids[b, r.positions[0] - 1]) if r.positions[0] > 0 else -1 for r in mine]
            global_tag, group = before[-1], []
            for run, tag in zip(mine, before):
                group.append(run.positions)
                if tag == global_tag:
                    spans.append(ImageSpan(batch_index=b, image_index=len([s for s in spans if s.batch_index == b]),
                                           positions=torch.cat(group)))  # fmt: skip
                    group = []
        return spans


@dataclass(frozen=True)
class VideoLlavaAdapter(FamilyAdapter):
    """Video-LLaVA: images (`<image>`) and videos (`<video>`, all frames of one video in one run) are both visual
    placeholders; one image or one video is one span (`n_v` counts per image / per video)."""

    def image_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        return (int(model.config.image_token_id), int(model.config.video_token_id))
class Gemma3Adapter(FamilyAdapter):
    """Gemma 3 (`Gemma3ForConditionalGeneration`), its decoder layer as transformers 5.24 computes it:

    - `post_attention_layernorm` normalises the attention *output* before the residual add, and the MLP runs as
      `post_feedforward_layernorm(mlp(pre_feedforward_layernorm(y)))` (RMSNorms with (1 + w) scaling);
      embeddings are scaled by sqrt(hidden) in the embedding module (before the executor sees them); attention
      scales scores by `query_pre_attn_scalar ** -0.5` inside `self_attn` (the executor calls the module) and
      applies no logit soft-capping in 5.24 (`attn_logit_softcapping` is not read by `Gemma3Attention`);
    - `sliding_attention` layers see keys whose position is > the query's - `sliding_window` (local RoPE base),
      `full_attention` layers see everything (global base, linear scaling on the 4B+): per-layer-type tables;
    - image tokens attend to each other in both directions within one image (a run of `token_type_ids == 1`,
      stock `get_block_sequence_ids_for_mask`), combined as the stock masks do: global layers
      `causal OR same image`, local layers `(causal OR same image) AND window`. Stock applies it only when
      `token_type_ids` is given (prefill; generate drops it when decoding, the new tokens being text).
    """

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        layers = super().decoder_layers(model)
        for i, layer in enumerate(layers):
            if not (hasattr(layer, "pre_feedforward_layernorm") and hasattr(layer, "post_feedforward_layernorm")):
                raise TypeError(f"decoder layer {i} ({type(layer).__name__}) is not a Gemma 3 layer")
        return layers

    def attention_branch(self, layer: nn.Module, x: torch.Tensor, **attn_kwargs: Any) -> torch.Tensor:
        return layer.post_attention_layernorm(super().attention_branch(layer, x, **attn_kwargs))

    def mlp_branch(self, layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
        return layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(y)))

    def mlp_input_norm(self, layer: nn.Module) -> nn.Module:
        return layer.pre_feedforward_layernorm

    def rotary_tables(self, language_model: nn.Module, x: torch.Tensor, positions: torch.Tensor) -> list:
        types = language_model.config.layer_types
        tables = {t: language_model.rotary_emb(x, positions, t) for t in sorted(set(types))}
        return [tables[t] for t in types[: len(language_model.layers)]]

    def sliding_window(self, model: nn.Module, layer_idx: int) -> int | None:
        text = model.config.get_text_config(decoder=True)
        return int(text.sliding_window) if text.layer_types[layer_idx] == "sliding_attention" else None

    def attention_groups(self, model: nn.Module, model_inputs: dict[str, Any], shape: tuple[int, int]):
        token_type_ids = model_inputs.get("token_type_ids")
        if token_type_ids is None or tuple(token_type_ids.shape) != tuple(shape):
            return None  # stock: no image blocks without token_type_ids (decoding steps)
        stock = sys.modules[type(model.model).__module__].get_block_sequence_ids_for_mask
        return stock(token_type_ids, device=token_type_ids.device)


FAMILIES: dict[str, FamilyAdapter] = {
    "llava": FamilyAdapter("llava"),
    "llava_next": FamilyAdapter("llava_next"),
    "qwen2_5_vl": FamilyAdapter("qwen2_5_vl", contiguous_positions=False),
    "internvl": FamilyAdapter("internvl"),  # InternVL3 (Qwen2.5 decoder) and InternVL3.5 (Qwen3: q/k norm)
    "qwen2_vl": FamilyAdapter("qwen2_vl", contiguous_positions=False),
    "llava_onevision": FamilyAdapter("llava_onevision"),
    "smolvlm": SmolVLMAdapter("smolvlm"),
    # Qwen3-VL: the decoder stack itself adds DeepStack features to the visual tokens' hidden states after its
    # first layers (full-length states, between layer calls): tokens a policy keeps get exactly the stock
    # additions, tokens it has left (or a reducer dropped) get them too but are never read again
    "qwen3_vl": FamilyAdapter("qwen3_vl", contiguous_positions=False),
    "video_llava": VideoLlavaAdapter("video_llava"),
    "gemma3": Gemma3Adapter("gemma3", sliding_windows=True, bidirectional_images=True),
}


def renumbering_families() -> tuple[str, ...]:
    """Families where a decoder-side pruner may renumber positions (`PruneDecision.renumber`): 1D RoPE and no
    sliding windows (windows are measured in one position numbering per call)."""
    return tuple(f for f, a in FAMILIES.items() if a.contiguous_positions and not a.sliding_windows)


def causal_families() -> tuple[str, ...]:
    """Families whose decoder attention is plain causal (no windows, no bidirectional image blocks)."""
    return tuple(f for f, a in FAMILIES.items() if not (a.sliding_windows or a.bidirectional_images))


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter of a loaded model (UnsupportedModelError lists the supported classes)."""
    return FAMILIES[family_of(model)]
