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


class HeadsError(ValueError):
    """A Ulysses layout that does not fit the head count; `parameter` is the model parameter at fault."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


def check_heads(heads: int, ulysses_degree: int, chunks: int = 1) -> None:
    """chunks: ulysses_attention's (0: auto_chunks, which always fits)."""
    if heads % ulysses_degree:
        raise HeadsError("ulysses_degree",
                         f"ulysses_degree={ulysses_degree} does not divide the {heads} attention heads: "
                         f"choose a ulysses_degree that divides {heads} and put the rest of the sequence "
                         f"parallelism in ring_degree")
    if chunks and (heads // ulysses_degree) % chunks:
        raise HeadsError("ulysses_chunks",
                         f"ulysses_chunks={chunks} does not divide the {heads // ulysses_degree} heads a rank "
                         f"attends with (ulysses_degree {ulysses_degree})")


# Writes prepared Q (index 0) or K (index 1) heads into a send buffer: (index, the (B, L/P, P, hc, D) heads of one
# chunk for every rank, their strided destination of that shape). FLUX passes its QK norm + RoPE prologue here, so
# the normalised Q and K are written once, straight into the buffer. V is sent as it is.
Prepare = Callable[[int, torch.Tensor, torch.Tensor], None]


def seq_to_heads_send(xs: Sequence[torch.Tensor], size: int, prepare: Optional[Prepare] = None, chunk: int = 0,
                      chunks: int = 1) -> torch.Tensor:
    """The send buffer from (B, L/P, H, D) sequence shards to head shards: (P, B, L/P, N, hc, D), for each rank j
    head chunk `chunk` of its H/P heads (hc = H/P/chunks) of all N tensors, interleaved per token, so that one
    all_to_all carries Q, K and V (three collectives were more launches for a step that is host-bound once it is
    split: FLUX at 1024x1024 on 2-4 GPUs, perf/RESULTS.md).

    What arrives (rank i's tokens in [i]) unpacks, with B == 1, to (1, L, hc, D) views with token stride
    N * hc * D, which the attention kernels take as they are. Packing tensor-major (a stack and a permuted copy)
    and unpacking with three more copies took ~7 ms of a 93 ms Ulysses-2 FLUX step (H200 profile, 2026-11-26);
    now the only copy of Q, K and V on the way out is into this buffer, and `prepare` can make even that one the
    prologue's own output."""
    b, lp, h, d = xs[0].shape
    hc = h // size // chunks
    send = xs[0].new_empty(size, b, lp, len(xs), hc, d)
    for n, x in enumerate(xs):
        heads = x.unflatten(2, (size, chunks, hc))[:, :, :, chunk]  # (B, L/P, P, hc, D), a view
        dest = send[:, :, :, n].permute(1, 2, 0, 3, 4)
        if prepare is None or n > 1:
            dest.copy_(heads)
        else:
            # One launch for all ranks. FLUX under Ulysses 2 with 2 chunks: a launch a rank took 13.0 us (8 a
            # block), one for all ranks takes 16.9 us (4 a block): 3.9 instead of 5.9 ms of prologue a step (H200
            # profiles, 2026-11-27, perf/RESULTS.md); the step did not move, the prologue runs while an exchange
            # travels.
            prepare(n, heads, dest)
    return send


def _unpack(recv: torch.Tensor) -> list[torch.Tensor]:
    """What arrived, (P, B, L/P, N, hc, D) with rank i's tokens in [i], -> N (B, L, hc, D) tensors. A view
    when B == 1 (rank-i chunks are adjacent token runs); reshape copies otherwise."""
    size, b, lp, n_tensors, hc, d = recv.shape
    return [recv[:, :, :, n].transpose(0, 1).reshape(b, size * lp, hc, d) for n in range(n_tensors)]


def heads_to_seq_send(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, L, hc, D) -> (P, B, L/P, hc, D): the tokens of rank j in [j], the send buffer of the way back."""
    b, l, hc, d = x.shape
    return x.reshape(b, size, l // size, hc, d).permute(1, 0, 2, 3, 4).contiguous()


def backend_attend(backend: str) -> Attend:
    fn = get_backend(backend)
    return lambda q, k, v, mask: fn(q, k, v, mask=mask)


def auto_chunks(heads_per_rank: int, captured: bool) -> int:
    """Head chunks when none are configured: 2 where the call is being captured into a CUDA graph and a rank
    attends with an even number of heads, at least 8; else 1. Measured on 2 H200s, 2026-11-27 (perf/RESULTS.md):
    FLUX.1-dev 1024x1024 under Ulysses 2 (12 heads a rank, CUDA graphs) 84.3-86.4 ms a step with 2 chunks against
    87.0-88.5 ms with one exchange, 87.4 with 4, as fewer heads make a chunk's attention grid too small to hide an
    exchange behind; but Qwen-Image (12 heads a rank, eager) 291.8 ms against 260.4, as each chunk adds kernel
    launches to a step that is host-bound without graphs, and Wan 14B (20 heads a rank, eager, 32,760 tokens)
    1,693.5-1,696.0 against 1,686.8-1,690.9 ms a forward."""
    return 2 if captured and heads_per_rank >= 8 and heads_per_rank % 2 == 0 else 1


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, *,
                      mask: Optional[torch.Tensor] = None, backend: str = "sdpa",
                      attend: Optional[Attend] = None, prepare: Optional[Prepare] = None,
                      chunks: int = 1) -> torch.Tensor:
    """Attention of the local queries over the whole sequence of `group`.

    q, k, v: this rank's (B, L/P, H, D) shards; mask: this rank's (B, L/P) key mask (True = attend).
    backend: a ditserve.kernels.registry name; attend: an explicit attention function over the
    gathered sequence instead (USP passes ring attention here); prepare: see Prepare. Returns
    (B, L/P, H, D).

    chunks > 1 pipelines the exchanges with the attention, by heads: each rank's H/P heads go in `chunks`
    groups, and while the attention runs on one group the next group's Q/K/V and the last group's output
    travel (asynchronous all_to_alls). Same result, bit for bit: attention is per head. 0: auto_chunks.
    With 1 chunk it is one exchange there and one back.
    """
    size = dist.get_world_size(group)
    check_heads(q.shape[2], size, chunks)
    chunks = chunks or auto_chunks(q.shape[2] // size, q.is_cuda and torch.cuda.is_current_stream_capturing())
    attend = attend or backend_attend(backend)
    full_mask = torch.cat(all_gather_mask(mask, group), dim=1) if mask is not None else None

    def exchange(send: torch.Tensor) -> tuple[torch.Tensor, dist.Work]:
        recv = torch.empty_like(send)
        return recv, dist.all_to_all_single(recv, send, group=group, async_op=True)

    incoming = exchange(seq_to_heads_send((q, k, v), size, prepare, 0, chunks))
    outgoing = []
    for c in range(chunks):
        recv, work = incoming
        if c + 1 < chunks:  # packed and sent before this chunk's attention, so it travels meanwhile
            incoming = exchange(seq_to_heads_send((q, k, v), size, prepare, c + 1, chunks))
        work.wait()
        outgoing.append(exchange(heads_to_seq_send(attend(*_unpack(recv), full_mask), size)))
    out = q.new_empty(q.shape)
    per_rank = out.unflatten(2, (size, chunks, q.shape[2] // size // chunks))  # (B, L/P, P, chunks, hc, D)
    for c, (recv, work) in enumerate(outgoing):  # recv[i]: our tokens, chunk c of rank i's heads
        work.wait()
        per_rank[:, :, :, c].copy_(recv.permute(1, 2, 0, 3, 4))
    return out
