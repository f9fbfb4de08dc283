"""Qwen-Image VAE decoding (unpack the transformer's tokens, undo the latent mean/std, decode) and,
for Qwen-Image-Edit, encoding of the input image into the same packed, normalised latents."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ditserve.flux.denoiser import pack_latents
from ditserve.flux.vae import FluxVaeDecoder, VaeOptions, unpack_latents
from ditserve.images import vae_pixels
from ditserve.loading import Checkpoint
from ditserve.stage import Outputs, RequestError, Row, Runtime, Stage, run_by_shape, tensor_field


class QwenImageVaeDecoder(FluxVaeDecoder):
    """LATENTS (packed tokens on their grid) -> PIXELS in [0, 1], (N, 3, H, W) fp32.

    FLUX's stage (input checks, grouping by shape, slicing) with Qwen-Image's normalisation and
    its video-shaped VAE (one frame), as ``QwenImagePipeline`` decodes.
    """

    def __init__(self, runtime: Runtime, options: VaeOptions | None = None):
        # Not FluxVaeDecoder.__init__: it reads config.latent_channels, which this VAE calls z_dim.
        Stage.__init__(self, runtime, options)
        self.vae = Checkpoint(runtime.model_path).load("vae", runtime)
        config = self.vae.config
        self.token_channels = 4 * config.z_dim
        shape = (1, config.z_dim, 1, 1, 1)
        dtype = runtime.dtype
        self.latents_mean = torch.tensor(config.latents_mean).view(shape).to(runtime.device, dtype)
        self.latents_inverse_std = (1.0 / torch.tensor(config.latents_std)).view(shape).to(runtime.device, dtype)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        latents = unpack_latents(tokens)[:, :, None]  # (B, C, 1, h, w): one frame
        # Exactly QwenImagePipeline's arithmetic: latents_std there is 1 / std.
        latents = latents / self.latents_inverse_std + self.latents_mean
        images = [
            self.vae.decode(chunk, return_dict=False)[0][:, :, 0]
            for chunk in latents.split(self.options.max_batch_images)
        ]
        return (torch.cat(images) / 2 + 0.5).clamp(0, 1).float()


class QwenImageVaeEncoder(Stage):
    """CONDITION_IMAGE (H, W, 3) uint8 -> IMAGE_LATENTS (H/16, W/16, 4C) fp32: packed tokens on their grid.

    As ``QwenImageEditPipeline._encode_vae_image``: pixels to [-1, 1], one frame, the mode of the
    latent distribution, normalised with the VAE's latent mean and std. Images of one shape are
    encoded together, at most ``max_batch_images`` at a time.
    """

    Options = VaeOptions
    inputs = ("CONDITION_IMAGE",)
    outputs = ("IMAGE_LATENTS",)

    def __init__(self, runtime: Runtime, options: VaeOptions | None = None):
        super().__init__(runtime, options)
        self.vae = Checkpoint(runtime.model_path).load("vae", runtime)
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        self.latents_mean = torch.tensor(config.latents_mean).view(shape).to(runtime.device, runtime.dtype)
        self.latents_std = torch.tensor(config.latents_std).view(shape).to(runtime.device, runtime.dtype)

    def execute(self, rows: Sequence[Row]) -> list[Outputs | RequestError]:
        return run_by_shape(rows, self.parse, lambda pixels: [{"IMAGE_LATENTS": v} for v in self.encode(torch.stack(pixels))])

    def parse(self, row: Row) -> torch.Tensor:
        pixels = tensor_field(row, "CONDITION_IMAGE", 3, self.runtime.device, torch.uint8)
        if pixels.shape[-1] != 3:
            raise RequestError("CONDITION_IMAGE", f"expected (H, W, 3), got shape {tuple(pixels.shape)}")
        return pixels

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        images = vae_pixels(pixels).to(self.runtime.dtype)[:, :, None]
        latents = torch.cat(
            [
                self.vae.encode(chunk).latent_dist.mode()
                for chunk in images.split(self.options.max_batch_images)
            ]
        )
        latents = ((latents - self.latents_mean) / self.latents_std)[:, :, 0]
        b, channels, h, w = latents.shape
        return pack_latents(latents).view(b, h // 2, w // 2, 4 * channels).float()
