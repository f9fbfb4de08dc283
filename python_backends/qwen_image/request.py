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
from collections.abc import Sequence

import numpy as np

from ditserve.flux.limits import MAX_PROMPT_CHARS, MAX_STEPS
from ditserve.flux.request import GenerationParams
from ditserve.loading import Checkpoint
from ditserve.stage import Outputs, RequestError, Row, Runtime, Stage, text_field

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


class QwenImageRequestCheck(Stage):
    inputs = ("PROMPT", "NEGATIVE_PROMPT", "HEIGHT", "WIDTH", "NUM_INFERENCE_STEPS", "GUIDANCE_SCALE",
              "TRUE_CFG_SCALE", "SEED", "NUM_IMAGES")
    outputs = ("PROMPT", "HEIGHT", "WIDTH", "NUM_INFERENCE_STEPS", "GUIDANCE_SCALE", "TRUE_CFG_SCALE", "SEED",
               "NUM_IMAGES")

    def __init__(self, runtime: Runtime, options=None):
        super().__init__(runtime, options)
        checkpoint = Checkpoint(runtime.model_path)
        self.size_multiple, self.default_size = latent_geometry(checkpoint)
        self.min_steps = min_steps(checkpoint)

    def execute(self, rows: Sequence[Row]) -> list[Outputs | RequestError]:
        results: list[Outputs | RequestError] = []
        for row in rows:
            try:
                prompt = text_field(row, "PROMPT", required=True, max_chars=MAX_PROMPT_CHARS)
                text_field(row, "NEGATIVE_PROMPT", required=False, max_chars=MAX_PROMPT_CHARS)
                params = parse_params(row, self.size_multiple, self.default_size, self.min_steps)
            except RequestError as error:
                results.append(error)
                continue
            results.append({"PROMPT": np.array([prompt.encode()], dtype=object), **params.as_row()})
        return results
