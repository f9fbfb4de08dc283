"""Wan image-to-video conditioning: the input image's VAE latents with the frame mask, and its CLIP context.

As ``WanImageToVideoPipeline.prepare_latents`` and ``encode_image`` (diffusers 0.42.1):

* the conditioning video is the resized image followed by NUM_FRAMES - 1 black (zero) frames, in
  [-1, 1]; the VAE encodes it (the mode of the latent distribution) and the latents are normalised
  with the VAE's mean and std. The mask has 1 on the image's frame and 0 on the others, the first
  frame repeated to the VAE's temporal factor so that it folds into (factor, latent frames): the
  transformer sees [noise latents, mask, image latents] along channels in every call.
  Only the first frame is conditioned (the reference's optional ``last_image`` is not supported).
* With ``expand_timesteps`` (Wan 2.2 TI2V) the VAE encodes the image alone, one latent frame; the
  denoiser puts it in place of the first noise frame (``ditserve.wan.denoiser``).
* Where the transformer takes an image context (Wan 2.1 I2V: ``image_dim``), the checkpoint's CLIP
  image processor and vision model see the image as sent, and the penultimate hidden states are the
  context (``encoder_hidden_states_image``), for the conditional and unconditional predictions alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from ditserve.images import vae_pixels
from ditserve.loading import Checkpoint
from ditserve.stage import Outputs, RequestError, Row, Runtime, Stage, int_field, tensor_field
from ditserve.wan.limits import MAX_FRAMES
from ditserve.wan.request import VideoGeometry, uses_clip
from ditserve.wan.vae import latent_normalisation


class WanImageEncoder(Stage):
    """CONDITION_IMAGE (H, W, 3) uint8, CLIP_IMAGE (h, w, 3) uint8 (or empty) and NUM_FRAMES ->
    CONDITION: (4 + C, latent frames, H/8, W/8) mask and image latents, or (C, 1, H/s, W/s) with
    expand_timesteps; IMAGE_EMBEDS: (tokens, D) CLIP context, or (0, 0) where the transformer takes none.
    All fp32. One video at a time: the conditioning video is as long as the output."""

    inputs = ("CONDITION_IMAGE", "CLIP_IMAGE", "NUM_FRAMES")
    outputs = ("CONDITION", "IMAGE_EMBEDS")

    def __init__(self, runtime: Runtime, options=None):
        super().__init__(runtime, options)
        checkpoint = Checkpoint(runtime.model_path)
        self.vae = checkpoint.load("vae", runtime)
        self.latents_mean, self.latents_inverse_std = latent_normalisation(self.vae.config, runtime.device, torch.float32)
        self.geometry = VideoGeometry.read(checkpoint)
        self.expand_timesteps = bool(checkpoint.index.get("expand_timesteps"))
        self.clip = uses_clip(checkpoint)
        if self.clip:
            self.image_processor = checkpoint.load("image_processor")
            self.image_encoder = checkpoint.load("image_encoder", runtime)

    def execute(self, rows: Sequence[Row]) -> list[Outputs | RequestError]:
        results: list[Outputs | RequestError] = []
        for row in rows:
            try:
                pixels = tensor_field(row, "CONDITION_IMAGE", 3, self.runtime.device, torch.uint8)
                clip_pixels = tensor_field(row, "CLIP_IMAGE", 3, torch.device("cpu"), torch.uint8)
                frames = int_field(row, "NUM_FRAMES", None, 1, MAX_FRAMES)
                if frames is None:
                    raise RequestError("NUM_FRAMES", "is required")
                for name, value in (("CONDITION_IMAGE", pixels), ("CLIP_IMAGE", clip_pixels)):
                    if value.shape[-1] != 3:
                        raise RequestError(name, f"expected (H, W, 3), got shape {tuple(value.shape)}")
                if self.clip and not clip_pixels.numel():
                    raise RequestError("CLIP_IMAGE", "this checkpoint's transformer takes a CLIP image context: send the image")
            except RequestError as error:
                results.append(error)
                continue
            results.append({"CONDITION": self.condition(pixels, frames), "IMAGE_EMBEDS": self.embed(clip_pixels)})
        return results

    @torch.inference_mode()
    def condition(self, pixels: torch.Tensor, frames: int) -> torch.Tensor:
        image = vae_pixels(pixels[None])[:, :, None]  # (1, 3, 1, H, W) fp32
        if self.expand_timesteps:
            video = image
        else:
            height, width = image.shape[-2:]
            video = torch.cat([image, image.new_zeros(1, 3, frames - 1, height, width)], dim=2)
        latents = self.vae.encode(video.to(self.runtime.dtype)).latent_dist.mode()
        # In fp32 whatever the VAE's dtype, as the pipeline (its latents' dtype).
        latents = (latents.float() - self.latents_mean) * self.latents_inverse_std
        if self.expand_timesteps:
            return latents[0]
        t = self.geometry.temporal_factor
        latent_height, latent_width = latents.shape[-2:]
        mask = torch.zeros(1, 1, frames, latent_height, latent_width, device=latents.device)
        mask[:, :, 0] = 1
        mask = torch.cat([mask[:, :, :1].repeat_interleave(t, dim=2), mask[:, :, 1:]], dim=2)
        mask = mask.view(1, -1, t, latent_height, latent_width).transpose(1, 2)  # (1, t, latent frames, h, w)
        return torch.cat([mask, latents], dim=1)[0]

    @torch.inference_mode()
    def embed(self, clip_pixels: torch.Tensor) -> torch.Tensor:
        if not self.clip:
            return torch.zeros(0, 0, device=self.runtime.device)
        # The processor's own resize and crop, on the image as decoded (PIL, as the pipeline hands it over).
        inputs = self.image_processor(images=Image.fromarray(clip_pixels.numpy()), return_tensors="pt")
        pixel_values = inputs.pixel_values.to(self.runtime.device, self.runtime.dtype)
        hidden = self.image_encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
        return hidden[0].float()
