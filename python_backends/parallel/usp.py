"""USP (unified sequence parallelism): Ulysses inside groups of `ulysses_degree` adjacent ranks, ring
attention across those groups.

Rank layout over a world of ulysses_degree * ring_degree ranks: rank = ring_index * ulysses_degree +
ulysses_index. Ulysses groups are runs of adjacent ranks (their all_to_all is the bandwidth-hungry
collective; adjacent ranks share NVLink / a host), ring groups take one rank of each Ulysses group.
The sequence shards follow the global rank, so after the Ulysses all_to_all each rank holds the
contiguous chunk of its Ulysses group, for its share of the heads, and the ring runs over chunks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from ditserve.kernels.attention import Prologue, norm_rope, reference_prologue
from ditserve.kernels.processors import set_processor

from .ring import ring_attention
from .shard import ShardPlan, gather
from .ulysses import Prepare, check_heads, ulysses_attention


@dataclass(frozen=True)
class USPLayout:
    ulysses_degree: int
    ring_degree: int
    ulysses_groups: tuple[tuple[int, ...], ...]
    ring_groups: tuple[tuple[int, ...], ...]


def usp_layout(world: int, ulysses_degree: int, ring_degree: int) -> USPLayout:
    """The process groups (as global ranks) of a USP layout; pure."""
    if ulysses_degree < 1 or ring_degree < 1 or ulysses_degree * ring_degree != world:
        raise ValueError(f"ulysses_degree * ring_degree must equal the world size {world} (both >= 1), got "
                         f"ulysses_degree={ulysses_degree}, ring_degree={ring_degree}")
    u, r = ulysses_degree, ring_degree
    return USPLayout(
        u, r,
        ulysses_groups=tuple(tuple(ring * u + i for i in range(u)) for ring in range(r)),
        ring_groups=tuple(tuple(ring * u + i for ring in range(r)) for i in range(u)),
    )


@dataclass(frozen=True)
class SPMesh:
    """This rank's process groups for sequence parallelism."""

    layout: USPLayout
    group: dist.ProcessGroup  # all ranks of the layout, in shard order (gathers whole sequences)
    ulysses_group: dist.ProcessGroup
    ring_group: dist.ProcessGroup
    ulysses_chunks: int = 0  # ulysses_attention's chunks (0: auto)

    @property
    def degree(self) -> int:
        return self.layout.ulysses_degree * self.layout.ring_degree

    @property
    def rank(self) -> int:
        """This rank's sequence shard index."""
        return dist.get_rank(self.ring_group) * self.layout.ulysses_degree + dist.get_rank(self.ulysses_group)


def build_mesh(ulysses_degree: int, ring_degree: int, first_rank: int = 0,
               ulysses_chunks: int = 0) -> Optional[SPMesh]:
    """Create the USP groups over global ranks [first_rank, first_rank + ulysses_degree * ring_degree).

    Every rank of the default group must call it with the same arguments, also ranks outside the
    mesh (new_group is collective over the default group); those get None. With CFG parallelism
    each CFG branch has its own mesh, so the ranks of both call it twice (`first_rank` 0 and P).
    """
    degree = ulysses_degree * ring_degree
    layout = usp_layout(degree, ulysses_degree, ring_degree)
    if first_rank == 0 and degree == dist.get_world_size():
        whole = dist.group.WORLD
    else:
        whole = dist.new_group(list(range(first_rank, first_rank + degree)))
    # new_group must be called by every rank for every group, in the same order.
    ulysses = [dist.new_group([first_rank + r for r in ranks]) for ranks in layout.ulysses_groups]
    ring = [dist.new_group([first_rank + r for r in ranks]) for ranks in layout.ring_groups]
    me = dist.get_rank() - first_rank
    if not 0 <= me < degree:
        return None
    return SPMesh(layout, whole, ulysses[me // ulysses_degree], ring[me % ulysses_degree], ulysses_chunks)


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mesh: SPMesh, *,
                  mask: Optional[torch.Tensor] = None, backend: str = "sdpa",
                  prepare: Optional[Prepare] = None) -> torch.Tensor:
    """Attention of this rank's (B, L/P, H, D) shard (P = mesh.degree) over the whole sequence.

    mask: this rank's (B, L/P) key mask, True = attend. ulysses_degree 1 is pure ring attention,
    ring_degree 1 pure Ulysses. prepare (ulysses.Prepare): what to apply to Q and K before any
    communication, written into the all_to_all's send buffer (pure ring: into fresh tensors).
    """
    if mesh.layout.ulysses_degree == 1:  # pure ring: no all_to_all to write the prepared Q and K into
        if prepare is not None:
            q, k = (_prepared(n, x, prepare) for n, x in enumerate((q, k)))
        return ring_attention(q, k, v, mesh.ring_group, mask=mask, backend=backend)
    attend, chunks = None, mesh.ulysses_chunks
    if mesh.layout.ring_degree > 1:
        attend = lambda q, k, v, m: ring_attention(q, k, v, mesh.ring_group, mask=m, backend=backend)  # noqa: E731
        chunks = chunks or 1  # auto_chunks was measured with plain attention, not with a ring in each chunk
    return ulysses_attention(q, k, v, mesh.ulysses_group, mask=mask, backend=backend, attend=attend, prepare=prepare,
                             chunks=chunks)


def _prepared(n: int, x: torch.Tensor, prepare: Prepare) -> torch.Tensor:
    out = torch.empty_like(x)
    prepare(n, x, out)
    return out


class SequenceParallelBackend:
    """Has a registry Backend's call signature; attends this rank's shard over the whole sequence (the
    FLUX, Qwen-Image and Wan sequence-parallel processors use it).

    The prologue (QK RMSNorm + RoPE) runs before any communication (our Triton kernel on CUDA, torch
    on CPU), written straight into the Ulysses send buffer: ring blocks from other ranks arrive
    already normalised and rotated, and each rank knows only its own rows' tables.
    """

    def __init__(self, mesh: SPMesh, backend: str = "sdpa") -> None:
        self.mesh = mesh
        self.backend = backend

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
                 prologue: Optional[Prologue] = None) -> torch.Tensor:
        prepare = None if prologue is None else functools.partial(write_prologue, prologue)
        return usp_attention(q, k, v, self.mesh, mask=mask, backend=self.backend, prepare=prepare)


def write_prologue(prologue: Prologue, index: int, x: torch.Tensor, out: torch.Tensor) -> None:
    """ulysses.Prepare: Q (index 0) or K (1) normalised and rotated into `out`; x is (B, L, H, D) or, from
    Ulysses, (B, L, P, hc, D)."""
    which = "qk"[index]
    if x.is_cuda:
        # One Triton kernel instead of ~15 fp32 torch ops: those took ~25 ms of a 118 ms Ulysses-2
        # step (FLUX.1-dev 1024x1024, H200, 2026-11-26 profile).
        norm_rope(x, prologue, which=which, out=out)
    else:
        heads = x.reshape(*x.shape[:2], -1, x.shape[-1])
        out.copy_(reference_prologue(heads, prologue, which=which).view(x.shape))


# --- what every model's sequence-parallel forward (parallel.flux, .qwen_image, .wan) does around its blocks ---


def install_processor(transformer: torch.nn.Module, mesh: SPMesh, processor: object,
                      attentions: Iterable[torch.nn.Module]) -> int:
    """A model's ``set_sequence_parallel``: one `processor` (a SequenceParallelBackend inside) on each of
    `attentions`, the transformer's self or joint attention modules; returns how many.

    Raises ValueError when ulysses_degree does not divide the head count (checked here, at load,
    rather than in the first request) or when there is no module to install on.
    """
    check_heads(transformer.config.num_attention_heads, mesh.layout.ulysses_degree, mesh.ulysses_chunks)
    return set_processor(transformer, attentions, processor, "set_sequence_parallel")


def all_gather_image(x: torch.Tensor, p: ShardPlan, mesh: SPMesh) -> torch.Tensor:
    """This rank's output rows (B, its image rows [+ padding], C) -> the whole image stream (B, image tokens, C)
    on every rank. A rank's shard may hold text rows too, which the output no longer has: zero rows stand in
    front for them, so every rank sends a joint-shaped shard of one size, and the text rows are dropped after."""
    if x.shape[1] < p.local_len:  # Wan's shards, and ranks past the text, hold no text rows: no copy
        x = torch.cat([x.new_zeros(x.shape[0], p.local_len - x.shape[1], x.shape[2]), x], dim=1)
    parts = [torch.empty_like(x) for _ in range(mesh.degree)]
    dist.all_gather(parts, x.contiguous(), group=mesh.group)
    return gather(parts, p, dim=1)[:, p.text_len:]
