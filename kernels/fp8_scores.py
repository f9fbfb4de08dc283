"""The softmax pieces both FP8 attention kernels share (attention_fp8.py in Triton-lang, attention_hopper_fp8.py in
Gluon, which calls these jit functions too): int8 scores as fp32 without a conversion instruction, and the running
row max with the exponent's per-row bias.

The int32 scores are converted with the 1.5 * 2^23 bit trick: an int32 x < 2^22 in magnitude plus 0x4B400000, read
as fp32, is exactly x + SCORE_OFFSET (one integer add, where I2F runs at quarter rate like exp2). The offset is
taken out of the row max (exact: both in [2^22, 2^24)) and out of the exponent's per-row bias, so no per-element
subtraction is needed (H100: 549-554 -> 588-596 TFLOP/s at (1,24,4608,128), perf/RESULTS.md). Exactly: the scale
keeps 22 significant bits, so that shift = SCORE_OFFSET * scale is exact, and the running max becomes the one the
rounded bias really takes off, (bias - shift) + 8 (exact, Sterbenz), so P, its row sum and the LSE use the same max.
P comes out as exp2(s - m + 8), i.e. scaled by 256 (see attention_fp8).
"""

import triton
import triton.language as tl

SCORE_OFFSET = tl.constexpr(12582912.0)


@triton.jit
def int8_scores(s_raw):
    """int32 scores -> fp32 scores + SCORE_OFFSET (exact for |s_raw| < 2^22: 128 channels of int8 products)."""
    return (s_raw + 0x4B400000).to(tl.float32, bitcast=True)


@triton.jit
def row_bias(m_i, qk, scale, QK_INT8: tl.constexpr):
    """Running max and exponent bias of a score tile qk (INT8: offset by SCORE_OFFSET), so that P = exp2(qk * scale -
    bias); scale: per-row score scale (log2 units). Returns (scale, bias, new max); INT8 rounds the scale to 22
    significant bits (see the module docstring)."""
    if QK_INT8:
        scale = (scale.to(tl.int32, bitcast=True) & -4).to(tl.float32, bitcast=True)
        shift = SCORE_OFFSET * scale
        bias = shift + (tl.maximum(m_i, (tl.max(qk, 1) - SCORE_OFFSET) * scale) - 8.0)
        m_new = (bias - shift) + 8.0
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)
        bias = m_new - 8.0
    return scale, bias, m_new
