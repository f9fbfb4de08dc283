"""Attention processor for diffusers' FluxAttention (0.42.1) that runs a ditserve backend with the fused
RMSNorm + RoPE prologue.

diffusers' FluxAttnProcessor runs, per block: norm_q, norm_k (and norm_added_q/k in double blocks), a
concatenation of the text and image streams, two rotary embeddings (each several fp32 elementwise ops),
then attention on (B, H, L, D) transposes. Here the raw projections are concatenated once and the
backend gets the normalisation weights (text rows: norm_added_*, image rows: norm_*) and the RoPE tables,
which the `triton` backend applies inside the kernel; the output comes back in (B, L, H, D), which
`flatten(2, 3)` hands to the output projections without a copy.

    from ditserve.kernels.flux_processor import set_attention_backend
    set_attention_backend(transformer, "triton")   # or "sdpa", "triton_fp8", "flash_attn"
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers.models.transformers.transformer_flux import (
    FluxAttention,
    FluxAttnProcessor,
    _get_qkv_projections,
)

from .attention import Prologue
from .processors import BackendProcessor, key_padding_mask, norm_eps, norm_weight


_WHO = "ditserve FLUX processor"


class DitserveFluxAttnProcessor(BackendProcessor):
    """Drop-in for FluxAttnProcessor: same inputs and outputs, attention through a ditserve backend."""

    module_type = FluxAttention
    diffusers_processor = FluxAttnProcessor

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        query, key, value, enc_q, enc_k, enc_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        d = attn.head_dim
        query, key, value = (x.unflatten(-1, (-1, d)) for x in (query, key, value))
        norms = [attn.norm_q, attn.norm_k]
        qw = norm_weight(attn.norm_q, d, query, _WHO)
        kw = norm_weight(attn.norm_k, d, key, _WHO)
        split = 0
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            enc_q, enc_k, enc_v = (x.unflatten(-1, (-1, d)) for x in (enc_q, enc_k, enc_v))
            split = enc_q.shape[1]
            query = torch.cat([enc_q, query], dim=1)
            key = torch.cat([enc_k, key], dim=1)
            value = torch.cat([enc_v, value], dim=1)
            qw = torch.stack([norm_weight(attn.norm_added_q, d, query, _WHO), qw])
            kw = torch.stack([norm_weight(attn.norm_added_k, d, key, _WHO), kw])
            norms += [attn.norm_added_q, attn.norm_added_k]
        cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
        prologue = Prologue(q_weight=qw, k_weight=kw, eps=norm_eps(norms, query.dtype, _WHO), norm_split=split,
                            cos=cos, sin=sin, interleaved=True, k_mode=self.k_mode)
        mask = key_padding_mask(attention_mask, key.shape[0], key.shape[1], _WHO)

        hidden_states = self.backend(query, key, value, mask=mask, prologue=prologue)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


set_attention_backend = DitserveFluxAttnProcessor.install
