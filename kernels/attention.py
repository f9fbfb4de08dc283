"""Forward attention for diffusion transformers, in Triton (flash-attention-2 style online softmax).

Non-causal, one program per (block of BLOCK_M queries, batch x head); keys are streamed in BLOCK_N tiles
with the running max / running sum rescaling of FlashAttention-2, in base 2 (exp2, with log2(e) folded
into the softmax scale). Full key tiles run without bounds checks; one masked tail iteration handles
Lk % BLOCK_N, so any length works.

Layouts: "BLHD" (batch, length, heads, head_dim) is what diffusers' processors hold after
`unflatten(-1, (-1, head_dim))`, and the output in that layout feeds `flatten(2, 3)` and the output
projection with no transpose. "BHLD" is SDPA's layout. Both are handled through strides; the last
dimension must be contiguous.

Optional, all in the same launch:
  * a boolean key-padding mask (B, Lk), True = attend (SDPA's boolean convention); rows whose keys are
    all masked give output 0 and LSE -inf;
  * the per-row log-sum-exp (natural log, fp32, (B, H, Lq)) so that results over disjoint key sets merge
    exactly: lse = logaddexp(lse1, lse2), out = out1 * exp(lse1 - lse) + out2 * exp(lse2 - lse);
  * a fused prologue (`Prologue`): per-head RMSNorm of Q and K with weights, then rotary embedding.
    Q's is applied to the Q tile in registers as it is loaded (normalised, rotated Q is never written).
    K's runs either inline (per K tile inside the key loop, so K' is never written either, but it is
    recomputed for every query block) or as a prepass kernel that writes K' once (`k_mode`, default
    "prepass": 2.2x faster on the H100 at FLUX size, perf/ATTENTION_NOTES.md).

On sm_90 (H100/H200) the same function runs as the Gluon kernel of attention_hopper.py (FlashAttention-3's
warp-specialised structure) whenever it supports the call; the prologue is then a prepass on Q and K.

Under TRITON_INTERPRET=1 (CPU) the kernels run in Triton's interpreter: tl.dot on bf16 is wrong there
(relative error ~1e9 with triton 3.6.0, against ~1e-7 for fp16 and fp32), so CPU use is restricted to fp16/fp32 by the registry.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import attention_hopper as _hopper
from .tma import tma_origin

# Read once, like triton.jit does at decoration time: setting it after this import has no effect.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

Layout = Literal["BLHD", "BHLD"]
# On an H100 the Gluon kernel (attention_hopper.py) takes every call it supports: 0.99-1.13x cuDNN SDPA against
# this kernel's 0.77-0.89x (perf/RESULTS.md). Benchmarks set False to time the Triton-lang kernel.
HOPPER_KERNEL: bool = True


# ----------------------------------------------------------------------------------------------------
# Prologue: per-head RMSNorm (+ weight) then rotary embedding, on an fp32 tile in registers.
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _norm_rope(
    x,  # (ROWS, HEAD_DIM) fp32
    rows,  # (ROWS,) token indices of the tile
    nrows,  # rows >= nrows are padding (their cos/sin are not loaded)
    W0,  # norm weight for rows < norm_split
    W1,  # norm weight for rows >= norm_split (== W0 when the sequence has one stream)
    norm_split,
    Cos,
    Sin,
    stride_cl,
    eps,
    NORM: tl.constexpr,
    ROPE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    d = tl.arange(0, HEAD_DIM)
    if NORM:
        inv_rms = tl.math.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
        w0 = tl.load(W0 + d).to(tl.float32)
        w1 = tl.load(W1 + d).to(tl.float32)
        w = tl.where((rows >= norm_split)[:, None], w1[None, :], w0[None, :])
        x = x * inv_rms[:, None] * w
    if ROPE:
        in_range = (rows < nrows)[:, None]
        cs = rows[:, None] * stride_cl + d[None, :]
        cos = tl.load(Cos + cs, mask=in_range, other=0.0)
        sin = tl.load(Sin + cs, mask=in_range, other=0.0)
        # Both conventions rotate pairs (a, b) -> (a cos_a - b sin_a, b cos_b + a sin_b); they differ only
        # in which columns pair up: (2i, 2i+1) for FLUX / Qwen-Image / Wan (diffusers use_real_unbind_dim=-1),
        # (i, i + D/2) for rotate-half models (use_real_unbind_dim=-2).
        if INTERLEAVED:
            a, b = tl.split(tl.reshape(x, (ROWS, HEAD_DIM // 2, 2)))
            ca, cb = tl.split(tl.reshape(cos, (ROWS, HEAD_DIM // 2, 2)))
            sa, sb = tl.split(tl.reshape(sin, (ROWS, HEAD_DIM // 2, 2)))
            x = tl.reshape(tl.join(a * ca - b * sa, b * cb + a * sb), (ROWS, HEAD_DIM))
        else:
            a, b = tl.split(tl.permute(tl.reshape(x, (ROWS, 2, HEAD_DIM // 2)), (0, 2, 1)))
            ca, cb = tl.split(tl.permute(tl.reshape(cos, (ROWS, 2, HEAD_DIM // 2)), (0, 2, 1)))
            sa, sb = tl.split(tl.permute(tl.reshape(sin, (ROWS, 2, HEAD_DIM // 2)), (0, 2, 1)))
            x = tl.reshape(tl.permute(tl.join(a * ca - b * sa, b * cb + a * sb), (0, 2, 1)), (ROWS, HEAD_DIM))
    return x


@triton.jit
def _prologue_kernel(
    X, Out, W0, W1, Cos, Sin,
    eps, norm_split,
    stride_xb, stride_xg, stride_xh, stride_xl,
    stride_ob, stride_og, stride_oh, stride_ol,
    stride_cl,
    H, HEADS_IN_GROUP, L,
    HEAD_DIM: tl.constexpr,
    NORM: tl.constexpr,
    ROPE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_L: tl.constexpr,
    HEADS: tl.constexpr,
):
    """Writes norm+RoPE(X) once (the prepass on K, and on Q before the Gluon kernel): BLOCK_L tokens of one
    batch, HEADS heads, so cos/sin and the norm weights are loaded once for them. Head h is at
    (h // HEADS_IN_GROUP) * stride_g + (h % HEADS_IN_GROUP) * stride_h: Ulysses passes every rank's heads of a
    chunk as groups, one launch instead of one per rank. RoPE's partner column (d ^ 1, or d ^ D/2 for
    rotate-half) is a second load of the same row, not a register shuffle: the reshape/split form of
    `_norm_rope` ran this pass at ~0.5 TB/s on an H100 (perf/RESULTS.md)."""
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    off_b = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    ok = (rows < L)[:, None]
    partner = d ^ 1 if INTERLEAVED else d ^ (HEAD_DIM // 2)
    first = (d & 1) == 0 if INTERLEAVED else d < HEAD_DIM // 2
    if NORM:
        later = (rows >= norm_split)[:, None]
        w = tl.where(later, tl.load(W1 + d)[None, :], tl.load(W0 + d)[None, :]).to(tl.float32)
        wp = tl.where(later, tl.load(W1 + partner)[None, :], tl.load(W0 + partner)[None, :]).to(tl.float32)
    if ROPE:
        cs = rows[:, None] * stride_cl + d[None, :]
        cos = tl.load(Cos + cs, mask=ok, other=0.0)
        sin = tl.where(first[None, :], -1.0, 1.0) * tl.load(Sin + cs, mask=ok, other=0.0)
    for i in tl.static_range(HEADS):
        h = tl.program_id(2).to(tl.int64) * HEADS + i
        g = h // HEADS_IN_GROUP
        hg = h - g * HEADS_IN_GROUP
        here = ok & (h < H)
        x_row = X + off_b * stride_xb + g * stride_xg + hg * stride_xh + rows[:, None] * stride_xl
        x = tl.load(x_row + d[None, :], mask=here, other=0.0).to(tl.float32)
        if ROPE:
            xp = tl.load(x_row + partner[None, :], mask=here, other=0.0).to(tl.float32)
        if NORM:
            inv_rms = tl.math.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
            x = x * inv_rms * w
            if ROPE:
                xp = xp * inv_rms * wp
        if ROPE:
            x = x * cos + xp * sin
        o_row = Out + off_b * stride_ob + g * stride_og + hg * stride_oh + rows[:, None] * stride_ol
        tl.store(o_row + d[None, :], x.to(Out.dtype.element_ty), mask=here)


# ----------------------------------------------------------------------------------------------------
# Attention kernel
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(desc, row, col, ptrs, step, n_valid, TMA: tl.constexpr, TAIL: tl.constexpr):
    """A (rows, HEAD_DIM) tile: TMA (rows past the tensor read as 0; rows past this head's length belong
    to the next batch/head and are masked by the caller) or a pointer load (tail rows masked here)."""
    if TMA:
        return desc.load([row, col])
    elif TAIL:
        return tl.load(ptrs + step, mask=n_valid[:, None], other=0.0)
    else:
        return tl.load(ptrs + step)


@triton.jit
def _qk_tile(
    q, Kd, k_row0, col0, k_ptrs, stride_kl, start_n, LK,
    KW0, KW1, norm_split, Cos, Sin, stride_cl, eps,
    TAIL: tl.constexpr, TMA: tl.constexpr, K_PROLOGUE: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr,
    INTERLEAVED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Raw scores q k^T of the key tile at start_n (K's prologue applied on the fly when inline)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(Kd, k_row0 + start_n, col0, k_ptrs, start_n * stride_kl, cols < LK, TMA, TAIL)
    if K_PROLOGUE:
        k = _norm_rope(k.to(tl.float32), cols, LK, KW0, KW1, norm_split, Cos, Sin, stride_cl, eps,
                       NORM, ROPE, INTERLEAVED, BLOCK_N, HEAD_DIM).to(q.dtype)
    return tl.dot(q, tl.trans(k), input_precision=PRECISION)


@triton.jit
def mask_keys(qk, mask_ptr, start_n, LK, TAIL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scores of padded keys (key-padding mask) and of keys past LK (the last tile) become -inf."""
    cols = start_n + tl.arange(0, BLOCK_N)
    if HAS_MASK:
        if TAIL:
            keep = tl.load(mask_ptr + cols, mask=cols < LK, other=0) != 0
        else:
            keep = tl.load(mask_ptr + cols) != 0
        qk = tl.where(keep[None, :], qk, float("-inf"))
    elif TAIL:
        qk = tl.where((cols < LK)[None, :], qk, float("-inf"))
    return qk


@triton.jit
def _softmax_pv(
    acc, l_i, m_i, qk, Vd, k_row0, col0, v_ptrs, stride_vl, mask_ptr, start_n, LK, qk_scale,
    TAIL: tl.constexpr, TMA: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Online-softmax update with the key tile at start_n: rescale, exponentiate, accumulate P V."""
    cols = start_n + tl.arange(0, BLOCK_N)
    qk = mask_keys(qk, mask_ptr, start_n, LK, TAIL, HAS_MASK, BLOCK_N)
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(Vd, k_row0 + start_n, col0, v_ptrs, start_n * stride_vl, cols < LK, TMA, TAIL)
    if TMA and TAIL:
        # Rows past LK came from the next batch/head: finite, but keep 0 * inf out of the sum.
        v = tl.where((cols < LK)[:, None], v, 0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, l_i, m_ij


@triton.jit
def _attn_inner(
    acc, l_i, m_i, q,
    Kd, Vd, k_row0, col0,
    k_ptrs, v_ptrs, mask_ptr,
    start, end, stride_kl, stride_vl, LK, qk_scale,
    KW0, KW1, norm_split, Cos, Sin, stride_cl, eps,
    TAIL: tl.constexpr,
    TMA: tl.constexpr,
    PIPE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    K_PROLOGUE: tl.constexpr,
    NORM: tl.constexpr,
    ROPE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    if PIPE:
        # Scores of tile j+1 are issued before the softmax of tile j, so that the tensor cores can work
        # on them while the CUDA cores exponentiate (what FA3 calls intra-warpgroup overlap).
        if end > start:
            qk = _qk_tile(q, Kd, k_row0, col0, k_ptrs, stride_kl, start, LK, KW0, KW1, norm_split, Cos, Sin,
                          stride_cl, eps, TAIL, TMA, K_PROLOGUE, NORM, ROPE, INTERLEAVED, PRECISION, BLOCK_N,
                          HEAD_DIM)
            for start_n in range(start, end - BLOCK_N, BLOCK_N):
                start_n = tl.multiple_of(start_n, BLOCK_N)
                qk_next = _qk_tile(q, Kd, k_row0, col0, k_ptrs, stride_kl, start_n + BLOCK_N, LK, KW0, KW1,
                                   norm_split, Cos, Sin, stride_cl, eps, TAIL, TMA, K_PROLOGUE, NORM, ROPE,
                                   INTERLEAVED, PRECISION, BLOCK_N, HEAD_DIM)
                acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, Vd, k_row0, col0, v_ptrs, stride_vl, mask_ptr,
                                            start_n, LK, qk_scale, TAIL, TMA, HAS_MASK, PRECISION, BLOCK_N)
                qk = qk_next
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, Vd, k_row0, col0, v_ptrs, stride_vl, mask_ptr,
                                        end - BLOCK_N, LK, qk_scale, TAIL, TMA, HAS_MASK, PRECISION, BLOCK_N)
    else:
        for start_n in range(start, end, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            qk = _qk_tile(q, Kd, k_row0, col0, k_ptrs, stride_kl, start_n, LK, KW0, KW1, norm_split, Cos, Sin,
                          stride_cl, eps, TAIL, TMA, K_PROLOGUE, NORM, ROPE, INTERLEAVED, PRECISION, BLOCK_N,
                          HEAD_DIM)
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, Vd, k_row0, col0, v_ptrs, stride_vl, mask_ptr,
                                        start_n, LK, qk_scale, TAIL, TMA, HAS_MASK, PRECISION, BLOCK_N)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, Mask,
    Qd, Kd, Vd, TMA_OK,
    QW0, QW1, KW0, KW1, Cos, Sin,
    sm_scale, eps, norm_split,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    stride_mb, stride_cl,
    H, LQ, LK, LQ_TUNE, LK_TUNE,  # *_TUNE: autotuning keys only (tune_length)
    HEAD_DIM: tl.constexpr,
    BLHD: tl.constexpr,
    HAS_MASK: tl.constexpr,
    NORM: tl.constexpr,
    ROPE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    K_PROLOGUE: tl.constexpr,
    PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    PIPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)

    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    q_ptrs = q_base + offs_m[:, None] * stride_ql + d[None, :]
    k_ptrs = K + off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh \
        + offs_n[:, None] * stride_kl + d[None, :]
    v_ptrs = V + off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh \
        + offs_n[:, None] * stride_vl + d[None, :]
    mask_ptr = Mask + off_b.to(tl.int64) * stride_mb
    q_row0, k_row0, col0 = tma_origin(off_b, off_h, off_bh, LQ, LK, HEAD_DIM, BLHD)

    q = _load_tile(Qd, q_row0 + pid_m * BLOCK_M, col0, q_ptrs, 0, offs_m < LQ, USE_TMA, True)
    if NORM or ROPE:
        q = _norm_rope(q.to(tl.float32), offs_m, LQ, QW0, QW1, norm_split, Cos, Sin, stride_cl, eps,
                       NORM, ROPE, INTERLEAVED, BLOCK_M, HEAD_DIM).to(Q.dtype.element_ty)

    # Finite start for the running max: a tile whose keys are all masked then gives p = exp2(-inf) = 0
    # and alpha = 1 instead of exp2(-inf - -inf) = NaN.
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e)

    n_full = (LK // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, Kd, Vd, k_row0, col0, k_ptrs, v_ptrs, mask_ptr, 0, n_full,
                                stride_kl, stride_vl, LK, qk_scale,
                                KW0, KW1, norm_split, Cos, Sin, stride_cl, eps,
                                False, USE_TMA, PIPE, HAS_MASK, K_PROLOGUE, NORM, ROPE, INTERLEAVED, PRECISION,
                                BLOCK_N, HEAD_DIM)
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q, Kd, Vd, k_row0, col0, k_ptrs, v_ptrs, mask_ptr, n_full, LK,
                                stride_kl, stride_vl, LK, qk_scale,
                                KW0, KW1, norm_split, Cos, Sin, stride_cl, eps,
                                True, USE_TMA, False, HAS_MASK, K_PROLOGUE, NORM, ROPE, INTERLEAVED, PRECISION,
                                BLOCK_N, HEAD_DIM)

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    row_ok = offs_m < LQ
    tl.store(Lse + off_bh.to(tl.int64) * LQ + offs_m, lse, mask=row_ok)
    # Pointer store even with TMA: a 2-D TMA store of a tail tile would spill into the next batch/head.
    o_base = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ol + d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------------
# Configs: pruned for the device at tuning time. No fallback: if nothing fits, the launch raises.
# ----------------------------------------------------------------------------------------------------
# Interpreter: one fixed config, no timing (do_bench has no meaning there). The interpreter's cost is per
# tile, not per element: 64x64 tiles ran a 1000x1000 head in ~3 s against ~15 s with 32x32, and lengths
# 113 / 257 still cover several full tiles plus a masked tail.
INTERPRET_CONFIG: dict[str, int] = {"BLOCK_M": 64, "BLOCK_N": 64, "USE_TMA": False, "PIPE": False}


def _set_tma_block_shapes(nargs: dict) -> None:
    if isinstance(nargs["Qd"], TensorDescriptor):
        d = nargs["HEAD_DIM"]
        nargs["Qd"].block_shape = [nargs["BLOCK_M"], d]
        nargs["Kd"].block_shape = [nargs["BLOCK_N"], d]
        nargs["Vd"].block_shape = [nargs["BLOCK_N"], d]


# (BLOCK_M, BLOCK_N, num_warps, num_stages, USE_TMA, PIPE)
CfgKey = tuple[int, int, int, int, bool, bool]
# Hopper, >= 1024 queries. One warpgroup per 64 query rows (wgmma m64): 128-row tiles, 8 warps.
# H100, 2026-11-26 (perf/ATTENTION_NOTES.md): 3 stages beat 2 by 10-25% at every shape, so 2-stage
# configs are gone; TMA and pointer loads were within 3% of each other, so both stay in the race.
# PIPE only with 64-key tiles: with 128-key tiles the second score tile needs 256 KB of shared memory
# (sm_90 cross-compile, `bench_attention.py --compile-check`), over the 227 KB a block can have.
HOPPER_LONG: frozenset[CfgKey] = frozenset({
    (128, 128, 8, 3, False, False), (128, 128, 8, 3, True, False), (128, 64, 8, 3, False, False),
    (128, 64, 8, 4, False, False), (128, 64, 8, 3, False, True), (128, 64, 8, 3, True, True),
})
# Hopper, < 1024 queries: small grids; 64- or 128-row tiles, cheap to tune.
HOPPER_SHORT: frozenset[CfgKey] = frozenset({(64, 64, 4, 2, False, False), (128, 64, 8, 2, False, False)})


def _key(cfg: triton.Config) -> CfgKey:
    k = cfg.kwargs
    return (k["BLOCK_M"], k["BLOCK_N"], cfg.num_warps, cfg.num_stages, k["USE_TMA"], k["PIPE"])


def _candidate_configs() -> list[triton.Config]:
    generic = {(bm, bn, w, s, False, False) for bm in (64, 128) for bn in (64, 128) for w in (4, 8) for s in (2, 3)}
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": tma, "PIPE": pipe}, num_warps=w, num_stages=s,
                      pre_hook=_set_tma_block_shapes)
        for bm, bn, w, s, tma, pipe in sorted(generic | HOPPER_LONG | HOPPER_SHORT)
    ]


def _smem_bytes(cfg: triton.Config, head_dim: int, elt: int) -> int:
    # Q tile once, K and V tiles per pipeline stage.
    return (cfg.kwargs["BLOCK_M"] * head_dim + 2 * cfg.num_stages * cfg.kwargs["BLOCK_N"] * head_dim) * elt


def prune_configs(configs: list[triton.Config], named_args: dict, **meta) -> list[triton.Config]:
    """Keep the configs worth timing on this device; raise if none is valid."""
    head_dim = meta["HEAD_DIM"]
    elt = named_args["Q"].element_size()
    props = torch.cuda.get_device_properties(named_args["Q"].device)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    if props.major == 9:
        allowed = HOPPER_LONG if long_sequence(named_args["LQ_TUNE"]) else HOPPER_SHORT
    else:
        allowed = {(bm, bn, w, s, False, False) for bm in (64, 128) for bn in (64, 128) for w in (4, 8)
                   for s in (2, 3) if not (bm * bn >= 128 * 64 and w == 4)}
    kept = [
        c for c in configs
        if _key(c) in allowed and _smem_bytes(c, head_dim, elt) <= smem
        and (named_args["TMA_OK"] or not c.kwargs["USE_TMA"])
    ]
    if not kept:
        raise RuntimeError(f"ditserve attention: no kernel config fits head_dim={head_dim} in {smem} B of "
                           f"shared memory on {props.name}")
    return kept


def tune_length(n: int) -> int:
    """A sequence length as the autotuner keys it: the next power of two. Keyed on exact lengths, every
    new prompt length re-tuned the kernel once per process, 0.8-1.4 s each time at Qwen-Image's size (24
    heads of 128, ~4,100 tokens, H200, 2026-11-26), where text lengths vary from request to request. Every
    config is correct at any length (tails are masked); a bucket runs the config tuned at its first length."""
    return 1 << max(0, n - 1).bit_length()


def long_sequence(lq_tune: int) -> bool:
    """Whether Hopper's long-sequence configs are the candidates, decided on the tuner's bucket of the query
    count (``tune_length``), as the tuned config is cached: decided on the exact count, the lengths of one bucket
    (513 to 1024) chose among the short or the long configs as whichever came first did."""
    return lq_tune > 1024


_TUNE_KEY = ["LQ_TUNE", "LK_TUNE", "HEAD_DIM", "HAS_MASK", "NORM", "ROPE", "K_PROLOGUE", "TMA_OK"]
_attn_fwd_tuned = triton.autotune(
    configs=_candidate_configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": prune_configs}
)(_attn_fwd_kernel)


def _prologue_configs() -> list[triton.Config]:
    """16 tokens won on an H100 at FLUX's 4,608 (4 heads a program) and Ulysses-2's 2,304 (2 heads), and before
    heads got a grid axis (2026-11-27, perf/RESULTS.md); 32 stays as the one larger tile tried."""
    return [triton.Config({"BLOCK_L": bl, "HEADS": h}, num_warps=w)
            for bl in (16, 32) for h in (1, 2, 4) for w in (4, 8)]


# Not keyed on H: a CUDA graph captures FLUX's Ulysses calls with 2 head chunks after eager warm-up calls with one
# (ulysses.auto_chunks), and a key first seen during capture would be tuned there, which fails the capture.
_prologue_tuned = triton.autotune(configs=_prologue_configs(), key=["L", "HEAD_DIM", "NORM", "ROPE"])(
    _prologue_kernel
)


# ----------------------------------------------------------------------------------------------------
# Python API
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prologue:
    """Per-head RMSNorm of Q and K and rotary embedding, fused into the attention kernel.

    q_weight / k_weight: (D,) or (2, D). With two rows, tokens < norm_split use row 0 and the rest row 1
    (FLUX double blocks: text tokens use norm_added_q/k, image tokens norm_q/k). None: no norm.
    cos / sin: (L, D) float tables (diffusers `use_real=True` format, repeat-interleaved for FLUX); None:
    no rotary embedding. interleaved=True pairs columns (2i, 2i+1) (FLUX, Qwen-Image, Wan), False pairs
    (i, i + D/2). k_mode: "inline" normalises/rotates each K tile in the attention loop (K never written),
    "prepass" runs one small kernel over K first (K' written once, read by the attention kernel).
    """

    q_weight: Optional[torch.Tensor] = None
    k_weight: Optional[torch.Tensor] = None
    eps: float = 1e-6
    norm_split: int = 0
    cos: Optional[torch.Tensor] = None
    sin: Optional[torch.Tensor] = None
    interleaved: bool = True
    k_mode: Literal["inline", "prepass"] = "prepass"


def _strides(x: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """(batch, head, token) strides."""
    if layout == "BLHD":
        return x.stride(0), x.stride(2), x.stride(1)
    if layout == "BHLD":
        return x.stride(0), x.stride(1), x.stride(2)
    raise ValueError(f"layout must be 'BLHD' or 'BHLD', got {layout!r}")


def dims(x: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(B, H, L, D) of a tensor in `layout`."""
    if layout == "BLHD":
        return x.shape[0], x.shape[2], x.shape[1], x.shape[3]
    return x.shape[0], x.shape[1], x.shape[2], x.shape[3]


def _alloc(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Output allocation (a seam for tests, which poison outputs to prove every element is written)."""
    return torch.empty(shape, device=like.device, dtype=dtype)


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _norm_weights(w: Optional[torch.Tensor], d: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if w is None:
        return like, like  # unused by the kernel (NORM=False); any pointer will do
    w = w.reshape(-1, d).contiguous()  # (D,) or (2, D): validate_prologue checked
    return w[0], w[-1]


def _head_strides(x: torch.Tensor, layout: str) -> tuple[int, int, int, int, int]:
    """(batch, head group, head, token) strides and the heads in a group of `layout`, or of (B, L, G, H, D)
    (BLHD with heads in G groups)."""
    if x.dim() == 5:
        return x.stride(0), x.stride(2), x.stride(3), x.stride(1), x.shape[3]
    sb, sh, sl = _strides(x, layout)
    return sb, 0, sh, sl, dims(x, layout)[1]


def _launch_prologue(x: torch.Tensor, layout: str, w: Optional[torch.Tensor], p: Prologue,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x: (B, L, H, D), (B, H, L, D), or (B, L, G, H, D) in layout "BLHD" (G groups of H heads)."""
    B, D = x.shape[0], x.shape[-1]
    H, L = (math.prod(x.shape[2:-1]), x.shape[1]) if layout == "BLHD" else (x.shape[1], x.shape[2])
    out = _alloc(tuple(x.shape), x, x.dtype) if out is None else out
    w0, w1 = _norm_weights(w, D, x)
    cos = p.cos if p.cos is not None else x
    sin = p.sin if p.sin is not None else x
    *xs, in_group = _head_strides(x, layout)
    *os_, _ = _head_strides(out, layout)
    args = (x, out, w0, w1, cos, sin, p.eps, p.norm_split, *xs, *os_, cos.stride(0), H, in_group, L)
    meta = dict(HEAD_DIM=D, NORM=w is not None, ROPE=p.cos is not None, INTERLEAVED=p.interleaved)
    if INTERPRET:
        _prologue_kernel[(triton.cdiv(L, 64), B, triton.cdiv(H, 2))](*args, **meta, BLOCK_L=64, HEADS=2)
    else:
        _prologue_tuned[lambda m: (triton.cdiv(L, m["BLOCK_L"]), B, triton.cdiv(H, m["HEADS"]))](*args, **meta)
    return out


def validate_prologue(p: Prologue, D: int, Lq: int, Lk: int, device: torch.device) -> Prologue:
    """Raise ValueError naming what `p` gets wrong for attention of Lq queries over Lk keys of head dim D;
    returns p with cos/sin as contiguous fp32 on `device`. The registry's backends that apply the prologue
    before attention run it too, so that all of them reject the same prologues with the same message."""
    if (p.cos is None) != (p.sin is None):
        raise ValueError("prologue: give both cos and sin, or neither")
    if p.cos is not None:
        if Lq != Lk:
            raise ValueError(f"prologue: rotary embedding needs Lq == Lk (self-attention), got {Lq} and {Lk}")
        if tuple(p.cos.shape) != (Lq, D) or tuple(p.sin.shape) != (Lq, D):
            raise ValueError(f"prologue: cos/sin must be ({Lq}, {D}), got {tuple(p.cos.shape)}, "
                             f"{tuple(p.sin.shape)}")
        cos = p.cos.to(device=device, dtype=torch.float32).contiguous()
        sin = p.sin.to(device=device, dtype=torch.float32).contiguous()
        p = Prologue(p.q_weight, p.k_weight, p.eps, p.norm_split, cos, sin, p.interleaved, p.k_mode)
    if (p.q_weight is None) != (p.k_weight is None):
        raise ValueError("prologue: give both q_weight and k_weight, or neither")
    for name, w in (("q_weight", p.q_weight), ("k_weight", p.k_weight)):
        if w is not None and tuple(w.shape) not in ((D,), (2, D)):
            raise ValueError(f"prologue: {name} must be (D,) or (2, D) with D = {D}, got {tuple(w.shape)}")
    if p.k_mode not in ("inline", "prepass"):
        raise ValueError(f"prologue: k_mode must be 'inline' or 'prepass', got {p.k_mode!r}")
    return p


def _tma_views(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str
               ) -> Optional[tuple[tuple[torch.Tensor, int, int, int], ...]]:
    """(tensor, rows, width, row stride) of the 2-D token-row views a TMA reads, for q, k, v; None when a
    tensor's token rows are not evenly spaced or are misaligned. BLHD rows may be wider than H * D (Ulysses
    hands over Q, K and V interleaved per token: one (1, L, H, D) view each)."""
    views = []
    for x in (q, k, v):
        B, H, L, D = dims(x, layout)
        if layout == "BLHD":
            row = x.stride(1)
            dense = x.stride(3) == 1 and (H == 1 or x.stride(2) == D) and (B == 1 or x.stride(0) == L * row)
            rows, width = B * L, H * D
        else:
            row, dense, rows, width = D, x.is_contiguous(), B * H * L, D
        if not dense or x.data_ptr() % 16 or (row * x.element_size()) % 16:
            return None
        views.append((x, rows, width, row))
    return tuple(views)


def _tma_descriptors(views) -> tuple[TensorDescriptor, ...]:
    """Host TMA descriptors of `_tma_views` for the Triton-lang kernel (its tuner sets the block shapes)."""
    return tuple(TensorDescriptor(x, [rows, width], [row, 1], [1, x.shape[-1]]) for x, rows, width, row in views)


def _attention_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], layout: str,
    scale: float, prologue: Optional[Prologue],
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    B, H, Lq, D = dims(q, layout)
    Lk = dims(k, layout)[2]
    p = validate_prologue(prologue, D, Lq, Lk, q.device) if prologue is not None else None
    norm = p is not None and p.q_weight is not None
    rope = p is not None and p.cos is not None
    k_inline = p is not None and p.k_mode == "inline"
    if (norm or rope) and not k_inline:
        k = _launch_prologue(k, layout, p.k_weight, p)

    views = _tma_views(q, k, v, layout) if not INTERPRET else None
    out = _alloc(tuple(q.shape), q, q.dtype)
    lse = _alloc((B, H, Lq), q, torch.float32)
    mask_u8 = mask.contiguous().view(torch.uint8) if mask is not None else None
    if HOPPER_KERNEL and not k_inline and _hopper.supported(q, views):
        if norm or rope:
            q = _launch_prologue(q, layout, p.q_weight, p)
            views = _tma_views(q, k, v, layout)
        _hopper.launch(q, views, out, lse, mask_u8, _strides(out, layout), H, Lq, Lk, scale, layout == "BLHD")
        return out, lse
    mask_u8 = mask_u8 if mask_u8 is not None else q  # q: unused pointer when HAS_MASK=False
    qw0, qw1 = _norm_weights(p.q_weight if norm else None, D, q)
    kw0, kw1 = _norm_weights(p.k_weight if norm else None, D, q)
    cos = p.cos if rope else q
    sin = p.sin if rope else q
    descs = _tma_descriptors(views) if views is not None else None
    args = (
        q, k, v, out, lse, mask_u8, *(descs or (q, k, v)), int(descs is not None), qw0, qw1, kw0, kw1, cos, sin,
        scale, p.eps if p is not None else 0.0, p.norm_split if p is not None else 0,
        *_strides(q, layout), *_strides(k, layout), *_strides(v, layout), *_strides(out, layout),
        mask_u8.stride(0) if mask is not None else 0, cos.stride(0),
        H, Lq, Lk, tune_length(Lq), tune_length(Lk),
    )
    meta = dict(HEAD_DIM=D, BLHD=layout == "BLHD", HAS_MASK=mask is not None, NORM=norm, ROPE=rope,
                INTERLEAVED=p.interleaved if p is not None else True, K_PROLOGUE=k_inline and (norm or rope),
                # fp32 inputs (interpreter tests, parity runs) get exact fp32 dots, not tf32.
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    try:
        launch(_attn_fwd_kernel, _attn_fwd_tuned, INTERPRET_CONFIG, args, meta, Lq, B * H)
    except triton.runtime.errors.OutOfResources as exc:
        if not meta["K_PROLOGUE"]:
            raise
        # Measured on an H100 (2026-11-26): at head_dim 128 every tuned config of the inline K
        # prologue needed 256 KB of shared memory, over the 227 KB a block may use.
        raise ValueError(f"prologue k_mode='inline' does not fit this GPU's shared memory at head_dim={D} ({exc}); "
                         f"use k_mode='prepass' (the default)") from None
    return out, lse


def launch(kernel, tuned, interpret_config: dict, args: tuple, meta: dict, Lq: int, batch_heads: int) -> None:
    """One program per BLOCK_M queries of each (batch, head): the interpreter runs one fixed
    config (autotuning there would only multiply the slow interpreted runs), the GPU the tuner."""
    if INTERPRET:
        kernel[(triton.cdiv(Lq, interpret_config["BLOCK_M"]), batch_heads)](*args, **meta, **interpret_config)
    else:
        tuned[lambda m: (triton.cdiv(Lq, m["BLOCK_M"]), batch_heads)](*args, **meta)


# torch.library registration: the op takes the prologue as flat optional tensors and scalars.
@torch.library.custom_op("ditserve::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], layout: str, scale: float,
    q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor], eps: float, norm_split: int,
    cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], interleaved: bool, k_mode: str,
    use_prologue: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    p = Prologue(q_weight, k_weight, eps, norm_split, cos, sin, interleaved, k_mode) if use_prologue else None
    return _attention_impl(q, k, v, mask, layout, scale, p)


@_attention_op.register_fake
def _(q, k, v, mask, layout, scale, q_weight, k_weight, eps, norm_split, cos, sin, interleaved, k_mode,
      use_prologue):
    B, H, Lq, _ = dims(q, layout)
    # The real op allocates out contiguous in q's shape (_alloc) whatever q's strides: empty_like would keep them.
    return q.new_empty(q.shape), q.new_empty((B, H, Lq), dtype=torch.float32)


def check_mask(mask: Optional[torch.Tensor], k: torch.Tensor, layout: str) -> None:
    """The kernels read the key mask as bytes, rows of Lk: any other dtype or shape would be read wrong or out
    of bounds, silently. k: (B, H, Lk, D) in `layout`."""
    if mask is None:
        return
    B, _, Lk, _ = dims(k, layout)
    if mask.dtype != torch.bool or tuple(mask.shape) != (B, Lk):
        raise ValueError(f"mask must be bool (B, Lk) = ({B}, {Lk}), got {mask.dtype} {tuple(mask.shape)}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    layout: Layout = "BLHD",
    scale: Optional[float] = None,
    prologue: Optional[Prologue] = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v over non-causal attention; Triton kernel (ditserve::attention).

    q: (B, Lq, H, D) for layout "BLHD" or (B, H, Lq, D) for "BHLD"; k, v: the same with Lk.
    mask: optional bool (B, Lk), True = attend. scale: default 1/sqrt(D). Returns out in q's layout and
    dtype, and with return_lse the natural-log LSE (B, H, Lq) in fp32 (-inf for fully masked rows).
    Constraints (dtype, head dim, device) are checked by ditserve.kernels.registry, not here.
    """
    D = q.shape[-1]
    check_mask(mask, k, layout)
    s = 1.0 / math.sqrt(D) if scale is None else float(scale)
    p = prologue
    out, lse = torch.ops.ditserve.attention(
        q, k, v, mask, layout, s,
        p.q_weight if p else None, p.k_weight if p else None, p.eps if p else 0.0, p.norm_split if p else 0,
        p.cos if p else None, p.sin if p else None, p.interleaved if p else True, p.k_mode if p else "prepass",
        p is not None,
    )
    return (out, lse) if return_lse else out


def check_which(which: str) -> None:
    """The prologue of Q or of K: anything else would silently get K's weights."""
    if which not in ("q", "k"):
        raise ValueError(f"which must be 'q' or 'k', got {which!r}")


def norm_rope(x: torch.Tensor, prologue: Prologue, *, which: Literal["q", "k"] = "k",
              layout: Layout = "BLHD", out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The prologue alone, as one kernel (what k_mode="prepass" runs on K). x may also be (B, L, G, H, D), heads in
    groups with a stride each (layout "BLHD"): Ulysses' heads of one chunk for every rank. out: where to write (x's
    shape and dtype, any strides with a contiguous last dimension; e.g. a slice of a send buffer)."""
    if not (x.dim() == 4 or (x.dim() == 5 and layout == "BLHD")):
        raise ValueError(f"norm_rope: x must be (B, L, H, D), (B, H, L, D) or, in layout BLHD, (B, L, G, H, D); got "
                         f"{tuple(x.shape)} in layout {layout}")
    check_which(which)
    L, D = (x.shape[1] if layout == "BLHD" else x.shape[2]), x.shape[-1]
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.stride(-1) != 1):
        raise ValueError(f"norm_rope: out must have x's shape {tuple(x.shape)} and dtype {x.dtype} with a contiguous "
                         f"last dimension, got {tuple(out.shape)}, {out.dtype}, strides {out.stride()}")
    p = validate_prologue(prologue, D, L, L, x.device)
    return _launch_prologue(_last_contiguous(x), layout, p.q_weight if which == "q" else p.k_weight, p, out)


def reference_prologue(x: torch.Tensor, prologue: Prologue, *, which: Literal["q", "k"],
                       layout: Layout = "BLHD") -> torch.Tensor:
    """Torch version of the prologue, computed in x's dtype promoted to at least fp32; returns fp32 or fp64."""
    check_which(which)
    B, H, L, D = dims(x, layout)
    xt = x if layout == "BLHD" else x.transpose(1, 2)  # (B, L, H, D)
    work = xt.to(torch.promote_types(x.dtype, torch.float32))
    w = prologue.q_weight if which == "q" else prologue.k_weight
    if w is not None:
        w = w.reshape(-1, D).to(work.dtype)
        rows = torch.arange(L, device=x.device)
        wl = torch.where((rows >= prologue.norm_split)[:, None], w[-1][None, :], w[0][None, :])  # (L, D)
        work = work * torch.rsqrt(work.pow(2).mean(-1, keepdim=True) + prologue.eps) * wl[None, :, None, :]
    if prologue.cos is not None:
        cos = prologue.cos.to(work.dtype)[None, :, None, :]
        sin = prologue.sin.to(work.dtype)[None, :, None, :]
        if prologue.interleaved:
            a, b = work.unflatten(-1, (-1, 2)).unbind(-1)
            rot = torch.stack([-b, a], dim=-1).flatten(-2)
        else:
            a, b = work.unflatten(-1, (2, -1)).unbind(-2)
            rot = torch.cat([-b, a], dim=-1)
        work = work * cos + rot * sin
    return work if layout == "BLHD" else work.transpose(1, 2)
