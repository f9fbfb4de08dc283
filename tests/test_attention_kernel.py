"""ditserve.kernels.attention / attention_fp8 against an fp64 reference.

CPU: Triton's interpreter (TRITON_INTERPRET=1, set below before triton is imported), fp16/fp32 only,
because the interpreter's bf16 dot and fp8 casts are unreliable (bf16 tl.dot off by ~1e9 relative, an
in-kernel e4m3 cast rounding otherwise than the GPU: triton 3.6.0); the FP8 kernel
is checked there on inputs already quantised by torch. GPU (`-m gpu`): bf16 relative error <= 1e-2 and
FP8 cosine similarity >= 0.999 against fp64.

Every case draws fresh random inputs and poisons the outputs with NaN before the kernel runs.
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

from ditserve.kernels import attention as A  # noqa: E402
from ditserve.kernels import attention_fp8 as A8  # noqa: E402
from ditserve.kernels.attention import Prologue, attention, norm_rope, reference_prologue  # noqa: E402
from ditserve.kernels.attention_fp8 import (  # noqa: E402
    K_BLOCK, FP8Tensors, attention_fp8, attention_fp8_quantized, quantize_fp8,
)

interp = pytest.mark.skipif(
    not A.INTERPRET,
    reason="needs Triton's interpreter: TRITON_INTERPRET=1 before triton is first imported (run this file alone)",
)
gpu = pytest.mark.gpu


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output buffer starts as NaN: a test passes only if the kernel wrote every element."""
    def alloc(shape, like, dtype):
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)

    monkeypatch.setattr(A, "_alloc", alloc)


def ref_attention(q, k, v, mask=None, layout="BLHD", scale=None):
    """fp64 attention; rows with no key give 0 and LSE -inf (the kernel's contract)."""
    if layout == "BLHD":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    q, k, v = (x.double() for x in (q, k, v))
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :].to(s.device), float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.nan_to_num(torch.softmax(s, -1), nan=0.0) @ v
    return (out.transpose(1, 2) if layout == "BLHD" else out), lse


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def cosine(x: torch.Tensor, ref: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(x.double().flatten(), ref.double().flatten(), dim=0).item()


def make_qkv(B, H, Lq, Lk, D, dtype, layout, device="cpu"):
    shape = (lambda L: (B, L, H, D)) if layout == "BLHD" else (lambda L: (B, H, L, D))
    return tuple(torch.randn(shape(L), device=device, dtype=dtype) for L in (Lq, Lk, Lk))


def make_mask(B, Lk, device="cpu"):
    mask = torch.rand(B, Lk, device=device) > 0.3
    mask[:, 0] = True  # every row keeps a key; fully masked rows have their own test
    return mask


def make_prologue(L, D, *, norm, rope, interleaved, k_mode, split, device="cpu"):
    def w():
        return (torch.rand(2 if split else 1, D, device=device) + 0.5).squeeze(0) if norm else None

    return Prologue(
        q_weight=w(), k_weight=w(), eps=1e-6, norm_split=split,
        cos=torch.randn(L, D, device=device) if rope else None,
        sin=torch.randn(L, D, device=device) if rope else None,
        interleaved=interleaved, k_mode=k_mode,
    )


def check_finite(*xs):
    for x in xs:
        assert not torch.isnan(x).any(), "output element left unwritten (NaN poison survived)"


# ---------------------------------------------------------------------------------------------- CPU
# (B, H, Lq, Lk, D, dtype, masked, layout): odd lengths, Lq != Lk, both layouts, head dims 16/64/128.
CASES = [
    (1, 2, 1, 17, 16, torch.float32, False, "BLHD"),
    (2, 2, 17, 113, 64, torch.float16, True, "BLHD"),
    (1, 2, 257, 1, 128, torch.float16, False, "BHLD"),
    (1, 2, 113, 257, 128, torch.float16, True, "BHLD"),
    (2, 1, 257, 257, 16, torch.float32, True, "BLHD"),
    (1, 1, 1000, 1000, 64, torch.float16, False, "BLHD"),
]


@interp
@pytest.mark.parametrize("B,H,Lq,Lk,D,dtype,masked,layout", CASES)
def test_attention_matches_fp64(B, H, Lq, Lk, D, dtype, masked, layout):
    q, k, v = make_qkv(B, H, Lq, Lk, D, dtype, layout)
    mask = make_mask(B, Lk) if masked else None
    out, lse = attention(q, k, v, mask=mask, layout=layout, return_lse=True)
    check_finite(out, lse)
    ref, ref_lse = ref_attention(q, k, v, mask, layout)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (B, H, Lq)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert rel_err(out, ref) < tol
    assert (lse.double() - ref_lse).abs().max().item() < 1e-4


# (L, D, dtype, norm, rope, interleaved, k_mode, split, masked)
PROLOGUE_CASES = [
    (113, 64, torch.float16, True, True, True, "inline", 40, False),
    (257, 128, torch.float16, False, True, False, "prepass", 0, True),
    (17, 16, torch.float32, True, False, True, "prepass", 5, True),
    (257, 16, torch.float32, True, True, True, "inline", 0, False),
    (113, 16, torch.float32, True, True, False, "prepass", 100, False),
]


@interp
@pytest.mark.parametrize("L,D,dtype,norm,rope,interleaved,k_mode,split,masked", PROLOGUE_CASES)
def test_fused_prologue_matches_fp64(L, D, dtype, norm, rope, interleaved, k_mode, split, masked):
    B, H = 1, 2
    q, k, v = make_qkv(B, H, L, L, D, dtype, "BLHD")
    p = make_prologue(L, D, norm=norm, rope=rope, interleaved=interleaved, k_mode=k_mode, split=split)
    mask = make_mask(B, L) if masked else None
    out, lse = attention(q, k, v, mask=mask, prologue=p, return_lse=True)
    check_finite(out, lse)
    ref, ref_lse = ref_attention(reference_prologue(q.double(), p, which="q"),
                                 reference_prologue(k.double(), p, which="k"), v, mask)
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 3e-3)
    assert (lse.double() - ref_lse).abs().max().item() < (1e-4 if dtype == torch.float32 else 2e-2)


@interp
@pytest.mark.parametrize("Lq,Lk,D,dtype,masked,inline_prologue", [
    (113, 257, 64, torch.float16, True, False),
    (17, 17, 16, torch.float32, False, False),  # no full key tile: the pipelined loop is skipped
    (257, 257, 16, torch.float32, False, True),
])
def test_pipelined_key_loop_matches_fp64(monkeypatch, Lq, Lk, D, dtype, masked, inline_prologue):
    """PIPE=True (scores of tile j+1 before the softmax of tile j), a tuning option on Hopper."""
    monkeypatch.setitem(A.INTERPRET_CONFIG, "PIPE", True)
    B, H = 2, 1
    q, k, v = make_qkv(B, H, Lq, Lk, D, dtype, "BLHD")
    mask = make_mask(B, Lk) if masked else None
    p = make_prologue(Lq, D, norm=True, rope=True, interleaved=True, k_mode="inline", split=9) \
        if inline_prologue else None
    out, lse = attention(q, k, v, mask=mask, prologue=p, return_lse=True)
    check_finite(out, lse)
    if p is not None:
        q, k = reference_prologue(q.double(), p, which="q"), reference_prologue(k.double(), p, which="k")
    ref, ref_lse = ref_attention(q, k, v, mask)
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 2e-3)
    assert (lse.double() - ref_lse).abs().max().item() < 1e-4


@interp
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("layout", ["BLHD", "BHLD"])
def test_norm_rope_kernel_matches_reference(interleaved, layout):
    """The prepass kernel (every head of a token block in one program): both layouts, batch 2, a tail block."""
    L, D = 113, 64
    x = torch.randn(2, L, 3, D) if layout == "BLHD" else torch.randn(2, 3, L, D)
    p = make_prologue(L, D, norm=True, rope=True, interleaved=interleaved, k_mode="prepass", split=30)
    got = norm_rope(x, p, which="k", layout=layout)
    check_finite(got)
    assert rel_err(got, reference_prologue(x.double(), p, which="k", layout=layout)) < 1e-6


def interleaved_qkv(L: int, H: int, D: int, dtype, device="cpu") -> tuple[torch.Tensor, ...]:
    """Q, K, V as Ulysses hands them over: (1, L, H, D) views of one (1, L, 3, H, D) buffer."""
    buf = torch.randn(1, L, 3, H, D, dtype=dtype, device=device)
    return buf[:, :, 0], buf[:, :, 1], buf[:, :, 2]


@interp
def test_attention_and_prologue_take_token_interleaved_views():
    """Strided inputs (token stride 3 * H * D) give what contiguous ones give, and norm_rope writes
    into a strided `out` (a send-buffer slice) without touching its neighbours."""
    L, H, D = 113, 2, 16
    q, k, v = interleaved_qkv(L, H, D, torch.float32)
    assert not q.is_contiguous()
    got = attention(q, k, v)
    assert rel_err(got, ref_attention(q, k, v)[0]) < 1e-5
    p = make_prologue(L, D, norm=True, rope=True, interleaved=True, k_mode="prepass", split=30)
    buf = torch.full((1, L, 2, H, D), float("nan"))
    norm_rope(q, p, which="q", out=buf[:, :, 1])
    assert buf[:, :, 0].isnan().all()
    assert rel_err(buf[:, :, 1], reference_prologue(q.double(), p, which="q")) < 1e-6
    with pytest.raises(ValueError, match="norm_rope: out must have"):
        norm_rope(q, p, which="q", out=buf[:, :, 1, :, :8])


def check_prologue_into_head_groups(L: int, hc: int, D: int, dtype, device: str, tol: float) -> None:
    """Ulysses' call: chunk 1 of 2 of every rank's heads, (1, L, P, hc, D) views of a (1, L, H, D) tensor, written
    by one launch into their (P, 1, L, 3, hc, D) send-buffer slots (Q's of the three tensors interleaved per token),
    leaving the other slots alone."""
    P = 2
    x = torch.randn(1, L, P * 2 * hc, D, dtype=dtype, device=device)
    heads = x.unflatten(2, (P, 2, hc))[:, :, :, 1]
    send = torch.full((P, 1, L, 3, hc, D), float("nan"), dtype=dtype, device=device)
    p = make_prologue(L, D, norm=True, rope=True, interleaved=True, k_mode="prepass", split=5, device=device)
    norm_rope(heads, p, which="q", out=send[:, :, :, 0].permute(1, 2, 0, 3, 4))
    ref = reference_prologue(heads.reshape(1, L, P * hc, D).double(), p, which="q").view(heads.shape)
    assert rel_err(send[:, :, :, 0].permute(1, 2, 0, 3, 4), ref) < tol
    assert send[:, :, :, 1:].isnan().all()


@interp
def test_prologue_writes_head_groups():
    """3 heads a group and 2 a program (the interpreter's HEADS): programs straddle the groups."""
    check_prologue_into_head_groups(37, 3, 16, torch.float32, "cpu", 1e-6)


@interp
def test_registry_kernel_prologue_equals_the_torch_prologue():
    """What triton_fp8 and flash_attn (CUDA-only) apply before attending: Q's and K's own weights."""
    from ditserve.kernels import registry

    L, D = 57, 16
    q, k = torch.randn(1, L, 2, D), torch.randn(1, L, 2, D)
    p = make_prologue(L, D, norm=True, rope=True, interleaved=True, k_mode="prepass", split=9)
    for got, want in zip(registry._unfused(q, k, p, kernel=True), registry._unfused(q, k, p)):
        assert rel_err(got, want) < 1e-6
    assert registry._unfused(q, k, None, kernel=True) == (q, k)


@interp
@pytest.mark.parametrize("D,dtype", [(64, torch.float16), (16, torch.float32)])
def test_lse_merge_of_two_key_halves_equals_full(D, dtype):
    B, H, Lq, Lk = 2, 2, 113, 257
    q, k, v = make_qkv(B, H, Lq, Lk, D, dtype, "BLHD")
    mask = make_mask(B, Lk)
    h = 120
    o1, l1 = attention(q, k[:, :h], v[:, :h], mask=mask[:, :h], return_lse=True)
    o2, l2 = attention(q, k[:, h:], v[:, h:], mask=mask[:, h:], return_lse=True)
    full, lfull = attention(q, k, v, mask=mask, return_lse=True)
    lse = torch.logaddexp(l1, l2)
    w1 = torch.exp(l1 - lse).transpose(1, 2)[..., None]
    w2 = torch.exp(l2 - lse).transpose(1, 2)[..., None]
    merged = o1.double() * w1 + o2.double() * w2
    assert (lse - lfull).abs().max().item() < 1e-5
    assert rel_err(merged, full.double()) < (1e-6 if dtype == torch.float32 else 2e-3)
    assert rel_err(merged, ref_attention(q, k, v, mask)[0]) < (1e-5 if dtype == torch.float32 else 2e-3)


@interp
def test_fully_masked_rows_give_zero_and_neg_inf_lse():
    q, k, v = make_qkv(2, 2, 17, 113, 16, torch.float32, "BLHD")
    mask = make_mask(2, 113)
    mask[1] = False
    out, lse = attention(q, k, v, mask=mask, return_lse=True)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    assert rel_err(out[0:1], ref_attention(q[0:1], k[0:1], v[0:1], mask[0:1])[0]) < 1e-5


@interp
# strided: q a BLHD view of BHLD storage; the op's output is contiguous all the same, and so must the fake's be.
@pytest.mark.parametrize("strided", [False, True])
def test_custom_op_registration_and_fake(strided):
    q, k, v = make_qkv(1, 2, 17, 33, 16, torch.float32, "BLHD")
    if strided:
        q = torch.randn(1, 2, 17, 16).transpose(1, 2)
    args = (q, k, v, None, "BLHD", 0.25, None, None, 0.0, 0, None, None, True, "prepass", False)
    torch.library.opcheck(torch.ops.ditserve.attention.default, args, test_utils=("test_schema", "test_faketensor"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(x) for x in (q, k, v))
        out, lse = torch.ops.ditserve.attention(fq, fk, fv, None, "BLHD", 0.25, None, None, 0.0, 0, None, None,
                                                True, "prepass", False)
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == (1, 2, 17) and lse.dtype == torch.float32


@interp
@pytest.mark.parametrize("layout", ["BLHD", "BHLD"])
def test_fp8_custom_op_fake_matches_the_op_on_strided_q(layout):
    """The FP8 op's output is contiguous in `layout` (attention_fp8_quantized's out_layout) whatever q's strides."""
    q, k, v = make_qkv(1, 2, 17, 33, 16, torch.float16, layout)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, the other layout's strides
    args = (q, k, v, None, layout, 0.25, "int8")
    torch.library.opcheck(torch.ops.ditserve.attention_fp8.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@interp
def test_attention_entry_points_check_the_mask(monkeypatch):
    """The kernels read the mask's bytes: a float or int64 mask would be reinterpreted, a short one read past its end.
    attention_fp8 checks before it quantises."""
    q, k, v = make_qkv(2, 2, 17, 33, 16, torch.float16, "BLHD")
    t = quantize_fp8(q, k, v)
    monkeypatch.setattr(A8, "quantize_fp8", lambda *args: pytest.fail("quantised before the mask was checked"))
    bad = {"float": torch.ones(2, 33), "int64": torch.ones(2, 33, dtype=torch.int64),
           "short": torch.ones(2, 32, dtype=torch.bool), "one row": torch.ones(33, dtype=torch.bool)}
    for mask in bad.values():
        message = re.escape(f"mask must be bool (B, Lk) = (2, 33), got {mask.dtype} {tuple(mask.shape)}")
        for fn in (lambda: attention(q, k, v, mask=mask), lambda: attention_fp8(q, k, v, mask=mask),
                   lambda: attention_fp8_quantized(t, mask=mask)):
            with pytest.raises(ValueError, match=message):
                fn()


def test_prologue_which_must_be_q_or_k():
    x = torch.randn(1, 17, 2, 16)
    p = make_prologue(17, 16, norm=True, rope=True, interleaved=True, k_mode="prepass", split=0)
    with pytest.raises(ValueError, match="which must be 'q' or 'k', got 'v'"):
        reference_prologue(x, p, which="v")
    if A.INTERPRET:
        with pytest.raises(ValueError, match="which must be 'q' or 'k', got 'Q'"):
            norm_rope(x, p, which="Q")


def torch_quantize(q, k, v, qk_format):
    """Reference quantiser in torch (round-to-nearest casts), BLHD in, FP8Tensors out."""
    qf, kf, vf = (x.transpose(1, 2).double() for x in (q, k, v))
    B, H, Lk, D = kf.shape
    qmax = 127.0 if qk_format == "int8" else 448.0

    def cast(x, scale):
        y = x / scale
        return torch.round(y).to(torch.int8) if qk_format == "int8" else y.float().to(torch.float8_e4m3fn)

    q_scale = qf.abs().amax(-1).clamp_min(1e-12) / qmax
    mean = kf.mean(2, keepdim=True)
    ks = kf - mean
    nkb = -(-Lk // K_BLOCK)
    k_scale = torch.nn.functional.pad(ks, (0, 0, 0, nkb * K_BLOCK - Lk)).reshape(B, H, nkb, -1).abs().amax(-1)
    k_scale = k_scale.clamp_min(1e-12) / qmax
    v_scale = vf.abs().amax(2).clamp_min(1e-12) / 448.0
    lk_pad = -(-Lk // 16) * 16
    vt = torch.nn.functional.pad((vf / v_scale[:, :, None, :]).transpose(2, 3), (0, lk_pad - Lk))
    return FP8Tensors(
        cast(qf, q_scale[..., None]).contiguous(),
        cast(ks, k_scale.repeat_interleave(K_BLOCK, 2)[:, :, :Lk, None]).contiguous(),
        vt.float().to(torch.float8_e4m3fn).contiguous(),
        q_scale.float(), k_scale.float(), v_scale.float(), (qf @ mean.transpose(2, 3)).squeeze(-1).float(),
    )


def code_steps(t) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 value of one code of t.q and of t.k, broadcastable to them."""
    Lk = t.k.shape[2]
    return t.q_scale[..., None].double(), t.k_scale.repeat_interleave(K_BLOCK, dim=2)[:, :, :Lk, None].double()


def dequantized(t):
    """fp64 (q, k, v) that the quantised tensors represent (k without its mean)."""
    Lk = t.k.shape[2]
    q_step, k_step = code_steps(t)
    q, k = t.q.double() * q_step, t.k.double() * k_step
    v = (t.vt.double() * t.v_scale[..., None].double()).transpose(2, 3)[:, :, :Lk]
    return q, k, v


@interp
@pytest.mark.parametrize("qk_format", ["int8", "fp8"])
# pipe: the software-pipelined key loop (the PIPE config) instead of the plain one.
@pytest.mark.parametrize("B,H,Lq,Lk,D,masked,pipe", [(1, 2, 257, 256, 64, True, False),
                                                      (1, 1, 17, 1000, 128, False, False),
                                                      (1, 2, 113, 300, 64, True, True)])
def test_fp8_kernel_logic_on_torch_quantised_inputs(B, H, Lq, Lk, D, masked, pipe, qk_format, monkeypatch):
    monkeypatch.setitem(A8.INTERPRET_CONFIG_FP8, "PIPE", pipe)
    q, k, v = make_qkv(B, H, Lq, Lk, D, torch.float32, "BLHD")
    k = k + 0.5  # a common offset in K: what the smoothing removes
    mask = make_mask(B, Lk) if masked else None
    t = torch_quantize(q, k, v, qk_format)
    out, lse = attention_fp8_quantized(t, mask=mask, out_layout="BHLD", out_dtype=torch.float32)
    check_finite(out, lse)
    ref, ref_lse = ref_attention(*dequantized(t), mask=mask, layout="BHLD")
    # The LSE never sees the in-kernel e4m3 cast of P: it must be exact, smoothing shift included, up to fp32
    # rounding (int8 scores carry SCORE_OFFSET into the product with the scale, which the interpreter does not
    # fuse into an FMA: max 2.2e-5 over 30 seeds here, 1.4e-4 before the kernel took the max its bias really
    # subtracts). The output does see the cast, and the interpreter's rounds differently from the GPU's (cosine
    # ~0.998 here).
    assert (lse.double() - (ref_lse + t.q_dot_kmean.double() / math.sqrt(D))).abs().max().item() < 1e-4
    assert cosine(out, ref) > 0.995


@interp
@pytest.mark.parametrize("qk_format", ["int8", "fp8"])
# 8,321 keys: 66 key blocks, so the last _kv_stats_kernel program (STATS_BLOCKS = 4 blocks) is partly past the
# end, and 17 partials, more than the 16 that _kv_finish_kernel reduces at a time.
@pytest.mark.parametrize("B,H,Lq,Lk,D", [(2, 2, 113, 257, 64), (1, 1, 5, 8321, 16)])
def test_triton_quantiser_matches_torch(B, H, Lq, Lk, D, qk_format):
    q, k, v = make_qkv(B, H, Lq, Lk, D, torch.float16, "BLHD")
    k = k + 0.5
    got, want = quantize_fp8(q, k, v, qk_format=qk_format), torch_quantize(q, k, v, qk_format)
    for name in ("q_scale", "k_scale", "v_scale", "q_dot_kmean"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-4, atol=1e-5)
    assert got.vt.shape == want.vt.shape and torch.all(got.vt[..., Lk:].float() == 0)
    (gq, gk, gv), (wq, wk, wv) = dequantized(got), dequantized(want)
    if qk_format == "int8":  # the nearest codes, either way at a tie: fp16 inputs often land on an exact half
        q_step, k_step = code_steps(got)
        qf, kf = (x.transpose(1, 2).double() for x in (q, k))
        for codes, exact in ((got.q, qf / q_step), (got.k, (kf - kf.mean(2, keepdim=True)) / k_step)):
            assert (codes.double() - exact).abs().max().item() <= 0.5 + 1e-4
    else:  # e4m3 casts: the interpreter rounds differently from torch (~6% rms here; a layout bug ~140%)
        assert rel_err(gq, wq) < 0.1 and rel_err(gk, wk) < 0.1
    assert rel_err(gv, wv) < 0.1


@interp
@pytest.mark.parametrize("qk_format", ["int8", "fp8"])
def test_fp8_end_to_end_lse_is_that_of_unsmoothed_scores(qk_format):
    q, k, v = make_qkv(1, 2, 113, 257, 64, torch.float16, "BLHD")
    k = k + 1.0
    out, lse = attention_fp8(q, k, v, return_lse=True, qk_format=qk_format)
    check_finite(out, lse)
    ref, ref_lse = ref_attention(q, k, v)
    assert out.dtype == torch.float16
    assert (lse.double() - ref_lse).abs().max().item() < 0.1  # quantised scores, not the smoothing
    assert cosine(out, ref) > 0.99


def test_hopper_configs_cross_compile_for_sm90():
    """GPU-only compile errors (the interpreter never lowers to PTX): compile one Hopper config of every
    kernel family for sm_90 with Triton's bundled ptxas, in a subprocess without the interpreter. It also fails
    when ptxas hoists the Gluon FP8 kernel's P V wait above the softmax again (its SASS, read with nvdisasm:
    the first FP8 version had 9 and 13 of 64 exponentials before that wait)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "perf" / "bench_attention.py"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, str(script), "--compile-check", "--quick"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- GPU
GPU_CASES = [
    (2, 3, 1031, 2053, 128, False),
    (1, 3, 4608, 4608, 128, False),
    (2, 4, 257, 1013, 64, True),
    (1, 2, 17, 4352, 128, True),
]


def pick_kernel(request, monkeypatch, module):
    """Runs the test with the Gluon kernels allowed (sm_90 only) or not; returns a check that the Gluon kernel
    (`module.launch`) ran exactly for the calls its `module.supported` accepted, and never when not allowed.
    Which calls it accepts is tested on the CPU (test_gluon_kernels_take_only_the_calls_they_support)."""
    gluon = request.param == "gluon"
    if gluon and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernels are sm_90 only")
    monkeypatch.setattr(A, "HOPPER_KERNEL", gluon)
    accepted, launched = [], []
    supported, launch = module.supported, module.launch
    monkeypatch.setattr(module, "supported", lambda *a: accepted.append(supported(*a)) or accepted[-1])
    monkeypatch.setattr(module, "launch", lambda *a, **kw: launched.append(1) or launch(*a, **kw))
    return lambda: len(launched) == sum(accepted) and (gluon or not accepted)


@pytest.fixture(params=["gluon", "triton-lang"])
def bf16_kernel(request, monkeypatch):
    dispatched_as_meant = pick_kernel(request, monkeypatch, A._hopper)
    yield
    assert dispatched_as_meant()


@pytest.fixture(params=["gluon", "triton-lang"])
def fp8_kernel(request, monkeypatch):
    dispatched_as_meant = pick_kernel(request, monkeypatch, A8._hopper_fp8)
    yield
    assert dispatched_as_meant()


@gpu
@pytest.mark.parametrize("B,H,Lq,Lk,D,masked", GPU_CASES)
@pytest.mark.parametrize("layout", ["BLHD", "BHLD"])
def test_gpu_bf16_matches_fp64(B, H, Lq, Lk, D, masked, layout, bf16_kernel):
    q, k, v = make_qkv(B, H, Lq, Lk, D, torch.bfloat16, layout, "cuda")
    mask = make_mask(B, Lk, "cuda") if masked else None
    out, lse = attention(q, k, v, mask=mask, layout=layout, return_lse=True)
    check_finite(out, lse)
    ref, ref_lse = ref_attention(q, k, v, mask, layout)
    assert rel_err(out, ref) <= 1e-2
    assert (lse.double() - ref_lse).abs().max().item() < 5e-2


def check_fully_masked_rows(fn, tol):
    q, k, v = make_qkv(2, 2, 300, 257, 128, torch.bfloat16, "BLHD", "cuda")
    mask = make_mask(2, 257, "cuda")
    mask[1] = False
    out, lse = fn(q, k, v, mask=mask, return_lse=True)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    ref, ref_lse = ref_attention(q[:1], k[:1], v[:1], mask[:1])
    assert rel_err(out[:1], ref) <= tol and (lse[:1].double() - ref_lse).abs().max().item() < 0.1


@gpu
def test_gpu_bf16_fully_masked_rows_give_zero(bf16_kernel):
    check_fully_masked_rows(attention, 1e-2)


@gpu
def test_gpu_fp8_fully_masked_rows_give_zero(fp8_kernel):
    check_fully_masked_rows(attention_fp8, 5e-2)


def check_gpu_prologue(k_mode, D, interleaved):
    B, H, L = 1, 4, 1000
    q, k, v = make_qkv(B, H, L, L, D, torch.bfloat16, "BLHD", "cuda")
    p = make_prologue(L, D, norm=True, rope=True, interleaved=interleaved, k_mode=k_mode, split=300, device="cuda")
    out = attention(q, k, v, prologue=p)
    check_finite(out)
    ref, _ = ref_attention(reference_prologue(q.double(), p, which="q"),
                           reference_prologue(k.double(), p, which="k"), v)
    assert rel_err(out, ref) <= 1e-2


@gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("interleaved", [True, False])
def test_gpu_bf16_prologue_matches_fp64(D, interleaved, bf16_kernel):
    check_gpu_prologue("prepass", D, interleaved)


@gpu
@pytest.mark.parametrize("interleaved", [True, False])
def test_gpu_bf16_inline_prologue_matches_fp64(interleaved):
    """k_mode="inline" (K's prologue inside the key loop) exists in the Triton-lang kernel only."""
    check_gpu_prologue("inline", 64, interleaved)


@gpu
def test_gpu_prologue_writes_head_groups():
    """FLUX under Ulysses 2 with 2 chunks: 6 heads of each rank, 2,304 tokens."""
    check_prologue_into_head_groups(2304, 6, 128, torch.bfloat16, "cuda", 1e-2)


@gpu
def test_gpu_token_interleaved_views_match_fp64(bf16_kernel):
    """The Ulysses receive layout at FLUX's size on 4 GPUs (6 heads a rank): TMA descriptors with a row
    stride of 3 * H * D, and the prologue writing into a send-buffer slice."""
    L, H, D = 4608, 6, 128
    q, k, v = interleaved_qkv(L, H, D, torch.bfloat16, "cuda")
    assert A._tma_views(q, k, v, "BLHD") is not None
    out = attention(q, k, v)
    check_finite(out)
    assert rel_err(out, ref_attention(q, k, v)[0]) <= 1e-2
    p = make_prologue(L, D, norm=True, rope=True, interleaved=True, k_mode="prepass", split=512, device="cuda")
    buf = torch.zeros(1, L, 3, H, D, dtype=torch.bfloat16, device="cuda")
    norm_rope(k, p, which="k", out=buf[:, :, 1])
    assert rel_err(buf[:, :, 1], reference_prologue(k.double(), p, which="k")) <= 1e-2
    assert not buf[:, :, 0].any() and not buf[:, :, 2].any()


@gpu
def test_gpu_inline_prologue_at_head_dim_128_fails_clearly_on_hopper():
    if torch.cuda.get_device_properties(0).major != 9:
        pytest.skip("the shared-memory limit measured is Hopper's (227 KB a block)")
    # Above 1024 queries (the tuner's bucket), Hopper's long-sequence configs are tuned (1000 still fits the short ones).
    q, k, v = make_qkv(1, 4, 4608, 4608, 128, torch.bfloat16, "BLHD", "cuda")
    p = make_prologue(4608, 128, norm=True, rope=True, interleaved=True, k_mode="inline", split=512, device="cuda")
    with pytest.raises(ValueError, match="k_mode='inline' does not fit this GPU's shared memory at head_dim=128"):
        attention(q, k, v, prologue=p)


@gpu
@pytest.mark.parametrize("qk_format,min_cos", [("int8", 0.999), ("fp8", 0.998)])
@pytest.mark.parametrize("B,H,Lq,Lk,D,masked", GPU_CASES)
def test_gpu_fp8_cosine(B, H, Lq, Lk, D, masked, qk_format, min_cos, fp8_kernel):
    """Default int8 Q.K^T meets 0.999; all-e4m3 measured 0.9986 on random inputs (module docstring)."""
    q, k, v = make_qkv(B, H, Lq, Lk, D, torch.bfloat16, "BLHD", "cuda")
    mask = make_mask(B, Lk, "cuda") if masked else None
    out, lse = attention_fp8(q, k, v, mask=mask, return_lse=True, qk_format=qk_format)
    check_finite(out, lse)
    ref, ref_lse = ref_attention(q, k, v, mask)
    assert out.dtype == torch.bfloat16
    assert cosine(out, ref) >= min_cos
    assert (lse.double() - ref_lse).abs().max().item() < 0.1


@gpu
@pytest.mark.parametrize("kernel", ["bf16", "int8", "fp8"])
@pytest.mark.parametrize("B,H,Lq,Lk,D,masked", GPU_CASES)
def test_gpu_gluon_programs_take_task_after_task(B, H, Lq, Lk, D, masked, kernel, monkeypatch):
    """The Gluon kernels' persistent grid (one program an SM, query tiles fetched from the launch's counter). With 3
    programs each runs many tasks, so the ring's phases and the Q hand-over cross task boundaries; every task must
    give the bits it gives when the test shapes' few tasks each get their own program - also replayed from a CUDA
    graph, twice, which only works if every replay starts the counter from zero."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernels are sm_90 only")
    if kernel != "bf16" and D != A8._hopper_fp8.HEAD_DIM:
        pytest.skip("the Gluon FP8 kernel takes head dim 128 only")
    monkeypatch.setattr(A, "HOPPER_KERNEL", True)
    module = A._hopper if kernel == "bf16" else A8._hopper_fp8
    launches, launch = [], module.launch
    monkeypatch.setattr(module, "launch", lambda *a, **kw: launches.append(1) or launch(*a, **kw))
    q, k, v = make_qkv(B, H, Lq, Lk, D, torch.bfloat16, "BLHD", "cuda")
    mask = make_mask(B, Lk, "cuda") if masked else None
    if kernel == "bf16":
        run = lambda: attention(q, k, v, mask=mask, return_lse=True)  # noqa: E731
    else:
        t = quantize_fp8(q, k, v, "BLHD", kernel)
        run = lambda: attention_fp8_quantized(t, mask=mask)  # noqa: E731
    tasks = B * H * -(-Lq // (A._hopper.CONSUMERS * A._hopper.BLOCK_M))
    assert tasks <= A._hopper.sm_count(q.device)  # so the first call runs one task a program
    one_each = run()
    monkeypatch.setattr(A._hopper, "sm_count", lambda device: 3)
    few = run()
    assert torch.equal(few[0], one_each[0]) and torch.equal(few[1], one_each[1])
    check_finite(*few)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = run()
    for _ in range(2):
        for x in replayed:
            x.fill_(float("nan"))  # a task no program took would keep these
        graph.replay()
        assert torch.equal(replayed[0], one_each[0]) and torch.equal(replayed[1], one_each[1])
    assert len(launches) == 3


@gpu
def test_gpu_lse_merge(bf16_kernel):
    q, k, v = make_qkv(1, 4, 1000, 2000, 128, torch.bfloat16, "BLHD", "cuda")
    o1, l1 = attention(q, k[:, :1000], v[:, :1000], return_lse=True)
    o2, l2 = attention(q, k[:, 1000:], v[:, 1000:], return_lse=True)
    lse = torch.logaddexp(l1, l2)
    merged = (o1.double() * torch.exp(l1 - lse).transpose(1, 2)[..., None]
              + o2.double() * torch.exp(l2 - lse).transpose(1, 2)[..., None])
    ref, ref_lse = ref_attention(q, k, v)
    assert rel_err(merged, ref) <= 1e-2
    assert (lse.double() - ref_lse).abs().max().item() < 5e-2


def test_autotuning_is_keyed_on_length_buckets():
    """New prompt lengths in one power-of-two bucket reuse the tuned config instead of re-tuning."""
    assert [A.tune_length(n) for n in (1, 16, 17, 4103, 4608, 8192, 32760)] == [1, 16, 32, 8192, 8192, 8192, 32768]
    for key in (A._TUNE_KEY, A8._attn_fwd_fp8_tuned.keys):
        assert "LQ" not in key and "LK" not in key and {"LQ_TUNE", "LK_TUNE"} <= set(key)


def test_candidate_configs_follow_the_length_bucket(monkeypatch):
    """The tuned config is cached per bucket, so the configs it is chosen among must be the bucket's too: with the
    exact length deciding, 1000 and 1024 queries (one bucket) had the short and the long Hopper configs."""
    import types

    hopper = types.SimpleNamespace(major=9, minor=0, shared_memory_per_block_optin=227 * 1024, name="an sm_90 GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: hopper)
    q = torch.empty(1, 1, 1, 128, dtype=torch.bfloat16)

    def candidates(prune, configs, lq, **meta):
        args = {"Q": q, "LQ": lq, "LQ_TUNE": A.tune_length(lq), "TMA_OK": True}
        return {A._key(c) for c in prune(configs, args, HEAD_DIM=128, **meta)}

    for prune, configs in ((A.prune_configs, A._candidate_configs()), (A8.prune_fp8_configs, A8._fp8_configs())):
        assert candidates(prune, configs, 1000) == candidates(prune, configs, 1024) != candidates(prune, configs, 1025)


def test_gluon_grid_is_one_program_an_sm_or_a_task(monkeypatch):
    monkeypatch.setattr(A._hopper, "sm_count", lambda device: 132)
    assert A._hopper.programs(864, None) == 132
    assert A._hopper.programs(54, None) == 54


def test_gluon_kernels_take_only_the_calls_they_support(monkeypatch):
    """attention() sends a call to the Gluon kernel only on sm_90, in bf16 (fp16 has not run on a GPU), at head
    dims 64/128 and with token rows a TMA can address; attention_fp8 to its Gluon kernel only on sm_90 at head
    dim 128 (at 64 the Triton-lang one measured faster); everything else stays on the Triton-lang kernels."""
    H = A._hopper
    q, k, v = make_qkv(1, 2, 33, 40, 128, torch.bfloat16, "BLHD")
    views = A._tma_views(q, k, v, "BLHD")
    assert views is not None
    quantised = {D: torch_quantize(*make_qkv(1, 2, 33, 40, D, torch.float32, "BLHD"), "int8") for D in (64, 128)}
    assert not H.supported(q, views)  # no sm_90 GPU here
    assert not A8._hopper_fp8.supported(quantised[128])
    monkeypatch.setattr(H, "runs_on", lambda device: True)
    monkeypatch.setattr(A8._hopper_fp8, "runs_on", lambda device: True)
    assert A8._hopper_fp8.supported(quantised[128])
    assert not A8._hopper_fp8.supported(quantised[64])
    assert H.supported(q, views)
    assert not H.supported(q.half(), views)
    assert not H.supported(q.float(), views)
    assert not H.supported(q[..., :16], views)
    assert not H.supported(q, None)
    # Token rows 3 * H * D apart (a Ulysses receive buffer) are TMA-able; rows of a head-strided view are not.
    buf = torch.zeros(1, 40, 3, 2, 128, dtype=torch.bfloat16)
    assert A._tma_views(buf[:, :, 0], buf[:, :, 1], buf[:, :, 2], "BLHD") is not None
    assert A._tma_views(q, k.transpose(1, 2).contiguous().transpose(1, 2), v, "BLHD") is None
