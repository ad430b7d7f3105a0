"""Opening input images with a size rule, so that no image can exhaust memory before the model sees it.

The rule (applied by every wrapper, `DOPWrapper.split_message`, and by the search's input checks):

- An image whose longer side exceeds `MAX_SIDE` (8192 px) is downscaled, aspect ratio kept (bicubic),
  so that its longer side is `MAX_SIDE` (the shorter side at least 1 px), BEFORE any padding or
  processing. LLaVA-1.5 pads an image to a square canvas of its longer side: a 100000x100 image (what
  VLMEvalKit's encoder makes of a 10000x10 one, it enlarges the short side to 100 px) would need a
  10^10-pixel canvas (30 GB); after the rule the canvas is at most 8192x8192 (200 MB). 8192 px is far
  above the input resolution of every supported model (336/672 px LLaVA, 448 px InternVL tiles,
  Qwen2.5-VL's default `max_pixels` = 3584x3584 for square images), so ordinary images are untouched and
  results on them do not change.
- An image that Pillow refuses as a decompression bomb (over 2x `Image.MAX_IMAGE_PIXELS`, ~179 MP) or
  cannot decode is refused with an error naming the file.
"""
from __future__ import annotations

from PIL import Image

MAX_SIDE = 8192


class ImageError(ValueError):
    """An input image that cannot be used; the message names the file."""


def limit_size(image: Image.Image, max_side: int = MAX_SIDE) -> Image.Image:
    """`image` downscaled so that its longer side is at most `max_side` (aspect kept); unchanged if smaller."""
    w, h = image.size
    side = max(w, h)
    if side <= max_side:
        return image
    scale = max_side / side
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def open_image(path: str, max_side: int = MAX_SIDE) -> Image.Image:
    """The image file at `path` as RGB, with the size rule of this module applied."""
    try:
        with Image.open(path) as im:
            if max(im.size) > max_side:
                im.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale already
            image = im.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image {path} is too large to decode safely ({exc}); downscale it first") from None
    except (OSError, SyntaxError, ValueError) as exc:  # PIL raises these for unreadable/corrupt images
        raise ImageError(f"image {path} cannot be decoded ({exc})") from None
    return limit_size(image, max_side)
