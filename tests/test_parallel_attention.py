"""Sequence-parallel attention across gloo process groups on CPU equals one-process attention.

Each test starts one group and runs several checks in it (starting costs more than the checks).
Every rank draws the same full q/k/v from one seeded generator, attends with its shard, and the
gathered result is compared with SDPA over the whole sequence (fp32, key-padding mask included,
lengths that do not divide the degree). One GPU-marked test runs chunked Ulysses on 2 GPUs over NCCL, in a CUDA
graph too.
"""

from __future__ import annotations

import sys
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ditserve.parallel import (build_mesh, gather, local_key_mask, plan, ring_attention, shard, ulysses_attention,
                               usp_attention)
from ditserve.parallel.ulysses import auto_chunks

TOL = 1e-5


def _worker(rank: int, world: int, init_file: str, checks: Callable[[], None], backend: str) -> None:
    torch.set_num_threads(1)  # the test machines have few cores; ranks must not fight over them
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        checks()
    finally:
        dist.destroy_process_group()


# What the ranks import besides the test modules that use run_group (the checks import them lazily).
RANK_MODULES = ("ditserve.flux.denoiser", "ditserve.parallel.flux", "ditserve.parallel.qwen_image", "ditserve.parallel.wan")


def run_group(world: int, tmp_path, checks: Callable[[], None], backend: str = "gloo") -> None:
    """Run `checks` (a module-level function) on `world` gloo ranks (nccl: one GPU each); a failing rank
    fails the test.

    The ranks fork from multiprocessing's fork server, which imports torch, diffusers and these test
    modules once: spawned ranks imported them each time (2.5 to 8 s of CPU a rank, about 20 ranks).
    The server is one fresh single-threaded process, so forking it is safe where forking pytest's
    process (OpenMP and other threads) would not be. NCCL ranks are spawned: on a GPU host those imports
    query CUDA (``torch.cuda.is_available()`` at module level), after which torch refuses CUDA in a forked
    child ("Cannot re-initialize CUDA in forked subprocess", H200 pair, 2026-11-27)."""
    start_method = "spawn" if backend == "nccl" else "forkserver"
    if start_method == "forkserver":
        users = [name for name, module in list(sys.modules.items()) if getattr(module, "run_group", None) is run_group]
        mp.get_context("forkserver").set_forkserver_preload([*users, *RANK_MODULES])  # used when the server starts
    mp.start_processes(_worker, args=(world, str(tmp_path / "pg_init"), checks, backend), nprocs=world, join=True,
                       start_method=start_method)


def _scale_qk(index: int, x: torch.Tensor, out: torch.Tensor) -> None:
    """A ulysses.Prepare whose effect the reference can apply: Q x 2, K x 3 (no symmetry hides a mix-up)."""
    out.copy_(x * (2.0, 3.0)[index])


def _expect_equal(name: str, attn: Callable, text_len: int, image_len: int, heads: int, seed: int,
                  batch: int = 2, prepared: bool = False) -> None:
    """attn(q, k, v, mask) on this rank's shard, gathered over the default group, equals full SDPA
    (of Q x 2 and K x 3 when `prepared`: attn applies _scale_qk). The shard index is the global rank
    (USP's layout keeps it so: SPMesh.rank). Batch 1 takes Ulysses' no-copy path, batch 2 its copies."""
    degree, rank = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(seed)
    p = plan(text_len, image_len, degree)
    q, k, v = (torch.randn(batch, p.total, heads, 8, generator=g) for _ in range(3))
    mask = torch.rand(batch, p.total, generator=g) > 0.3
    mask[:, 0] = True  # SDPA gives NaN for a row with no key at all
    qr, kr = (q * 2, k * 3) if prepared else (q, k)
    ref = F.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None, None, :]).transpose(1, 2)
    local = attn(*(shard(x, p, rank, dim=1) for x in (q, k, v)), local_key_mask(p, rank, mask))
    parts = [torch.empty_like(local) for _ in range(degree)]
    dist.all_gather(parts, local.contiguous())
    err = (gather(parts, p, dim=1) - ref).abs().max().item()
    assert err < TOL, f"{name}: max abs err {err} (lengths {text_len}+{image_len}, degree {degree})"


def _check_schemes(ulysses_heads: int) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD
    lengths = [(3, 2 * world + 1), (0, 4 * world - 1), (5, world)]  # none divides the degree
    ring = lambda q, k, v, m: ring_attention(q, k, v, group, mask=m)
    uly = lambda q, k, v, m: ulysses_attention(q, k, v, group, mask=m)
    for i, (text_len, image_len) in enumerate(lengths):
        _expect_equal("ring", ring, text_len, image_len, heads=2, seed=i)
        _expect_equal("ulysses", uly, text_len, image_len, heads=ulysses_heads, seed=i)
    # 8 heads a rank in 2 (auto_chunks' choice inside a CUDA graph) or 4 pipelined groups, or auto (0, here one
    # exchange): bit for bit one exchange's result.
    assert [auto_chunks(h, captured=True) for h in (1, 2, 6, 8, 9, 12, 20)] == [1, 1, 1, 2, 1, 2, 2]
    assert [auto_chunks(h, captured=False) for h in (8, 12, 20)] == [1, 1, 1]
    for chunks in (0, 2, 4):
        chunked = lambda q, k, v, m: ulysses_attention(q, k, v, group, mask=m, prepare=_scale_qk, chunks=chunks)
        for batch in (1, 2):
            _expect_equal(f"ulysses, {chunks} chunks", chunked, 3, 2 * world + 1, heads=8 * world, seed=9,
                          batch=batch, prepared=True)
        g = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(2, 2 * world, 8 * world, 8, generator=g) for _ in "qkv")
        assert torch.equal(ulysses_attention(q, k, v, group, chunks=chunks), ulysses_attention(q, k, v, group))
    with pytest.raises(ValueError, match=r"ulysses_chunks=3 does not divide the 8 heads a rank attends with"):
        ulysses_attention(q, k, v, group, chunks=3)
    for u, r in ((world, 1), (1, world)):
        mesh = build_mesh(u, r)
        assert mesh.rank == rank
        usp = lambda q, k, v, m: usp_attention(q, k, v, mesh, mask=m)
        _expect_equal(f"usp {u}x{r}", usp, 3, 2 * world + 1, heads=ulysses_heads, seed=7)
        usp = lambda q, k, v, m: usp_attention(q, k, v, mesh, mask=m, prepare=_scale_qk)
        _expect_equal(f"usp {u}x{r}, prepared, batch 1", usp, 3, 2 * world + 1, heads=ulysses_heads, seed=8,
                      batch=1, prepared=True)


def _checks_2() -> None:
    _check_schemes(ulysses_heads=2)


def _checks_3() -> None:
    with pytest.raises(ValueError, match=r"ulysses_degree=3 does not divide the 2 attention heads"):
        x = torch.zeros(1, 2, 2, 8)
        ulysses_attention(x, x, x, dist.group.WORLD)
    _check_schemes(ulysses_heads=6)


def _checks_4() -> None:
    mesh = build_mesh(2, 2)
    assert mesh.rank == dist.get_rank()
    usp = lambda q, k, v, m: usp_attention(q, k, v, mesh, mask=m)
    _expect_equal("usp 2x2", usp, 3, 10, heads=4, seed=11)
    _expect_equal("usp 2x2", usp, 0, 17, heads=2, seed=12)
    usp = lambda q, k, v, m: usp_attention(q, k, v, mesh, mask=m, prepare=_scale_qk)
    _expect_equal("usp 2x2, prepared, batch 1", usp, 3, 10, heads=4, seed=13, batch=1, prepared=True)
    chunked = build_mesh(2, 2, ulysses_chunks=2)  # a ring in each of the 2 head chunks
    usp = lambda q, k, v, m: usp_attention(q, k, v, chunked, mask=m, prepare=_scale_qk)
    _expect_equal("usp 2x2, 2 chunks", usp, 3, 10, heads=4, seed=14, prepared=True)


def test_two_ranks(tmp_path):
    run_group(2, tmp_path, _checks_2)


def test_three_ranks(tmp_path):
    run_group(3, tmp_path, _checks_3)


def test_usp_2x2(tmp_path):
    run_group(4, tmp_path, _checks_4)


def _chunks_on_gpus() -> None:
    """Chunked Ulysses on NCCL, eager and captured in a CUDA graph (as the FLUX denoiser runs it), equals one
    exchange bit for bit. Our Triton kernel attends (per head, one config for any head count); torch SDPA may
    split keys differently for a different head count."""
    group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()

    def inputs(seed: int) -> list[torch.Tensor]:
        g = torch.Generator("cuda").manual_seed(seed * world + rank)
        return [torch.randn(1, 1031, 8 * world, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in "qkv"]

    def attention(*qkv, chunks):
        return ulysses_attention(*qkv, group, backend="triton", chunks=chunks)

    qkv = inputs(0)
    one = attention(*qkv, chunks=1)
    for chunks in (2, 4):
        assert torch.equal(attention(*qkv, chunks=chunks), one), f"{chunks} chunks, eager"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        attention(*qkv, chunks=2)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention(*qkv, chunks=0)  # auto: 2 chunks inside a graph (8 heads a rank)
    for seed in (1, 2):  # fresh inputs into the captured ones, replay
        for x, fresh in zip(qkv, inputs(seed)):
            x.copy_(fresh)
        graph.replay()
        assert torch.equal(out, attention(*qkv, chunks=1)), f"graph replay {seed}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_chunked_ulysses_on_two_gpus_equals_one_exchange(tmp_path):
    run_group(2, tmp_path, _chunks_on_gpus, backend="nccl")
