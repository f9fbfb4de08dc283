"""Sequence-parallel Wan: WanTransformer3DModel (Wan 2.1, and both Wan 2.2 experts) on a shard of its
video tokens.

The patch embedding, rotary tables and time/text embeddings are computed on the full inputs (the
tables depend on the whole latent grid; the embeddings are cheap). Every rank then runs the blocks
on its shard of the video tokens (shard.plan with ``text_len=0``: contiguous rows, padding at the
global end); all per-token work needs no communication:
* self-attention (``attn1``) runs through ``usp_attention`` with padded keys masked out, its rotary
  embedding applied before the exchange by one prologue (``WanSequenceParallelProcessor``), as FLUX's
  QK norm and rotary embedding are;
* cross-attention (``attn2``) keeps diffusers' processor: every rank holds the whole text (and, for
  I2V checkpoints, the whole image context), and cross-attention is per query row;
* image-to-video inputs need nothing more: the condition channels enter with the noise latents, so
  their tokens are the noise tokens; per-token timesteps (Wan 2.2 TI2V) give per-token modulation,
  sharded like the tokens;
* norm_out / proj_out run on the shard, then the shards are gathered and unpatchified.

    mesh = build_mesh(ulysses_degree=2, ring_degree=1)      # on every rank
    set_sequence_parallel(transformer, mesh)
    out = sp_forward(transformer, mesh, hidden_states=..., timestep=..., encoder_hidden_states=...)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from diffusers.models.transformers.transformer_wan import WanAttention

from ditserve.kernels.wan_processor import DitserveWanAttnProcessor

from .shard import local_key_mask, plan, shard
from .usp import SequenceParallelBackend, SPMesh, all_gather_image, install_processor


class WanSequenceParallelProcessor(DitserveWanAttnProcessor):
    """The self-attention of a Wan block on this rank's shard: ditserve's Wan processor
    (ditserve.kernels.wan_processor) with its backend swapped for FLUX's sequence-parallel one. The
    projections and the QK RMSNorm run as there; the rotary embedding (interleaved pairs, the rank's rows of
    the tables) goes to the backend as a prologue, which applies it before the exchange (our Triton prologue
    kernel on CUDA, torch on CPU), then the attention runs over the whole sequence.

    Only the rotary embedding can go to the prologue: Wan's QK RMSNorm is across heads (one RMS over the
    heads x head_dim features of a token, weights of that width), and the prologue normalises each head's row
    on its own with one (head_dim,) weight; so the norm stays torch, on the projections before the heads split.

    One instance serves every ``attn1`` of a transformer; ``sp_forward`` sets ``key_mask`` (this
    rank's padding) for the duration of a forward, since the blocks pass no mask to ``attn1``.
    """

    def __init__(self, mesh: SPMesh, backend: str = "sdpa") -> None:
        super().__init__(SequenceParallelBackend(mesh, backend))
        self.key_mask: Optional[torch.Tensor] = None

    def __call__(self, attn: WanAttention, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                 rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("Wan sequence-parallel processor: self-attention only, its key mask set by sp_forward")
        return super().__call__(attn, hidden_states, None, self.key_mask, rotary_emb)


def set_sequence_parallel(transformer: torch.nn.Module, mesh: SPMesh, backend: str = "sdpa") -> int:
    """Install the sequence-parallel processor on the self-attention of every block; returns how many
    (usp.install_processor)."""
    processor = WanSequenceParallelProcessor(mesh, backend)
    return install_processor(transformer, mesh, processor, (block.attn1 for block in transformer.blocks))


def sp_forward(transformer: torch.nn.Module, mesh: SPMesh, *, hidden_states: torch.Tensor, timestep: torch.Tensor,
               encoder_hidden_states: torch.Tensor,
               encoder_hidden_states_image: Optional[torch.Tensor] = None) -> torch.Tensor:
    """WanTransformer3DModel(...)[0] computed sequence-parallel; every rank of mesh.group calls it with
    the same full inputs and gets the full output (B, C, F, H, W).

    The steps around the blocks mirror WanTransformer3DModel.forward (diffusers 0.42.1): its forward
    has no seam between the full-grid embedding and the blocks other than diffusers' own
    context-parallel hooks, which are bound to diffusers' device mesh rather than ours.
    The transformer must have the sequence-parallel processors (`set_sequence_parallel`).
    """
    processor = transformer.blocks[0].attn1.processor
    if not isinstance(processor, WanSequenceParallelProcessor):
        raise ValueError("sp_forward: install the sequence-parallel processors first (set_sequence_parallel)")
    batch, _, frames, height, width = hidden_states.shape
    p_t, p_h, p_w = transformer.config.patch_size
    grid = (frames // p_t, height // p_h, width // p_w)
    p = plan(0, math.prod(grid), mesh.degree)
    rank = mesh.rank

    cos, sin = (shard(table, p, rank, dim=1, stream="image") for table in transformer.rope(hidden_states))
    tokens = transformer.patch_embedding(hidden_states).flatten(2).transpose(1, 2)
    x = shard(tokens, p, rank, dim=1, stream="image").contiguous()
    per_token = timestep.dim() == 2  # Wan 2.2 TI2V: (B, video tokens); the embeddings are per token too
    temb, timestep_proj, text, image = transformer.condition_embedder(
        timestep.flatten(), encoder_hidden_states, encoder_hidden_states_image,
        timestep_seq_len=timestep.shape[1] if per_token else None)
    if per_token:  # sharded as the tokens they modulate
        temb = shard(temb, p, rank, dim=1, stream="image")
        timestep_proj = shard(timestep_proj.unflatten(2, (6, -1)), p, rank, dim=1, stream="image")
    else:
        timestep_proj = timestep_proj.unflatten(1, (6, -1))
    if image is not None:  # I2V: the image context goes in front of the text, as diffusers does
        text = torch.cat([image, text], dim=1)

    # Without padding every key is real: no mask, so no mask exchange in every attention call.
    processor.key_mask = local_key_mask(p, rank, batch=batch, device=x.device) if p.padded != p.total else None
    try:
        for block in transformer.blocks:
            x = block(x, text, timestep_proj, (cos, sin))
    finally:
        processor.key_mask = None

    if per_token:
        shift, scale = (transformer.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
        shift, scale = shift.squeeze(2), scale.squeeze(2)
    else:
        shift, scale = (transformer.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
    x = (transformer.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
    x = transformer.proj_out(x)
    x = all_gather_image(x, p, mesh)
    # Unpatchify: (B, tokens, p_t * p_h * p_w * C) -> (B, C, F, H, W).
    x = x.reshape(batch, *grid, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
