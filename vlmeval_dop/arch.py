"""What the FLOPs model and the executor need to know about an MLLM decoder, derived from its HF config.

Supported classes (stock transformers, no vendored code):

=====================================  =============  ==========================================
class                                  family         visual tokens at the paper's resolution
=====================================  =============  ==========================================
LlavaForConditionalGeneration          ``llava``      (336/14)^2 = 576
LlavaNextForConditionalGeneration      ``llava_next`` 672x672: base + 4 crops = 5 x 576 = 2880 *
Qwen2_5_VLForConditionalGeneration     ``qwen2_5_vl`` 1008x1008: (1008/28)^2 = 1296
InternVLForConditionalGeneration       ``internvl``   896x896: 4 tiles + thumbnail = 5 x 256 = 1280
Qwen2VLForConditionalGeneration        ``qwen2_vl``   1008x1008: (1008/28)^2 = 1296
LlavaOnevisionForConditionalGeneration ``llava_onevision``  768x768: base + 2x2 crops = 5 x 729 = 3645 *
Idefics3ForConditionalGeneration       ``smolvlm``    square image: 4x4 tiles + global = 17 x 64 = 1088 **
SmolVLMForConditionalGeneration        ``smolvlm``    (SmolVLM2 checkpoints; same layout)
Qwen3VLForConditionalGeneration        ``qwen3_vl``   1024x1024: (1024/32)^2 = 1024 (16 px patches, 2x2 merge)
Gemma3ForConditionalGeneration         ``gemma3``     any image: 896x896, (896/14)^2 patches pooled 4x4 = 256 ***
VideoLlavaForConditionalGeneration     ``video_llava`` a video of 8 frames x (224/14)^2 = 2048 ****
=====================================  =============  ==========================================

InternVL3.5 (`-HF` checkpoints) is ``InternVLForConditionalGeneration`` with a Qwen3 decoder: family
``internvl``, same visual token count; its per-head q/k RMSNorm adds no matmul FLOPs.

* llava-hf additionally inserts one ``image_newline`` placeholder per row of the unpadded crop grid
  (48 at 672x672: 2928 placeholders). The paper's 2880 counts crops x 576 only. We follow the paper in
  FLOPs budgets (`visual_tokens`) and report the newline count separately (`visual_extra_tokens`);
  the executor treats newline placeholders as visual tokens (they carry no information without the image).
  LLaVA-OneVision does the same (54 newlines for the 2x2 grid of a 768x768 image: 3699 placeholders); its
  `anyres_max_9` grids go up to 6x6 crops (features then downsampled to at most 9 x 729), so the count
  depends on the image; 768x768 plays the role LLaVA-NeXT's 672x672 plays in the paper.
** SmolVLM (HuggingFaceTB/SmolVLM-256M/500M-Instruct are ``idefics3`` checkpoints) resizes every image to a
  longest edge of 4 tiles and splits it into tiles plus a global view, (tile/patch)^2 / scale_factor^2 tokens
  each (64 for 512 px / 16 / 4; 81 for SmolVLM-Instruct's 384 / 14 / 3), with text markers between the tiles.
*** Gemma 3 resizes every image to 896x896 (pan-and-scan off, VLMEvalKit's and the processor's default) and
  average-pools SigLIP's 64x64 patches to `mm_tokens_per_image` = 256 tokens: the count never depends on the image.
**** Video-LLaVA (LanguageBind/Video-LLaVA-7B-hf) takes images (`<image>`, 256 placeholders: [CLS] dropped,
  `vision_feature_select_strategy="default"`) and videos (`<video>`, 8 frames through the video tower). For
  videos HF keeps every frame's [CLS] feature (`get_video_features` applies no select strategy, as the original
  Video-LLaVA's video tower returns all 257 tokens): 8 x 257 = 2056 placeholders. The paper (App. E.7,
  following VisPruner) counts 2048 = 8 x 256 patches; the 8 [CLS] rows are `visual_extra_tokens`, as
  LLaVA-NeXT's newlines. Both ids are visual tokens for the executor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_CLASSES: dict[str, str] = {
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava_next",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "InternVLForConditionalGeneration": "internvl",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "LlavaOnevisionForConditionalGeneration": "llava_onevision",
    "Idefics3ForConditionalGeneration": "smolvlm",
    "SmolVLMForConditionalGeneration": "smolvlm",
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
    "VideoLlavaForConditionalGeneration": "video_llava",
    "Gemma3ForConditionalGeneration": "gemma3",
}
# model_type in the saved config.json -> the class above (lets us work from a config alone)
_MODEL_TYPES: dict[str, str] = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "video_llava": "VideoLlavaForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
}


# frames per video of Video-LLaVA's processor (LanguageBind's `num_frames`, VLMEvalKit's `nframe`)
VIDEO_LLAVA_FRAMES = 8


class UnsupportedModelError(ValueError):
    """The model class is not one of the supported MLLM families."""


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"unsupported model {what!r}; vlmeval_dop supports: {', '.join(sorted(SUPPORTED_CLASSES))}"
    )


@dataclass(frozen=True)
class ArchSpec:
    """Decoder shape facts used by FLOPs accounting and the executor.

    Attributes:
        family: one of ``llava``, ``llava_next``, ``qwen2_5_vl``, ``internvl``, ``qwen2_vl``,
            ``llava_onevision``, ``smolvlm``, ``qwen3_vl``, ``gemma3``, ``video_llava``.
        num_layers: decoder layers L.
        hidden_size: h.
        num_heads / num_kv_heads / head_dim: attention shape; ``kv_dim = num_kv_heads * head_dim``.
        intermediate_size: MLP width m (gated MLP: 3 matrices).
        visual_tokens: visual tokens at the paper's input resolution (N_v of the paper).
        visual_extra_tokens: placeholders the HF processor adds beyond N_v (LLaVA-NeXT row newlines).
        image_token_ids: token ids that mark visual positions in ``input_ids``.
        gqa: the LLM uses grouped-query attention (Qwen2-style); selects the GQA FLOPs formula.
    """

    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    visual_tokens: int
    visual_extra_tokens: int = 0
    image_token_ids: tuple[int, ...] = field(default_factory=tuple)
    gqa: bool = False

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @classmethod
    def from_config(cls, config: Any, visual_tokens: int | None = None) -> "ArchSpec":
        """Derive the spec from a HF config of a supported MLLM (object with ``model_type``)."""
        model_type = getattr(config, "model_type", None)
        if model_type not in _MODEL_TYPES:
            raise _unsupported(model_type)
        family = SUPPORTED_CLASSES[_MODEL_TYPES[model_type]]
        text = config.text_config
        num_heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
        vision = config.vision_config
        extra = 0
        if family in ("llava", "llava_next"):
            img = vision.image_size
            per_tile = (img // vision.patch_size) ** 2
            if getattr(config, "vision_feature_select_strategy", "default") == "full":
                per_tile += 1  # CLS token kept
            default_n = per_tile if family == "llava" else 5 * per_tile  # 672x672 -> base + 2x2 crops
            if family == "llava_next":
                extra = 2 * (img // vision.patch_size)  # one newline per row of the 2x2-crop grid
            token_ids = (config.image_token_id,)
        elif family == "video_llava":
            per_frame = (vision.image_size // vision.patch_size) ** 2
            default_n = VIDEO_LLAVA_FRAMES * per_frame  # the paper's 2048 for a video of 8 frames at 224 px
            extra = VIDEO_LLAVA_FRAMES  # one [CLS] row per frame in HF's video span
            token_ids = (config.image_token_id, config.video_token_id)
        elif family == "llava_onevision":
            per_tile = (vision.image_size // vision.patch_size) ** 2  # SigLIP: no CLS token
            default_n = 5 * per_tile  # 2x2 tiles of 768x768 -> base + 4 crops
            extra = 2 * (vision.image_size // vision.patch_size)  # one newline per row of the 2x2-crop grid
            token_ids = (config.image_token_id,)
        elif family == "smolvlm":
            per_tile = int((vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2)
            default_n = 17 * per_tile  # a square image: 4x4 tiles + the global view
            token_ids = (config.image_token_id,)
        elif family == "qwen3_vl":
            merge = vision.spatial_merge_size * vision.patch_size  # 32 px per LLM token
            default_n = (1024 // merge) ** 2
            token_ids = (config.image_token_id,)
        elif family == "gemma3":
            default_n = int(config.mm_tokens_per_image)  # fixed: every image is resized to vision_config.image_size
            token_ids = (config.image_token_id,)
        elif family in ("qwen2_5_vl", "qwen2_vl"):
            merge = vision.spatial_merge_size * vision.patch_size  # 28 px per LLM token
            default_n = (1008 // merge) ** 2
            token_ids = (config.image_token_id,)
        else:  # internvl
            size = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
            patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
            per_tile = int((size // patch) ** 2 * config.downsample_ratio**2)
            default_n = 5 * per_tile  # 896x896 -> 4 tiles + thumbnail
            token_ids = (config.image_token_id,)
        return cls(
            family=family,
            num_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            num_heads=num_heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            intermediate_size=text.intermediate_size,
            visual_tokens=default_n if visual_tokens is None else visual_tokens,
            visual_extra_tokens=extra,
            image_token_ids=tuple(int(t) for t in token_ids),
            gqa=family in ("qwen2_5_vl", "internvl", "qwen2_vl", "llava_onevision", "qwen3_vl")
            or (family in ("smolvlm", "gemma3") and (getattr(text, "num_key_value_heads", None) or num_heads) < num_heads),
        )

    @classmethod
    def from_model(cls, model: Any, visual_tokens: int | None = None) -> "ArchSpec":
        """Derive the spec from a loaded model; the class must be one of SUPPORTED_CLASSES."""
        name = type(model).__name__
        if name not in SUPPORTED_CLASSES:
            raise _unsupported(name)
        return cls.from_config(model.config, visual_tokens=visual_tokens)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ArchSpec":
        """Build from plain data (eval_configs/models.yaml ``arch`` block)."""
        data = dict(data)
        data["image_token_ids"] = tuple(data.get("image_token_ids", ()))
        return cls(**data)


def family_of(model: Any) -> str:
    """The family key of a loaded model, or UnsupportedModelError listing the supported classes."""
    name = type(model).__name__
    if name not in SUPPORTED_CLASSES:
        raise _unsupported(name)
    return SUPPORTED_CLASSES[name]
