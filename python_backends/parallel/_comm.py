"""Collectives shared by the attention schemes."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_mask(mask: torch.Tensor, group: dist.ProcessGroup) -> list[torch.Tensor]:
    """Every rank's (B, L/P) bool key mask, in group-rank order. uint8 on the wire: gloo has no bool
    collectives; masks are tiny, so they are gathered once per attention call."""
    parts = [torch.empty_like(mask, dtype=torch.uint8) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mask.to(torch.uint8).contiguous(), group=group)
    return [p.bool() for p in parts]
