"""FLUX.1 denoising: latent preparation, FlowMatch Euler schedule, guidance, true CFG.

Rows that share (height, width, steps, text length) share one timestep schedule, image token
count and text token count, so they run as one batched transformer forward per step; each row
keeps its own seed, guidance and true-CFG scale. The result must equal ``FluxPipeline`` for each
row alone.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch

from ditserve.denoising import DenoiserOptions, TransformerDenoiser, flow_match_scheduler, guide, seeded_noise
from ditserve.flux.request import GenerationParams, latent_geometry
from ditserve.flux.text_encoder import TextEncoderOptions
from ditserve.kernels.flux_processor import set_attention_backend
from ditserve.loading import Checkpoint
from ditserve.parallel.flux import set_sequence_parallel, sp_forward
from ditserve.stage import RequestError, Row, tensor_field


FluxDenoiserOptions = DenoiserOptions  # the common image-denoiser parameters, cuda_graphs included


@dataclasses.dataclass(frozen=True)
class FluxRequest:
    """One validated row: its text embeddings and generation parameters."""

    prompt_embeds: torch.Tensor  # (L, D)
    pooled_embeds: torch.Tensor  # (D_pool,)
    negative_embeds: torch.Tensor | None
    negative_pooled: torch.Tensor | None
    params: GenerationParams

    @property
    def do_true_cfg(self) -> bool:  # FluxPipeline: true_cfg_scale > 1 and a negative prompt
        return self.params.true_cfg > 1 and self.negative_embeds is not None


# --- latent layout: pure functions ----------------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches become tokens, as FLUX expects."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def image_token_ids(grid_h: int, grid_w: int, device, dtype) -> torch.Tensor:
    """Rotary position ids (grid_h*grid_w, 3): (0, row, column) for each image token."""
    ids = torch.zeros(grid_h, grid_w, 3)
    ids[..., 1] = torch.arange(grid_h)[:, None]
    ids[..., 2] = torch.arange(grid_w)[None, :]
    return ids.reshape(grid_h * grid_w, 3).to(device=device, dtype=dtype)


class FluxDenoiser(TransformerDenoiser):
    Options = FluxDenoiserOptions
    pipeline_classes = ("FluxPipeline",)
    inputs = ("PROMPT_EMBEDS", "POOLED_PROMPT_EMBEDS", "NEGATIVE_PROMPT_EMBEDS", "NEGATIVE_POOLED_PROMPT_EMBEDS",
              *GenerationParams.fields)
    uniform_fields = GenerationParams.shape_fields

    def load_components(self, checkpoint: Checkpoint) -> None:
        self.size_multiple, self.default_size = latent_geometry(checkpoint)
        self.latent_channels = self.transformer.config.in_channels // 4
        self.forward = self.graphed(self._forward, self.options.graphs_enabled(self.runtime.device))

    def warmup_batches(self, steps: int) -> list[list[FluxRequest]]:
        # FluxPipeline's defaults: its size, its text length (flux_text_encoder pads every prompt to
        # max_sequence_length), no true CFG (a negative prompt would have that same length): the one
        # attention shape of FLUX requests at that size.
        config = self.transformer.config
        embeds = self.warmup_tensor(TextEncoderOptions.max_sequence_length, config.joint_attention_dim)
        pooled = self.warmup_tensor(config.pooled_projection_dim)
        size = self.default_size
        params = GenerationParams(height=size, width=size, steps=steps, guidance=3.5, true_cfg=1.0, seed=0, num_images=1)
        return [[FluxRequest(embeds, pooled, None, None, params)]]

    # --- attention (hooks of GroupedDenoiser) ----------------------------------------------

    # "auto": our Triton kernel with the fused norm+RoPE prologue: a FLUX.1-dev step at 1024x1024
    # took 151.3 ms against diffusers' 184.3 ms on an H100 (2026-11-26, perf/ATTENTION_NOTES.md).
    auto_triton_on_cuda = True

    install_attention_backend = staticmethod(set_attention_backend)
    install_sequence_parallel = staticmethod(set_sequence_parallel)

    # --- requests -------------------------------------------------------------------

    def parse(self, row: Row) -> FluxRequest:
        device, dtype = self.runtime.device, self.runtime.dtype
        config = self.transformer.config
        text_width, pooled_width = config.joint_attention_dim, config.pooled_projection_dim
        prompt = tensor_field(row, "PROMPT_EMBEDS", 2, device, dtype, width=text_width)
        if prompt.shape[0] == 0:  # as Qwen-Image's: the joint attention would have no text to attend to
            raise RequestError("PROMPT_EMBEDS", "has no tokens")
        pooled = tensor_field(row, "POOLED_PROMPT_EMBEDS", 1, device, dtype, width=pooled_width)
        negative = negative_pooled = None
        if "NEGATIVE_PROMPT_EMBEDS" in row and row["NEGATIVE_PROMPT_EMBEDS"].numel() > 0:
            negative = tensor_field(row, "NEGATIVE_PROMPT_EMBEDS", 2, device, dtype, width=text_width)
            negative_pooled = tensor_field(row, "NEGATIVE_POOLED_PROMPT_EMBEDS", 1, device, dtype, width=pooled_width)
            if negative.shape != prompt.shape:
                raise RequestError("NEGATIVE_PROMPT_EMBEDS", f"shape {tuple(negative.shape)} != PROMPT_EMBEDS {tuple(prompt.shape)}")
        params = GenerationParams.parse(row, self.size_multiple, self.default_size)
        return FluxRequest(prompt, pooled, negative, negative_pooled, params)

    def group_key(self, request: FluxRequest) -> tuple:
        # The text length too: a batch's texts are concatenated as they are, without a mask (FluxPipeline's are
        # all max_sequence_length long, as flux_text_encoder pads them), and a negative has its prompt's length.
        return (*super().group_key(request), request.prompt_embeds.shape[0])

    # --- the denoising loop -----------------------------------------------------------

    def _forward(self, **inputs: Optional[torch.Tensor]) -> torch.Tensor:
        """One transformer call: sequence-parallel on the group's mesh when there is one."""
        mesh = self.parallel.mesh if self.parallel is not None else None
        if mesh is not None:
            return sp_forward(self.transformer, mesh, **inputs)
        return self.transformer(**inputs, return_dict=False)[0]

    @torch.inference_mode()
    def denoise(self, requests: list[FluxRequest]) -> list[torch.Tensor]:
        """Denoise requests of one group key (height, width, steps, text length); packed latents per request, fp32.

        Each result is (num_images, h/2, w/2, 4C): the transformer's tokens laid on their
        2x2-patch grid, so the VAE stage can unpack them without being told the size.
        """
        device, dtype = self.runtime.device, self.runtime.dtype
        first = requests[0]
        latent_h = 2 * (first.params.height // self.size_multiple)
        latent_w = 2 * (first.params.width // self.size_multiple)
        counts = [r.params.num_images for r in requests]

        def per_image(values: list) -> torch.Tensor:
            return torch.cat([v.expand(n, *v.shape[1:]) for v, n in zip(values, counts)])

        latents = pack_latents(seeded_noise(requests, (self.latent_channels, latent_h, latent_w), device, dtype))
        prompt = per_image([r.prompt_embeds[None] for r in requests])
        pooled = per_image([r.pooled_embeds[None] for r in requests])
        text_ids = torch.zeros(prompt.shape[1], 3, device=device, dtype=dtype)
        image_ids = image_token_ids(latent_h // 2, latent_w // 2, device, dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.tensor(
                [r.params.guidance for r, n in zip(requests, counts) for _ in range(n)], device=device, dtype=torch.float32
            )

        cfg = [r.do_true_cfg for r in requests]
        cfg_index = torch.tensor([i for i, on in enumerate(np.repeat(cfg, counts)) if on], device=device, dtype=torch.long)
        if len(cfg_index):
            cfg_requests = [(r, n) for r, n in zip(requests, counts) if r.do_true_cfg]
            negative = torch.cat([r.negative_embeds[None].expand(n, -1, -1) for r, n in cfg_requests])
            negative_pooled = torch.cat([r.negative_pooled[None].expand(n, -1) for r, n in cfg_requests])
            scales = torch.tensor([r.params.true_cfg for r, n in cfg_requests for _ in range(n)],
                                  device=device, dtype=torch.float32).view(-1, 1, 1)

        scheduler = flow_match_scheduler(
            self.scheduler_class, self.scheduler_config, first.params.steps, latents.shape[1], self.runtime.device
        )

        def transformer(hidden, timestep, guidance, pooled, text):
            return self.forward(hidden_states=hidden, timestep=timestep, guidance=guidance, pooled_projections=pooled,
                                encoder_hidden_states=text, txt_ids=text_ids, img_ids=image_ids)

        with self.attention_context():
            for t in self.steps(scheduler.timesteps):
                timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
                negative_branch = None
                if len(cfg_index):
                    negative_guidance = None if guidance is None else guidance[cfg_index]
                    negative_branch = lambda: transformer(  # noqa: E731
                        latents[cfg_index], timestep[cfg_index], negative_guidance, negative_pooled, negative
                    )
                prediction, negative_prediction = self.branches(
                    lambda: transformer(latents, timestep, guidance, pooled, prompt),
                    negative_branch,
                    like=latents,
                    negative_like=latents[cfg_index] if len(cfg_index) else None,
                )
                if len(cfg_index):
                    prediction[cfg_index] = guide(negative_prediction, prediction[cfg_index], scales)
                latents = scheduler.step(prediction, t, latents, return_dict=False)[0]

        grid = latents.float().view(latents.shape[0], latent_h // 2, latent_w // 2, latents.shape[-1])
        return list(grid.split(counts))
