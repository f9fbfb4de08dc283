"""What ditserve's attention processors for diffusers' DiT attention modules share (FLUX:
`flux_processor`, Qwen-Image: `qwen_processor`, Wan: `wan_processor`).

Each processor is a drop-in for the model's diffusers processor (same inputs, same outputs) that hands
the raw per-head Q, K, V to a registry backend (`ditserve.kernels.registry`), with the QK norm and the
rotary embedding as a `Prologue` where the model's maths allows: the `triton` backend applies it inside
the kernel, the others before it (`registry._unfused`), so every backend computes the same function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal, Optional, Union

import torch
from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm

from .registry import get_backend

# (q, k, v, *, mask=None, prologue=None) -> out, all (B, L, H, D): a registry Backend, or a callable
# with its signature (the sequence-parallel one, ditserve.parallel.usp.SequenceParallelBackend).
Attend = Callable[..., torch.Tensor]


class BackendProcessor:
    """Base of ditserve's processors: the backend they attend through (a registry name or an Attend) and
    how the `triton` backend applies the K prologue (Prologue.k_mode). Each model's subclass names the
    diffusers attention module it serves and diffusers' own processor for it, which `install` restores."""

    module_type: type
    diffusers_processor: type

    def __init__(self, backend: Union[str, Attend] = "triton", k_mode: Literal["inline", "prepass"] = "prepass") -> None:
        self.backend: Attend = get_backend(backend) if isinstance(backend, str) else backend
        self.k_mode = k_mode

    @classmethod
    def install(cls, transformer: torch.nn.Module, name: str, *,
                k_mode: Literal["inline", "prepass"] = "prepass") -> int:
        """Install cls(name, k_mode) on every `module_type` module of `transformer` (the model's
        `set_attention_backend`); name "diffusers" restores `diffusers_processor`. Returns how many."""
        processor = cls.diffusers_processor() if name == "diffusers" else cls(name, k_mode)
        modules = (m for m in transformer.modules() if isinstance(m, cls.module_type))
        return set_processor(transformer, modules, processor, f"set_attention_backend ({cls.module_type.__name__})")


# QK norms the prologue can compute: a per-head RMSNorm with an optional weight and no bias.
_RMS_NORMS = (torch.nn.RMSNorm, DiffusersRMSNorm)


def norm_weight(norm: Optional[torch.nn.Module], head_dim: int, like: torch.Tensor, who: str) -> torch.Tensor:
    """The (head_dim,) weight of a per-head QK RMSNorm (ones where it has none)."""
    if not isinstance(norm, _RMS_NORMS) or getattr(norm, "bias", None) is not None:
        raise ValueError(f"{who}: the QK norms must be RMSNorms without bias, got {type(norm).__name__}")
    # torch.nn.RMSNorm keeps normalized_shape, diffusers' RMSNorm dim: the prologue normalises per head.
    width = tuple(getattr(norm, "normalized_shape", None) or norm.dim)
    if width != (head_dim,):
        raise ValueError(f"{who}: QK norm over {width} features, not per head ({head_dim})")
    if norm.weight is None:
        return torch.ones(head_dim, device=like.device, dtype=like.dtype)
    return norm.weight


def norm_eps(norms: Sequence[torch.nn.Module], dtype: torch.dtype, who: str) -> float:
    """The one eps of several QK RMSNorms (the prologue takes one); torch.nn.RMSNorm with eps=None uses the
    input dtype's machine epsilon."""
    values = {float(n.eps) if n.eps is not None else float(torch.finfo(dtype).eps) for n in norms}
    if len(values) != 1:
        raise ValueError(f"{who}: the fused prologue takes one eps, the QK norms have {sorted(values)}")
    return values.pop()


def key_padding_mask(mask: Optional[torch.Tensor], batch: int, length: int, who: str) -> Optional[torch.Tensor]:
    """A bool key-padding mask (True = attend) as (B, L), from (B, L) or broadcastable (B, 1, 1, L)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise ValueError(f"{who}: the attention mask must be bool (True = attend), got {mask.dtype}")
    given = tuple(mask.shape)  # the error names what the caller passed, not the squeezed view
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        mask = mask[:, 0, 0, :]
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{who}: the attention mask must be (B, L) = ({batch}, {length}) or (B, 1, 1, L), got "
                         f"{given}")
    return mask


def set_processor(transformer: torch.nn.Module, modules: Iterable[torch.nn.Module], processor: object,
                  who: str) -> int:
    """Install `processor` on each of `modules`, attention modules of `transformer`; returns how many. One
    instance serves every block, so any state it keeps must be per forward, not per block (Wan's key mask).
    `who` names the caller in the error when there are none."""
    n = 0
    for module in modules:
        module.set_processor(processor)
        n += 1
    if n == 0:
        raise ValueError(f"{who}: {type(transformer).__name__} has no attention modules to install on")
    return n
