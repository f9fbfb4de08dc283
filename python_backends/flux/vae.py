"""FLUX.1 VAE decoding: unpack the transformer's tokens, undo scale/shift, decode to pixels."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ditserve.loading import Checkpoint
from ditserve.stage import Outputs, RequestError, Row, Runtime, Stage, check_parameter, run_by_shape, tensor_field


@dataclasses.dataclass(frozen=True)
class VaeOptions:
    # Images per VAE decode call. The FLUX VAE's decoder activations at 1024x1024 take
    # several GB per image in bf16, so large batches are decoded in slices.
    max_batch_images: int = 4

    def __post_init__(self):
        check_parameter("max_batch_images", self.max_batch_images, 1)


def unpack_latents(tokens: torch.Tensor) -> torch.Tensor:
    """(B, h/2, w/2, 4C) patch tokens on their grid -> (B, C, h, w) latents."""
    b, grid_h, grid_w, channels = tokens.shape
    patches = tokens.view(b, grid_h, grid_w, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, grid_h * 2, grid_w * 2)


class FluxVaeDecoder(Stage):
    """LATENTS (packed tokens) -> PIXELS in [0, 1], (N, 3, H, W) fp32."""

    Options = VaeOptions
    inputs = ("LATENTS",)
    outputs = ("PIXELS",)

    def __init__(self, runtime: Runtime, options: VaeOptions | None = None):
        super().__init__(runtime, options)
        self.vae = Checkpoint(runtime.model_path).load("vae", runtime)
        self.token_channels = 4 * self.vae.config.latent_channels

    def execute(self, rows: Sequence[Row]) -> list[Outputs | RequestError]:
        def run(tokens: list[torch.Tensor]) -> list[Outputs]:
            pixels = self.decode(torch.cat(tokens)).split([t.shape[0] for t in tokens])
            return [{"PIXELS": value} for value in pixels]

        # Requests of one size decode together whatever their image counts.
        return run_by_shape(rows, self.parse, run, key=lambda tokens: tuple(tokens.shape[1:]))

    def parse(self, row: Row) -> torch.Tensor:
        return tensor_field(row, "LATENTS", 4, self.runtime.device, self.runtime.dtype, width=self.token_channels)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        latents = unpack_latents(tokens) / config.scaling_factor + config.shift_factor
        images = [
            self.vae.decode(chunk, return_dict=False)[0] for chunk in latents.split(self.options.max_batch_images)
        ]
        # Denormalise in the decode dtype, as diffusers' VaeImageProcessor does, before the
        # exact widening to fp32 for the stage boundary.
        return (torch.cat(images) / 2 + 0.5).clamp(0, 1).float()
