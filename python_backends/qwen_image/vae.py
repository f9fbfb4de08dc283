"""Qwen-Image VAE decoding: unpack the transformer's tokens, undo the latent mean/std, decode."""

from __future__ import annotations

import torch

from ditserve.flux.vae import FluxVaeDecoder, VaeOptions, unpack_latents
from ditserve.loading import Checkpoint
from ditserve.stage import Runtime, Stage


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
