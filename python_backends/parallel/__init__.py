"""Sequence parallelism for diffusion transformers: shard maths, Ulysses, Ring and USP attention."""

from .ring import block_attention, merge, ring_attention
from .shard import ShardPlan, gather, local_key_mask, plan, shard
from .ulysses import check_heads, ulysses_attention
from .usp import SPMesh, USPLayout, build_mesh, usp_attention, usp_layout

__all__ = [
    "ShardPlan", "plan", "shard", "gather", "local_key_mask",
    "merge", "block_attention", "ring_attention",
    "check_heads", "ulysses_attention",
    "USPLayout", "SPMesh", "usp_layout", "build_mesh", "usp_attention",
]
