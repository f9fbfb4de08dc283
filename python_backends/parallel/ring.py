"""Ring attention: each rank keeps its query block and the key/value blocks travel around the ring.

Partial results over disjoint key blocks merge exactly through their log-sum-exp (`merge`), so the
result equals attention over the whole sequence up to fp32 rounding. Each step posts the send of the
current K/V block to the next rank and the receive from the previous one before computing on the
current block, so on NCCL the transfer overlaps the attention of the block in hand.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from ditserve.kernels import attention as _attn
from ditserve.kernels.registry import get_backend

from ._comm import all_gather_mask


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of attention over two disjoint key sets.

    out_*: (B, L, H, D); lse_*: (B, H, L) natural-log fp32, -inf where a row saw no key (its out is 0).
    Returns (out fp32, lse): out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse), lse = logaddexp.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    # Rows with no key on either side have lse = -inf: give them weight 0, not exp(nan).
    safe = torch.where(torch.isinf(lse), 0.0, lse)
    w_a = torch.exp(lse_a - safe).transpose(1, 2).unsqueeze(-1)  # (B, L, H, 1)
    w_b = torch.exp(lse_b - safe).transpose(1, 2).unsqueeze(-1)
    return out_a.float() * w_a + out_b.float() * w_b, lse


# Backends whose block attention returns the log-sum-exp that merging needs.
RING_BACKENDS = ("triton", "sdpa")


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                    backend: str = "sdpa") -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over one key block with its LSE: (out (B, Lq, H, D), lse (B, H, Lq) fp32).

    backend "triton": the ditserve kernel (return_lse=True), out in q's dtype. "sdpa": fp32 torch maths
    (fp32 out, scores materialised: O(Lq * Lk) memory), the reference, since SDPA returns no LSE.
    The other registry backends return no LSE and cannot be merged.
    """
    if backend == "triton":
        get_backend("triton").check(q, k, v, mask)
        return _attn.attention(q, k, v, mask=mask, layout="BLHD", return_lse=True)
    if backend not in RING_BACKENDS:
        raise ValueError(f"ring attention needs the log-sum-exp of each block: backend must be one of "
                         f"{RING_BACKENDS}, got {backend!r}")
    scores = torch.einsum("blhd,bmhd->bhlm", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("bhlm,bmhd->blhd", probs, v.float()), lse  # fp32: merged before rounding


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, *,
                   mask: Optional[torch.Tensor] = None, backend: str = "sdpa") -> torch.Tensor:
    """Attention of the local queries over the keys of every rank of `group`.

    q, k, v: this rank's (B, L/P, H, D) shards (the same shape on every rank, see shard.plan);
    mask: this rank's (B, L/P) key-padding mask, True = attend (padding rows False). Returns (B, L/P, H, D).
    """
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    masks = all_gather_mask(mask, group) if mask is not None else [None] * size
    send_to = dist.get_global_rank(group, (rank + 1) % size)
    recv_from = dist.get_global_rank(group, (rank - 1) % size)
    kv = torch.stack([k, v]).contiguous()
    out = lse = None
    for step in range(size):
        pending = []
        if step + 1 < size:
            incoming = torch.empty_like(kv)
            pending = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, send_to, group),
                                              dist.P2POp(dist.irecv, incoming, recv_from, group)])
        source = (rank - step) % size  # the rank whose K/V block is in hand
        block_out, block_lse = block_attention(q, kv[0], kv[1], masks[source], backend)
        out, lse = (block_out, block_lse) if out is None else merge(out, lse, block_out, block_lse)
        for request in pending:
            request.wait()
        if pending:
            kv = incoming
    return out.to(q.dtype)
