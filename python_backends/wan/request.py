"""wan_request: validate a text-to-video request and fill in WanPipeline's defaults; wan_i2v_request:
the same plus the input image of image-to-video.

FLUX's request check (``FluxRequestCheck``) with the video parameters: its checks and messages for
the fields the pipelines share (sizes, steps, guidance, seed, prompts), plus NUM_FRAMES, which must
be ``k * t + 1`` for the VAE's temporal factor t (4: the first frame, then t frames per latent frame),
and FPS for the MP4. The size multiple is the VAE's spatial factor times the transformer's patch
(8 x 2 = 16), as WanPipeline checks. GUIDANCE_SCALE is WanPipeline's classifier-free guidance scale
(on above 1, with NEGATIVE_PROMPT or the empty prompt as the negative); GUIDANCE_SCALE_2 is Wan 2.2's
scale for the low-noise expert (default: GUIDANCE_SCALE; refused for one-expert checkpoints, as
WanPipeline refuses it). Guidance is on for the whole request when GUIDANCE_SCALE > 1, as in WanPipeline.

``WanImageRequestCheck`` (WanImageToVideoPipeline: the same fields and defaults) adds IMAGE, decoded and
validated once here (``ditserve.images``) and passed on as pixels: resized to HEIGHT x WIDTH as
``video_processor.preprocess`` resizes it (Lanczos, aspect ratio not kept), for the VAE; and as sent,
for CLIP's own image processor, where the checkpoint conditions on a CLIP embedding (Wan 2.1 I2V).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from ditserve.flux.request import FluxRequestCheck, GenerationParams
from ditserve.images import ImageInputOptions, images_field, resize_for_vae
from ditserve.loading import Checkpoint
from ditserve.flux.limits import MAX_GUIDANCE
from ditserve.stage import Outputs, RequestError, Row, float_field, int_field, scalar_outputs
from ditserve.wan.limits import (
    DEFAULT_FPS,
    DEFAULT_FRAMES,
    DEFAULT_GUIDANCE,
    DEFAULT_HEIGHT,
    DEFAULT_STEPS,
    DEFAULT_WIDTH,
    MAX_FPS,
    MAX_FRAMES,
)


@dataclasses.dataclass(frozen=True)
class VideoGeometry:
    size_multiple: int  # pixels: VAE spatial factor x transformer patch
    spatial_factor: int  # pixels per latent
    temporal_factor: int  # frames per latent frame after the first
    experts: int = 1  # 2 for Wan 2.2 A14B (boundary_ratio in model_index.json): GUIDANCE_SCALE_2 applies

    @classmethod
    def read(cls, checkpoint: Checkpoint) -> VideoGeometry:
        """From the VAE and transformer configs alone (plain JSON: the request stage never imports diffusers)."""
        vae = checkpoint.config("vae")
        patch = checkpoint.config("transformer")["patch_size"]
        # AutoencoderKLWan's defaults where a config predates these keys, as WanPipeline reads them.
        spatial, temporal = vae.get("scale_factor_spatial", 8), vae.get("scale_factor_temporal", 4)
        experts = 2 if checkpoint.index.get("boundary_ratio") is not None else 1
        return cls(size_multiple=spatial * max(patch[1], patch[2]), spatial_factor=spatial, temporal_factor=temporal,
                   experts=experts)


@dataclasses.dataclass(frozen=True)
class VideoParams:
    height: int
    width: int
    num_frames: int
    steps: int
    guidance: float
    guidance_2: float  # the low-noise expert's scale (Wan 2.2); WanPipeline's default: guidance
    seed: int
    fps: int
    num_images: ClassVar[int] = 1  # one video per request: GroupedDenoiser's unit of batching
    # The row fields that parse reads and as_row writes (GenerationParams.fields).
    fields: ClassVar[tuple[str, ...]] = ("HEIGHT", "WIDTH", "NUM_FRAMES", "NUM_INFERENCE_STEPS", "GUIDANCE_SCALE",
                                         "GUIDANCE_SCALE_2", "SEED", "FPS")
    shape_fields: ClassVar[tuple[str, ...]] = ("HEIGHT", "WIDTH", "NUM_FRAMES")  # as GenerationParams.shape_fields

    @classmethod
    def parse(cls, row: Row, geometry: VideoGeometry) -> VideoParams:
        # FLUX's parser for the shared fields; WanPipeline's defaults where the request has none.
        shared = GenerationParams.parse(row, geometry.size_multiple, DEFAULT_HEIGHT)
        frames = int_field(row, "NUM_FRAMES", DEFAULT_FRAMES, 1, MAX_FRAMES)
        if (frames - 1) % geometry.temporal_factor:
            t = geometry.temporal_factor
            raise RequestError("NUM_FRAMES", f"must be {t}k+1 (1, {t + 1}, {2 * t + 1}, ...) in [1, {MAX_FRAMES}], got {frames}")
        guidance = shared.guidance if "GUIDANCE_SCALE" in row else DEFAULT_GUIDANCE
        guidance_2 = float_field(row, "GUIDANCE_SCALE_2", guidance, 0.0, MAX_GUIDANCE)
        return cls(
            height=shared.height,
            width=shared.width if "WIDTH" in row else DEFAULT_WIDTH,
            num_frames=frames,
            steps=shared.steps if "NUM_INFERENCE_STEPS" in row else DEFAULT_STEPS,
            guidance=guidance,
            guidance_2=guidance_2,
            seed=shared.seed,
            fps=int_field(row, "FPS", DEFAULT_FPS, 1, MAX_FPS),
        )

    def as_row(self) -> Outputs:
        return scalar_outputs(HEIGHT=self.height, WIDTH=self.width, NUM_FRAMES=self.num_frames,
                              NUM_INFERENCE_STEPS=self.steps, GUIDANCE_SCALE=self.guidance,
                              GUIDANCE_SCALE_2=self.guidance_2, SEED=self.seed, FPS=self.fps)


class WanRequestCheck(FluxRequestCheck):
    """FLUX's request check with Wan's video parameters, geometry and defaults."""

    inputs = ("PROMPT", "NEGATIVE_PROMPT", *VideoParams.fields)
    outputs = ("PROMPT", *VideoParams.fields)
    uniform_fields = VideoParams.shape_fields

    def configure(self, checkpoint: Checkpoint) -> None:
        self.geometry = VideoGeometry.read(checkpoint)

    def parse_params(self, row: Row) -> VideoParams:
        # Here, not in VideoParams.parse: the denoiser parses the rows this stage filled in, which
        # always carry GUIDANCE_SCALE_2.
        if "GUIDANCE_SCALE_2" in row and self.geometry.experts == 1:  # WanPipeline raises the same
            raise RequestError("GUIDANCE_SCALE_2", "applies only to two-expert (Wan 2.2 A14B) checkpoints")
        return VideoParams.parse(row, self.geometry)


def uses_clip(checkpoint: Checkpoint) -> bool:
    """Whether the transformer takes a CLIP image context (Wan 2.1 I2V), as WanImageToVideoPipeline
    decides: by the transformer's ``image_dim`` (plain JSON, like VideoGeometry.read)."""
    return checkpoint.config("transformer").get("image_dim") is not None


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy())  # (H, W, 3) uint8


class WanImageRequestCheck(WanRequestCheck):
    """wan_request's checks plus IMAGE (one encoded PNG, JPEG or WebP) -> CONDITION_IMAGE (HEIGHT, WIDTH, 3)
    uint8 for the VAE, and CLIP_IMAGE: the decoded image as sent (h, w, 3) uint8 for CLIP, or (0, 0, 3)
    for checkpoints without an image encoder, which would not use it (an ensemble's tensors cannot be
    optional between steps, and an empty one costs nothing)."""

    Options = ImageInputOptions
    inputs = (*WanRequestCheck.inputs, "IMAGE")
    outputs = (*WanRequestCheck.outputs, "CONDITION_IMAGE", "CLIP_IMAGE")
    sources = {"CLIP_IMAGE": "IMAGE"}  # the image as sent, at its own size

    def configure(self, checkpoint: Checkpoint) -> None:
        super().configure(checkpoint)
        self.clip = uses_clip(checkpoint)

    def execute(self, rows: Sequence[Row]) -> list[Outputs | RequestError]:
        results = super().execute(rows)
        for i, (row, checked) in enumerate(zip(rows, results)):
            if isinstance(checked, RequestError):
                continue
            try:
                # WanImageToVideoPipeline conditions on one image (a list there is a batch of videos).
                (image,) = images_field(row, "IMAGE", max_images=1, limits=self.options.limits)
            except RequestError as error:
                results[i] = error
                continue
            checked["CONDITION_IMAGE"] = _pixels(resize_for_vae(image, int(checked["WIDTH"]), int(checked["HEIGHT"])))
            checked["CLIP_IMAGE"] = _pixels(image) if self.clip else torch.zeros((0, 0, 3), dtype=torch.uint8)
        return results
