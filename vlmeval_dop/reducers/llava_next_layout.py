"""Where each placeholder of a llava-hf LLaVA-NeXT image span comes from (crop, patch, or row newline).

llava-hf packs one image as (`LlavaNextModel.pack_image_features`):

1. the base (resized 336x336) crop: side*side patch tokens (576), no newline;
2. the grid crops (e.g. 2x2 for 672x672) stitched into one (rows*side, cols*side) map, *unpadded* to the
   image's aspect ratio (`unpad_image`: rows/columns of padding removed), then a learned `image_newline`
   token appended to every row of that map, flattened row-major.

A 672x672 image thus has 576 + 48 * (48 + 1) = 2928 placeholders: 2880 vision-tower tokens (the paper's
count: 5 crops x 576) plus 48 newline tokens. Reducers that work per crop use `llava_next_layout` to map
every placeholder back to its crop and patch; newline tokens map to -1. (The official VisPruner / CDPruner
code does not pack as llava-hf does: no unpadding, no newlines; see `llava_next_packing`, which uses this
map to report which placeholder, if any, each of its rows stands for.)

We compute the map by running the model's own packing steps on a tensor of token codes instead of
features, so it follows transformers' layout (including `unpad_image`'s rounding) by construction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import ReducerError


@dataclass
class CropLayout:
    """Origin of every placeholder of one LLaVA-NeXT image span.

    Attributes:
        crop: (N,) long, the crop of each placeholder (0 = base image, 1.. = grid crops row-major), -1 for
            a row-newline token.
        patch: (N,) long, the patch index inside that crop (row-major over side x side), -1 for newlines.
        num_crops: crops of the image (base included).
        side: patches per crop side (24 for CLIP ViT-L/14 at 336 px).
    """

    crop: torch.Tensor
    patch: torch.Tensor
    num_crops: int
    side: int

    @property
    def newline(self) -> torch.Tensor:
        """(N,) bool, the row-newline placeholders (not vision-tower tokens)."""
        return self.crop < 0

    def crop_positions(self, crop: int) -> torch.Tensor:
        """Span-local indices of the placeholders of `crop` (surviving patches after unpadding), in order."""
        return torch.nonzero(self.crop == crop, as_tuple=False).flatten()


def llava_next_layout(model: nn.Module, image_size, num_tokens: int | None = None) -> CropLayout:
    """The crop/patch origin of each placeholder of an image of `image_size` = (height, width) on `model`.

    Args:
        model: a LlavaNextForConditionalGeneration (its config gives grid pinpoints and crop size).
        image_size: the image's (height, width) as in the processor's `image_sizes`.
        num_tokens: the image span length, checked against the layout when given.

    Raises:
        ReducerError: the layout does not have `num_tokens` placeholders (e.g. a different packing).
    """
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    P = side * side
    size = [int(v) for v in (image_size.tolist() if isinstance(image_size, torch.Tensor) else image_size)]
    rows, cols = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    n_grid = rows * cols
    base_code = torch.arange(P)  # crop 0
    if n_grid == 0:  # base crop only: pack_image_features appends one newline
        codes = torch.cat([base_code, torch.tensor([-1])])
    else:
        # code = crop * P + patch, laid out exactly as pack_image_features lays out features
        grid = (torch.arange(1, n_grid + 1)[:, None] * P + torch.arange(P)[None]).view(rows, cols, side, side)
        grid = grid.permute(0, 2, 1, 3).reshape(1, rows * side, cols * side)
        grid = unpad_image(grid, size)
        newline = torch.full((1, grid.shape[1], 1), -1, dtype=grid.dtype)
        codes = torch.cat([base_code, torch.cat([grid, newline], dim=-1).flatten()])
    if num_tokens is not None and codes.numel() != num_tokens:
        raise ReducerError(
            f"LLaVA-NeXT layout of a {size[0]}x{size[1]} image has {codes.numel()} placeholders, but the image "
            f"span has {num_tokens}; the reducer cannot map tokens to crops"
        )
    is_newline = codes < 0
    crop = torch.where(is_newline, -1, codes // P)
    patch = torch.where(is_newline, -1, codes % P)
    return CropLayout(crop=crop, patch=patch, num_crops=n_grid + 1, side=side)
