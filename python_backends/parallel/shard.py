"""Sequence sharding for sequence-parallel attention: pure functions, no process groups.

The sequence is the MMDiT joint sequence, text tokens then image tokens (FLUX, Qwen-Image,
SD3), or plain video tokens (Wan, HunyuanVideo: ``text_len=0``).

Padding rule
------------
The joint sequence of ``total = text_len + image_len`` tokens is padded *at its end* (after the
last image token) to ``padded = degree * ceil(total / degree)`` tokens, and rank ``r`` holds the
contiguous slice ``[r * local_len, (r + 1) * local_len)`` of the padded sequence
(``local_len = padded / degree``). Consequences, which the attention code relies on:

* every rank holds the same number of tokens, so all_to_all and ring blocks have one shape;
* padding rows exist only at the global end, so they sit at the end of the last rank(s)' image
  rows, and gathering is "concatenate, then keep the first ``total`` rows";
* the order of the local pieces is the global order, so a rank's local joint sequence is
  ``[its text rows, its image rows, its padding rows]`` and a model that concatenates text
  before image (FLUX's blocks) keeps working on a shard;
* padded rows are zero; their keys are masked out of attention (``local_key_mask``) and their query
  rows are computed (row-wise ops cannot mix them into real rows) and dropped at gather.

Rotary tables, position ids and key-padding masks are per-token tensors like any other and are
sharded with the same ``shard`` call, so rank ``r``'s positions are exactly those of its tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Optional

import torch

Stream = Literal["joint", "text", "image"]


@dataclass(frozen=True)
class ShardPlan:
    text_len: int
    image_len: int
    degree: int

    def __post_init__(self) -> None:
        if self.degree < 1:
            raise ValueError(f"sequence-parallel degree must be >= 1, got {self.degree}")
        if self.text_len < 0 or self.image_len < 0 or self.text_len + self.image_len == 0:
            raise ValueError(f"sequence lengths must be >= 0 and not both 0, got text {self.text_len}, "
                             f"image {self.image_len}")

    @property
    def total(self) -> int:
        return self.text_len + self.image_len

    @property
    def local_len(self) -> int:
        return -(-self.total // self.degree)

    @property
    def padded(self) -> int:
        return self.local_len * self.degree

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.degree:
            raise ValueError(f"rank {rank} out of range for degree {self.degree}")

    def text_slice(self, rank: int) -> slice:
        """This rank's rows of the text stream."""
        self._check_rank(rank)
        start = rank * self.local_len
        return slice(min(start, self.text_len), min(start + self.local_len, self.text_len))

    def image_slice(self, rank: int) -> slice:
        """This rank's rows of the image (or video) stream, padding excluded."""
        self._check_rank(rank)
        start = rank * self.local_len - self.text_len
        stop = start + self.local_len
        return slice(min(max(start, 0), self.image_len), min(max(stop, 0), self.image_len))

    def pad(self, rank: int) -> int:
        """Padding rows at the end of this rank's shard."""
        text, image = self.text_slice(rank), self.image_slice(rank)
        return self.local_len - (text.stop - text.start) - (image.stop - image.start)


def plan(text_len: int, image_len: int, degree: int) -> ShardPlan:
    """The shard plan of a joint sequence (text_len=0 for video tokens)."""
    return ShardPlan(text_len, image_len, degree)


def _stream_len(p: ShardPlan, stream: Stream) -> int:
    return {"joint": p.total, "text": p.text_len, "image": p.image_len}[stream]


def _pad_rows(x: torch.Tensor, rows: int, dim: int, value: float | bool = 0) -> torch.Tensor:
    if rows == 0:
        return x
    shape = list(x.shape)
    shape[dim] = rows
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def shard(x: torch.Tensor, p: ShardPlan, rank: int, dim: int, stream: Stream = "joint",
          pad_value: float | bool = 0) -> torch.Tensor:
    """Rank `rank`'s rows of x along `dim`.

    stream "joint": x holds the whole joint sequence (total rows) -> local_len rows, padding included.
    stream "text": x holds the text rows -> this rank's text rows (no padding).
    stream "image": x holds the image rows -> this rank's image rows followed by its padding rows.
    pad_value: what padding rows hold (False for a key mask).
    """
    dim = dim % x.dim()
    if x.shape[dim] != _stream_len(p, stream):
        raise ValueError(f"shard: dim {dim} of x has {x.shape[dim]} rows, the {stream} stream of {p} has "
                         f"{_stream_len(p, stream)}")
    if stream == "text":
        rows = p.text_slice(rank)
        return x.narrow(dim, rows.start, rows.stop - rows.start)
    if stream == "image":
        rows = p.image_slice(rank)
        return _pad_rows(x.narrow(dim, rows.start, rows.stop - rows.start), p.pad(rank), dim, pad_value)
    start = rank * p.local_len
    take = max(0, min(p.local_len, p.total - start))
    return _pad_rows(x.narrow(dim, min(start, p.total), take), p.local_len - take, dim, pad_value)


def gather(parts: Sequence[torch.Tensor], p: ShardPlan, dim: int, stream: Stream = "joint") -> torch.Tensor:
    """Inverse of `shard`: the shards of all ranks, in rank order -> the stream, padding dropped."""
    if len(parts) != p.degree:
        raise ValueError(f"gather: {len(parts)} parts for degree {p.degree}")
    # Padding exists only at the global end, so the concatenation is the stream followed by padding.
    return torch.cat(list(parts), dim=dim).narrow(dim, 0, _stream_len(p, stream))


def local_key_mask(p: ShardPlan, rank: int, mask: Optional[torch.Tensor] = None,
                   batch: int = 1, device: Optional[torch.device] = None) -> torch.Tensor:
    """(B, local_len) bool key mask of this rank's tokens: the caller's mask (B, total), True = attend,
    or all True, with this rank's padding rows False."""
    if mask is None:
        mask = torch.ones(batch, p.total, dtype=torch.bool, device=device)
    return shard(mask, p, rank, dim=1, pad_value=False)
