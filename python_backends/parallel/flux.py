"""Sequence-parallel FLUX: FluxTransformer2DModel on a shard of its joint text + image sequence.

Every rank runs the whole transformer on its shard (shard.plan: text rows, image rows, end padding);
all per-token work (projections, MLPs, norms, AdaLN modulation) needs no communication, and the
joint attention of every block runs through `usp_attention`. The processor is ditserve's FLUX
processor (ditserve.kernels.flux_processor) with its backend swapped for a sequence-parallel one, so
the projection, norm and output code is shared: on a shard the processor's norm split is the rank's
own text row count and its rotary tables are those of the rank's own ids, which is what the
per-row prologue needs.

    mesh = build_mesh(ulysses_degree=2, ring_degree=1)      # on every rank
    set_sequence_parallel(transformer, mesh)
    out = sp_forward(transformer, mesh, hidden_states=..., encoder_hidden_states=..., txt_ids=...,
                     img_ids=..., timestep=..., pooled_projections=..., guidance=...)
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from diffusers.models.transformers.transformer_flux import FluxAttention

from ditserve.kernels.flux_processor import DitserveFluxAttnProcessor

from .shard import local_key_mask, plan, shard
from .usp import SequenceParallelBackend, SPMesh, all_gather_image, install_processor


def set_sequence_parallel(transformer: torch.nn.Module, mesh: SPMesh, backend: str = "sdpa") -> int:
    """Install the sequence-parallel processor on every FluxAttention; returns how many (usp.install_processor)."""
    processor = DitserveFluxAttnProcessor(SequenceParallelBackend(mesh, backend))
    attentions = (m for m in transformer.modules() if isinstance(m, FluxAttention))
    return install_processor(transformer, mesh, processor, attentions)


def sp_forward(transformer: torch.nn.Module, mesh: SPMesh, *, hidden_states: torch.Tensor,
               encoder_hidden_states: torch.Tensor, txt_ids: torch.Tensor, img_ids: torch.Tensor,
               joint_attention_kwargs: Optional[dict[str, Any]] = None, **kwargs: Any) -> torch.Tensor:
    """FluxTransformer2DModel(...)[0] computed sequence-parallel; every rank of mesh.group calls it with
    the same full inputs and gets the full output (B, image tokens, C).

    The transformer must have the sequence-parallel processors (`set_sequence_parallel`).
    """
    batch, image_len = hidden_states.shape[:2]
    p = plan(encoder_hidden_states.shape[1], image_len, mesh.degree)
    rank = mesh.rank
    # Without padding every key is real: no mask, so no mask exchange in every attention call and
    # the kernels' unmasked path.
    mask = local_key_mask(p, rank, batch=batch, device=hidden_states.device) if p.padded != p.total else None
    local = transformer(
        hidden_states=shard(hidden_states, p, rank, dim=1, stream="image"),
        encoder_hidden_states=shard(encoder_hidden_states, p, rank, dim=1, stream="text"),
        txt_ids=shard(txt_ids, p, rank, dim=0, stream="text"),
        img_ids=shard(img_ids, p, rank, dim=0, stream="image"),
        joint_attention_kwargs={**(joint_attention_kwargs or {}), "attention_mask": mask},
        return_dict=False,
        **kwargs,
    )[0]
    return all_gather_image(local, p, mesh)
