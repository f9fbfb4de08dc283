"""Qwen-Image denoising: latents, FlowMatch Euler schedule with Qwen-Image's shift, true CFG.

Rows that share (height, width, steps) share one schedule and image token count, so they run as
one batched transformer forward per step, text padded to the longest row of the batch and masked
(``encoder_hidden_states_mask``); each row keeps its own seed and true-CFG scale. When every text
token of a batch is real the mask is dropped, as ``QwenImagePipeline.encode_prompt`` does, so a
row alone runs exactly the reference's computation. True CFG is QwenImagePipeline's
norm-preserving combination: ``comb = neg + s * (pos - neg)``, rescaled per token to the norm of
``pos``.

Qwen-Image-Edit (``QwenImageEditDenoiser``) adds the input image's latents: its tokens follow the
noise tokens in every transformer forward (``img_shapes`` lists both grids), and only the noise
tokens' prediction is kept, as ``QwenImageEditPipeline``. Rows are then also grouped by the image's
latent grid.

Parallelism (``ditserve.denoising``): the true-CFG branches on a rank each (cfg_parallel), and the
transformer sequence-parallel (sp_degree, ``ditserve.parallel.qwen_image``: Ulysses, Ring or both).
Attention: parameter ``attention_backend`` (``ditserve.denoising``); the ditserve backends run through
``ditserve.kernels.qwen_processor`` (QK RMSNorm and RoPE fused into the Triton kernel, the text mask as
its key mask).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch

from ditserve.denoising import DenoiserOptions, TransformerDenoiser, flow_match_scheduler, guide, seeded_noise
from ditserve.flux.denoiser import pack_latents
from ditserve.flux.request import GenerationParams
from ditserve.kernels.qwen_processor import set_attention_backend
from ditserve.loading import Checkpoint
from ditserve.parallel.qwen_image import set_sequence_parallel, sp_forward
from ditserve.qwen_image.request import DEFAULT_TRUE_CFG, latent_geometry, min_steps, parse_params
from ditserve.qwen_image.text_encoder import TextEncoderOptions
from ditserve.stage import ConfigError, RequestError, Row, tensor_field


QwenDenoiserOptions = DenoiserOptions  # the common image-denoiser parameters, cuda_graphs included

# The negative texts of the warm-up: short (as a negative prompt often is) and not a multiple of 16 tokens.
WARMUP_NEGATIVE_TOKENS = 7


@dataclasses.dataclass(frozen=True)
class QwenRequest:
    prompt_embeds: torch.Tensor  # (L, D), only real tokens
    negative_embeds: torch.Tensor | None
    params: GenerationParams
    image_latents: torch.Tensor | None = None  # Edit: (h/2, w/2, 4C) condition tokens on their grid

    @property
    def do_true_cfg(self) -> bool:  # QwenImagePipeline: true_cfg_scale > 1 and a negative prompt
        return self.params.true_cfg > 1 and self.negative_embeds is not None


def _real_tokens(row: Row, embeds_name: str, mask_name: str, device, dtype, width: int) -> torch.Tensor:
    """The embeddings of the real tokens, ``width`` wide: padding (mask 0) is dropped; the mask must be a prefix."""
    embeds = tensor_field(row, embeds_name, 2, device, dtype, width=width)
    if mask_name not in row:
        return embeds
    mask = row[mask_name].reshape(-1).to(device=device)
    if mask.shape[0] != embeds.shape[0]:
        raise RequestError(mask_name, f"length {mask.shape[0]} != {embeds_name} length {embeds.shape[0]}")
    length = int(mask.sum())
    if not bool((mask[:length] == 1).all()) or bool(mask[length:].any()):
        raise RequestError(mask_name, "must be ones followed by zeros")
    return embeds[:length]


def pad_texts(texts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, L_max, D) right-padded with zeros, and the (B, L_max) mask, or None when nothing is padded."""
    length = max(t.shape[0] for t in texts)
    out = texts[0].new_zeros((len(texts), length, texts[0].shape[-1]))
    mask = torch.zeros(len(texts), length, dtype=torch.int64, device=out.device)
    for i, t in enumerate(texts):
        out[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = 1
    return out, (None if bool(mask.all()) else mask)


class QwenImageDenoiser(TransformerDenoiser):
    Options = QwenDenoiserOptions
    pipeline_classes = ("QwenImagePipeline",)
    inputs = ("PROMPT_EMBEDS", "PROMPT_EMBEDS_MASK", "NEGATIVE_PROMPT_EMBEDS", "NEGATIVE_PROMPT_EMBEDS_MASK",
              *GenerationParams.fields)
    uniform_fields = GenerationParams.shape_fields

    def load_components(self, checkpoint: Checkpoint) -> None:
        if self.transformer.config.guidance_embeds:
            raise ConfigError("model_path: guidance-distilled Qwen-Image transformers are not supported")
        self.size_multiple, self.default_size = latent_geometry(checkpoint)
        self.min_steps = min_steps(checkpoint)
        self.latent_channels = self.transformer.config.in_channels // 4
        graphs = self.options.graphs_enabled(self.runtime.device)
        if graphs and self.options.sp_degree == 1:
            # diffusers' QwenImageTransformer2DModel.forward (0.42.1) turns the text length into a CUDA
            # tensor from a host int whenever a text mask is given (compute_text_seq_len_from_mask), a
            # copy CUDA graph capture refuses; the sequence-parallel forward (ditserve.parallel.qwen_image)
            # is ours and has none. Graphs pay where the step is host-bound, which is the sequence-parallel
            # one (Ulysses 2 with true CFG on H200s: 275.6 ms a step eager, 185.6 with graphs, RESULTS).
            raise ConfigError("parameter cuda_graphs: 'true' needs sp_degree > 1 for Qwen-Image (diffusers' own "
                              "forward, used on one GPU, copies host data to the GPU, which graph capture forbids)")
        self.forward = self.graphed(self._forward, graphs)

    def warmup_batches(self, steps: int) -> list[list[QwenRequest]]:
        """QwenImagePipeline's default size with true CFG, in two batches that between them call the four
        variants of our Triton kernel that requests call (Triton compiles each at its first call, ~10 s;
        ditserve.denoising): without and with the key mask (a text alone is not padded, a batch of texts
        of different lengths is), each at a sequence length that is a multiple of 16 (the positive texts:
        the text encoder's max_sequence_length) and at one that is not (the negative texts, as most texts
        are not)."""
        params = GenerationParams(height=self.default_size, width=self.default_size, steps=max(steps, self.min_steps),
                                  guidance=1.0, true_cfg=DEFAULT_TRUE_CFG, seed=0, num_images=1)

        def request(text: int, negative: int) -> QwenRequest:
            width = self.transformer.config.joint_attention_dim
            return QwenRequest(self.warmup_tensor(text, width), self.warmup_tensor(negative, width), params)

        longest = TextEncoderOptions.max_sequence_length
        alone = [request(longest, WARMUP_NEGATIVE_TOKENS)]
        if self.options.max_batch_images == 1:
            return [alone]  # no batch pads a text
        return [alone, [request(longest, WARMUP_NEGATIVE_TOKENS), request(longest // 2, WARMUP_NEGATIVE_TOKENS - 1)]]

    # --- attention (hooks of GroupedDenoiser) ----------------------------------------------

    # Rows of a batch have their own text lengths: the text is padded and masked (pad_texts).
    attention_masked = True
    # "auto": our Triton kernel with the fused QK RMSNorm + RoPE prologue: a Qwen-Image step (4096 + 256
    # tokens) took 160.1 ms against 189.6 ms with diffusers' processor on an H100 (2026-11-26, perf/RESULTS.md).
    auto_triton_on_cuda = True

    install_attention_backend = staticmethod(set_attention_backend)
    install_sequence_parallel = staticmethod(set_sequence_parallel)

    def parse(self, row: Row) -> QwenRequest:
        device, dtype = self.runtime.device, self.runtime.dtype
        width = self.transformer.config.joint_attention_dim
        prompt = _real_tokens(row, "PROMPT_EMBEDS", "PROMPT_EMBEDS_MASK", device, dtype, width)
        if prompt.shape[0] == 0:
            raise RequestError("PROMPT_EMBEDS", "has no tokens")
        negative = None
        if "NEGATIVE_PROMPT_EMBEDS" in row and row["NEGATIVE_PROMPT_EMBEDS"].numel() > 0:
            negative = _real_tokens(row, "NEGATIVE_PROMPT_EMBEDS", "NEGATIVE_PROMPT_EMBEDS_MASK", device, dtype, width)
        return QwenRequest(prompt, negative, parse_params(row, self.size_multiple, self.default_size, self.min_steps))

    def _forward(self, *, hidden_states: torch.Tensor, image_tokens: Optional[torch.Tensor], shapes: tuple,
                 **inputs: Optional[torch.Tensor]) -> torch.Tensor:
        """One transformer call (sequence-parallel on the group's mesh when there is one): the noise tokens'
        prediction. Edit's input-image tokens follow the noise tokens; `shapes` are the (frames, h, w)
        latent grids of both, the same for every row."""
        noise_tokens = hidden_states.shape[1]
        if image_tokens is not None:
            hidden_states = torch.cat([hidden_states, image_tokens], dim=1)
        inputs.update(hidden_states=hidden_states, img_shapes=[list(shapes)] * hidden_states.shape[0])
        mesh = self.parallel.mesh if self.parallel is not None else None
        if mesh is not None:
            return sp_forward(self.transformer, mesh, **inputs)[:, :noise_tokens]
        return self.transformer(**inputs, guidance=None, return_dict=False)[0][:, :noise_tokens]

    @torch.inference_mode()
    def denoise(self, requests: list[QwenRequest]) -> list[torch.Tensor]:
        """Denoise requests of one (height, width, steps): per request (num_images, h/2, w/2, 4C) fp32,
        the packed tokens on their 2x2-patch grid (the layout flux_vae_decoder also takes)."""
        device, dtype = self.runtime.device, self.runtime.dtype
        first = requests[0]
        latent_h = 2 * (first.params.height // self.size_multiple)
        latent_w = 2 * (first.params.width // self.size_multiple)
        counts = [r.params.num_images for r in requests]
        # QwenImagePipeline draws (n, 1, C, h, w): the same numbers.
        latents = pack_latents(seeded_noise(requests, (self.latent_channels, latent_h, latent_w), device, dtype))
        prompt, prompt_mask = pad_texts([r.prompt_embeds for r, n in zip(requests, counts) for _ in range(n)])
        shapes = [(1, latent_h // 2, latent_w // 2)]
        image_tokens = None
        if first.image_latents is not None:  # one grid per group (group_key)
            grids = torch.cat([r.image_latents.expand(n, -1, -1, -1) for r, n in zip(requests, counts)])
            shapes.append((1, *grids.shape[1:3]))
            image_tokens = grids.flatten(1, 2)
        shapes = tuple(shapes)  # hashable: part of a CUDA graph's signature (the rotary positions come from it)

        cfg_requests = [(r, n) for r, n in zip(requests, counts) if r.do_true_cfg]
        cfg_index = torch.tensor(
            [j for r, start, n in zip(requests, np.cumsum([0, *counts]), counts) if r.do_true_cfg for j in range(start, start + n)],
            dtype=torch.long,
            device=device,
        )
        if cfg_requests:
            negative, negative_mask = pad_texts([r.negative_embeds for r, n in cfg_requests for _ in range(n)])
            scales = torch.tensor(
                [r.params.true_cfg for r, n in cfg_requests for _ in range(n)], device=device, dtype=torch.float32
            ).view(-1, 1, 1)

        def transformer(hidden, timestep, text, mask, images):
            return self.forward(hidden_states=hidden, timestep=timestep, encoder_hidden_states=text,
                                encoder_hidden_states_mask=mask, image_tokens=images, shapes=shapes)

        scheduler = flow_match_scheduler(
            self.scheduler_class, self.scheduler_config, first.params.steps, latents.shape[1], self.runtime.device
        )
        with self.attention_context():
            for t in self.steps(scheduler.timesteps):
                timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
                negative_branch = None
                if cfg_requests:
                    negative_images = None if image_tokens is None else image_tokens[cfg_index]
                    negative_branch = lambda: transformer(  # noqa: E731
                        latents[cfg_index], timestep[cfg_index], negative, negative_mask, negative_images
                    )
                prediction, negative_prediction = self.branches(
                    lambda: transformer(latents, timestep, prompt, prompt_mask, image_tokens),
                    negative_branch,
                    like=latents,
                    negative_like=latents[cfg_index] if cfg_requests else None,
                )
                if cfg_requests:
                    positive = prediction[cfg_index]
                    combined = guide(negative_prediction, positive, scales)
                    positive_norm = torch.norm(positive, dim=-1, keepdim=True)
                    combined_norm = torch.norm(combined, dim=-1, keepdim=True)
                    prediction[cfg_index] = combined * (positive_norm / combined_norm)
                latents = scheduler.step(prediction, t, latents, return_dict=False)[0]

        grid = latents.float().view(latents.shape[0], latent_h // 2, latent_w // 2, latents.shape[-1])
        return list(grid.split(counts))


class QwenImageEditDenoiser(QwenImageDenoiser):
    """``QwenImageDenoiser`` with the input image's latents (IMAGE_LATENTS, from qwen_image_edit_vae_encoder)."""

    inputs = (*QwenImageDenoiser.inputs, "IMAGE_LATENTS")
    # Not QwenImageEditPlusPipeline (Qwen-Image-Edit-2509/-2511: several input images, a "Picture N:" template).
    pipeline_classes = ("QwenImageEditPipeline",)

    def parse(self, row: Row) -> QwenRequest:
        request = super().parse(row)
        latents = tensor_field(row, "IMAGE_LATENTS", 3, self.runtime.device, self.runtime.dtype,
                               width=4 * self.latent_channels)
        return dataclasses.replace(request, image_latents=latents)

    def group_key(self, request: QwenRequest) -> tuple:
        return (*super().group_key(request), tuple(request.image_latents.shape))

    def warmup_batches(self, steps: int) -> list[list[QwenRequest]]:
        # Qwen-Image's batches with an input image of the default size (qwen_image_edit_request's default
        # condition_area, 1024 x 1024, gives it for square images). Edit's texts hold the image's vision
        # tokens, so they are longer; the kernel variants are the same.
        grid = self.default_size // self.size_multiple
        latents = self.warmup_tensor(grid, grid, 4 * self.latent_channels)
        batches = super().warmup_batches(steps)
        return [[dataclasses.replace(r, image_latents=latents) for r in batch] for batch in batches]
