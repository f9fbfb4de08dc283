"""Post-processing shared by the image pipelines: uint8 pixels and PNG bytes."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ditserve.stage import Outputs, RequestError, Row, Stage, check_parameter, tensor_field


@dataclasses.dataclass(frozen=True)
class PostprocessOptions:
    # zlib level for PNG: PIL's default 6. Lower is faster and larger; pixels are the same.
    png_compress_level: int = 6

    def __post_init__(self):
        check_parameter("png_compress_level", self.png_compress_level, 0, 9)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8, rounding as diffusers' numpy_to_pil."""
    return (pixels.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def encode_png(image: np.ndarray, compress_level: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


class Postprocess(Stage):
    """PIXELS (N, 3, H, W) in [0, 1] -> IMAGE (N, H, W, 3) uint8 and PNG (N,) bytes."""

    Options = PostprocessOptions
    inputs = ("PIXELS",)
    outputs = ("IMAGE", "PNG")

    def execute(self, rows: Sequence[Row]) -> list[Outputs | RequestError]:
        results: list[Outputs | RequestError] = []
        for row in rows:
            try:
                pixels = tensor_field(row, "PIXELS", 4, row["PIXELS"].device, torch.float32)
            except RequestError as error:
                results.append(error)
                continue
            if pixels.shape[1] != 3:
                results.append(RequestError("PIXELS", f"expected 3 channels, got shape {tuple(pixels.shape)}"))
                continue
            # Quantise where the pixels are (GPU or CPU); only uint8 crosses to the host.
            images = to_uint8(pixels).cpu().numpy()
            png = np.array([encode_png(image, self.options.png_compress_level) for image in images], dtype=object)
            results.append({"IMAGE": images, "PNG": png})
        return results
