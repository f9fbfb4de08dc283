"""What the denoiser stages of every pipeline share: batching rows by schedule, and the schedule.

Rows with the same (height, width, steps) share one timestep schedule and image token count, so
a denoiser runs them as one batched transformer forward per step, in chunks of at most
``options.max_batch_images`` images (a row is never split: its latents come from one seeded draw).
"""

from __future__ import annotations

from abc import abstractmethod
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # Qwen-Image's is a copy

from ditserve.stage import Outputs, RequestError, Row, Stage


class GroupedDenoiser(Stage):
    """Subclasses parse a row into a request with ``.params`` (``GenerationParams``) and denoise
    a list of requests of one (height, width, steps) into packed latents, one tensor each."""

    outputs = ("LATENTS",)

    @abstractmethod
    def parse(self, row: Row) -> Any: ...

    @abstractmethod
    def denoise(self, requests: list) -> list[torch.Tensor]: ...

    def execute(self, rows: Sequence[Row]) -> list[Outputs | RequestError]:
        results: list[Outputs | RequestError | None] = [None] * len(rows)
        groups: dict[tuple, list[tuple[int, Any]]] = defaultdict(list)
        for i, row in enumerate(rows):
            try:
                request = self.parse(row)
            except RequestError as error:
                results[i] = error
                continue
            groups[self.group_key(request)].append((i, request))
        for members in groups.values():
            for chunk in self._chunks(members):
                for (i, _), latents in zip(chunk, self.denoise([request for _, request in chunk])):
                    results[i] = {"LATENTS": latents}
        return results

    def group_key(self, request: Any) -> tuple:
        """Requests with equal keys run together; subclasses add what else must match (e.g. condition shapes)."""
        return (request.params.height, request.params.width, request.params.steps)

    def _chunks(self, members: list[tuple[int, Any]]) -> Iterator[list[tuple[int, Any]]]:
        chunk, images = [], 0
        for member in members:
            if chunk and images + member[1].params.num_images > self.options.max_batch_images:
                yield chunk
                chunk, images = [], 0
            chunk.append(member)
            images += member[1].params.num_images
        if chunk:
            yield chunk


def flow_match_scheduler(scheduler_class: type, scheduler_config, steps: int, image_tokens: int, device):
    """A fresh scheduler set as FluxPipeline and QwenImagePipeline set it: linear sigmas from 1 to
    1/steps and the resolution-dependent shift mu (schedulers with flow sigmas make their own)."""
    scheduler = scheduler_class.from_config(scheduler_config)
    config = scheduler.config
    mu = calculate_shift(
        image_tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    if getattr(config, "use_flow_sigmas", False):
        scheduler.set_timesteps(steps, device=device, mu=mu)
    else:
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, mu=mu)
    scheduler.set_begin_index(0)
    return scheduler
