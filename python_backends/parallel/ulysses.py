"""Ulysses attention: all_to_all from sequence shards to head shards, full-sequence attention on
H/P heads, all_to_all back.

Rank r of the group attends with heads [r * H/P, (r + 1) * H/P) over the whole sequence, so the
degree must divide the head count. The sequence shards are contiguous and in rank order
(shard.plan), so gathering the sequence is a plain concatenation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ditserve.kernels.registry import get_backend

from ._comm import all_gather_mask

# (q, k, v, key mask) -> out, all (B, L, H, D) with mask (B, L) or None.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def check_heads(heads: int, ulysses_degree: int) -> None:
    if heads % ulysses_degree:
        raise ValueError(f"ulysses_degree={ulysses_degree} does not divide the {heads} attention heads: "
                         f"choose a ulysses_degree that divides {heads} and put the rest of the sequence "
                         f"parallelism in ring_degree")


# Writes prepared Q (index 0) or K (index 1) heads into a send buffer: (index, a (B, L/P, H/P, D) slice,
# its (B, L/P, H/P, D) strided destination). FLUX passes its QK norm + RoPE prologue here, so the
# normalised Q and K are written once, straight into the buffer. V is sent as it is.
Prepare = Callable[[int, torch.Tensor, torch.Tensor], None]


def seq_to_heads(xs: Sequence[torch.Tensor], group: dist.ProcessGroup,
                 prepare: Optional[Prepare] = None) -> list[torch.Tensor]:
    """(B, L/P, H, D) sequence shards -> (B, L, H/P, D) head shards (whole sequence), all tensors of
    one shape in one all_to_all: one collective for Q, K and V instead of three, fewer launches for a
    step that is host-bound once it is split (FLUX at 1024x1024 on 2-4 GPUs, perf/RESULTS.md).

    Layout: the chunk for rank j is (B, L/P, N, H/P, D), the N tensors interleaved per token, so what
    arrives (rank i's tokens in chunk i) is (P, B, L/P, N, H/P, D): with B == 1 each tensor is a
    (1, L, H/P, D) view with token stride N * H/P * D, which the attention kernels take as it is.
    Packing tensor-major (a stack and a permuted copy) and unpacking with three more copies took ~7 ms
    of a 93 ms Ulysses-2 FLUX step (H200 profile, 2026-11-26); now the only copy is into the send
    buffer, and `prepare` can make even that one the prologue's own output.
    """
    size = dist.get_world_size(group)
    b, lp, h, d = xs[0].shape
    hp = h // size
    send = xs[0].new_empty(size, b, lp, len(xs), hp, d)
    for n, x in enumerate(xs):
        if prepare is None or n > 1:
            send[:, :, :, n].copy_(x.unflatten(2, (size, hp)).permute(2, 0, 1, 3, 4))
        else:
            for j in range(size):
                prepare(n, x[:, :, j * hp:(j + 1) * hp], send[j, :, :, n])
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i]: rank i's tokens, our heads
    # A view when B == 1 (rank-i chunks are adjacent token runs); reshape copies otherwise.
    return [recv[:, :, :, n].transpose(0, 1).reshape(b, size * lp, hp, d) for n in range(len(xs))]


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Inverse of seq_to_heads: (B, L, H/P, D) -> (B, L/P, H, D)."""
    size = dist.get_world_size(group)
    b, l, hp, d = x.shape
    send = x.reshape(b, size, l // size, hp, d).permute(1, 0, 2, 3, 4).contiguous()  # tokens of rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i]: our tokens, rank i's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, l // size, size * hp, d)


def backend_attend(backend: str) -> Attend:
    fn = get_backend(backend)
    return lambda q, k, v, mask: fn(q, k, v, mask=mask)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, *,
                      mask: Optional[torch.Tensor] = None, backend: str = "sdpa",
                      attend: Optional[Attend] = None, prepare: Optional[Prepare] = None) -> torch.Tensor:
    """Attention of the local queries over the whole sequence of `group`.

    q, k, v: this rank's (B, L/P, H, D) shards; mask: this rank's (B, L/P) key mask (True = attend).
    backend: a ditserve.kernels.registry name; attend: an explicit attention function over the
    gathered sequence instead (USP passes ring attention here); prepare: see seq_to_heads. Returns
    (B, L/P, H, D).
    """
    check_heads(q.shape[2], dist.get_world_size(group))
    attend = attend or backend_attend(backend)
    full_mask = torch.cat(all_gather_mask(mask, group), dim=1) if mask is not None else None
    out = attend(*seq_to_heads((q, k, v), group, prepare), full_mask)
    return heads_to_seq(out, group)
