"""FP8 attention for Hopper (sm_90) in Gluon: attention_hopper.py's warp-specialised structure on the tensors that
attention_fp8.quantize_fp8 makes (int8 or e4m3 Q.K^T, e4m3 P.V; scales and the smoothing as described there).

Differences from the bf16 kernel: the scores leave the MMA as int32 (int8 Q/K) and become fp32 by the 1.5 * 2^23
bit trick, with the offset folded into the row max and the exponent's bias exactly as in attention_fp8; P is
quantised to e4m3 as exp2(s - m + 8) (scaled by 256) and handed to the P V product through shared memory (as a
register operand it would have to stay alive across the asynchronous MMA, and Triton 3.6 cannot pass 8-bit
registers through `warpgroup_mma_wait`: "Unexpected bitwidth in WGMMAWaitGroupOp: 8"); V comes transposed,
(B*H*D, Lk_pad) rows of tokens, because fp8 wgmma wants both operands K-major.

The consumer loop is software-pipelined by one key tile: S_{j+1} = Q K_{j+1}^T is issued before the softmax of
S_j, so that product (and P_{j-1} V_{j-1}) runs on the tensor cores while the warpgroup exponentiates; one wait
after the softmax then finds both done. (Issued as FA3 does, S_j and P_{j-1} V_{j-1} together after the softmax of
tile j-1, the warpgroup sat ~520-550 cycles a tile waiting for S_j: perf/RESULTS.md, clock64 profile.) H100, kernel
alone, int8 Q.K^T: +3-11% at 32,760 tokens, unchanged at 4,352-4,608, where the persistent grid (attention_hopper)
then gained 6-9%; e4m3 Q.K^T lost 5-7% at 4,352-4,608 to it (ptxas copies S_{j+1} into S_j's registers, 60 MOVs a
tile; unrolling by two to avoid that spilled), 2-3% once persistent. S_j, S_{j+1} and O are 192 of a consumer's 240
registers, so P goes through shared memory, in two buffers a warpgroup: P_j is stored while P V_{j-1} still reads
the other one, and only then does the warpgroup wait. (With one buffer that wait had to come before the store, and
ptxas hoisted it above the exponentials.)
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, warpgroup_mma, warpgroup_mma_init, warpgroup_mma_wait,
)

from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .fp8_scores import int8_scores, row_bias
from .attention_hopper import (
    BLOCK_M, BLOCK_N, CONSUMERS, MAXNREG, REGS_CONSUMER, REGS_PRODUCER, _next_task, _producer, _ring, _task, programs,
    runs_on, smem_layout, task_counter, wgmma_layout,
)


@gluon.jit
def _softmax_update_fp8(s_raw, m_i, l_i, j, LK, mask_ptr, q_row_scale, ks_ptr, TAIL: gl.constexpr,
                        HAS_MASK: gl.constexpr, QK_INT8: gl.constexpr, BLOCK_N: gl.constexpr):
    """Online-softmax step on key tile j's raw scores: returns P * 256 (fp32), alpha, m, l (see attention_fp8).
    TAIL: mask the keys past LK (the caller passes it for the last tile only)."""
    if QK_INT8:
        qk = int8_scores(s_raw)
    else:
        qk = s_raw
    cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, qk.type.layout))
    if HAS_MASK:
        keep = gl.load(mask_ptr + cols, mask=cols < LK, other=0) != 0
        qk = gl.where(keep[None, :], qk, float("-inf"))
    elif TAIL:
        qk = gl.where((cols < LK)[None, :], qk, float("-inf"))
    sc = q_row_scale * gl.load(ks_ptr + j)  # one K scale per 128-key block = per tile
    sc, bias, m_new = row_bias(m_i, qk, sc, QK_INT8)
    p = gl.exp2(qk * sc[:, None] - bias[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _consumer_fp8(descs, ring, sched, rest, WG: gl.constexpr, FLAGS: gl.constexpr):
    q_desc, k_desc, vt_desc = descs
    q_smem, k_smem, vt_smem, q_bar, q_empty, k_ready, k_empty, v_ready, v_empty, task_id, counter = ring
    n_tasks, n_m, H, LQ, LK = sched
    p_smem, QS, KS, VS, QM, Out, Lse, Mask, stride_ob, stride_oh, stride_ol, stride_mb, NKB, sm_scale = rest
    TAIL: gl.constexpr = FLAGS[1]
    HAS_MASK: gl.constexpr = FLAGS[2]
    QK_INT8: gl.constexpr = FLAGS[3]
    BM: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    HEAD_DIM: gl.constexpr = k_desc.block_type.shape[1]
    STAGES: gl.constexpr = k_smem.type.shape[0]
    s_layout: gl.constexpr = wgmma_layout(BLOCK_N, 32)
    o_layout: gl.constexpr = wgmma_layout(HEAD_DIM, 32)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    n_kv = gl.cdiv(LK, BLOCK_N)
    q = q_smem.index(WG)
    zero_s = gl.zeros([BM, BLOCK_N], gl.int32 if QK_INT8 else gl.float32, s_layout)

    c = 0  # K/V tiles consumed so far: ring slot and phase of tile j of this task are those of c + j
    it = 0
    t = _next_task(q_bar, task_id, WG, it)
    while t < n_tasks:
        task = _task(t, sched, BM, HEAD_DIM, False)
        off_b, off_h, off_bh, m0 = task[0], task[1], task[2], task[3]
        bh = off_bh.to(gl.int64)
        mask_ptr = Mask + off_b.to(gl.int64) * stride_mb
        ks_ptr = KS + bh * NKB
        rows = m0 + WG * BM + gl.arange(0, BM, layout=s_rows)
        q_row_scale = gl.load(QS + bh * LQ + rows, mask=rows < LQ, other=1.0) * (sm_scale * 1.4426950408889634)
        o = gl.zeros([BM, HEAD_DIM], gl.float32, o_layout)
        m_i = gl.full([BM], -1.0e30, gl.float32, s_rows)
        l_i = gl.zeros([BM], gl.float32, s_rows)

        mbarrier.wait(k_ready.index(c % STAGES), (c // STAGES) & 1)
        s_tok = warpgroup_mma(q, k_smem.index(c % STAGES).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(c % STAGES), count=1)
        # Software-pipelined by one key tile: S_{j+1} = Q K_{j+1}^T is issued before the softmax of S_j, so the
        # tensor cores compute it (and P_{j-1} V_{j-1}) while this warpgroup exponentiates.
        pv_tok = warpgroup_mma_init(o)  # no P V product in flight before the first tile
        p_prev = p_smem.index(2 * WG + 1)
        for j in range(0, n_kv - 1):
            sk = (c + j + 1) % STAGES
            sv = (c + j) % STAGES
            mbarrier.wait(k_ready.index(sk), ((c + j + 1) // STAGES) & 1)
            s_tok = warpgroup_mma(q, k_smem.index(sk).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            p, alpha, m_i, l_i = _softmax_update_fp8(s, m_i, l_i, j, LK, mask_ptr, q_row_scale, ks_ptr, False,
                                                     HAS_MASK, QK_INT8, BLOCK_N)
            # P_j goes to one buffer while P V_{j-1} still reads the other; storing it before waiting for that
            # product keeps ptxas from hoisting the wait above the exponentials.
            p_cur = p_smem.index(2 * WG + j % 2)
            p_cur.store(p.to(gl.float8e4nv))
            fence_async_shared()
            # Both products were issued before the softmax and are done by now: P V_{j-1} and S_{j+1}.
            o, _, s = warpgroup_mma_wait(0, deps=(pv_tok, p_prev, s_tok))
            mbarrier.arrive(v_empty.index((sv + STAGES - 1) % STAGES), count=1, pred=j > 0)
            mbarrier.arrive(k_empty.index(sk), count=1)
            o = o * gl.convert_layout(alpha, o_rows)[:, None]
            mbarrier.wait(v_ready.index(sv), ((c + j) // STAGES) & 1)
            pv_tok = warpgroup_mma(p_cur, vt_smem.index(sv).permute((1, 0)), o, use_acc=True, is_async=True)
            p_prev = p_cur
        # Every Q K^T of this task is done: the producer may load the next task's Q.
        mbarrier.arrive(q_empty.index(WG), count=1)

        # The last key tile: its softmax, then the last P V product.
        j = n_kv - 1
        sv = (c + j) % STAGES
        p, alpha, m_i, l_i = _softmax_update_fp8(s, m_i, l_i, j, LK, mask_ptr, q_row_scale, ks_ptr, TAIL,
                                                 HAS_MASK, QK_INT8, BLOCK_N)
        p_cur = p_smem.index(2 * WG + j % 2)
        p_cur.store(p.to(gl.float8e4nv))
        fence_async_shared()
        o, _ = warpgroup_mma_wait(0, deps=(pv_tok, p_prev))
        mbarrier.arrive(v_empty.index((sv + STAGES - 1) % STAGES), count=1, pred=j > 0)
        o = o * gl.convert_layout(alpha, o_rows)[:, None]
        mbarrier.wait(v_ready.index(sv), ((c + j) // STAGES) & 1)
        pv_tok = warpgroup_mma(p_cur, vt_smem.index(sv).permute((1, 0)), o, use_acc=True, is_async=True)
        o, _ = warpgroup_mma_wait(0, deps=(pv_tok, p_cur))
        mbarrier.arrive(v_empty.index(sv), count=1)

        # V's per-channel scale once; the 2^8 P scale cancels in o / l and leaves the LSE; the smoothing shift
        # q . mean(K) goes back into the LSE (attention_fp8's contract).
        l_o = gl.convert_layout(l_i, o_rows)
        has_keys = l_o > 0.0
        l_safe = gl.where(has_keys, l_o, 1.0)
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        o = o * gl.load(VS + bh * HEAD_DIM + cols)[None, :] / l_safe[:, None]
        rows_o = m0 + WG * BM + gl.arange(0, BM, layout=o_rows)
        row_ok = rows_o < LQ
        o_ptr = Out + off_b.to(gl.int64) * stride_ob + off_h.to(gl.int64) * stride_oh
        gl.store(o_ptr + rows_o[:, None].to(gl.int64) * stride_ol + cols[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
        lse = gl.where(has_keys, (gl.convert_layout(m_i, o_rows) - 8.0 + gl.log2(l_safe)) * 0.6931471805599453,
                       float("-inf"))
        lse += sm_scale * gl.load(QM + bh * LQ + rows_o, mask=row_ok, other=0.0)
        gl.store(Lse + bh * LQ + rows_o, lse, mask=row_ok)
        c += n_kv
        it += 1
        t = _next_task(q_bar, task_id, WG, it)


@gluon.jit
def _attn_fwd_hopper_fp8(q_desc, k_desc, vt_desc, QS, KS, VS, QM, Out, Lse, Mask, Counter, stride_ob, stride_oh,
                         stride_ol, stride_mb, H, LQ, LK, NKB, sm_scale, n_tasks, STAGES: gl.constexpr,
                         TAIL: gl.constexpr, HAS_MASK: gl.constexpr, QK_INT8: gl.constexpr):
    """Tasks as in the bf16 kernel. 2-D views: Q (B*H*Lq, D), K (B*H*Lk, D), Vt (B*H*D, Lk_pad)."""
    BM: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    descs = (q_desc, k_desc, vt_desc)
    ring = _ring(q_desc, k_desc, vt_desc, Counter, STAGES)
    sched = (n_tasks, gl.cdiv(LQ, 2 * BM), H, LQ, LK)
    p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BLOCK_N], gl.float8e4nv)
    p_smem = gl.allocate_shared_memory(gl.float8e4nv, [4, BM, BLOCK_N], p_layout)
    rest = (p_smem, QS, KS, VS, QM, Out, Lse, Mask, stride_ob, stride_oh, stride_ol, stride_mb, NKB, sm_scale)
    FLAGS: gl.constexpr = (False, TAIL, HAS_MASK, QK_INT8, True)  # (BLHD, ..., V_T): see attention_hopper._producer
    gl.warp_specialize([
        (_consumer_fp8, (descs, ring, sched, rest, 0, FLAGS)),
        (_consumer_fp8, (descs, ring, sched, rest, 1, FLAGS)),
        (_producer, (descs, ring, sched, rest, 0, FLAGS)),
    ], [4, 1], [REGS_CONSUMER, REGS_PRODUCER])


STAGES = 3  # 8-bit tiles: Q 16 KB, K and V^T 32 KB a stage at head dim 128, P 2 x 16 KB: 144 KB in all
# Head dim 128 only: at 64 the Triton-lang FP8 kernel is faster (H100, (1, 24, 4608, 64), kernel alone: int8 Q.K^T
# 440.9 vs 383.5 TFLOP/s, e4m3 471.7 vs 391.0; perf/RESULTS.md, 2026-11-27).
HEAD_DIM = 128


def supported(t) -> bool:
    """Whether this kernel runs attention_fp8's quantised tensors `t`: an sm_90 GPU and head dim 128."""
    return t.q.shape[-1] == HEAD_DIM and runs_on(t.q.device)


def launch(t, out: torch.Tensor, lse: torch.Tensor, mask_u8: Optional[torch.Tensor], out_strides: tuple[int, int, int],
           sm_scale: float) -> None:
    """Writes out and lse for attention_fp8's quantised tensors `t` (FP8Tensors); see attention_fp8_quantized."""
    B, H, Lq, D = t.q.shape
    Lk = t.k.shape[2]
    qk = gl.int8 if t.q.dtype == torch.int8 else gl.float8e4nv
    descs = []
    for x, block, dt in ((t.q, [BLOCK_M, D], qk), (t.k, [BLOCK_N, D], qk), (t.vt, [D, BLOCK_N], gl.float8e4nv)):
        rows = x.shape[0] * x.shape[1] * x.shape[2]
        descs.append(TensorDescriptor(x, [rows, x.shape[3]], [x.shape[3], 1], block, smem_layout(tuple(block), dt)))
    n_tasks = B * H * triton.cdiv(Lq, CONSUMERS * BLOCK_M)
    _attn_fwd_hopper_fp8[(programs(n_tasks, t.q.device), )](
        *descs, t.q_scale, t.k_scale, t.v_scale, t.q_dot_kmean, out, lse,
        mask_u8 if mask_u8 is not None else lse, task_counter(t.q.device), *out_strides,
        mask_u8.stride(0) if mask_u8 is not None else 0,
        H, Lq, Lk, t.k_scale.shape[-1], sm_scale, n_tasks,
        STAGES=STAGES, TAIL=Lk % BLOCK_N != 0, HAS_MASK=mask_u8 is not None, QK_INT8=t.q.dtype == torch.int8,
        num_warps=4, maxnreg=MAXNREG)
