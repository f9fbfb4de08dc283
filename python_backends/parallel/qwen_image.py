"""Sequence-parallel Qwen-Image: QwenImageTransformer2DModel (Qwen-Image and Qwen-Image-Edit) on a shard
of its joint text + image sequence.

Qwen's joint attention concatenates text before image, which is shard.plan's order: rank ``r`` holds
its text rows, then its image rows, then padding (at the global end only). The text embedding, the
timestep embedding and the rotary tables are computed on the full inputs (the tables depend on the
whole image grid(s) and the text length); the tables are then sharded with the tokens. Every rank
runs the blocks on its shard:
* the two streams keep their own modulation, norms and MLPs (per token, no communication); a rank
  may hold no text rows or no image rows, and every per-token op takes an empty stream;
* the joint attention runs through ``usp_attention``, its key mask the text mask (``encoder_hidden_states_mask``,
  sharded with the text tokens) with the padding rows masked out; Q and K are normalised and rotated
  before the exchange by one prologue (``QwenSequenceParallelProcessor``), as FLUX's are;
* norm_out / proj_out run on the image shard, then the image tokens are gathered.
For Qwen-Image-Edit the image stream is the noise tokens followed by the input image's tokens
(``img_shapes`` with two grids): the rotary table lists both grids in that order, so sharding it as
one image stream keeps every token's position.

Transformers with ``zero_cond_t`` (Qwen-Image-Edit-2511) embed the timestep twice, the second time as 0,
and modulate each image token with one of the two: the noise tokens (each sample's first grid) with the
timestep, the condition-image tokens (the grids after it) with 0; the text stream and ``norm_out`` take
the first. That choice is a per-token index over the image stream (``condition_index``), so it is
sharded with the image tokens like the rotary table.

    mesh = build_mesh(ulysses_degree=2, ring_degree=1)      # on every rank
    set_sequence_parallel(transformer, mesh)
    out = sp_forward(transformer, mesh, hidden_states=..., encoder_hidden_states=...,
                     encoder_hidden_states_mask=..., timestep=..., img_shapes=...)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from diffusers.models.attention_processor import Attention

from ditserve.kernels.processors import key_padding_mask
from ditserve.kernels.qwen_processor import DitserveQwenAttnProcessor

from .shard import local_key_mask, plan, shard
from .usp import SequenceParallelBackend, SPMesh, all_gather_image, install_processor


class QwenSequenceParallelProcessor(DitserveQwenAttnProcessor):
    """ditserve's Qwen-Image processor (ditserve.kernels.qwen_processor) on this rank's shard, its backend
    swapped for FLUX's sequence-parallel one: the same projections, then the per-stream per-head QK RMSNorms
    and the rotary embedding as one prologue (the rank's text row count as its norm split, the rank's rows of
    the rotary table), applied before the exchange (our Triton prologue kernel on CUDA, torch on CPU), then
    the joint [text, image] attention over the whole sequence.

    ``attention_mask`` is this rank's (B, local_len) joint key mask (True = attend), passed by ``sp_forward``
    through the blocks' attention kwargs; the text mask is part of it, so ``encoder_hidden_states_mask`` is None.
    """

    def __init__(self, mesh: SPMesh, backend: str = "sdpa") -> None:
        super().__init__(SequenceParallelBackend(mesh, backend))

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 encoder_hidden_states_mask: None = None, attention_mask: Optional[torch.Tensor] = None,
                 image_rotary_emb: Optional[tuple] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states_mask is not None:
            raise ValueError("Qwen-Image sequence-parallel processor: the text mask must come as part of the joint "
                             "attention_mask (sp_forward builds it)")
        batch, length = hidden_states.shape[0], encoder_hidden_states.shape[1] + hidden_states.shape[1]
        mask = key_padding_mask(attention_mask, batch, length, "Qwen-Image sequence-parallel processor")
        return self.joint_attention(attn, hidden_states, encoder_hidden_states, mask, image_rotary_emb)


def set_sequence_parallel(transformer: torch.nn.Module, mesh: SPMesh, backend: str = "sdpa") -> int:
    """Install the sequence-parallel processor on every block's attention; returns how many (usp.install_processor)."""
    processor = QwenSequenceParallelProcessor(mesh, backend)
    return install_processor(transformer, mesh, processor, (block.attn for block in transformer.transformer_blocks))


def condition_index(img_shapes: list, device: torch.device) -> torch.Tensor:
    """zero_cond_t's (B, image tokens) modulation index, as QwenImageTransformer2DModel.forward builds it:
    0 for the tokens of each sample's first grid (noise), 1 for those of the grids after it (condition images).
    Filled on the device, never copied from the host: a CUDA graph captures this (cuda_graphs)."""
    tokens = sum(math.prod(grid) for grid in img_shapes[0])
    index = torch.zeros(len(img_shapes), tokens, dtype=torch.int, device=device)
    for row, grids in zip(index, img_shapes):
        row[math.prod(grids[0]):] = 1
    return index


def sp_forward(transformer: torch.nn.Module, mesh: SPMesh, *, hidden_states: torch.Tensor,
               encoder_hidden_states: torch.Tensor, encoder_hidden_states_mask: Optional[torch.Tensor],
               timestep: torch.Tensor, img_shapes: list) -> torch.Tensor:
    """QwenImageTransformer2DModel(...)[0] (no guidance) computed sequence-parallel; every rank of
    mesh.group calls it with the same full inputs and gets the full output (B, image tokens, C).

    The steps around the blocks mirror QwenImageTransformer2DModel.forward (diffusers 0.42.1): the
    rotary tables are built inside it from the whole grids and text length, with no seam to shard
    them before the blocks other than diffusers' own context-parallel hooks (bound to its mesh).
    The transformer must have the sequence-parallel processors (`set_sequence_parallel`).
    """
    if not isinstance(transformer.transformer_blocks[0].attn.processor, QwenSequenceParallelProcessor):
        raise ValueError("sp_forward: install the sequence-parallel processors first (set_sequence_parallel)")
    batch, image_len = hidden_states.shape[:2]
    text_len = encoder_hidden_states.shape[1]
    p = plan(text_len, image_len, mesh.degree)
    rank = mesh.rank

    x = transformer.img_in(shard(hidden_states, p, rank, dim=1, stream="image"))
    text = shard(encoder_hidden_states, p, rank, dim=1, stream="text")
    text = transformer.txt_in(transformer.txt_norm(text))
    timestep = timestep.to(x.dtype)
    modulate_index = None
    if transformer.config.zero_cond_t:
        timestep = torch.cat([timestep, timestep * 0])  # temb: (2B, D), the second half at timestep 0
        # Padding rows get index 0 (the `shard` pad value): computed, then dropped at gather.
        modulate_index = shard(condition_index(img_shapes, x.device), p, rank, dim=1, stream="image")
    temb = transformer.time_text_embed(timestep, x)
    img_freqs, txt_freqs = transformer.pos_embed(img_shapes, max_txt_seq_len=text_len, device=x.device)
    rotary = (shard(img_freqs, p, rank, dim=0, stream="image"), shard(txt_freqs, p, rank, dim=0, stream="text"))

    # The joint key mask: the text mask, image keys all real, this rank's padding rows masked out.
    # Without text padding nor shard padding every key is real: no mask exchange in every attention call.
    joint = None
    if encoder_hidden_states_mask is not None:
        joint = torch.cat([encoder_hidden_states_mask.bool(),
                           torch.ones(batch, image_len, dtype=torch.bool, device=x.device)], dim=1)
    mask = None
    if joint is not None or p.padded != p.total:
        mask = local_key_mask(p, rank, joint, batch=batch, device=x.device)

    for block in transformer.transformer_blocks:
        text, x = block(hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=None, temb=temb,
                        image_rotary_emb=rotary, joint_attention_kwargs={"attention_mask": mask},
                        modulate_index=modulate_index)
    if modulate_index is not None:
        temb = temb.chunk(2)[0]  # the output norm is modulated by the timestep alone
    x = transformer.proj_out(transformer.norm_out(x, temb))

    return all_gather_image(x, p, mesh)
