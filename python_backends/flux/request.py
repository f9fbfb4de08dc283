"""The first step of flux_t2i: validate a request and fill in FluxPipeline's defaults.

Checking every field before any model runs means a bad request is answered in
milliseconds instead of after text encoding and a wait in the denoiser's queue (seconds
to minutes on a busy GPU). Every input is optional here so that even a request missing
PROMPT reaches this stage and gets "PROMPT: is required": Triton's ensemble scheduler does
not check required inputs itself, and a step that never gets an input ends the request with
"unexpected deadlock". The denoiser parses its copies with the same ``GenerationParams``.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from ditserve.flux.limits import MAX_GUIDANCE, MAX_IMAGES, MAX_PROMPT_CHARS, MAX_SEED, MAX_SIZE, MAX_STEPS, MIN_SIZE
from ditserve.loading import Checkpoint
from ditserve.stage import (
    Outputs,
    RequestError,
    Row,
    Runtime,
    Stage,
    float_field,
    int_field,
    prompt_fields,
    scalar_outputs,
)


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    height: int
    width: int
    steps: int
    guidance: float
    true_cfg: float
    seed: int
    num_images: int
    # The row fields that parse reads and as_row writes: every stage that passes them on lists them so.
    fields: ClassVar[tuple[str, ...]] = ("HEIGHT", "WIDTH", "NUM_INFERENCE_STEPS", "GUIDANCE_SCALE", "TRUE_CFG_SCALE",
                                         "SEED", "NUM_IMAGES")
    # Those that set the shape of a request's outputs: the stages that read them declare them uniform_fields.
    shape_fields: ClassVar[tuple[str, ...]] = ("HEIGHT", "WIDTH", "NUM_IMAGES")

    @classmethod
    def parse(cls, row: Row, size_multiple: int, default_size: int) -> GenerationParams:
        sizes = {}
        for name in ("HEIGHT", "WIDTH"):
            value = int_field(row, name, default_size, MIN_SIZE, MAX_SIZE)
            if value % size_multiple:
                raise RequestError(name, f"must be a multiple of {size_multiple} in [{MIN_SIZE}, {MAX_SIZE}], got {value}")
            sizes[name] = value
        seed = int_field(row, "SEED", None, 0, MAX_SEED)
        return cls(
            height=sizes["HEIGHT"],
            width=sizes["WIDTH"],
            steps=int_field(row, "NUM_INFERENCE_STEPS", 28, 1, MAX_STEPS),
            guidance=float_field(row, "GUIDANCE_SCALE", 3.5, 0.0, MAX_GUIDANCE),
            true_cfg=float_field(row, "TRUE_CFG_SCALE", 1.0, 0.0, MAX_GUIDANCE),
            seed=secrets.randbelow(MAX_SEED) if seed is None else seed,
            num_images=int_field(row, "NUM_IMAGES", 1, 1, MAX_IMAGES),
        )

    def as_row(self) -> Outputs:
        return scalar_outputs(HEIGHT=self.height, WIDTH=self.width, NUM_INFERENCE_STEPS=self.steps,
                              GUIDANCE_SCALE=self.guidance, TRUE_CFG_SCALE=self.true_cfg, SEED=self.seed,
                              NUM_IMAGES=self.num_images)


def latent_geometry(checkpoint: Checkpoint) -> tuple[int, int]:
    """(size multiple, default size) of a FLUX checkpoint, from its VAE config alone."""
    vae_config = checkpoint.config("vae")
    vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    # Latents are packed in 2x2 patches; FluxPipeline's default is 128 latents per side.
    return vae_scale_factor * 2, 128 * vae_scale_factor


class FluxRequestCheck(Stage):
    inputs = ("PROMPT", "NEGATIVE_PROMPT", *GenerationParams.fields)
    outputs = ("PROMPT", *GenerationParams.fields)
    # Refused here, before any model runs, when the rows of one request differ in them.
    uniform_fields = GenerationParams.shape_fields

    def __init__(self, runtime: Runtime, options=None):
        super().__init__(runtime, options)
        self.configure(Checkpoint(runtime.model_path))

    def configure(self, checkpoint: Checkpoint) -> None:
        """Read what the limits depend on from the checkpoint's configs (no weights)."""
        self.size_multiple, self.default_size = latent_geometry(checkpoint)

    def parse_params(self, row: Row) -> GenerationParams:
        """The pipeline's generation parameters; other pipelines change limits and defaults here."""
        return GenerationParams.parse(row, self.size_multiple, self.default_size)

    def execute(self, rows: Sequence[Row]) -> list[Outputs | RequestError]:
        results: list[Outputs | RequestError] = []
        for row in rows:
            try:
                prompt, _ = prompt_fields(row, MAX_PROMPT_CHARS)
                params = self.parse_params(row)
            except RequestError as error:
                results.append(error)
                continue
            results.append({"PROMPT": np.array([prompt.encode()], dtype=object), **params.as_row()})
        return results
