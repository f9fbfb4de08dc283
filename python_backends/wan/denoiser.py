"""Wan denoising: video latents, the checkpoint's scheduler, classifier-free guidance, one or two experts.

As ``WanPipeline.__call__``: fp32 latents of (frames - 1) / t + 1 latent frames drawn from each
request's own CPU generator, the checkpoint's scheduler (UniPC with ``flow_shift`` in the Wan
checkpoints, or FlowMatch Euler with its ``shift``) set to the step count alone, the transformer fed
the latents in its dtype, and ``uncond + s * (cond - uncond)`` with the negative prompt's
embeddings when s = GUIDANCE_SCALE > 1. A Wan 2.2 A14B checkpoint (``boundary_ratio`` and
``transformer_2`` in model_index.json) runs ``transformer`` on the steps with timestep >=
boundary_ratio x num_train_timesteps and ``transformer_2`` on the rest, at GUIDANCE_SCALE_2
(``guidance_scale_2``; by default the same scale).

Requests of one (height, width, steps, frames, text length) run as one batch: conditional and
unconditional rows together in one transformer forward per step. With ``cfg_parallel`` the two halves
of that batch are computed each on its CFG branch of the worker group (``GroupedDenoiser.branches``);
with ``sp_degree`` > 1 every forward runs sequence-parallel over the video tokens
(``ditserve.parallel.wan``), both experts included. Attention: parameter ``attention_backend``
(``ditserve.denoising``) for both experts; the ditserve backends run through
``ditserve.kernels.wan_processor`` (RoPE fused into the Triton kernel; Wan's across-heads QK norm cannot be).

Image-to-video (``WanImageDenoiser``, as ``WanImageToVideoPipeline``): each request brings CONDITION from
``ditserve.wan.image_encoder``, concatenated to the noise latents along channels in every transformer
call, and, for Wan 2.1 I2V, IMAGE_EMBEDS, the CLIP context of both predictions. Wan 2.2 TI2V checkpoints
(``expand_timesteps``) take a timestep per video token instead of one per video, in WanPipeline and
WanImageToVideoPipeline alike: with an image, its latent frame replaces the first noise frame in every
call and at the end, and its tokens' timestep is 0.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ditserve.denoising import (AUTOTUNED_BACKENDS, TransformerDenoiser, TransformerOptions, attention_fits, guide,
                                seeded_noise)
from ditserve.kernels import attention_hopper
from ditserve.kernels.wan_processor import set_attention_backend
from ditserve.loading import Checkpoint
from ditserve.parallel.wan import set_sequence_parallel, sp_forward
from ditserve.stage import ConfigError, RequestError, Row, check_parameter, tensor_field
from ditserve.wan.checkpoint import MAX_SEQUENCE_LENGTH
from ditserve.wan.limits import DEFAULT_FPS, DEFAULT_FRAMES, DEFAULT_GUIDANCE, DEFAULT_HEIGHT, DEFAULT_WIDTH
from ditserve.wan.request import VideoGeometry, VideoParams


@dataclasses.dataclass(frozen=True)
class WanDenoiserOptions(TransformerOptions):
    max_batch_videos: int = 4  # videos per transformer forward (twice the rows with guidance); a video is never split

    def __post_init__(self):
        check_parameter("max_batch_videos", self.max_batch_videos, 1)

    @property
    def max_batch_images(self) -> int:  # the batch limit under GroupedDenoiser's name
        return self.max_batch_videos


@dataclasses.dataclass(frozen=True)
class WanRequest:
    prompt_embeds: torch.Tensor  # (L, D), padding zeroed, as the transformer takes it
    negative_embeds: torch.Tensor  # (L, D)
    params: VideoParams
    condition: Optional[torch.Tensor] = None  # image-to-video: fp32 (4 + C, f, h, w), or (C, 1, h, w) for TI2V
    image_embeds: Optional[torch.Tensor] = None  # Wan 2.1 I2V: (tokens, D) CLIP context


class WanDenoiser(TransformerDenoiser):
    Options = WanDenoiserOptions
    # FPS goes to the postprocess stage alone (VideoParams.parse gives its default here, unused).
    inputs = ("PROMPT_EMBEDS", "NEGATIVE_PROMPT_EMBEDS", *(f for f in VideoParams.fields if f != "FPS"))
    uniform_fields = VideoParams.shape_fields

    def load_components(self, checkpoint: Checkpoint) -> None:
        self.boundary_ratio = checkpoint.index.get("boundary_ratio")
        # The low-noise expert: loaded only where the pipeline would use it. One architecture with the
        # first: its attention is the one select_attention checked.
        self.transformer_2 = checkpoint.load("transformer_2", self.runtime) if self.boundary_ratio is not None else None
        self.geometry = VideoGeometry.read(checkpoint)
        self.latent_channels = checkpoint.config("vae")["z_dim"]
        self.expand_timesteps = bool(checkpoint.index.get("expand_timesteps"))
        channels, what = self.transformer_inputs()
        if self.transformer.config.in_channels != channels:
            raise ConfigError(f"model_path: this denoiser needs a transformer taking {channels} input channels ({what}), "
                              f"got {self.transformer.config.in_channels}: {self.wrong_checkpoint}")

    # Said when the transformer's input channels are another pipeline's.
    wrong_checkpoint = "an image-to-video checkpoint goes to wan_i2v"
    # Which of the two a checkpoint is for, the transformer's input channels tell (Wan 2.2 TI2V's WanPipeline
    # checkpoints serve both): load_components refuses the other's with wrong_checkpoint.
    pipeline_classes = ("WanPipeline", "WanImageToVideoPipeline")

    def transformer_inputs(self) -> tuple[int, str]:
        """The transformer's input channels in this pipeline, and what they are: the noise latents alone
        (text-to-video, and TI2V, whose image latents replace a latent frame)."""
        return self.latent_channels, "the VAE's latents"

    # --- attention (hooks of GroupedDenoiser) ----------------------------------------------

    def experts(self) -> list[torch.nn.Module]:
        return [self.transformer] + ([self.transformer_2] if self.transformer_2 is not None else [])

    def auto_attention_backend(self, head_dim: int) -> str:
        # Our kernel where it is the Gluon one (sm_90: a Wan 14B step 3,050 vs 3,380 ms with diffusers' SDPA on
        # an H100) or for Ring attention on CUDA: its "sdpa" blocks run torch's memory-efficient kernel, the only
        # one that returns their log-sum-exp (182 TFLOP/s at 1x40x32760x128 on an H100, perf/RESULTS.md "Baselines").
        # Elsewhere diffusers' SDPA: the Triton-lang kernel is 5% slower at Wan 14B's size (3,542 vs 3,380 ms;
        # perf/RESULTS.md, "A Gluon kernel for Hopper").
        config = self.parallel_config
        devices = config.devices if config is not None else (self.runtime.device,)
        ring_on_cuda = config is not None and config.ring_degree > 1 and devices[0].type == "cuda"
        gluon = all(attention_hopper.runs_on(d) for d in devices) and attention_fits(
            "triton", self.runtime, head_dim, masked=self.attention_masked)
        return "triton" if ring_on_cuda or gluon else "sdpa"

    install_attention_backend = staticmethod(set_attention_backend)
    install_sequence_parallel = staticmethod(set_sequence_parallel)

    # --- warm-up (hooks of TransformerDenoiser) -------------------------------------------

    def needs_warmup(self) -> bool:
        # Only where our kernels would compile and tune at the first request (auto picks triton for Ring
        # attention on CUDA): a 14B step at the default size takes about 7 s (H100, perf/RESULTS.md), and
        # diffusers' SDPA has nothing to tune.
        return self.attention_name in AUTOTUNED_BACKENDS

    def warmup_batches(self, steps: int) -> list[list[WanRequest]]:
        # WanPipeline's defaults: size, frame count, guidance with a negative prompt, and text length
        # (wan_text_encoder pads every prompt to it): the one self- and cross-attention shape of requests
        # of that size (the first expert's steps; the second's are the same shapes).
        text = self.warmup_tensor(MAX_SEQUENCE_LENGTH, self.transformer.config.text_dim)
        params = VideoParams(height=DEFAULT_HEIGHT, width=DEFAULT_WIDTH, num_frames=DEFAULT_FRAMES, steps=steps,
                             guidance=DEFAULT_GUIDANCE, guidance_2=DEFAULT_GUIDANCE, seed=0, fps=DEFAULT_FPS)
        return [[WanRequest(text, text, params)]]

    # --- requests -------------------------------------------------------------------

    def parse(self, row: Row) -> WanRequest:
        device, dtype = self.runtime.device, self.runtime.dtype
        width = self.transformer.config.text_dim
        prompt = tensor_field(row, "PROMPT_EMBEDS", 2, device, dtype, width=width)
        negative = tensor_field(row, "NEGATIVE_PROMPT_EMBEDS", 2, device, dtype, width=width)
        if negative.shape != prompt.shape:
            raise RequestError("NEGATIVE_PROMPT_EMBEDS", f"shape {tuple(negative.shape)} != PROMPT_EMBEDS {tuple(prompt.shape)}")
        return WanRequest(prompt, negative, VideoParams.parse(row, self.geometry))

    def group_key(self, request: WanRequest) -> tuple:
        return (*super().group_key(request), request.params.num_frames, request.prompt_embeds.shape[0])

    def expert(self, t: torch.Tensor) -> torch.nn.Module:
        if self.transformer_2 is None or t >= self.boundary_ratio * self.scheduler_config.num_train_timesteps:
            return self.transformer  # Wan 2.1, or Wan 2.2's high-noise steps
        return self.transformer_2

    @torch.inference_mode()
    def denoise(self, requests: list[WanRequest]) -> list[torch.Tensor]:
        """Denoise requests of one group key: per request (C, latent frames, H/s, W/s) fp32."""
        device, dtype = self.runtime.device, self.runtime.dtype
        first = requests[0].params
        spatial, temporal = self.geometry.spatial_factor, self.geometry.temporal_factor
        shape = (1, self.latent_channels, (first.num_frames - 1) // temporal + 1, first.height // spatial, first.width // spatial)
        latents = seeded_noise(requests, shape[1:], device, torch.float32)  # as WanPipeline: fp32, whatever the dtype
        guided = [i for i, r in enumerate(requests) if r.params.guidance > 1]
        text = torch.stack([r.prompt_embeds for r in requests] + [requests[i].negative_embeds for i in guided])
        # Per expert: WanPipeline's guidance_scale on transformer's steps, guidance_scale_2 on transformer_2's.
        scales = {
            expert: torch.tensor([getattr(requests[i].params, field) for i in guided], device=device,
                                 dtype=torch.float32).view(-1, 1, 1, 1, 1)
            for expert, field in ((self.transformer, "guidance"), (self.transformer_2, "guidance_2")) if expert is not None
        }
        condition = torch.stack([r.condition for r in requests]) if requests[0].condition is not None else None
        image = torch.stack([r.image_embeds for r in requests]) if requests[0].image_embeds is not None else None
        frame_mask, token_mask = self.timestep_masks(shape, condition is not None)

        def model_input(latents: torch.Tensor) -> torch.Tensor:
            if condition is None:
                return latents.to(dtype)
            if frame_mask is not None:  # TI2V: the image's latent frame in place of the first noise frame
                return ((1 - frame_mask) * condition + frame_mask * latents).to(dtype)
            return torch.cat([latents, condition], dim=1).to(dtype)

        def timesteps(t: torch.Tensor, batch: int) -> torch.Tensor:
            if token_mask is None:
                return t.expand(batch)
            return (token_mask * t).unsqueeze(0).expand(batch, -1)  # TI2V: (batch, video tokens)

        scheduler = self.scheduler_class.from_config(self.scheduler_config)
        scheduler.set_timesteps(first.steps, device=device)
        scheduler.set_begin_index(0)
        n = len(requests)
        mesh = self.parallel.mesh if self.parallel is not None else None
        cfg_parallel = self.parallel is not None and self.parallel.config.cfg_parallel

        def forward(transformer: torch.nn.Module, hidden: torch.Tensor, text: torch.Tensor,
                    image: Optional[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
            inputs = dict(hidden_states=hidden, timestep=timesteps(t, hidden.shape[0]), encoder_hidden_states=text,
                          encoder_hidden_states_image=image)
            if mesh is not None:
                return sp_forward(transformer, mesh, **inputs)
            return transformer(**inputs, return_dict=False)[0]

        like = torch.empty(latents.shape, device=device, dtype=dtype)  # a prediction's shape and dtype (CFG parallel)
        with self.attention_context():
            for t in self.steps(scheduler.timesteps):
                hidden = model_input(latents)
                transformer = self.expert(t)
                if cfg_parallel:  # each CFG branch computes its half of the batch below
                    prediction, unconditional = self.branches(
                        lambda: forward(transformer, hidden, text[:n], image, t),
                        (lambda: forward(transformer, hidden[guided], text[n:], image[guided] if image is not None else None, t))
                        if guided else None,
                        like=like,
                        negative_like=like[guided] if guided else None,
                    )
                else:
                    both = torch.cat([hidden, hidden[guided]])
                    context = torch.cat([image, image[guided]]) if image is not None else None
                    prediction = forward(transformer, both, text, context, t)
                    prediction, unconditional = prediction[:n], prediction[n:]
                if guided:
                    prediction[guided] = guide(unconditional, prediction[guided], scales[transformer])
                latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
        if frame_mask is not None and condition is not None:
            latents = (1 - frame_mask) * condition + frame_mask * latents
        return list(latents.float())

    def timestep_masks(self, shape: tuple[int, ...], conditioned: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """TI2V (expand_timesteps): the latent mask, (1, 1, f, h, w) fp32, 0 on the image's frame when there
        is one, and its value per video token, by which every token's timestep is t x mask. (None, None)
        for the other checkpoints. The pipelines take the token values at stride 2, Wan's patch; here at the
        transformer's patch size."""
        if not self.expand_timesteps:
            return None, None
        mask = torch.ones(1, 1, *shape[2:], device=self.runtime.device, dtype=torch.float32)
        if conditioned:
            mask[:, :, 0] = 0
        p_t, p_h, p_w = self.transformer.config.patch_size
        return mask, mask[0, 0, ::p_t, ::p_h, ::p_w].flatten()


class WanImageDenoiser(WanDenoiser):
    """The Wan denoiser of wan_i2v: each request also brings the image's CONDITION and IMAGE_EMBEDS
    (``ditserve.wan.image_encoder``; IMAGE_EMBEDS is empty where the transformer takes no image context)."""

    inputs = (*WanDenoiser.inputs, "CONDITION", "IMAGE_EMBEDS")
    wrong_checkpoint = "a text-to-video checkpoint goes to wan_t2v"

    def transformer_inputs(self) -> tuple[int, str]:
        if self.expand_timesteps:
            return super().transformer_inputs()
        # WanImageToVideoPipeline: [noise latents, mask (one channel per frame of the temporal factor), image latents].
        return 2 * self.latent_channels + self.geometry.temporal_factor, "the VAE's latents, the frame mask and the image latents"

    def load_components(self, checkpoint: Checkpoint) -> None:
        super().load_components(checkpoint)
        # The CLIP context's tokens (the warm-up's): the vision model's patches and its class token.
        vision = checkpoint.config("image_encoder") if self.transformer.config.image_dim is not None else None
        self.image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1 if vision is not None else 0

    def condition_shape(self, params: VideoParams) -> tuple[int, ...]:
        """CONDITION's shape at the request's size and frame count (ditserve.wan.image_encoder)."""
        geometry = self.geometry
        latent = (params.height // geometry.spatial_factor, params.width // geometry.spatial_factor)
        if self.expand_timesteps:
            return (self.latent_channels, 1, *latent)
        frames = (params.num_frames - 1) // geometry.temporal_factor + 1
        return (self.latent_channels + geometry.temporal_factor, frames, *latent)

    def warmup_batches(self, steps: int) -> list[list[WanRequest]]:
        def with_image(request: WanRequest) -> WanRequest:
            condition = self.warmup_tensor(*self.condition_shape(request.params), dtype=torch.float32)
            embeds = self.warmup_tensor(self.image_tokens, self.transformer.config.image_dim) if self.image_tokens else None
            return dataclasses.replace(request, condition=condition, image_embeds=embeds)

        return [[with_image(r) for r in batch] for batch in super().warmup_batches(steps)]

    def parse(self, row: Row) -> WanRequest:
        request = super().parse(row)
        expected = self.condition_shape(request.params)
        # fp32, as the pipeline mixes it with the fp32 latents; the transformer input is cast afterwards.
        condition = tensor_field(row, "CONDITION", 4, self.runtime.device, torch.float32)
        if tuple(condition.shape) != expected:
            raise RequestError("CONDITION", f"expected shape {expected} for this size and frame count, got {tuple(condition.shape)}")
        image_dim = self.transformer.config.image_dim
        embeds = tensor_field(row, "IMAGE_EMBEDS", 2, self.runtime.device, self.runtime.dtype, width=image_dim)
        if image_dim is None:
            if embeds.numel():
                raise RequestError("IMAGE_EMBEDS", "this checkpoint's transformer takes no image context; expected it empty")
            embeds = None
        elif not embeds.shape[0]:
            raise RequestError("IMAGE_EMBEDS", f"expected (tokens, {image_dim}) with at least one token, "
                                               f"got shape {tuple(embeds.shape)}")
        return dataclasses.replace(request, condition=condition, image_embeds=embeds)

    def group_key(self, request: WanRequest) -> tuple:
        tokens = request.image_embeds.shape[0] if request.image_embeds is not None else 0
        return (*super().group_key(request), tokens)
