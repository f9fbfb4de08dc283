"""qwen_image_request: validate a request and fill in QwenImagePipeline's defaults.

The fields, limits and error messages are flux_request's (``GenerationParams.parse``); only the
defaults differ: 50 steps and ``true_cfg_scale`` 4.0 as ``QwenImagePipeline.__call__`` (true CFG
still needs a negative prompt), 1024x1024 (128 latents x the VAE factor), and the size multiple
comes from the Qwen-Image VAE (``2 ** len(temperal_downsample)``, times 2 for the 2x2 packing).
With Qwen-Image's scheduler (``shift_terminal``) at least 2 steps: one step is a NaN image in
QwenImagePipeline too.
"""

from __future__ import annotations

import dataclasses
import json

from ditserve.flux.limits import MAX_STEPS
from ditserve.flux.request import FluxRequestCheck, GenerationParams
from ditserve.loading import Checkpoint
from ditserve.stage import RequestError, Row

DEFAULT_STEPS = 50
DEFAULT_TRUE_CFG = 4.0


def _config(checkpoint: Checkpoint, component: str, file: str) -> dict:
    # Plain JSON, not the component class's load_config: this stage then never imports diffusers
    # (about 5 s of CPU per model load, paid by every server start).
    with open(checkpoint.path / component / file) as f:
        return json.load(f)


def latent_geometry(checkpoint: Checkpoint) -> tuple[int, int]:
    """(size multiple, default size) of a Qwen-Image checkpoint, from its VAE config alone."""
    vae_scale_factor = 2 ** len(_config(checkpoint, "vae", "config.json")["temperal_downsample"])
    return vae_scale_factor * 2, 128 * vae_scale_factor  # QwenImagePipeline.default_sample_size = 128


def min_steps(checkpoint: Checkpoint) -> int:
    """2 with Qwen-Image's ``shift_terminal``: FlowMatchEulerDiscreteScheduler stretches the sigmas
    by 1 / (1 - last sigma), which is 1 / 0 for one step, so QwenImagePipeline makes a NaN image."""
    return 2 if _config(checkpoint, "scheduler", "scheduler_config.json").get("shift_terminal") else 1


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
