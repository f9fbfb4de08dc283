"""Attention backends with explicit constraints.

    backend = get_backend("triton")
    backend.check(q, k, v, mask)          # ValueError naming the violated constraint
    out = backend(q, k, v, mask=mask, prologue=p)

All backends take and return (B, L, H, D) tensors (diffusers' layout after `unflatten`), a boolean
key-padding mask (B, Lk) with True = attend, and an optional `Prologue` (per-head RMSNorm + RoPE).
Backends that cannot fuse the prologue apply it first (`_unfused`: torch's `reference_prologue` for `sdpa`,
our Triton prologue kernel for the CUDA-only ones), so every backend computes the same function.

Names: "sdpa" (torch scaled_dot_product_attention; the reference), "triton" (ditserve::attention),
"triton_fp8" (ditserve::attention_fp8: int8 Q/K, e4m3 P/V), "flash_attn" (only listed when flash_attn imports).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import attention as _attn
from .attention import Prologue, reference_prologue, validate_prologue
from .attention_fp8 import attention_fp8

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[Prologue]],
                  torch.Tensor]


@dataclass(frozen=True)
class Backend:
    name: str
    fn: AttnFn
    dtypes: dict[str, frozenset[torch.dtype]]  # per device type; the keys are the supported device types
    head_dims: frozenset[int]
    supports_mask: bool
    min_capability: tuple[int, int] = (0, 0)  # CUDA compute capability
    cpu_needs_interpreter: bool = False

    def check(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Raise ValueError naming the first constraint that (q, k, v, mask) violates."""
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"{self.name}: q, k, v must be 4-D (B, L, H, D), got {q.dim()}, {k.dim()}, {v.dim()}")
        if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
            raise ValueError(f"{self.name}: shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                             f"v {tuple(v.shape)} (expected (B, Lq, H, D) and (B, Lk, H, D))")
        if not (q.device == k.device == v.device):
            raise ValueError(f"{self.name}: q, k, v are on different devices")
        if not (q.dtype == k.dtype == v.dtype):
            raise ValueError(f"{self.name}: q, k, v have different dtypes {q.dtype}, {k.dtype}, {v.dtype}")
        self.check_config(q.device, q.dtype, q.shape[-1], masked=mask is not None)
        if mask is not None:
            if mask.dtype != torch.bool or tuple(mask.shape) != (k.shape[0], k.shape[1]):
                raise ValueError(f"{self.name}: mask must be bool (B, Lk) = ({k.shape[0]}, {k.shape[1]}), got "
                                 f"{mask.dtype} {tuple(mask.shape)}")
            if mask.device != q.device:
                raise ValueError(f"{self.name}: mask is on {mask.device}, q on {q.device}")

    def check_config(self, device: torch.device, dtype: torch.dtype, head_dim: int, *, masked: bool = False) -> None:
        """Raise ValueError naming the first constraint that attention on `device` in `dtype` with `head_dim`
        (and a key-padding mask when `masked`) violates: what a model can check at load, before any tensor."""
        dev = device.type
        if dev not in self.dtypes:
            raise ValueError(f"{self.name}: device type '{dev}' not supported (supported: {sorted(self.dtypes)})")
        if dev == "cpu" and self.cpu_needs_interpreter and not _attn.INTERPRET:
            raise ValueError(f"{self.name}: on CPU this backend runs only in Triton's interpreter; set "
                             "TRITON_INTERPRET=1 before importing ditserve.kernels")
        if dev == "cuda" and torch.cuda.get_device_capability(device) < self.min_capability:
            raise ValueError(f"{self.name}: needs CUDA compute capability >= {self.min_capability}, device has "
                             f"{torch.cuda.get_device_capability(device)}")
        if dtype not in self.dtypes[dev]:
            raise ValueError(f"{self.name}: dtype {dtype} not supported on {dev} "
                             f"(supported: {sorted(str(d) for d in self.dtypes[dev])})")
        if head_dim not in self.head_dims:
            raise ValueError(f"{self.name}: head dim {head_dim} not supported (supported: {sorted(self.head_dims)})")
        if masked and not self.supports_mask:
            raise ValueError(f"{self.name}: key-padding masks are not supported")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
                 prologue: Optional[Prologue] = None) -> torch.Tensor:
        self.check(q, k, v, mask)
        return self.fn(q, k, v, mask, prologue)


def _unfused(q: torch.Tensor, k: torch.Tensor, p: Optional[Prologue], *, kernel: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The prologue before a backend that does not fuse it: torch ops for `sdpa`, the reference, or with
    `kernel` (the CUDA-only backends) our Triton prologue kernel, one launch per tensor instead of ~15
    fp32 torch ops (ditserve.parallel.usp.write_prologue has the measurement). The prologue is checked as the
    `triton` backend's kernel checks it, so that every backend refuses a bad one with the same message (unchecked,
    one given weight was silently skipped, or normalised Q alone)."""
    if p is None:
        return q, k
    p = validate_prologue(p, q.shape[-1], q.shape[1], k.shape[1], q.device)
    if p.q_weight is None and p.cos is None:
        return q, k
    if kernel:
        return _attn.norm_rope(q, p, which="q"), _attn.norm_rope(k, p, which="k")
    return (reference_prologue(q, p, which="q").to(q.dtype), reference_prologue(k, p, which="k").to(k.dtype))


def _sdpa(q, k, v, mask, prologue):
    q, k = _unfused(q, k, prologue)
    attn_mask = mask[:, None, None, :] if mask is not None else None
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
    if mask is not None:  # SDPA gives NaN for rows with no key; the Triton kernels give 0. Those rows only:
        # NaN or Inf elsewhere is an overflow to show, not to clip (as nan_to_num did).
        out = out.masked_fill(~mask.any(-1)[:, None, None, None], 0.0)
    return out.transpose(1, 2)


def _triton(q, k, v, mask, prologue):
    return _attn.attention(q, k, v, mask=mask, layout="BLHD", prologue=prologue)


def _triton_fp8(q, k, v, mask, prologue):
    q, k = _unfused(q, k, prologue, kernel=True)
    return attention_fp8(q, k, v, mask=mask, layout="BLHD")


def _flash_attn(q, k, v, mask, prologue):
    from flash_attn import flash_attn_func  # listed only when importable

    q, k = _unfused(q, k, prologue, kernel=True)
    return flash_attn_func(q, k, v, softmax_scale=1.0 / math.sqrt(q.shape[-1]))


_HALF = frozenset({torch.float16, torch.bfloat16})
_BACKENDS: dict[str, Backend] = {
    "sdpa": Backend(
        "sdpa", _sdpa, {"cpu": _HALF | {torch.float32}, "cuda": _HALF | {torch.float32}},
        head_dims=frozenset(range(1, 513)), supports_mask=True,
    ),
    "triton": Backend(
        "triton", _triton,
        # The interpreter's bf16 tl.dot is wrong (relative error ~1e9, triton 3.6.0): CPU gets fp16/fp32 only.
        {"cuda": _HALF, "cpu": frozenset({torch.float16, torch.float32})},
        head_dims=frozenset({16, 64, 128}), supports_mask=True,
        min_capability=(8, 0), cpu_needs_interpreter=True,
    ),
    "triton_fp8": Backend(
        "triton_fp8", _triton_fp8, {"cuda": _HALF},
        head_dims=frozenset({64, 128}), supports_mask=True, min_capability=(8, 9),
    ),
}
try:
    import flash_attn  # noqa: F401

    _HAS_FLASH_ATTN = True
except ImportError:
    _HAS_FLASH_ATTN = False
if _HAS_FLASH_ATTN:
    _BACKENDS["flash_attn"] = Backend(
        "flash_attn", _flash_attn, {"cuda": _HALF},
        head_dims=frozenset(range(8, 257, 8)), supports_mask=False, min_capability=(8, 0),
    )


def available_backends() -> list[str]:
    return list(_BACKENDS)


def get_backend(name: str) -> Backend:
    try:
        return _BACKENDS[name]
    except KeyError:
        hint = " (flash_attn is not installed)" if name == "flash_attn" else ""
        raise ValueError(f"unknown attention backend {name!r}{hint}; available: {available_backends()}") from None
