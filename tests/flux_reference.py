"""Shared by the pipeline tests: request rows as the Triton adapter builds them, the diffusers
reference pipelines, their image for the same inputs, and the pixel comparisons (parity is within 1/255)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline

from ditserve.checkpoints import resolve_model_path

CPU_FP32 = dict(device=torch.device("cpu"), dtype=torch.float32)


def make_row(prompt, negative=None, **scalars) -> dict:
    """A request row as the Triton adapter builds it (batch dimension removed)."""
    types = {"SEED": torch.int64, "GUIDANCE_SCALE": torch.float32, "GUIDANCE_SCALE_2": torch.float32, "TRUE_CFG_SCALE": torch.float32}
    row = {"PROMPT": np.array([prompt.encode()], dtype=object)}
    if negative is not None:
        row["NEGATIVE_PROMPT"] = np.array([negative.encode()], dtype=object)
    for name, value in scalars.items():
        row[name] = torch.tensor([value], dtype=types.get(name, torch.int32))
    return row


# Request field -> reference pipeline argument, passed only when the request sets it, so that
# each diffusers pipeline (FluxPipeline, QwenImagePipeline) applies its own defaults.
# HEIGHT and WIDTH too: QwenImageEditPipeline's defaults come from the input image.
_OPTIONAL_ARGS = {
    "TRUE_CFG_SCALE": "true_cfg_scale",
    "GUIDANCE_SCALE": "guidance_scale",
    "NUM_IMAGES": "num_images_per_prompt",
    "HEIGHT": "height",
    "WIDTH": "width",
}


def reference_uint8(pipe, prompt, negative=None, *, image=None, **kw) -> np.ndarray:
    """The diffusers pipeline's image for the same request fields, as uint8 (N, H, W, 3);
    ``image`` (a PIL image) goes to the Edit pipelines."""
    images = pipe(
        prompt=prompt,
        negative_prompt=negative,
        **({} if image is None else {"image": image}),
        num_inference_steps=kw["NUM_INFERENCE_STEPS"],
        generator=torch.Generator("cpu").manual_seed(kw["SEED"]),
        output_type="np",
        **{arg: kw[field] for field, arg in _OPTIONAL_ARGS.items() if field in kw},
    ).images
    return (images * 255).round().astype(np.uint8)  # as diffusers' numpy_to_pil


def reference_pipeline(model_path, pipeline_class=FluxPipeline, **components):
    """diffusers' ``pipeline_class`` on a model-path spec in fp32, without progress bars;
    ``components`` replace those it would load."""
    pipe = pipeline_class.from_pretrained(resolve_model_path(model_path), dtype=torch.float32, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixel_diff(a: np.ndarray, b: np.ndarray) -> int:
    """The largest difference between two uint8 images or videos, in 1/255 steps."""
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def assert_pixels_match(ours: np.ndarray, expected: np.ndarray, shape: tuple | None = None) -> None:
    """Parity: our pixels have the reference's shape (and `shape`, where given), are not flat, and are within 1/255
    of the reference's."""
    assert ours.shape == expected.shape, (ours.shape, expected.shape)
    assert shape is None or ours.shape == shape, (ours.shape, shape)
    assert ours.std() > 5, "flat output: the test could not tell pipelines apart"
    diff = pixel_diff(ours, expected)
    assert diff <= 1, f"max pixel difference {diff}/255"


def assert_batched_equal_alone(pipeline, rows: list[dict], batched: list, output: str = "IMAGE") -> None:
    """Each row's result from one call with all `rows` (`batched`) is within 1/255 of that row run alone."""
    for row, together in zip(rows, batched):
        (alone,) = pipeline([row])
        diff = pixel_diff(alone[output], together[output])
        assert diff <= 1, f"batched differs from unbatched by {diff}/255"
