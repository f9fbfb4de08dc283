"""Sequence-parallel Wan: WanTransformer3DModel (Wan 2.1, and both Wan 2.2 experts) on a shard of its
video tokens.

The patch embedding, rotary tables and time/text embeddings are computed on the full inputs (the
tables depend on the whole latent grid; the embeddings are cheap). Every rank then runs the blocks
on its shard of the video tokens (shard.plan with ``text_len=0``: contiguous rows, padding at the
global end); all per-token work needs no communication:
* self-attention (``attn1``) runs through ``usp_attention`` with padded keys masked out;
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
import torch.distributed as dist
from diffusers.models.transformers.transformer_wan import WanAttention, _get_qkv_projections

from .shard import gather, local_key_mask, plan, shard
from .ulysses import check_heads
from .usp import SPMesh, usp_attention


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """WanAttnProcessor's rotary embedding (interleaved pairs; diffusers nests it in __call__, so it
    cannot be imported): x (B, L, H, D), tables (1, L, 1, D) fp32, result in x's dtype."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class WanSequenceParallelProcessor:
    """The self-attention of a Wan block on this rank's shard: WanAttnProcessor's projections, QK
    RMSNorm (across heads, per token) and rotary embedding, then attention over the whole sequence.

    One instance serves every ``attn1`` of a transformer; ``sp_forward`` sets ``key_mask`` (this
    rank's padding) for the duration of a forward, since the blocks pass no mask to ``attn1``.
    """

    def __init__(self, mesh: SPMesh, backend: str = "sdpa") -> None:
        self.mesh = mesh
        self.backend = backend
        self.key_mask: Optional[torch.Tensor] = None

    def __call__(self, attn: WanAttention, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        out = usp_attention(query, key, value, self.mesh, mask=self.key_mask, backend=self.backend)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def set_sequence_parallel(transformer: torch.nn.Module, mesh: SPMesh, backend: str = "sdpa") -> int:
    """Install the sequence-parallel processor on the self-attention of every block; returns how many.

    Raises ValueError when ulysses_degree does not divide the head count (checked here, at load,
    rather than in the first request).
    """
    check_heads(transformer.config.num_attention_heads, mesh.layout.ulysses_degree)
    processor = WanSequenceParallelProcessor(mesh, backend)
    for block in transformer.blocks:
        block.attn1.set_processor(processor)
    return len(transformer.blocks)


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
    parts = [torch.empty_like(x) for _ in range(mesh.degree)]
    dist.all_gather(parts, x.contiguous(), group=mesh.group)
    x = gather(parts, p, dim=1, stream="image")
    # Unpatchify: (B, tokens, p_t * p_h * p_w * C) -> (B, C, F, H, W).
    x = x.reshape(batch, *grid, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
