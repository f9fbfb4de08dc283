"""Wan VAE decoding: undo the latent mean/std and decode a video's latent frames to pixel frames."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ditserve.loading import Checkpoint
from ditserve.stage import Outputs, RequestError, Row, Runtime, Stage, check_parameter, run_by_shape, tensor_field


def latent_normalisation(config, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1 / std) of the VAE's latent channels, (1, C, 1, 1, 1) each, as the Wan pipelines compute them
    (their ``latents_std`` is 1 / std)."""
    shape = (1, config.z_dim, 1, 1, 1)
    mean = torch.tensor(config.latents_mean).view(shape).to(device, dtype)
    return mean, (1.0 / torch.tensor(config.latents_std)).view(shape).to(device, dtype)


@dataclasses.dataclass(frozen=True)
class VaeOptions:
    # Videos per VAE decode call. The Wan VAE decodes a video frame chunk by frame chunk with a
    # cache, but at 480x832 one video's activations still take GBs: one at a time by default.
    max_batch_videos: int = 1

    def __post_init__(self):
        check_parameter("max_batch_videos", self.max_batch_videos, 1)


class WanVaeDecoder(Stage):
    """LATENTS (C, latent frames, h, w) -> PIXELS (frames, 3, H, W) in [0, 1] fp32, one video a row.

    Videos of one latent shape are decoded together; each row keeps its own video.
    """

    Options = VaeOptions
    inputs = ("LATENTS",)
    outputs = ("PIXELS",)

    def __init__(self, runtime: Runtime, options: VaeOptions | None = None):
        super().__init__(runtime, options)
        self.vae = Checkpoint(runtime.model_path).load("vae", runtime)
        self.latents_mean, self.latents_inverse_std = latent_normalisation(self.vae.config, runtime.device, runtime.dtype)

    def execute(self, rows: Sequence[Row]) -> list[Outputs | RequestError]:
        return run_by_shape(rows, self.parse, lambda latents: [{"PIXELS": v} for v in self.decode(torch.stack(latents))])

    def parse(self, row: Row) -> torch.Tensor:
        latents = tensor_field(row, "LATENTS", 4, self.runtime.device, self.runtime.dtype)
        if latents.shape[0] != self.vae.config.z_dim:
            raise RequestError("LATENTS", f"first dimension must be {self.vae.config.z_dim}, got {latents.shape[0]}")
        return latents

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, f, h, w) -> (B, frames, 3, H, W) in [0, 1] fp32."""
        # Exactly WanPipeline's arithmetic: latents_std there is 1 / std.
        latents = latents / self.latents_inverse_std + self.latents_mean
        videos = [self.vae.decode(chunk, return_dict=False)[0] for chunk in latents.split(self.options.max_batch_videos)]
        # Denormalise in the decode dtype, as diffusers' VideoProcessor, then widen exactly to fp32.
        return (torch.cat(videos) / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).float()
