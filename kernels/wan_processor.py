"""Attention processor for Wan's attention (diffusers 0.42.1 `WanAttnProcessor`) that runs a ditserve backend,
with Wan's rotary embedding fused into the kernel.

Every Wan block has a self-attention (`attn1`: QK RMSNorm, rotary embedding) and a cross-attention (`attn2`:
queries from the video tokens, keys and values from the text; no rotary embedding, so query and key
lengths differ). In image-to-video checkpoints with a CLIP context (Wan 2.1 I2V: `add_k_proj`), `attn2`
also attends over the image context with its own keys and values, and adds the two results.

Wan's QK norms are RMSNorms across all heads (`qk_norm="rms_norm_across_heads"`: one RMS over the
heads x head_dim features of a token), not per head: the kernel's prologue normalises each head's row
on its own, so it cannot compute them. They run here with torch, and only the rotary embedding goes to
the prologue.

    from ditserve.kernels.wan_processor import set_attention_backend
    set_attention_backend(transformer, "triton")   # or "sdpa", "triton_fp8", "diffusers"
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanAttnProcessor,
    _get_added_kv_projections,
    _get_qkv_projections,
)

from .attention import Prologue
from .processors import BackendProcessor, key_padding_mask

_WHO = "ditserve Wan processor"

# WanAttnProcessor splits the image context off the front of encoder_hidden_states by assuming the text
# after it is 512 tokens long (UMT5's padded length, hard-coded there): the same split here.
TEXT_TOKENS = 512


def rope_tables(freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (L, D) fp32, of WanRotaryPosEmbed's (1, L, 1, D) tables. WanAttnProcessor rotates
    the pair (x[2i], x[2i+1]) by cos[2i] and sin[2i + 1]; the kernel's interleaved rotation reads cos and sin
    at both columns of a pair, so each of those is repeated over its pair (Wan's tables already hold equal
    values there; taking the columns Wan reads keeps this exact whatever the tables hold)."""
    cos = freqs_cos.flatten(0, 2)[:, 0::2].repeat_interleave(2, dim=-1)
    sin = freqs_sin.flatten(0, 2)[:, 1::2].repeat_interleave(2, dim=-1)
    return cos, sin


class DitserveWanAttnProcessor(BackendProcessor):
    """Drop-in for WanAttnProcessor: same inputs and outputs, attention through a ditserve backend."""

    module_type = WanAttention
    diffusers_processor = WanAttnProcessor

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        image_context = None
        if attn.add_k_proj is not None:
            split = encoder_hidden_states.shape[1] - TEXT_TOKENS
            image_context, encoder_hidden_states = encoder_hidden_states[:, :split], encoder_hidden_states[:, split:]
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)  # across heads: not the prologue's per-head norm
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        prologue = None
        if rotary_emb is not None:
            if image_context is not None:  # the image attention would need the rotated queries the kernel never writes
                raise ValueError(f"{_WHO}: a rotary embedding with an image context (Wan rotates only in self-attention)")
            cos, sin = rope_tables(*rotary_emb)
            prologue = Prologue(cos=cos, sin=sin, interleaved=True, k_mode=self.k_mode)
        mask = key_padding_mask(attention_mask, key.shape[0], key.shape[1], _WHO)

        out = self.backend(query, key, value, mask=mask, prologue=prologue).flatten(2, 3).type_as(query)
        if image_context is not None:
            key_img, value_img = _get_added_kv_projections(attn, image_context)
            key_img = attn.norm_added_k(key_img)
            key_img, value_img = (x.unflatten(2, (attn.heads, -1)) for x in (key_img, value_img))
            out = out + self.backend(query, key_img, value_img).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


set_attention_backend = DitserveWanAttnProcessor.install
