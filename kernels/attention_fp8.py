"""FP8 (e4m3) forward attention: quantised Q/K/V, fp32 softmax and accumulation, bf16 output.

Quantisation (torch, one pass per tensor; `quantize_fp8`):
  * Q: one scale per token (amax over the head dim). Loaded once per program, so a per-row scale costs
    nothing over a per-block one: it folds into the softmax scale vector.
  * K: smoothed first (the per-head mean over tokens subtracted, SageAttention's trick; softmax is
    invariant to it because q.mean is constant along a row), then one scale per block of K_BLOCK=128
    tokens, so every key tile of the kernel (BLOCK_N divides 128) has one scalar scale.
  * V: one scale per channel (amax over tokens), applied to the output once; stored transposed,
    (B, H, D, Lk padded to 16), because Hopper's fp8 wgmma wants both operands K-major.
The LSE returned is that of the unsmoothed scores (the wrapper adds back scale * q.mean), so fp8 partial
results merge with each other exactly like the bf16 kernel's.

In the kernel, P is quantised to e4m3 as exp2(s - m + 8), i.e. scaled by 256 (max 256 < 448): small
probabilities keep e4m3's normal precision instead of flushing to subnormals; the row sum uses the same
scaled P, so the factor cancels in acc / l.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor
import torch.nn.functional as F

from . import attention as _attn
from .attention import INTERPRET, Layout, _last_contiguous, _strides, dims

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
K_BLOCK = 128


class FP8Tensors(NamedTuple):
    q: torch.Tensor  # (B, H, Lq, D) e4m3
    k: torch.Tensor  # (B, H, Lk, D) e4m3, smoothed
    vt: torch.Tensor  # (B, H, D, Lk_pad16) e4m3
    q_scale: torch.Tensor  # (B, H, Lq) fp32
    k_scale: torch.Tensor  # (B, H, cdiv(Lk, K_BLOCK)) fp32
    v_scale: torch.Tensor  # (B, H, D) fp32
    k_mean: torch.Tensor  # (B, H, 1, D) fp32, subtracted from K before quantising


def quantize_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout = "BLHD") -> FP8Tensors:
    """Quantise Q/K/V for `attention_fp8_quantized` (see the module docstring for the scale granularity)."""
    def bhld(x: torch.Tensor) -> torch.Tensor:
        return (x.transpose(1, 2) if layout == "BLHD" else x).float()

    qf, kf, vf = bhld(q), bhld(k), bhld(v)
    B, H, Lk, D = kf.shape
    q_scale = qf.abs().amax(-1).clamp_min(1e-12) / FP8_MAX
    q8 = (qf / q_scale[..., None]).to(FP8)

    k_mean = kf.mean(dim=2, keepdim=True)
    ks = kf - k_mean
    nkb = triton.cdiv(Lk, K_BLOCK)
    k_scale = F.pad(ks, (0, 0, 0, nkb * K_BLOCK - Lk)).reshape(B, H, nkb, K_BLOCK * D).abs().amax(-1)
    k_scale = k_scale.clamp_min(1e-12) / FP8_MAX
    k8 = (ks / k_scale.repeat_interleave(K_BLOCK, dim=2)[:, :, :Lk, None]).to(FP8)

    v_scale = vf.abs().amax(dim=2).clamp_min(1e-12) / FP8_MAX
    lk_pad = triton.cdiv(Lk, 16) * 16
    vt8 = F.pad((vf / v_scale[:, :, None, :]).transpose(2, 3), (0, lk_pad - Lk)).to(FP8).contiguous()
    return FP8Tensors(q8.contiguous(), k8.contiguous(), vt8, q_scale.contiguous(), k_scale.contiguous(),
                      v_scale.contiguous(), k_mean)


@triton.jit
def _attn_fp8_inner(
    acc, l_i, m_i, q, q_row_scale,
    k_ptrs, vt_ptrs, ks_ptr, mask_ptr, Kd, Vtd, k_row0, vt_row0,
    start, end, LK,
    TAIL: tl.constexpr,
    USE_TMA: tl.constexpr,
    HAS_MASK: tl.constexpr,
    K_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if USE_TMA:  # tail rows past LK belong to the next head: their scores are masked below
            k = Kd.load([k_row0 + start_n, 0])
        elif TAIL:
            k = tl.load(k_ptrs + start_n * HEAD_DIM, mask=(cols < LK)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * HEAD_DIM)
        qk = tl.dot(q, tl.trans(k))
        s = q_row_scale * tl.load(ks_ptr + start_n // K_BLOCK)
        if HAS_MASK:
            if TAIL:
                keep = tl.load(mask_ptr + cols, mask=cols < LK, other=0) != 0
            else:
                keep = tl.load(mask_ptr + cols) != 0
            qk = tl.where(keep[None, :], qk, float("-inf"))
        elif TAIL:
            qk = tl.where((cols < LK)[None, :], qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * s)
        p = tl.math.exp2(qk * s[:, None] - (m_ij - 8.0)[:, None])
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
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_fp8_kernel(
    Q, K, Vt, QS, KS, VS, Out, Lse, Mask,
    Qd, Kd, Vtd,
    sm_scale,
    stride_ob, stride_oh, stride_ol, stride_mb,
    H, LQ, LK, LK_PAD, NKB,
    HEAD_DIM: tl.constexpr,
    HAS_MASK: tl.constexpr,
    K_BLOCK: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tl.static_assert(K_BLOCK % BLOCK_N == 0)
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
                                    0, n_full, LK, False, USE_TMA, HAS_MASK, K_BLOCK, BLOCK_N, HEAD_DIM)
    acc, l_i, m_i = _attn_fp8_inner(acc, l_i, m_i, q, q_row_scale, k_ptrs, vt_ptrs, ks_ptr, mask_ptr,
                                    Kd, Vtd, k_row0, vt_row0,
                                    n_full, LK, LK, True, USE_TMA, HAS_MASK, K_BLOCK, BLOCK_N, HEAD_DIM)

    has_keys = l_i > 0.0
    v_scale = tl.load(VS + bh * HEAD_DIM + d)
    out = acc * v_scale[None, :] / tl.where(has_keys, l_i, 1.0)[:, None]
    # The 2^8 P scale sits in l_i: take it out of the LSE.
    lse = tl.where(has_keys, (m_i - 8.0 + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(Lse + bh * LQ + offs_m, lse, mask=row_ok)
    o_base = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ol + d[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None])


INTERPRET_CONFIG_FP8: dict[str, int] = {"BLOCK_M": 64, "BLOCK_N": 64, "USE_TMA": False}


def _set_tma_block_shapes(nargs: dict) -> None:
    if isinstance(nargs["Qd"], TensorDescriptor):
        d = nargs["HEAD_DIM"]
        nargs["Qd"].block_shape = [nargs["BLOCK_M"], d]
        nargs["Kd"].block_shape = [nargs["BLOCK_N"], d]
        nargs["Vtd"].block_shape = [d, nargs["BLOCK_N"]]


def _fp8_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": tma}, num_warps=w, num_stages=s,
                      pre_hook=_set_tma_block_shapes)
        for bm in (64, 128)
        for bn in (64, 128)
        for w in (4, 8)
        for s in (2, 3)
        for tma in (False, True)
    ]


def prune_fp8_configs(configs: list[triton.Config], named_args: dict, **meta) -> list[triton.Config]:
    """Hopper: 128-row tiles with two warpgroups for long query sets (as for bf16); raise if none fits."""
    props = torch.cuda.get_device_properties(named_args["Q"].device)
    if props.major < 9 and (props.major, props.minor) != (8, 9):
        raise RuntimeError(f"ditserve attention_fp8: {props.name} has no fp8 tensor cores (needs sm_89+)")
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    head_dim = meta["HEAD_DIM"]
    long_q = named_args["LQ"] >= 1024
    kept = [
        c for c in configs
        if (c.kwargs["BLOCK_M"] * head_dim + 2 * c.num_stages * c.kwargs["BLOCK_N"] * head_dim) <= smem
        and c.num_warps == c.kwargs["BLOCK_M"] // 16
        and (props.major >= 9 or not c.kwargs["USE_TMA"])
        and (c.kwargs["BLOCK_M"] == 128 if long_q
             else (c.kwargs["BLOCK_N"] == 64 and c.num_stages == 2 and not c.kwargs["USE_TMA"]))
    ]
    if not kept:
        raise RuntimeError(f"ditserve attention_fp8: no kernel config fits head_dim={head_dim} on {props.name}")
    return kept


_attn_fwd_fp8_tuned = triton.autotune(
    configs=_fp8_configs(), key=["LQ", "LK", "HEAD_DIM", "HAS_MASK"],
    prune_configs_by={"early_config_prune": prune_fp8_configs},
)(_attn_fwd_fp8_kernel)


def attention_fp8_quantized(
    t: FP8Tensors, *, mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
    out_layout: Layout = "BLHD", out_dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel alone, on already-quantised inputs. Returns (out in out_layout, LSE of the smoothed
    scores (B, H, Lq) fp32); `attention_fp8` adds the smoothing term back to the LSE."""
    B, H, Lq, D = t.q.shape
    Lk = t.k.shape[2]
    s = 1.0 / math.sqrt(D) if scale is None else float(scale)
    shape = (B, Lq, H, D) if out_layout == "BLHD" else (B, H, Lq, D)
    out = _attn._alloc(shape, t.q, out_dtype)
    lse = _attn._alloc((B, H, Lq), t.q, torch.float32)
    mask_u8 = mask.contiguous().view(torch.uint8) if mask is not None else t.q_scale
    if INTERPRET:
        descs = (t.q, t.k, t.vt)
    else:  # block shapes are set per config by _set_tma_block_shapes
        descs = tuple(TensorDescriptor(x, [x.shape[0] * x.shape[1] * x.shape[2], x.shape[3]], [x.shape[3], 1],
                                       [1, 16]) for x in (t.q, t.k, t.vt))
    args = (t.q, t.k, t.vt, t.q_scale, t.k_scale, t.v_scale, out, lse, mask_u8, *descs, s,
            *_strides(out, out_layout),
            mask_u8.stride(0) if mask is not None else 0,
            H, Lq, Lk, t.vt.shape[-1], t.k_scale.shape[-1])
    meta = dict(HEAD_DIM=D, HAS_MASK=mask is not None, K_BLOCK=K_BLOCK)
    if INTERPRET:
        grid = (triton.cdiv(Lq, INTERPRET_CONFIG_FP8["BLOCK_M"]), B * H)
        _attn_fwd_fp8_kernel[grid](*args, **meta, **INTERPRET_CONFIG_FP8)
    else:
        _attn_fwd_fp8_tuned[lambda m: (triton.cdiv(Lq, m["BLOCK_M"]), B * H)](*args, **meta)
    return out, lse


@torch.library.custom_op("ditserve::attention_fp8", mutates_args=())
def _attention_fp8_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], layout: str, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    t = quantize_fp8(q, k, v, layout)
    out, lse = attention_fp8_quantized(t, mask=mask, scale=scale, out_layout=layout, out_dtype=q.dtype)
    qf = q.transpose(1, 2) if layout == "BLHD" else q
    lse = lse + scale * (qf.float() @ t.k_mean.transpose(-1, -2)).squeeze(-1)
    return out, lse


@_attention_fp8_op.register_fake
def _(q, k, v, mask, layout, scale):
    B, H, Lq, _ = dims(q, layout)
    return torch.empty_like(q), q.new_empty((B, H, Lq), dtype=torch.float32)


def attention_fp8(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
    layout: Layout = "BLHD", scale: Optional[float] = None, return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FP8 attention (ditserve::attention_fp8): same contract as `attention` (no prologue); bf16/fp16 in
    and out, Q/K/V quantised to e4m3 on the way in."""
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = torch.ops.ditserve.attention_fp8(q, k, v, mask, layout, s)
    return (out, lse) if return_lse else out
