"""Attention processor for Qwen-Image's joint attention (diffusers 0.42.1 `QwenDoubleStreamAttnProcessor2_0`)
that runs a ditserve backend with the fused RMSNorm + RoPE prologue.

diffusers' processor runs, per block: four per-head RMSNorms (norm_q/norm_k on the image stream,
norm_added_q/norm_added_k on the text stream), four complex rotary embeddings (each through
view_as_complex in fp32), the [text, image] concatenation, and SDPA with the joint key mask (the text
mask; image keys are all real). Here the raw projections are concatenated once and the backend gets the
norm weights (text rows: norm_added_*, image rows: norm_*), the rotary table as (L, D) cos/sin, and the
text mask as its key-padding mask; the `triton` backend normalises and rotates Q and K inside the kernel.

    from ditserve.kernels.qwen_processor import set_attention_backend
    set_attention_backend(transformer, "triton")   # or "sdpa", "triton_fp8", "diffusers"
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

from .attention import Prologue
from .processors import BackendProcessor, key_padding_mask, norm_eps, norm_weight

_WHO = "ditserve Qwen-Image processor"


def rope_tables(img_freqs: torch.Tensor, txt_freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (text + image tokens, D) fp32, of Qwen-Image's complex rotary frequencies ((L, D/2)
    per stream). apply_rotary_emb_qwen(use_real=False) multiplies the pair (x[2i], x[2i+1]) as a complex
    number by freqs[i]: the kernel's interleaved rotation with cos = Re freqs[i] and sin = Im freqs[i] on both
    columns of the pair."""
    freqs = torch.cat([txt_freqs, img_freqs])
    return freqs.real.repeat_interleave(2, dim=-1), freqs.imag.repeat_interleave(2, dim=-1)


class DitserveQwenAttnProcessor(BackendProcessor):
    """Drop-in for QwenDoubleStreamAttnProcessor2_0: same inputs and outputs, attention through a ditserve
    backend. Returns (image stream output, text stream output)."""

    module_type = Attention
    diffusers_processor = QwenDoubleStreamAttnProcessor2_0

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_hidden_states_mask: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # diffusers' processor refuses both cases too: the joint mask is built from the text mask.
        if encoder_hidden_states is None:
            raise ValueError(f"{_WHO}: needs encoder_hidden_states (the text stream)")
        if attention_mask is not None:
            raise ValueError(f"{_WHO}: takes the text mask as encoder_hidden_states_mask, not an attention_mask")
        batch, text_len = encoder_hidden_states.shape[:2]
        mask = key_padding_mask(encoder_hidden_states_mask, batch, text_len, _WHO)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(batch, hidden_states.shape[1])], dim=1)
        return self.joint_attention(attn, hidden_states, encoder_hidden_states, mask, image_rotary_emb)

    def joint_attention(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        key_mask: Optional[torch.Tensor],
        image_rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The joint [text, image] attention with `key_mask`, a bool (B, text + image) key mask (True = attend)
        or None. Either stream may be empty (a sequence-parallel shard holding only text or only image rows)."""
        d = attn.inner_dim // attn.heads
        text_len = encoder_hidden_states.shape[1]

        def joint(text_proj: torch.nn.Module, image_proj: torch.nn.Module) -> torch.Tensor:
            return torch.cat([text_proj(encoder_hidden_states), image_proj(hidden_states)], dim=1).unflatten(-1, (-1, d))

        query = joint(attn.add_q_proj, attn.to_q)
        key = joint(attn.add_k_proj, attn.to_k)
        value = joint(attn.add_v_proj, attn.to_v)
        norms = (attn.norm_added_q, attn.norm_q, attn.norm_added_k, attn.norm_k)
        qw, kw = (torch.stack([norm_weight(text, d, query, _WHO), norm_weight(image, d, query, _WHO)])
                  for text, image in (norms[:2], norms[2:]))
        cos, sin = rope_tables(*image_rotary_emb) if image_rotary_emb is not None else (None, None)
        prologue = Prologue(q_weight=qw, k_weight=kw, eps=norm_eps(norms, query.dtype, _WHO), norm_split=text_len,
                            cos=cos, sin=sin, interleaved=True, k_mode=self.k_mode)

        out = self.backend(query, key, value, mask=key_mask, prologue=prologue).flatten(2, 3).to(query.dtype)
        text_out, image_out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        image_out = attn.to_out[0](image_out.contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)  # dropout
        return image_out, attn.to_add_out(text_out.contiguous())


set_attention_backend = DitserveQwenAttnProcessor.install
