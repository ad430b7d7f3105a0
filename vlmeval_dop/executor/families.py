"""Per-family facts the executor needs: where the decoder lives, how positions work, where images sit.

All supported families have LLaMA-style pre-norm decoder layers (`input_layernorm`, `self_attn`,
`post_attention_layernorm`, `mlp`), in transformers' layout `model.model.language_model.layers[i]` (SmolVLM:
`model.model.text_model`). Adding a family is one `FamilyAdapter` entry in `FAMILIES` (plus
`arch.SUPPORTED_CLASSES`); override the methods below where its layout differs (docs/adding_a_model.md).
"""
from __future__ import annotations

from dataclasses import dataclass

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
}


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter of a loaded model (UnsupportedModelError lists the supported classes)."""
    return FAMILIES[family_of(model)]
