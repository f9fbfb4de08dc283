"""perf/bench_alltoall.py: its NCCL variant strings and the buffer sizes it exchanges (those of a FLUX.1-dev
block under Ulysses 2 that perf/RESULTS.md quotes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "perf"))
import bench_alltoall  # noqa: E402


def test_variants_parse_to_environment_settings():
    assert bench_alltoall.parse_variant(" default ") == {}
    assert bench_alltoall.parse_variant("NCCL_MIN_NCHANNELS=32, NCCL_PROTO=Simple") == {
        "NCCL_MIN_NCHANNELS": "32", "NCCL_PROTO": "Simple"}
    with pytest.raises(ValueError, match="'NCCL_PROTO' is not NAME=VALUE"):
        bench_alltoall.parse_variant("NCCL_PROTO")


def test_buffers_are_a_flux_block_of_ulysses_2():
    bufs = bench_alltoall.buffers(2, 4608, 24, 128, torch.device("cpu"))
    # packed by ditserve.parallel.ulysses: Q, K, V interleaved per token, chunk j for rank j; and the output
    assert bufs["qkv"].shape == (2, 1, 2304, 3, 12, 128) and bufs["out"].shape == (2, 1, 2304, 12, 128)
    mb = {k: b.numel() * b.element_size() / 1e6 for k, b in bufs.items()}
    assert round(mb["qkv"], 1) == 42.5 and round(mb["out"], 1) == 14.2
