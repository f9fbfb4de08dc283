"""Decoding and validating encoded input images (PNG, JPEG, WebP) of a request field.

Shared by the pipelines that take images (Qwen-Image-Edit; Wan I2V), with the two steps of diffusers'
``VaeImageProcessor`` that their VAE encoders share (``resize_for_vae``, ``vae_pixels``). Every failure is
a ``RequestError`` naming the field, so a bad image fails its own request only:

* the size is read from the header (``Image.open`` is lazy) and checked against ``max_pixels``
  before any pixel is decoded, so a small file that declares a huge image (a decompression bomb)
  costs no memory. PIL's own bomb check (``Image.MAX_IMAGE_PIXELS``, far above our limits) is
  mapped to the same error;
* the whole image is then decoded, so a truncated or corrupt file is refused here and not in a
  later stage;
* the EXIF orientation is applied and the image is converted to RGB, as ``diffusers.utils.load_image``
  does; alpha is dropped. Of an animated image only the first frame is used. 16- and 32-bit grayscale
  images are refused: that conversion clips them (nearly white) instead of scaling them.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from PIL import Image, ImageOps, UnidentifiedImageError

from ditserve.stage import RequestError

FORMATS = ("PNG", "JPEG", "WEBP")


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 32 * 1024 * 1024
    # 16.8 MP: a 4096x4096 image, 50 MB decoded as RGB.
    max_pixels: int = 4096 * 4096
    # Each side at least this many pixels (the pipelines resize anyway; 1-pixel sides make degenerate shapes).
    min_side: int = 8

    def __post_init__(self):
        if self.max_bytes < 1 or self.max_pixels < 1 or self.min_side < 1:
            raise ValueError(f"image limits must be positive: {self}")


@dataclasses.dataclass(frozen=True)
class ImageInputOptions:
    """The image limits of a request stage that takes images, as model parameters."""

    max_image_bytes: int = ImageLimits.max_bytes
    max_image_pixels: int = ImageLimits.max_pixels

    def __post_init__(self):
        if self.max_image_bytes < 1 or self.max_image_pixels < 1:
            raise ValueError("parameters max_image_bytes and max_image_pixels must be positive")
        if self.max_image_pixels > Image.MAX_IMAGE_PIXELS:
            # Pillow refuses larger images itself (its decompression-bomb check), whatever ours allows.
            raise ValueError(f"parameter max_image_pixels must be at most {Image.MAX_IMAGE_PIXELS} (Pillow's "
                             f"decompression-bomb limit), got {self.max_image_pixels}")

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)


def resize_for_vae(image: Image.Image, width: int, height: int) -> Image.Image:
    """``VaeImageProcessor.resize`` with its default resample (Lanczos) and resize mode (no crop)."""
    return image.resize((width, height), Image.Resampling.LANCZOS)


def vae_pixels(pixels):
    """(B, H, W, 3) uint8 torch tensor -> (B, 3, H, W) fp32 in [-1, 1]: ``VaeImageProcessor.preprocess``'s
    arithmetic (uint8 / 255 in fp32, then 2x - 1)."""
    return 2.0 * (pixels.permute(0, 3, 1, 2).float() / 255.0) - 1.0


def decode_image(data: bytes, field: str, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Encoded bytes -> a fully decoded RGB image, or a ``RequestError`` naming ``field``."""
    if not data:
        raise RequestError(field, "is empty; expected PNG, JPEG or WebP bytes")
    if len(data) > limits.max_bytes:
        raise RequestError(field, f"must be at most {limits.max_bytes} bytes, got {len(data)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(field, f"declares more than {limits.max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise RequestError(field, "is not a readable PNG, JPEG or WebP image") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise RequestError(field, f"must have at most {limits.max_pixels} pixels, got {width}x{height}")
    if min(width, height) < limits.min_side:
        raise RequestError(field, f"sides must be at least {limits.min_side} pixels, got {width}x{height}")
    if image.mode.startswith(("I", "F")):
        # 16- and 32-bit grayscale (a 16-bit grayscale PNG opens as I;16): convert("RGB") clips each value to
        # 255 instead of scaling it, so the image would arrive nearly white (diffusers' load_image does the same).
        raise RequestError(field, f"is a {image.mode} (16- or 32-bit grayscale) image, which would lose its content "
                                  "when converted to RGB; send an 8-bit grayscale or RGB image")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise RequestError(field, f"is a truncated or corrupt {image.format} image") from None


def images_field(row: Mapping[str, Any], name: str, *, max_images: int, limits: ImageLimits = ImageLimits()) -> list[Image.Image]:
    """A TYPE_STRING input of dims [-1]: 1 to ``max_images`` encoded images, each decoded and checked."""
    if name not in row:
        raise RequestError(name, "is required")
    values = np.asarray(row[name], dtype=object).reshape(-1)
    if not 1 <= values.size <= max_images:
        expected = "1 image" if max_images == 1 else f"1 to {max_images} images"
        raise RequestError(name, f"expected {expected}, got {values.size}")
    return [decode_image(bytes(value), name, limits) for value in values]
