"""Low-precision forward attention: INT8 (default) or FP8 e4m3 Q.K^T, FP8 e4m3 P.V, fp32 softmax and
accumulation, bf16/fp16 output (SageAttention2's recipe; `qk_format="fp8"` is plain e4m3 throughout).

Quantisation (`quantize_fp8`: one pass over K and V for K's per-channel sums and V's per-channel amax per
K_BLOCK tokens, a small kernel that reduces those to K's mean and V's scales, then one pass over each tensor):
  * Q: one scale per token (amax over the head dim). Loaded once per program, so a per-row scale costs
    nothing over a per-block one: it folds into the softmax scale vector.
  * K: smoothed first (the per-head mean over tokens subtracted, SageAttention's trick; softmax is
    invariant to it because q.mean is constant along a row), then one scale per block of K_BLOCK=128
    tokens, so every key tile of the kernel (BLOCK_N divides 128) has one scalar scale.
  * V: e4m3 with one scale per channel (amax over tokens), applied to the output once; stored
    transposed, (B, H, D, Lk padded to 16), because Hopper's fp8 wgmma wants both operands K-major.
Why INT8 for Q.K^T: with e4m3 Q/K the scores carry ~3% relative error, and on random inputs the output's
cosine similarity to fp64 was 0.99861 on the H100 (all five benchmark shapes), under the 0.999 target;
torch emulation of the same pipeline gives 0.99861 for e4m3 and 0.99926 for int8 Q/K (7-bit mantissa
against e4m3's 3). The int32 scores are converted with the 2^23 * 1.5 bit trick (one integer add and one
float subtract at full rate) instead of I2F, which runs at quarter rate like exp2; the subtraction is folded into
the row max and the exponent's per-row bias (fp8_scores.py), so it costs nothing per score.

The LSE returned is that of the unsmoothed scores (the quantiser records q . mean(K) per row and the
kernel adds it back), so partial results merge exactly like the bf16 kernel's.

In the kernel, P is quantised to e4m3 as exp2(s - m + 8), i.e. scaled by 256 (max 256 < 448): small
probabilities keep e4m3's normal precision instead of flushing to subnormals; the row sum uses the same
scaled P, so the factor cancels in acc / l.

Two kernels run these tensors: the Triton-lang one here, and on sm_90 at head dim 128 its Gluon version
(attention_hopper_fp8.py; with int8 Q.K^T 1.14-1.16x the Triton-lang kernel at 4,608 tokens and 1.04-1.05x at
32,760 on an H100, perf/RESULTS.md).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import attention as _attn
from . import attention_hopper as _hopper
from . import attention_hopper_fp8 as _hopper_fp8
from .attention import (INTERPRET, Layout, _last_contiguous, _strides, check_mask, dims, launch, mask_keys,
                        tune_length)
from .fp8_scores import int8_scores, row_bias

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
K_BLOCK = 128
assert K_BLOCK == _hopper.BLOCK_N, "the Gluon FP8 kernel takes one K scale per key tile"
STATS_BLOCKS = 4  # key blocks per program of _kv_stats_kernel
QKFormat = Literal["int8", "fp8"]


class FP8Tensors(NamedTuple):
    q: torch.Tensor  # (B, H, Lq, D) int8 or e4m3
    k: torch.Tensor  # (B, H, Lk, D) int8 or e4m3, smoothed
    vt: torch.Tensor  # (B, H, D, Lk_pad16) e4m3
    q_scale: torch.Tensor  # (B, H, Lq) fp32
    k_scale: torch.Tensor  # (B, H, cdiv(Lk, K_BLOCK)) fp32
    v_scale: torch.Tensor  # (B, H, D) fp32
    q_dot_kmean: torch.Tensor  # (B, H, Lq) fp32: q . mean(K), the smoothing's shift of each score row


@triton.jit
def _quantize(x, scale, INT8: tl.constexpr):
    # One return statement: Triton's code generator rejects a constexpr-if branch that returns a
    # different type than the code after it (seen on the H100, 2026-11-26).
    y = x / scale
    if INT8:
        out = tl.where(y >= 0, y + 0.5, y - 0.5).to(tl.int8)  # round half away from zero
    else:
        out = y.to(tl.float8e4nv)
    return out


@triton.jit
def _kv_stats_kernel(K, V, KSum, VMax, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl, H, L, NSB,
                     HEAD_DIM: tl.constexpr, K_BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
    """Per BLOCKS * K_BLOCK tokens of a head: K's column sums and V's column amax, fp32, as row (head, program)
    of the (B*H, NSB, HEAD_DIM) partials; `_kv_finish_kernel` reduces them."""
    off_bh = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    b, h = (off_bh // H).to(tl.int64), (off_bh % H).to(tl.int64)
    k_sum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    v_max = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for i in tl.static_range(BLOCKS):
        rows = (tl.program_id(0) * BLOCKS + i) * K_BLOCK + tl.arange(0, K_BLOCK)
        ok = (rows < L)[:, None]
        k = tl.load(K + b * stride_kb + h * stride_kh + rows[:, None] * stride_kl + d[None, :], mask=ok, other=0.0)
        v = tl.load(V + b * stride_vb + h * stride_vh + rows[:, None] * stride_vl + d[None, :], mask=ok, other=0.0)
        k_sum += tl.sum(k.to(tl.float32), 0)
        v_max = tl.maximum(v_max, tl.max(tl.abs(v.to(tl.float32)), 0))
    out = (off_bh.to(tl.int64) * NSB + tl.program_id(0)) * HEAD_DIM + d
    tl.store(KSum + out, k_sum)
    tl.store(VMax + out, v_max)


@triton.jit
def _kv_finish_kernel(KSum, VMax, Mean, VS, L, NSB, HEAD_DIM: tl.constexpr, VMAX: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """BLOCK_D channels of one head: K's per-channel mean and V's per-channel e4m3 scale from the partials, in a
    fixed order (the same bits every run, unlike atomics)."""
    off_bh = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    k_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    v_max = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, NSB, BLOCK_B):
        blocks = start + tl.arange(0, BLOCK_B)
        ptrs = (off_bh * NSB + blocks[:, None]) * HEAD_DIM + d[None, :]
        ok = (blocks < NSB)[:, None]
        k_sum += tl.sum(tl.load(KSum + ptrs, mask=ok, other=0.0), 0)
        v_max = tl.maximum(v_max, tl.max(tl.load(VMax + ptrs, mask=ok, other=0.0), 0))
    tl.store(Mean + off_bh * HEAD_DIM + d, k_sum / L)
    tl.store(VS + off_bh * HEAD_DIM + d, tl.maximum(v_max, 1e-12) / VMAX)


@triton.jit
def _quant_q_kernel(X, Mean, Y, S, QM, stride_xb, stride_xh, stride_xl, H, L,
                    HEAD_DIM: tl.constexpr, INT8: tl.constexpr, QMAX: tl.constexpr, BLOCK_L: tl.constexpr):
    """Per-token scales; also q . mean(K) per token for the LSE."""
    off_bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.arange(0, HEAD_DIM)
    ok = rows < L
    x_base = X + (off_bh // H).to(tl.int64) * stride_xb + (off_bh % H).to(tl.int64) * stride_xh
    x = tl.load(x_base + rows[:, None] * stride_xl + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 1), 1e-12) / QMAX
    mean = tl.load(Mean + off_bh.to(tl.int64) * HEAD_DIM + d)
    row = off_bh.to(tl.int64) * L + rows
    tl.store(Y + row[:, None] * HEAD_DIM + d[None, :], _quantize(x, scale[:, None], INT8), mask=ok[:, None])
    tl.store(S + row, scale, mask=ok)
    tl.store(QM + row, tl.sum(x * mean[None, :], 1), mask=ok)


@triton.jit
def _quant_k_kernel(X, Mean, Y, S, stride_xb, stride_xh, stride_xl, H, L, NKB,
                    HEAD_DIM: tl.constexpr, INT8: tl.constexpr, QMAX: tl.constexpr, K_BLOCK: tl.constexpr):
    """K minus its per-head mean, one scale per K_BLOCK tokens."""
    off_bh = tl.program_id(1)
    rows = tl.program_id(0) * K_BLOCK + tl.arange(0, K_BLOCK)
    d = tl.arange(0, HEAD_DIM)
    ok = rows < L
    x_base = X + (off_bh // H).to(tl.int64) * stride_xb + (off_bh % H).to(tl.int64) * stride_xh
    x = tl.load(x_base + rows[:, None] * stride_xl + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    mean = tl.load(Mean + off_bh.to(tl.int64) * HEAD_DIM + d)
    x = tl.where(ok[:, None], x - mean[None, :], 0.0)
    scale = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-12) / QMAX
    row = off_bh.to(tl.int64) * L + rows
    tl.store(Y + row[:, None] * HEAD_DIM + d[None, :], _quantize(x, scale, INT8), mask=ok[:, None])
    tl.store(S + off_bh.to(tl.int64) * NKB + tl.program_id(0), scale)


@triton.jit
def _quant_vt_kernel(X, S, Yt, stride_xb, stride_xh, stride_xl, H, L, L_PAD,
                     HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr):
    """e4m3 V with per-channel scales, written transposed (D, L_PAD); padding columns get zeros."""
    off_bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.arange(0, HEAD_DIM)
    x_base = X + (off_bh // H).to(tl.int64) * stride_xb + (off_bh % H).to(tl.int64) * stride_xh
    x = tl.load(x_base + rows[:, None] * stride_xl + d[None, :], mask=(rows < L)[:, None], other=0.0)
    scale = tl.load(S + off_bh.to(tl.int64) * HEAD_DIM + d)
    yt = tl.trans(_quantize(x.to(tl.float32), scale[None, :], False))
    y_base = Yt + off_bh.to(tl.int64) * HEAD_DIM * L_PAD
    tl.store(y_base + d[:, None] * L_PAD + rows[None, :], yt, mask=(rows < L_PAD)[None, :])


def quantize_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout = "BLHD",
                 qk_format: QKFormat = "int8") -> FP8Tensors:
    """Quantise Q/K/V for `attention_fp8_quantized` (see the module docstring for the scale granularity)."""
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    B, H, Lq, D = dims(q, layout)
    Lk = dims(k, layout)[2]
    int8 = qk_format == "int8"
    qk_dtype, qmax = (torch.int8, INT8_MAX) if int8 else (FP8, FP8_MAX)
    dev = q.device
    nkb = triton.cdiv(Lk, K_BLOCK)
    # K's mean and V's amax over tokens in Triton: torch's two reductions took 27 + 26 us at (1,24,4608,128) on an
    # H100 (~1 TB/s). STATS_BLOCKS key blocks a program and a finish kernel split over channels: with one block a
    # program and one finish program a head, ours took 44 us there but 301 us against torch's 253 at
    # (1,40,32760,128) (10 MB of partials, 40 finish programs on 132 SMs; perf/RESULTS.md).
    nsb = triton.cdiv(nkb, STATS_BLOCKS)
    k_sum = torch.empty((B * H, nsb, D), device=dev, dtype=torch.float32)
    v_max = torch.empty((B * H, nsb, D), device=dev, dtype=torch.float32)
    k_mean = torch.empty((B, H, D), device=dev, dtype=torch.float32)
    v_scale = torch.empty((B, H, D), device=dev, dtype=torch.float32)
    _kv_stats_kernel[(nsb, B * H)](k, v, k_sum, v_max, *_strides(k, layout), *_strides(v, layout), H, Lk, nsb,
                                   HEAD_DIM=D, K_BLOCK=K_BLOCK, BLOCKS=STATS_BLOCKS, num_warps=8)
    _kv_finish_kernel[(B * H, triton.cdiv(D, 32))](k_sum, v_max, k_mean, v_scale, Lk, nsb, HEAD_DIM=D, VMAX=FP8_MAX,
                                                   BLOCK_B=16, BLOCK_D=min(D, 32), num_warps=4)
    lk_pad = triton.cdiv(Lk, 16) * 16
    q8 = torch.empty((B, H, Lq, D), device=dev, dtype=qk_dtype)
    k8 = torch.empty((B, H, Lk, D), device=dev, dtype=qk_dtype)
    vt8 = torch.empty((B, H, D, lk_pad), device=dev, dtype=FP8)
    q_scale = torch.empty((B, H, Lq), device=dev, dtype=torch.float32)
    q_dot_kmean = torch.empty((B, H, Lq), device=dev, dtype=torch.float32)
    k_scale = torch.empty((B, H, nkb), device=dev, dtype=torch.float32)
    # 64-token tiles, 4 warps: these kernels are bandwidth-bound passes over (tokens, D) tiles.
    _quant_q_kernel[(triton.cdiv(Lq, 64), B * H)](q, k_mean, q8, q_scale, q_dot_kmean, *_strides(q, layout), H, Lq,
                                                   HEAD_DIM=D, INT8=int8, QMAX=qmax, BLOCK_L=64, num_warps=4)
    _quant_k_kernel[(nkb, B * H)](k, k_mean, k8, k_scale, *_strides(k, layout), H, Lk, nkb,
                                  HEAD_DIM=D, INT8=int8, QMAX=qmax, K_BLOCK=K_BLOCK, num_warps=8)
    _quant_vt_kernel[(triton.cdiv(lk_pad, 64), B * H)](v, v_scale, vt8, *_strides(v, layout), H, Lk, lk_pad,
                                                       HEAD_DIM=D, BLOCK_L=64, num_warps=4)
    return FP8Tensors(q8, k8, vt8, q_scale, k_scale, v_scale, q_dot_kmean)


@triton.jit
def _qk_tile_fp8(q, Kd, k_row0, k_ptrs, start_n, LK,
                 TAIL: tl.constexpr, USE_TMA: tl.constexpr, QK_INT8: tl.constexpr,
                 BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Unscaled scores of the key tile at start_n, as fp32; INT8: plus fp8_scores.SCORE_OFFSET."""
    cols = start_n + tl.arange(0, BLOCK_N)
    if USE_TMA:  # tail rows past LK belong to the next head: their scores are masked by the caller
        k = Kd.load([k_row0 + start_n, 0])
    elif TAIL:
        k = tl.load(k_ptrs + start_n * HEAD_DIM, mask=(cols < LK)[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs + start_n * HEAD_DIM)
    if QK_INT8:
        qk_i = tl.dot(q, tl.trans(k), out_dtype=tl.int32)
        qk = int8_scores(qk_i)
    else:
        qk = tl.dot(q, tl.trans(k))
    return qk


@triton.jit
def _softmax_pv_fp8(acc, l_i, m_i, qk, q_row_scale, Vtd, vt_row0, vt_ptrs, ks_ptr, mask_ptr, start_n, LK,
                    TAIL: tl.constexpr, USE_TMA: tl.constexpr, HAS_MASK: tl.constexpr, QK_INT8: tl.constexpr,
                    K_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    s = q_row_scale * tl.load(ks_ptr + start_n // K_BLOCK)
    qk = mask_keys(qk, mask_ptr, start_n, LK, TAIL, HAS_MASK, BLOCK_N)
    s, bias, m_ij = row_bias(m_i, qk, s, QK_INT8)  # INT8: without subtracting SCORE_OFFSET per score (fp8_scores)
    p = tl.math.exp2(qk * s[:, None] - bias[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    if USE_TMA:  # Vt's padding columns are zeros and TMA fills past the end with zeros
        vt = Vtd.load([vt_row0, start_n])
    elif TAIL:
        vt = tl.load(vt_ptrs + start_n, mask=(cols < LK)[None, :], other=0.0)
    else:
        vt = tl.load(vt_ptrs + start_n)
    # Fresh fp32 product added to the fp32 accumulator: Hopper's fp8 MMA accumulates with reduced
    # precision inside one instruction chain, so the long sum over tiles stays out of it.
    acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), tl.trans(vt))
    return acc, l_i, m_ij


@triton.jit
def _attn_fp8_inner(
    acc, l_i, m_i, q, q_row_scale,
    k_ptrs, vt_ptrs, ks_ptr, mask_ptr, Kd, Vtd, k_row0, vt_row0,
    start, end, LK,
    TAIL: tl.constexpr,
    USE_TMA: tl.constexpr,
    PIPE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    QK_INT8: tl.constexpr,
    K_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    if PIPE:  # scores of tile j+1 issued before the softmax of tile j (see attention._attn_inner)
        if end > start:
            qk = _qk_tile_fp8(q, Kd, k_row0, k_ptrs, start, LK, TAIL, USE_TMA, QK_INT8, BLOCK_N, HEAD_DIM)
            for start_n in range(start, end - BLOCK_N, BLOCK_N):
                start_n = tl.multiple_of(start_n, BLOCK_N)
                qk_next = _qk_tile_fp8(q, Kd, k_row0, k_ptrs, start_n + BLOCK_N, LK, TAIL, USE_TMA, QK_INT8,
                                       BLOCK_N, HEAD_DIM)
                acc, l_i, m_i = _softmax_pv_fp8(acc, l_i, m_i, qk, q_row_scale, Vtd, vt_row0, vt_ptrs, ks_ptr,
                                                mask_ptr, start_n, LK, TAIL, USE_TMA, HAS_MASK, QK_INT8, K_BLOCK,
                                                BLOCK_N)
                qk = qk_next
            acc, l_i, m_i = _softmax_pv_fp8(acc, l_i, m_i, qk, q_row_scale, Vtd, vt_row0, vt_ptrs, ks_ptr,
                                            mask_ptr, end - BLOCK_N, LK, TAIL, USE_TMA, HAS_MASK, QK_INT8,
                                            K_BLOCK, BLOCK_N)
    else:
        for start_n in range(start, end, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            qk = _qk_tile_fp8(q, Kd, k_row0, k_ptrs, start_n, LK, TAIL, USE_TMA, QK_INT8, BLOCK_N, HEAD_DIM)
            acc, l_i, m_i = _softmax_pv_fp8(acc, l_i, m_i, qk, q_row_scale, Vtd, vt_row0, vt_ptrs, ks_ptr,
                                            mask_ptr, start_n, LK, TAIL, USE_TMA, HAS_MASK, QK_INT8, K_BLOCK,
                                            BLOCK_N)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_fp8_kernel(
    Q, K, Vt, QS, KS, VS, QM, Out, Lse, Mask,
    Qd, Kd, Vtd,
    sm_scale,
    stride_ob, stride_oh, stride_ol, stride_mb,
    H, LQ, LK, LK_PAD, NKB, LQ_TUNE, LK_TUNE,  # *_TUNE: autotuning keys only (attention.tune_length)
    HEAD_DIM: tl.constexpr,
    HAS_MASK: tl.constexpr,
    QK_INT8: tl.constexpr,
    K_BLOCK: tl.constexpr,
    USE_TMA: tl.constexpr,
    PIPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tl.static_assert(K_BLOCK % BLOCK_N == 0)
    tl.static_assert(HEAD_DIM <= 256)  # int32 scores stay under 2^22 = 256 * 127^2 + margin
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    bh = off_bh.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < LQ

    if USE_TMA:
        q = Qd.load([off_bh * LQ + pid_m * BLOCK_M, 0])
    else:
        q = tl.load(Q + bh * LQ * HEAD_DIM + offs_m[:, None] * HEAD_DIM + d[None, :], mask=row_ok[:, None],
                    other=0.0)
    q_row_scale = tl.load(QS + bh * LQ + offs_m, mask=row_ok, other=1.0) * (sm_scale * 1.4426950408889634)
    k_ptrs = K + bh * LK * HEAD_DIM + offs_n[:, None] * HEAD_DIM + d[None, :]
    vt_ptrs = Vt + bh * HEAD_DIM * LK_PAD + d[:, None] * LK_PAD + offs_n[None, :]
    ks_ptr = KS + bh * NKB
    mask_ptr = Mask + off_b.to(tl.int64) * stride_mb

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = (LK // BLOCK_N) * BLOCK_N
    k_row0 = off_bh * LK
    vt_row0 = off_bh * HEAD_DIM
    acc, l_i, m_i = _attn_fp8_inner(acc, l_i, m_i, q, q_row_scale, k_ptrs, vt_ptrs, ks_ptr, mask_ptr,
                                    Kd, Vtd, k_row0, vt_row0,
                                    0, n_full, LK, False, USE_TMA, PIPE, HAS_MASK, QK_INT8, K_BLOCK, BLOCK_N,
                                    HEAD_DIM)
    acc, l_i, m_i = _attn_fp8_inner(acc, l_i, m_i, q, q_row_scale, k_ptrs, vt_ptrs, ks_ptr, mask_ptr,
                                    Kd, Vtd, k_row0, vt_row0,
                                    n_full, LK, LK, True, USE_TMA, False, HAS_MASK, QK_INT8, K_BLOCK, BLOCK_N,
                                    HEAD_DIM)

    has_keys = l_i > 0.0
    v_scale = tl.load(VS + bh * HEAD_DIM + d)
    out = acc * v_scale[None, :] / tl.where(has_keys, l_i, 1.0)[:, None]
    # The 2^8 P scale sits in l_i: take it out of the LSE; add back the smoothing shift q . mean(K).
    lse = tl.where(has_keys, (m_i - 8.0 + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    lse += sm_scale * tl.load(QM + bh * LQ + offs_m, mask=row_ok, other=0.0)
    tl.store(Lse + bh * LQ + offs_m, lse, mask=row_ok)
    o_base = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ol + d[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None])


INTERPRET_CONFIG_FP8: dict[str, int] = {"BLOCK_M": 64, "BLOCK_N": 64, "USE_TMA": False, "PIPE": False}


def _set_tma_block_shapes(nargs: dict) -> None:
    if isinstance(nargs["Qd"], TensorDescriptor):
        d = nargs["HEAD_DIM"]
        nargs["Qd"].block_shape = [nargs["BLOCK_M"], d]
        nargs["Kd"].block_shape = [nargs["BLOCK_N"], d]
        nargs["Vtd"].block_shape = [d, nargs["BLOCK_N"]]


# (BLOCK_M, BLOCK_N, num_warps, num_stages, USE_TMA, PIPE). Hopper, >= 1024 queries; H100, 2026-11-26:
# 128x128 tiles with 3 stages and pointer loads won at every shape (13% ahead of the next), 2 stages lost.
FP8_LONG = frozenset({
    (128, 128, 8, 3, False, False), (128, 128, 8, 3, True, False), (128, 64, 8, 3, False, False),
    (128, 64, 8, 4, False, False), (128, 128, 8, 3, False, True), (128, 128, 8, 3, True, True),
    (128, 64, 8, 3, False, True), (128, 64, 8, 4, False, True),
})
FP8_SHORT = frozenset({(64, 64, 4, 2, False, False), (128, 64, 8, 2, False, False)})


def _key(c: triton.Config) -> tuple[int, int, int, int, bool, bool]:
    k = c.kwargs
    return (k["BLOCK_M"], k["BLOCK_N"], c.num_warps, c.num_stages, k["USE_TMA"], k["PIPE"])


def _fp8_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": tma, "PIPE": pipe}, num_warps=w, num_stages=s,
                      pre_hook=_set_tma_block_shapes)
        for bm, bn, w, s, tma, pipe in sorted(FP8_LONG | FP8_SHORT)
    ]


def prune_fp8_configs(configs: list[triton.Config], named_args: dict, **meta) -> list[triton.Config]:
    """Hopper (and Ada) only, as fp8 MMA needs sm_89+; raise if nothing fits."""
    props = torch.cuda.get_device_properties(named_args["Q"].device)
    if (props.major, props.minor) < (8, 9):
        raise RuntimeError(f"ditserve attention_fp8: {props.name} has no fp8 tensor cores (needs sm_89+)")
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    head_dim = meta["HEAD_DIM"]
    allowed = FP8_LONG if _attn.long_sequence(named_args["LQ_TUNE"]) else FP8_SHORT
    kept = [
        c for c in configs
        if _key(c) in allowed
        and (c.kwargs["BLOCK_M"] * head_dim + 2 * c.num_stages * c.kwargs["BLOCK_N"] * head_dim) <= smem
        and (props.major >= 9 or not c.kwargs["USE_TMA"])
    ]
    if not kept:
        raise RuntimeError(f"ditserve attention_fp8: no kernel config fits head_dim={head_dim} on {props.name}")
    return kept


_attn_fwd_fp8_tuned = triton.autotune(
    configs=_fp8_configs(), key=["LQ_TUNE", "LK_TUNE", "HEAD_DIM", "HAS_MASK", "QK_INT8"],
    prune_configs_by={"early_config_prune": prune_fp8_configs},
)(_attn_fwd_fp8_kernel)


def attention_fp8_quantized(
    t: FP8Tensors, *, mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
    out_layout: Layout = "BLHD", out_dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel alone, on already-quantised inputs (int8 or e4m3 Q/K, told apart by dtype). Returns
    (out in out_layout, natural-log LSE (B, H, Lq) fp32)."""
    B, H, Lq, D = t.q.shape
    Lk = t.k.shape[2]
    check_mask(mask, t.k, "BHLD")
    s = 1.0 / math.sqrt(D) if scale is None else float(scale)
    shape = (B, Lq, H, D) if out_layout == "BLHD" else (B, H, Lq, D)
    out = _attn._alloc(shape, t.q, out_dtype)
    lse = _attn._alloc((B, H, Lq), t.q, torch.float32)
    mask_u8 = mask.contiguous().view(torch.uint8) if mask is not None else None
    if _attn.HOPPER_KERNEL and _hopper_fp8.supported(t):
        _hopper_fp8.launch(t, out, lse, mask_u8, _strides(out, out_layout), s)
        return out, lse
    if INTERPRET:
        descs = (t.q, t.k, t.vt)
    else:  # block shapes are set per config by _set_tma_block_shapes
        descs = tuple(TensorDescriptor(x, [x.shape[0] * x.shape[1] * x.shape[2], x.shape[3]], [x.shape[3], 1],
                                       [1, 16]) for x in (t.q, t.k, t.vt))
    args = (t.q, t.k, t.vt, t.q_scale, t.k_scale, t.v_scale, t.q_dot_kmean, out, lse,
            mask_u8 if mask_u8 is not None else t.q_scale, *descs, s,  # q_scale: unused pointer without a mask
            *_strides(out, out_layout),
            mask_u8.stride(0) if mask_u8 is not None else 0,
            H, Lq, Lk, t.vt.shape[-1], t.k_scale.shape[-1], tune_length(Lq), tune_length(Lk))
    meta = dict(HEAD_DIM=D, HAS_MASK=mask is not None, QK_INT8=t.q.dtype == torch.int8, K_BLOCK=K_BLOCK)
    launch(_attn_fwd_fp8_kernel, _attn_fwd_fp8_tuned, INTERPRET_CONFIG_FP8, args, meta, Lq, B * H)
    return out, lse


@torch.library.custom_op("ditserve::attention_fp8", mutates_args=())
def _attention_fp8_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], layout: str, scale: float,
    qk_format: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    t = quantize_fp8(q, k, v, layout, qk_format)
    return attention_fp8_quantized(t, mask=mask, scale=scale, out_layout=layout, out_dtype=q.dtype)


@_attention_fp8_op.register_fake
def _(q, k, v, mask, layout, scale, qk_format):
    B, H, Lq, _ = dims(q, layout)
    # The real op allocates out contiguous in `layout`, i.e. in q's shape, whatever q's strides: empty_like
    # would keep them.
    return q.new_empty(q.shape), q.new_empty((B, H, Lq), dtype=torch.float32)


def attention_fp8(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
    layout: Layout = "BLHD", scale: Optional[float] = None, return_lse: bool = False,
    qk_format: QKFormat = "int8",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Quantised attention (ditserve::attention_fp8): same contract as `attention` (no prologue); bf16/fp16
    in and out; Q/K quantised to int8 (default) or e4m3, V and P to e4m3."""
    if qk_format not in ("int8", "fp8"):
        raise ValueError(f"qk_format must be 'int8' or 'fp8', got {qk_format!r}")
    check_mask(mask, k, layout)  # here too, not only in attention_fp8_quantized: before quantising
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = torch.ops.ditserve.attention_fp8(q, k, v, mask, layout, s, qk_format)
    return (out, lse) if return_lse else out
