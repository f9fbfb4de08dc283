"""qwen_image_request: validate a request and fill in QwenImagePipeline's defaults.

The fields, limits and error messages are flux_request's (``GenerationParams.parse``); only the
defaults differ: 50 steps and ``true_cfg_scale`` 4.0 as ``QwenImagePipeline.__call__`` (true CFG
still needs a negative prompt), 1024x1024 (128 latents x the VAE factor), and the size multiple
comes from the Qwen-Image VAE (``2 ** len(temperal_downsample)``, times 2 for the 2x2 packing).
With Qwen-Image's scheduler (``shift_terminal``) at least 2 steps: one step is a NaN image in
QwenImagePipeline too.

``QwenImageEditRequestCheck`` adds INPUT_IMAGE (not IMAGE: an ensemble's tensors share one
namespace, and IMAGE is the output) (``ditserve.images``): decoded and validated once, resized
to the condition size, and passed on as pixels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ditserve.flux.limits import MAX_PROMPT_CHARS, MAX_SIZE, MAX_STEPS, MIN_SIZE
from ditserve.flux.request import FluxRequestCheck, GenerationParams
from ditserve.images import ImageInputOptions, images_field, resize_for_vae
from ditserve.loading import Checkpoint
from ditserve.qwen_image.checkpoint import IMAGE_PAD
from ditserve.stage import Outputs, RequestError, Row, scalar_outputs, text_field

DEFAULT_STEPS = 50
DEFAULT_TRUE_CFG = 4.0


def latent_geometry(checkpoint: Checkpoint) -> tuple[int, int]:
    """(size multiple, default size) of a Qwen-Image checkpoint, from its VAE config alone."""
    vae_scale_factor = 2 ** len(checkpoint.config("vae")["temperal_downsample"])
    return vae_scale_factor * 2, 128 * vae_scale_factor  # QwenImagePipeline.default_sample_size = 128


def min_steps(checkpoint: Checkpoint) -> int:
    """2 with Qwen-Image's ``shift_terminal``: FlowMatchEulerDiscreteScheduler stretches the sigmas
    by 1 / (1 - last sigma), which is 1 / 0 for one step, so QwenImagePipeline makes a NaN image."""
    return 2 if checkpoint.config("scheduler", "scheduler_config.json").get("shift_terminal") else 1


def parse_params(row: Row, size_multiple: int, default_size: int, least_steps: int = 1) -> GenerationParams:
    params = GenerationParams.parse(row, size_multiple, default_size)
    if params.steps < least_steps:
        raise RequestError("NUM_INFERENCE_STEPS", f"must be an integer in [{least_steps}, {MAX_STEPS}], got {params.steps}")
    defaults = {}
    if "NUM_INFERENCE_STEPS" not in row:
        defaults["steps"] = DEFAULT_STEPS
    if "TRUE_CFG_SCALE" not in row:
        defaults["true_cfg"] = DEFAULT_TRUE_CFG
    return dataclasses.replace(params, **defaults)


class QwenImageRequestCheck(FluxRequestCheck):
    """FLUX's request check with Qwen-Image's geometry, defaults and least step count."""

    def configure(self, checkpoint: Checkpoint) -> None:
        self.size_multiple, self.default_size = latent_geometry(checkpoint)
        self.min_steps = min_steps(checkpoint)

    def parse_params(self, row: Row) -> GenerationParams:
        return parse_params(row, self.size_multiple, self.default_size, self.min_steps)


# --- Qwen-Image-Edit -----------------------------------------------------------------------------

#: QwenImageEditPipeline conditions on one image (a list there is a batch of edits, one per prompt).
MAX_INPUT_IMAGES = 1
VISION_PLACEHOLDERS = (IMAGE_PAD, "<|video_pad|>")


@dataclasses.dataclass(frozen=True)
class EditRequestOptions(ImageInputOptions):
    # QwenImageEditPipeline resizes the input image to about this many pixels, keeping its aspect
    # ratio (fixed 1024 * 1024 there): the VAE and Qwen2.5-VL see it at that size, and it is the
    # default output size. Smaller is faster and departs from the reference pipeline.
    condition_area: int = 1024 * 1024

    def __post_init__(self):
        super().__post_init__()
        if not MIN_SIZE**2 <= self.condition_area <= MAX_SIZE**2:
            raise ValueError(f"parameter condition_area: must be in [{MIN_SIZE**2}, {MAX_SIZE**2}], got {self.condition_area}")


def condition_size(area: int, width: int, height: int) -> tuple[int, int]:
    """(width, height) of about ``area`` pixels with the image's aspect ratio, each a multiple of 32:
    QwenImageEditPipeline's ``calculate_dimensions``."""
    ratio = width / height
    target_width = math.sqrt(area * ratio)
    return round(target_width / 32) * 32, round(target_width / ratio / 32) * 32


class QwenImageEditRequestCheck(QwenImageRequestCheck):
    """Qwen-Image's request check plus INPUT_IMAGE: decoded, validated and resized once, here, to the
    condition size; CONDITION_IMAGE (H, W, 3) uint8 goes to the text encoder and the VAE encoder.
    HEIGHT and WIDTH default to the condition size (floored to the size multiple), as in the pipeline."""

    Options = EditRequestOptions
    inputs = (*QwenImageRequestCheck.inputs, "INPUT_IMAGE")
    outputs = (*QwenImageRequestCheck.outputs, "CONDITION_IMAGE")
    sources = {"CONDITION_IMAGE": "INPUT_IMAGE"}  # its size follows the image's aspect ratio

    def condition_image(self, row: Row) -> Image.Image:
        (image,) = images_field(row, "INPUT_IMAGE", max_images=MAX_INPUT_IMAGES, limits=self.options.limits)
        width, height = condition_size(self.options.condition_area, *image.size)
        if not (MIN_SIZE <= width <= MAX_SIZE and MIN_SIZE <= height <= MAX_SIZE):
            raise RequestError(
                "INPUT_IMAGE",
                f"aspect ratio of {image.width}x{image.height} is too extreme: resized to about "
                f"{self.options.condition_area} pixels it would be {width}x{height}, outside [{MIN_SIZE}, {MAX_SIZE}]",
            )
        return resize_for_vae(image, width, height)

    def execute(self, rows: Sequence[Row]) -> list[Outputs | RequestError]:
        results: list[Outputs | RequestError] = []
        for row in rows:
            try:
                for name in ("PROMPT", "NEGATIVE_PROMPT"):
                    # The processor expands these placeholders into the image's tokens: one in a
                    # prompt would make Qwen2.5-VL fail the whole batch (token and feature counts differ).
                    text = text_field(row, name, required=False, max_chars=MAX_PROMPT_CHARS) or ""
                    if any(token in text for token in VISION_PLACEHOLDERS):
                        raise RequestError(name, f"must not contain {' or '.join(VISION_PLACEHOLDERS)}")
                image = self.condition_image(row)
            except RequestError as error:
                results.append(error)
                continue
            multiple = self.size_multiple
            defaults = scalar_outputs(HEIGHT=image.height // multiple * multiple, WIDTH=image.width // multiple * multiple)
            (checked,) = super().execute([{**defaults, **row}])
            if not isinstance(checked, RequestError):
                checked["CONDITION_IMAGE"] = torch.from_numpy(np.asarray(image).copy())
            results.append(checked)
        return results
