"""What vision-side reducers read from the CLIP vision tower of LLaVA-1.5 / LLaVA-NeXT.

VisPruner, VisionZip, PruMerge+ (and CDPruner's features) look at the vision tower's *feature layer*: the
layer whose output LLaVA feeds to the projector (`config.vision_feature_layer`, -2 = the penultimate
layer of CLIP ViT-L/14). The official implementations run the whole tower with `output_attentions=True`,
which forces eager attention on every layer. We instead record two tensors of that one layer with
forward hooks and recompute what is needed from them:

- the layer's attention input (after `layer_norm1`), from which the [CLS] query row and all keys are
  recomputed with the layer's own `q_proj` / `k_proj` (exactly the eager attention of that layer, see
  `tests/test_reducer_vision.py`);
- the layer's output (the pre-projector features, [CLS] first).

The hooks run during the model's own forward when the executor is asked to (`needs_vision_capture` on
a reducer), so the tower is not run twice; `vision_capture(ctx)` falls back to running the model's own
`get_image_features` under the hooks when nothing was recorded (e.g. a reducer called outside the
executor, or policy search replaying the decoder from cached inputs) and caches the result in
`ctx.cache` for every later call on the same sample.

Crops are in the order the model feeds them to the tower: LLaVA-1.5 one crop per image, LLaVA-NeXT the
base (resized) image first and then the grid crops row-major, `crops_per_image[i]` of them for image i.

Video-LLaVA has two CLIP towers, `image_tower` for images and `video_tower` for the frames of videos (each frame
on its own): the executor records both (`VISION_CAPTURE_KEY` / `VIDEO_CAPTURE_KEY`); a video's "crops" are its
frames, in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import ReducerError, ReductionContext

VISION_CAPTURE_KEY = "vision_capture"
VIDEO_CAPTURE_KEY = "video_capture"  # Video-LLaVA's video tower (frames)
CLIP_FAMILIES = ("llava", "llava_next")
# family -> (cache key, tower attribute of model.model) of every CLIP tower the executor records
RECORDED_TOWERS: dict[str, tuple[tuple[str, str], ...]] = {
    "llava": ((VISION_CAPTURE_KEY, "vision_tower"),),
    "llava_next": ((VISION_CAPTURE_KEY, "vision_tower"),),
    "video_llava": ((VISION_CAPTURE_KEY, "image_tower"), (VIDEO_CAPTURE_KEY, "video_tower")),
}


@dataclass
class VisionCapture:
    """The feature layer of the vision tower for every crop of one forward.

    Attributes:
        features: (C, 1+P, D) output of the feature layer, [CLS] first (pre-projector features).
        cls_attention: (C, P) float32 attention of the [CLS] query to the P patch tokens, mean over
            heads (softmax over all 1+P keys, as in the eager layer).
        keys: (C, 1+P, heads, head_dim) the layer's keys ([CLS] first).
        crops_per_image: crops of each image in order (sums to C).
        attn_input: (C, 1+P, D) the layer's attention input (after `layer_norm1`), for reducers that
            recompute the attention as their official code's eager layer did (VisPruner).
        tower: the tower's attribute name (`vision_tower`; Video-LLaVA `image_tower` or `video_tower`).
    """

    features: torch.Tensor
    cls_attention: torch.Tensor
    keys: torch.Tensor
    crops_per_image: list[int]
    attn_input: torch.Tensor | None = None
    tower: str = "vision_tower"  # the tower it was recorded from (Video-LLaVA: image_tower / video_tower)

    def image_crops(self, image: int) -> slice:
        """Rows of `features` / `cls_attention` / `keys` that belong to image number `image`."""
        start = sum(self.crops_per_image[:image])
        return slice(start, start + self.crops_per_image[image])


def vision_tower(model: nn.Module, name: str = "vision_tower") -> nn.Module:
    """The CLIP vision tower of a LLaVA-1.5 / LLaVA-NeXT model (`model.model.vision_tower`); `name`: another
    tower (Video-LLaVA's `image_tower` / `video_tower`)."""
    tower = getattr(getattr(model, "model", model), name, None)
    if tower is None or not hasattr(getattr(tower, "vision_model", tower), "encoder"):
        raise ReducerError(
            f"{type(model).__name__} has no CLIP vision tower; vision-attention reducers support the "
            f"families {', '.join(CLIP_FAMILIES)}"
        )
    return tower


def encoder_layers(model: nn.Module, name: str = "vision_tower") -> nn.ModuleList:
    """The CLIP encoder layers of the vision tower (older transformers nest them under `vision_model`)."""
    tower = vision_tower(model, name)
    return getattr(tower, "vision_model", tower).encoder.layers


def feature_layer_index(model: nn.Module, name: str = "vision_tower") -> int:
    """0-based index of the encoder layer whose output is LLaVA's image feature.

    `hidden_states[h]` of the tower is the output of layer `h - 1` (`hidden_states[0]` = embeddings),
    so `vision_feature_layer = -2` on a 24-layer tower is layer 22, the attention VisPruner reads as
    `attentions[-2]`.
    """
    h = model.config.vision_feature_layer
    if not isinstance(h, int):
        raise ReducerError(f"vision_feature_layer={h!r}: vision-attention reducers need a single feature layer")
    n = len(encoder_layers(model, name))
    idx = n + h if h < 0 else h - 1
    if not 0 <= idx < n:
        raise ReducerError(f"vision_feature_layer={h} does not name an encoder layer of the {n}-layer tower")
    return idx


def crops_per_image(model: nn.Module, model_inputs: dict[str, Any], num_crops: int, video: bool = False) -> list[int]:
    """How many tower crops each image has (LLaVA-NeXT: from `image_sizes`, as the model computes it); with
    `video`, how many frames each video has (`pixel_values_videos` (videos, frames, 3, H, W))."""
    if video:
        pv = model_inputs.get("pixel_values_videos")
        counts = [int(pv.shape[1])] * int(pv.shape[0]) if pv is not None else []
    elif "image_sizes" in model_inputs and model_inputs["image_sizes"] is not None and hasattr(model.config, "image_grid_pinpoints"):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        counts = [
            int(image_size_to_num_patches(
                image_size=size, grid_pinpoints=model.config.image_grid_pinpoints,
                patch_size=model.config.vision_config.image_size,
            ))
            for size in model_inputs["image_sizes"]
        ]
    else:
        counts = [1] * num_crops
    if sum(counts) != num_crops:
        raise ReducerError(f"vision tower saw {num_crops} crops but the inputs describe {sum(counts)}")
    return counts


class VisionRecorder:
    """Forward hooks on the feature layer that record its attention input and output.

    Use `attach(model)` / `detach()` (or as a context manager); `take(model, model_inputs)` turns what was
    recorded into a `VisionCapture` and clears the recording.
    """

    def __init__(self, tower: str = "vision_tower") -> None:
        self.tower = tower
        self._attn_in: list[torch.Tensor] = []
        self._out: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def attach(self, model: nn.Module) -> "VisionRecorder":
        layer = encoder_layers(model, self.tower)[feature_layer_index(model, self.tower)]
        self._layer = layer

        def grab_attn_in(module, args, kwargs):
            self._attn_in.append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach())

        def grab_out(module, args, output):
            self._out.append((output[0] if isinstance(output, tuple) else output).detach())

        self._handles = [
            layer.self_attn.register_forward_pre_hook(grab_attn_in, with_kwargs=True),
            layer.register_forward_hook(grab_out),
        ]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def clear(self) -> None:
        self._attn_in, self._out = [], []

    @property
    def recorded(self) -> bool:
        return bool(self._out)

    def take(self, model: nn.Module, model_inputs: dict[str, Any]) -> VisionCapture:
        """The recorded forward as a `VisionCapture` (and clear the recording)."""
        if not self._out:
            raise ReducerError("no vision-tower forward was recorded")
        normed, out = torch.cat(self._attn_in), torch.cat(self._out)
        self.clear()
        cls_attn, keys = cls_attention_and_keys(self._layer.self_attn, normed)
        crops = crops_per_image(model, model_inputs, out.shape[0], video=self.tower == "video_tower")
        return VisionCapture(out, cls_attn, keys, crops, normed, tower=self.tower)

    def __enter__(self) -> "VisionRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


@torch.no_grad()
def cls_attention_and_keys(attn: nn.Module, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS]->patch attention (mean over heads, float32) and the keys of one CLIP attention layer.

    `normed` is the layer's attention input (C, 1+P, D). Only the [CLS] query row is computed:
    O(P * D) per crop instead of the O(P^2 * D) of the full attention map. Mirrors the eager path:
    scores in the input dtype, softmax in float32.
    """
    C, T, _ = normed.shape
    heads, hd = attn.num_heads, attn.head_dim
    q = attn.q_proj(normed[:, :1]).view(C, 1, heads, hd).transpose(1, 2)  # (C, h, 1, hd)
    k = attn.k_proj(normed).view(C, T, heads, hd)
    scores = torch.matmul(q, k.transpose(1, 2).transpose(2, 3)) * attn.scale  # (C, h, 1, T)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    return probs[:, :, 0, 1:].mean(dim=1), k


def vision_capture(ctx: ReductionContext, video: bool = False) -> VisionCapture:
    """The feature layer of this forward's images (`video`: Video-LLaVA's videos, frames as crops): recorded by
    the executor, cached, or computed now.

    Computing runs the model's own `get_image_features` on `ctx.model_inputs` (pixel_values, image_sizes;
    `get_video_features` on pixel_values_videos) under a `VisionRecorder`; the result is kept in `ctx.cache`
    (shared by all `n_v` points of a sample during policy search).
    """
    if ctx.family not in RECORDED_TOWERS:
        raise ReducerError(f"vision-attention reducers support {', '.join(RECORDED_TOWERS)}, not {ctx.family!r}")
    key, tower = RECORDED_TOWERS[ctx.family][1 if video else 0]
    cached = ctx.cache.get(key)
    if cached is not None:
        return cached
    name = "pixel_values_videos" if video else "pixel_values"
    pixel_values = ctx.model_inputs.get(name)
    if pixel_values is None:
        raise ReducerError(f"this reducer needs the {'video' if video else 'image'} ({name}) but the forward had none")
    mm = ctx.model.model
    kwargs: dict[str, Any] = {}
    if ctx.family == "llava_next":
        kwargs["image_sizes"] = ctx.model_inputs["image_sizes"]
    with VisionRecorder(tower).attach(ctx.model) as rec, torch.no_grad():
        if video:
            mm.get_video_features(pixel_values_videos=pixel_values)
        else:
            mm.get_image_features(pixel_values=pixel_values, **kwargs)
        capture = rec.take(ctx.model, ctx.model_inputs)
    ctx.cache[key] = capture
    return capture
