"""Shared by the FLUX tests: request rows as the Triton adapter builds them, and the
diffusers reference image for the same inputs."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline

from ditserve.checkpoints import resolve_model_path

CPU_FP32 = dict(device=torch.device("cpu"), dtype=torch.float32)


def make_row(prompt, negative=None, **scalars) -> dict:
    """A request row as the Triton adapter builds it (batch dimension removed)."""
    types = {"SEED": torch.int64, "GUIDANCE_SCALE": torch.float32, "TRUE_CFG_SCALE": torch.float32}
    row = {"PROMPT": np.array([prompt.encode()], dtype=object)}
    if negative is not None:
        row["NEGATIVE_PROMPT"] = np.array([negative.encode()], dtype=object)
    for name, value in scalars.items():
        row[name] = torch.tensor([value], dtype=types.get(name, torch.int32))
    return row


def reference_uint8(pipe: FluxPipeline, prompt, negative=None, **kw) -> np.ndarray:
    images = pipe(
        prompt=prompt,
        negative_prompt=negative,
        true_cfg_scale=kw.get("TRUE_CFG_SCALE", 1.0),
        height=kw["HEIGHT"],
        width=kw["WIDTH"],
        num_inference_steps=kw["NUM_INFERENCE_STEPS"],
        guidance_scale=kw.get("GUIDANCE_SCALE", 3.5),
        num_images_per_prompt=kw.get("NUM_IMAGES", 1),
        generator=torch.Generator("cpu").manual_seed(kw["SEED"]),
        output_type="np",
    ).images
    return (images * 255).round().astype(np.uint8)  # as diffusers' numpy_to_pil


def reference_pipeline(model_path: str) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(resolve_model_path(model_path), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe
