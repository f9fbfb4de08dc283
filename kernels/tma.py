"""Where a (batch, head) starts in the 2-D token-row views the attention kernels' TMA descriptors read
(`attention._tma_views`): (B*L, H*D) for BLHD, (B*H*L, D) for BHLD. Shared by the Triton-lang kernel and the
Gluon ones (a scalar `triton.jit` helper inlines into both)."""

import triton
import triton.language as tl


@triton.jit
def tma_origin(off_b, off_h, off_bh, LQ, LK, HEAD_DIM: tl.constexpr, BLHD: tl.constexpr):
    """(first Q row, first K/V row, first column) of head off_h of batch off_b (off_bh = off_b * H + off_h)."""
    if BLHD:
        return off_b * LQ, off_b * LK, off_h * HEAD_DIM
    else:
        return off_bh * LQ, off_bh * LK, 0
