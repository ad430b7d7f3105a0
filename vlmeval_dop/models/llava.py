"""LLaVA-1.5 and LLaVA-NeXT (llava-hf checkpoints) as VLMEvalKit models.

Prompts follow VLMEvalKit's LLaVA wrappers (`vlmeval.vlm.llava.llava.LLaVA` / `LLaVA_Next`, whose
`use_custom_prompt`/`build_prompt` are reused as they are): multiple-choice datasets get the options as
"A. ..." lines and "Answer with the option's letter from the given choices directly."; other datasets
keep the dataset's prompt (VQA datasets append "Answer the question using a single word or phrase.", the
LLaVA short-answer prompt). The conversation is LLaVA's vicuna_v1 template, which the official LLaVA
evaluation (used for the paper's LLaVA numbers through VisPruner/CDPruner) and VLMEvalKit's vicuna
LLaVA-NeXT template both use: `<system> USER: <image>\\n<prompt> ASSISTANT:`. Decoding is greedy.

Resolution:
- LLaVA-1.5: the image is padded to a square with the mean colour before resizing to 336x336
  (LLaVA's `image_aspect_ratio="pad"`, as the official evaluation and VLMEvalKit's LLaVA wrapper do).
- LLaVA-NeXT: the anyres grid is fixed to a single 2x2 canvas of twice the tile size (672x672 for the
  336-pixel CLIP tower), as CDPruner and the paper do, on the processor *and* the model config so both
  agree on the crop layout: a square image gives 5 x 576 = 2880 features (+ 48 row newlines, see
  vlmeval_dop/arch.py); other aspect ratios are padded into the canvas and unpadded by the model, as in
  LLaVA's anyres, and give fewer.

Precision: the paper's LLaVA numbers come from VisPruner's / CDPruner's official code, i.e. LLaVA's
`load_pretrained_model`, which loads the language model in float16 but the CLIP tower with
`CLIPVisionModel.from_pretrained(..., device_map="auto")` and, because `device_map == "auto"`, never casts it:
the tower runs in float32 on float16-rounded pixels, and its features are cast back to float16 before the
projector (`CLIPVisionTower.forward`: `.to(images.dtype)`). The wrappers do the same by default
(`vision_dtype="float32"`); `vision_dtype="model"` runs the tower in the model's dtype, as VLMEvalKit's own
LLaVA wrapper does (it loads with `device_map="cpu"`, which takes LLaVA's float16 cast). The scores of the
vision-side reducers (VisPruner's and VisionZip's [CLS] attention, PruMerge+'s keys) come from the tower, so this
choice reaches their kept sets. On CPU (float32 everywhere) both settings are the same. One difference is left:
llava-hf checkpoints store the tower in float16, so its float32 weights are the float16-rounded values of the
openai CLIP weights the official loader reads.
"""
from __future__ import annotations

import torch
from PIL import Image
from vlmeval.vlm.llava.llava import LLaVA_Next

from .base import DOPWrapper

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


VISION_DTYPES = ("float32", "model")


def _cast_to_projector(module: torch.nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of the projector: features of a float32 tower enter it in its own dtype (LLaVA's
    `.to(images.dtype)` after the tower)."""
    dtype = next(module.parameters()).dtype
    return (args[0].to(dtype), *args[1:])


class _LLaVABase(DOPWrapper):
    """Common part of the LLaVA wrappers.

    Args:
        vision_dtype: `float32` (default): the CLIP tower runs in float32 when the model is loaded in a lower
            precision, as the official LLaVA loader behind the paper's LLaVA numbers does (see the module
            docstring); `model`: the tower runs in the model's dtype (VLMEvalKit's LLaVA wrapper). Not measured
            on real checkpoints here (needs a GPU); on CPU runs, which are float32, the two are identical.
    """

    CUDA_DTYPE = DOPWrapper.CUDA_DTYPE  # float16, as VLMEvalKit's LLaVA wrappers
    DEFAULT_MAX_NEW_TOKENS = 2048

    def __init__(self, *args, vision_dtype: str = "float32", **kwargs):
        if vision_dtype not in VISION_DTYPES:
            raise ValueError(f"vision_dtype {vision_dtype!r} unknown; valid: {', '.join(VISION_DTYPES)}")
        super().__init__(*args, **kwargs)
        self.vision_dtype = vision_dtype

    def _configure(self, model, processor) -> None:
        if self.vision_dtype == "float32" and self.dtype != torch.float32:
            model.model.vision_tower.to(torch.float32)
            # instance-level, lives as long as this loaded model (LLaVA's own tower -> projector cast)
            model.model.multi_modal_projector.register_forward_pre_hook(_cast_to_projector)

    # VLMEvalKit's LLaVA prompt logic, reused (LLaVA and LLaVA_Next define it identically)
    use_custom_prompt = LLaVA_Next.use_custom_prompt
    build_prompt = LLaVA_Next.build_prompt

    def prepare_image(self, image: Image.Image) -> Image.Image:
        return image

    def build_inputs(self, message, dataset=None):
        parts = self.split_message(message)
        images = [self.prepare_image(v) for t, v in parts if t == "image"]
        token = self.processor.image_token
        content = "\n".join(token if t == "image" else v for t, v in parts)
        prompt = f"{VICUNA_SYSTEM} USER: {content} ASSISTANT:"
        return self.processor(images=images or None, text=prompt, return_tensors="pt")


class LLaVA15DOP(_LLaVABase):
    """LLaVA-1.5 (`LlavaForConditionalGeneration`), 336x336 with square padding: 576 visual tokens."""

    FAMILY = "llava"
    MODEL_CLASS = "LlavaForConditionalGeneration"

    def __init__(self, *args, **kwargs):
        if kwargs.get("reducer") == "resize":
            raise ValueError("the resize reduction (DOP_R) is implemented for qwen2_5_vl and internvl only")
        super().__init__(*args, **kwargs)

    def prepare_image(self, image: Image.Image) -> Image.Image:
        """LLaVA's `expand2square`: pad to a square with the processor's mean colour, image centred.

        Done here because llava-hf's checkpoints ship a CLIPImageProcessor, which has no padding option
        and would centre-crop instead.
        """
        w, h = image.size
        if w == h:
            return image
        mean = tuple(int(255 * x) for x in self.processor.image_processor.image_mean)  # as LLaVA
        side = max(w, h)
        canvas = Image.new(image.mode, (side, side), mean)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        return canvas


class LLaVANextDOP(_LLaVABase):
    """LLaVA-NeXT (`LlavaNextForConditionalGeneration`) on a fixed 2x2 anyres canvas (672x672).

    Args:
        image_size: canvas side in pixels; default twice the vision tile (672 for the paper's models).
    """

    FAMILY = "llava_next"
    MODEL_CLASS = "LlavaNextForConditionalGeneration"

    def __init__(self, *args, image_size: int | None = None, **kwargs):
        if kwargs.get("reducer") == "resize":
            raise ValueError("the resize reduction (DOP_R) is implemented for qwen2_5_vl and internvl only")
        super().__init__(*args, **kwargs)
        self.image_size = image_size

    def _configure(self, model, processor) -> None:
        super()._configure(model, processor)
        tile = int(model.config.vision_config.image_size)
        side = int(self.image_size or 2 * tile)
        if side % tile:
            raise ValueError(f"image_size={side} must be a multiple of the vision tile ({tile} px)")
        grid = [[side, side]]
        # the processor lays out crops and placeholders, the model unpads features: both must use one grid
        processor.image_processor.image_grid_pinpoints = grid
        model.config.image_grid_pinpoints = grid
        self.image_size = side
