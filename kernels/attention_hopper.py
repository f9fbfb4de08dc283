"""Forward attention for Hopper (sm_90) in Gluon, FlashAttention-3's structure: warp-specialised, with the
tensor cores and the softmax overlapped explicitly.

Why a second kernel: `attention.py` (Triton-lang) stays at 0.77-0.89x cuDNN SDPA on an H100 because the
softmax of a key tile and the two MMAs of that tile run one after the other within a warpgroup (perf/RESULTS.md:
Triton's own warp specialisation and software pipelining of that kernel were slower still). Gluon exposes what
those passes decide for us: asynchronous `warpgroup_mma` with explicit waits, TMA with mbarriers, and
warp-specialised partitions with their register budgets.

The grid is persistent, one program an SM, and a program takes tasks (2 x BLOCK_M query rows of one (batch,
head)) one after another, so that one task's last tiles and output overlap the loads of the next (with a program a
task, each paid ~6-11 us of start and finish at FLUX's length). Tasks are fetched, not dealt out: a program's first
is its own index, the next ones come from a counter of the launch (atomic), so a program whose SM is busy - with
NCCL's kernels under Ulysses, where one head chunk's exchange overlaps the other's attention - takes fewer. H100,
kernel alone (perf/RESULTS.md): persistent with a static share each, the FP8 kernel (int8 Q.K^T) gained 6-9% at
4,352-4,608 tokens over one task a program and this one 0-3%; fetching the tasks, FP8 gained another 1-2% there and
5-8% at 32,760 (e4m3 Q.K^T lost 0-3%), and this one stayed at +0-3%. FLUX's Ulysses-2 step took the same time with
this kernel persistent as with a program a task (an H200 pair). In a program:
  * a producer warp loads a task's two Q tiles once the consumers are done with the previous ones (q_empty) and
    streams K and V tiles by TMA into a STAGES-deep ring that runs on across tasks (ready barriers signalled
    by the copies, empty barriers by both consumers);
  * two consumer warpgroups (the default partition and one worker) each own BLOCK_M = 64 rows. Per key
    tile j a consumer issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to back, waits for S_j only, and
    exponentiates it while the P V product is still on the tensor cores (FA3's intra-warpgroup overlap);
    then it waits for O, rescales it and moves on. The two warpgroups are not synchronised with each
    other, so the SM's schedulers also overlap one warpgroup's softmax with the other's MMAs.
    In the variant without a key mask ptxas moves the wait for O above the exponentials (SASS; the compile
    check reports it), so only the second kind of overlap happens there; pinning the wait after them
    measured no gain for this kernel (perf/RESULTS.md), unlike the FP8 one (attention_hopper_fp8.py).

Used by `attention.attention` (the `triton` backend) when `supported`: an sm_90 GPU, bf16, head dim 64 or
128, token rows a TMA can address. Non-causal, optional key-padding mask; the norm/RoPE prologue runs as a
prepass on Q and K first. Keys past Lk in the last tile are masked; in the 2-D TMA views those rows belong to the
next batch/head and reach P V with P = 0 (finite values, as every activation here).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .tma import tma_origin

BLOCK_M = 64  # query rows per consumer warpgroup (wgmma's M is 64 per warpgroup)
CONSUMERS = 2


@gluon.constexpr_function
def wgmma_layout(n, k):
    """Register layout of a consumer warpgroup's m64 x n wgmma accumulator, k the MMA's k step (16 for bf16
    operands, 32 for 8-bit ones)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, k])


@gluon.jit
def _softmax_update(s, m_i, l_i, j, n_kv, LK, mask_ptr, qk_scale, TAIL: gl.constexpr, HAS_MASK: gl.constexpr,
                    BLOCK_N: gl.constexpr):
    """Online-softmax step on the raw scores s of key tile j: returns P (unnormalised), alpha, m, l."""
    cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))
    if HAS_MASK:
        keep = gl.load(mask_ptr + cols, mask=cols < LK, other=0) != 0
        s = gl.where(keep[None, :], s, float("-inf"))
    elif TAIL:
        if j == n_kv - 1:
            s = gl.where((cols < LK)[None, :], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _task(t, sched, BM: gl.constexpr, HEAD_DIM: gl.constexpr, BLHD: gl.constexpr):
    """Task t, 2 * BM query rows of one (batch, head): (off_b, off_h, off_bh, m0, and the TMA
    origin: first Q row of the task, first K/V row and column of the head). Consecutive tasks share a head, so the
    programs running at one time read the K and V of a few heads (L2)."""
    n_tasks, n_m, H, LQ, LK = sched
    off_bh = t // n_m
    off_b = off_bh // H
    off_h = off_bh % H
    m0 = (t % n_m) * (2 * BM)
    q_row0, k_row0, col0 = tma_origin(off_b, off_h, off_bh, LQ, LK, HEAD_DIM, BLHD)
    return off_b, off_h, off_bh, m0, q_row0 + m0, k_row0, col0


@gluon.jit
def _publish_task(task_id, w, t):
    """Producer (one warp): the task of Q tile w, before the arrive on q_bar[w] that releases it to the consumer."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    task_id.index(w).store(gl.full([1], t, gl.int32, layout))


@gluon.jit
def _next_task(q_bar, task_id, WG: gl.constexpr, it):
    """Consumer: wait for the it-th Q tile and read its task (>= n_tasks: none left)."""
    mbarrier.wait(q_bar.index(WG), it & 1)
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    return gl.max(task_id.index(WG).load(layout), 0)


@gluon.jit
def _consumer(descs, ring, sched, rest, WG: gl.constexpr, FLAGS: gl.constexpr):
    q_desc, k_desc, v_desc = descs
    q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, k_empty, v_ready, v_empty, task_id, counter = ring
    n_tasks, n_m, H, LQ, LK = sched
    Out, Lse, Mask, stride_ob, stride_oh, stride_ol, stride_mb, qk_scale = rest
    BLHD: gl.constexpr = FLAGS[0]
    TAIL: gl.constexpr = FLAGS[1]
    HAS_MASK: gl.constexpr = FLAGS[2]
    BM: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    HEAD_DIM: gl.constexpr = k_desc.block_type.shape[1]
    STAGES: gl.constexpr = k_smem.type.shape[0]
    s_layout: gl.constexpr = wgmma_layout(BLOCK_N, 16)
    o_layout: gl.constexpr = wgmma_layout(HEAD_DIM, 16)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    n_kv = gl.cdiv(LK, BLOCK_N)
    q = q_smem.index(WG)
    zero_s = gl.zeros([BM, BLOCK_N], gl.float32, s_layout)

    c = 0  # K/V tiles consumed so far: ring slot and phase of tile j of this task are those of c + j
    it = 0
    t = _next_task(q_bar, task_id, WG, it)
    while t < n_tasks:
        task = _task(t, sched, BM, HEAD_DIM, BLHD)
        off_b, off_h, off_bh, m0 = task[0], task[1], task[2], task[3]
        mask_ptr = Mask + off_b.to(gl.int64) * stride_mb
        o = gl.zeros([BM, HEAD_DIM], gl.float32, o_layout)
        m_i = gl.full([BM], -1.0e30, gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BM], gl.float32, gl.SliceLayout(1, s_layout))

        # Tile 0: scores and softmax alone (no P V to overlap with yet).
        mbarrier.wait(k_ready.index(c % STAGES), (c // STAGES) & 1)
        s_tok = warpgroup_mma(q, k_smem.index(c % STAGES).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(c % STAGES), count=1)
        p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i, 0, n_kv, LK, mask_ptr, qk_scale, TAIL, HAS_MASK, BLOCK_N)
        p_op = gl.convert_layout(p.to(v_desc.dtype), p_layout)

        for j in range(1, n_kv):
            sk = (c + j) % STAGES
            mbarrier.wait(k_ready.index(sk), ((c + j) // STAGES) & 1)
            s_tok = warpgroup_mma(q, k_smem.index(sk).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            sv = (c + j - 1) % STAGES
            mbarrier.wait(v_ready.index(sv), ((c + j - 1) // STAGES) & 1)
            o_tok = warpgroup_mma(p_op, v_smem.index(sv), o, is_async=True)
            # S_j is done once at most one wgmma (the P V product) is in flight: exponentiate it meanwhile.
            s = warpgroup_mma_wait(1, deps=(s_tok, ))
            mbarrier.arrive(k_empty.index(sk), count=1)
            p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i, j, n_kv, LK, mask_ptr, qk_scale, TAIL, HAS_MASK,
                                                 BLOCK_N)
            o, _ = warpgroup_mma_wait(0, deps=(o_tok, p_op))
            mbarrier.arrive(v_empty.index(sv), count=1)
            o = o * gl.convert_layout(alpha, o_rows)[:, None]
            p_op = gl.convert_layout(p.to(v_desc.dtype), p_layout)
        # Every Q K^T of this task is done: the producer may load the next task's Q.
        mbarrier.arrive(q_empty.index(WG), count=1)

        sv = (c + n_kv - 1) % STAGES
        mbarrier.wait(v_ready.index(sv), ((c + n_kv - 1) // STAGES) & 1)
        o_tok = warpgroup_mma(p_op, v_smem.index(sv), o, is_async=True)
        o, _ = warpgroup_mma_wait(0, deps=(o_tok, p_op))
        mbarrier.arrive(v_empty.index(sv), count=1)

        # Rows without any key (all masked) get 0 and an LSE of -inf, as in the Triton kernel.
        l_o = gl.convert_layout(l_i, o_rows)
        has_keys = l_o > 0.0
        l_safe = gl.where(has_keys, l_o, 1.0)
        o = o / l_safe[:, None]
        rows = m0 + WG * BM + gl.arange(0, BM, layout=o_rows)
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        row_ok = rows < LQ
        o_ptr = Out + off_b.to(gl.int64) * stride_ob + off_h.to(gl.int64) * stride_oh
        gl.store(o_ptr + rows[:, None].to(gl.int64) * stride_ol + cols[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
        lse = gl.where(has_keys, (gl.convert_layout(m_i, o_rows) + gl.log2(l_safe)) * 0.6931471805599453,
                       float("-inf"))
        gl.store(Lse + off_bh.to(gl.int64) * LQ + rows, lse, mask=row_ok)
        c += n_kv
        it += 1
        t = _next_task(q_bar, task_id, WG, it)


@gluon.jit
def _producer(descs, ring, sched, rest, WG: gl.constexpr, FLAGS: gl.constexpr):
    """TMA loads, task after task: a task's two Q tiles once both consumers are done with the last ones (the first
    task does not wait), then its K and V tiles through the STAGES-deep ring, one counter over all tasks (empty
    barriers start out completed: the first lap does not wait). The producer fetches the tasks (module docstring)
    and hands each Q tile's task to its consumer in task_id, written before the barrier arrive that releases the
    tile (mbarrier arrive/wait order it); t >= n_tasks tells the consumer to stop. FLAGS[0]: BLHD (see _task);
    FLAGS[-1]: V_T, V comes transposed as FP8's (B*H*D, Lk_pad) view, tile j at [off_bh * D, j * BLOCK_N], instead
    of token rows."""
    q_desc, k_desc, v_desc = descs
    q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, k_empty, v_ready, v_empty, task_id, counter = ring
    n_tasks, n_m, H, LQ, LK = sched
    BLHD: gl.constexpr = FLAGS[0]
    V_T: gl.constexpr = FLAGS[len(FLAGS) - 1]
    BM: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    HEAD_DIM: gl.constexpr = k_desc.block_type.shape[1]
    STAGES: gl.constexpr = k_smem.type.shape[0]
    n_kv = gl.cdiv(LK, BLOCK_N)
    c = 0
    it = 0
    t = gl.program_id(0)
    while t < n_tasks:
        task = _task(t, sched, BM, HEAD_DIM, BLHD)
        off_bh, q_row, k_row0, col0 = task[2], task[4], task[5], task[6]
        for w in gl.static_range(2):
            mbarrier.wait(q_empty.index(w), (it & 1) ^ 1)
            _publish_task(task_id, w, t)
            mbarrier.expect(q_bar.index(w), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [q_row + w * BM, col0], q_bar.index(w), q_smem.index(w))
        for j in range(n_kv):
            s = (c + j) % STAGES
            phase = (((c + j) // STAGES) & 1) ^ 1
            mbarrier.wait(k_empty.index(s), phase)
            mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [k_row0 + j * BLOCK_N, col0], k_ready.index(s), k_smem.index(s))
            mbarrier.wait(v_empty.index(s), phase)
            mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
            if V_T:
                v_at = [off_bh * HEAD_DIM, j * BLOCK_N]
            else:
                v_at = [k_row0 + j * BLOCK_N, col0]
            tma.async_copy_global_to_shared(v_desc, v_at, v_ready.index(s), v_smem.index(s))
        c += n_kv
        it += 1
        t = gl.num_programs(0) + gl.atomic_add(counter, 1)  # the first task of each program is its own index
    for w in gl.static_range(2):  # no task left: t >= n_tasks tells each consumer to stop
        mbarrier.wait(q_empty.index(w), (it & 1) ^ 1)
        _publish_task(task_id, w, t)
        mbarrier.arrive(q_bar.index(w), count=1)


@gluon.jit
def _ring(q_desc, k_desc, v_desc, counter, STAGES: gl.constexpr):
    """One program's shared memory: two Q tiles, STAGES K and V tiles, their barriers (initialised), and the task of
    each Q tile; counter: the launch's task counter in global memory (zeroed)."""
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    task_id = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    for c in gl.static_range(2):
        mbarrier.init(q_bar.index(c), count=1)
        mbarrier.init(q_empty.index(c), count=1)  # its consumer releases a Q tile
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # both consumers release a tile
        mbarrier.init(v_empty.index(i), count=2)
    return q_smem, k_smem, v_smem, q_bar, q_empty, k_ready, k_empty, v_ready, v_empty, task_id, counter


@gluon.jit
def _attn_fwd_hopper(q_desc, k_desc, v_desc, Out, Lse, Mask, Counter, stride_ob, stride_oh, stride_ol, stride_mb, H,
                     LQ, LK, qk_scale, n_tasks, BLHD: gl.constexpr, STAGES: gl.constexpr, TAIL: gl.constexpr,
                     HAS_MASK: gl.constexpr):
    """The n_tasks = B * H * cdiv(LQ, 2 * BM) query tiles, fetched by P = programs() programs: first task p, then
    P + the counter's next value, until n_tasks."""
    BM: gl.constexpr = q_desc.block_type.shape[0]
    descs = (q_desc, k_desc, v_desc)
    ring = _ring(q_desc, k_desc, v_desc, Counter, STAGES)
    sched = (n_tasks, gl.cdiv(LQ, 2 * BM), H, LQ, LK)
    rest = (Out, Lse, Mask, stride_ob, stride_oh, stride_ol, stride_mb, qk_scale)
    FLAGS: gl.constexpr = (BLHD, TAIL, HAS_MASK, False)
    gl.warp_specialize([
        (_consumer, (descs, ring, sched, rest, 0, FLAGS)),
        (_consumer, (descs, ring, sched, rest, 1, FLAGS)),
        (_producer, (descs, ring, sched, rest, 0, FLAGS)),
    ], [4, 1], [REGS_CONSUMER, REGS_PRODUCER])


# Register budget: 4 + 4 + 1 warps round up to three warpgroups (384 threads); 65,536 registers an SM at one
# program an SM leave 168 a thread on average: 240 for each consumer warpgroup, 24 for the producer (FA3's split).
MAXNREG = 168
REGS_CONSUMER = gl.constexpr(240)
REGS_PRODUCER = gl.constexpr(24)
# 128-key tiles, two stages: Q (2 x 64 rows) + K and V (2 x 2 x 128 rows) at head dim 128 take 160 KB of shared
# memory; a third stage would need 224 KB plus barriers, over the 227 KB a block may use.
BLOCK_N = 128
STAGES = 2
HEAD_DIMS = (64, 128)


def _gl_dtype(dtype: torch.dtype):
    return gl.bfloat16 if dtype == torch.bfloat16 else gl.float16


@functools.cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def programs(n_tasks: int, device: torch.device) -> int:
    """The persistent grid: one program an SM (one fits, by shared memory and registers), fewer for fewer tasks."""
    return min(n_tasks, sm_count(device))


def task_counter(device: torch.device) -> torch.Tensor:
    """A launch's task counter (see the module docstring): zeroed for every launch, CUDA graphs included."""
    return torch.zeros(1, dtype=torch.int32, device=device)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def runs_on(device: torch.device) -> bool:
    """Whether `device` is one this kernel runs on (sm_90: H100, H200). The capability is cached: asked on every
    call it took ~25 us of an attention call's host time (perf/RESULTS.md, "Host time of one attention call")."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) == (9, 0)


@functools.cache
def smem_layout(block: tuple[int, ...], dtype) -> gl.NVMMASharedLayout:
    """A TMA tile's shared-memory layout (cached: ~7-15 us a call on the host, three a launch)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), dtype)


def supported(q: torch.Tensor, views: Optional[tuple]) -> bool:
    """Whether this kernel runs q's attention: an sm_90 GPU, bf16, head dim 64/128 and TMA-able views
    (`views` from attention._tma_views, None when a tensor's token rows are not evenly spaced)."""
    # bf16 only: the kernel compiles for fp16 too, but no fp16 case has run on a GPU yet.
    return views is not None and q.dtype == torch.bfloat16 and q.shape[-1] in HEAD_DIMS and runs_on(q.device)


def launch(q: torch.Tensor, views: tuple, out: torch.Tensor, lse: torch.Tensor, mask_u8: Optional[torch.Tensor],
           out_strides: tuple[int, int, int], H: int, Lq: int, Lk: int, scale: float, blhd: bool) -> None:
    """Writes out (any strides, contiguous last dim) and lse (B, H, Lq) fp32. views: (tensor, rows, width,
    row_stride) per q, k, v: the 2-D token-row views the TMA reads."""
    D = q.shape[-1]
    descs = []
    for (x, rows, width, row_stride), block in zip(views, (BLOCK_M, BLOCK_N, BLOCK_N)):
        descs.append(TensorDescriptor(x, [rows, width], [row_stride, 1], [block, D],
                                      smem_layout((block, D), _gl_dtype(x.dtype))))
    n_tasks = lse.shape[0] * H * triton.cdiv(Lq, CONSUMERS * BLOCK_M)
    _attn_fwd_hopper[(programs(n_tasks, q.device), )](
        *descs, out, lse, mask_u8 if mask_u8 is not None else lse, task_counter(q.device), *out_strides,
        mask_u8.stride(0) if mask_u8 is not None else 0, H, Lq, Lk, scale * 1.4426950408889634, n_tasks,
        BLHD=blhd, STAGES=STAGES, TAIL=Lk % BLOCK_N != 0, HAS_MASK=mask_u8 is not None,
        num_warps=4, maxnreg=MAXNREG)
