#!/usr/bin/env python3
"""Ring attention's blocks in one process: precision of the merged result and time per block.

    python perf/bench_ring_block.py                         # GPU: Qwen-Image 1024x1024 shape, bf16
    python perf/bench_ring_block.py --device cpu --tiny     # smoke test

Ring attention over P ranks computes, for each query shard, one attention block per key shard and
merges the blocks through their log-sum-exp (``ditserve.parallel.ring.block_attention`` and ``merge``,
what ``ring_attention`` runs between its sends and receives). Here all shards are in one process, so the
numbers are the ring's arithmetic without its communication. Inputs: a joint sequence of ``--text``
text tokens (the last ``--text-padding`` of them masked, as Qwen-Image's padded prompts) and
``--image`` image tokens, ``--heads`` heads of 128, random N(0, 1) fp32 q/k/v. Printed: the relative L2
error, against fp64 attention of those inputs, of one bf16 SDPA call over all keys (inputs rounded to
bf16) and of Ring P on the same bf16 inputs with each block backend (``sdpa``: torch's fused kernels;
``triton``: our kernel, CUDA only), and the median time of one block of a Ring 2 shard.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ditserve.parallel.ring import block_attention, merge


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One SDPA call over all keys, on (B, L, H, D) tensors."""
    out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=mask[:, None, None, :])
    return out.transpose(1, 2)


def ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, ranks: int,
         backend: str) -> torch.Tensor:
    """Ring attention's result over `ranks` equal shards (the sequence length must divide)."""
    n = q.shape[1] // ranks
    shards = []
    for r in range(ranks):
        out = lse = None
        for s in range(ranks):
            keys = slice(s * n, (s + 1) * n)
            block = block_attention(q[:, r * n:(r + 1) * n], k[:, keys], v[:, keys], mask[:, keys], backend)
            out, lse = block if out is None else merge(out, lse, *block)
        shards.append(out.to(q.dtype))
    return torch.cat(shards, dim=1)


def timed(fn, device: torch.device, repeats: int = 20) -> float:
    """Median milliseconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--text", type=int, default=256)
    parser.add_argument("--text-padding", type=int, default=76)
    parser.add_argument("--image", type=int, default=4096, help="image tokens (4096: 1024x1024)")
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--ranks", default="2,4", help="ring degrees; each must divide text + image")
    parser.add_argument("--tiny", action="store_true", help="32 text (8 padded) + 96 image tokens, 2 heads")
    args = parser.parse_args()
    if args.tiny:
        args.text, args.text_padding, args.image, args.heads = 32, 8, 96, 2
    device = torch.device(args.device)
    backends = ["sdpa"] + (["triton"] if device.type == "cuda" else [])
    total = args.text + args.image
    mask = torch.ones(1, total, dtype=torch.bool, device=device)
    mask[:, args.text - args.text_padding:args.text] = False
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(1, total, args.heads, 128, generator=g, device=device) for _ in range(3))
    exact = sdpa(q.double(), k.double(), v.double(), mask)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()

    def error(out: torch.Tensor) -> float:
        return ((out.double() - exact).norm() / exact.norm()).item()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}: {args.text} text tokens ({args.text_padding} masked) + {args.image} "
          f"image tokens, {args.heads} heads of 128, bf16")
    print(f"relative L2 error against fp64 attention: one SDPA call {error(sdpa(q, k, v, mask)):.3e}")
    for ranks in (int(r) for r in args.ranks.split(",")):
        errors = (f"{b} blocks {error(ring(q, k, v, mask, ranks, b)):.3e}" for b in backends)
        print(f"  Ring {ranks}: " + ", ".join(errors))
    half = slice(0, total // 2)
    block = [x[:, half].contiguous() for x in (q, k, v)]
    times = {b: timed(lambda b=b: block_attention(*block, mask[:, half], b), device) for b in backends}
    print(f"one Ring 2 block ({total // 2} queries x {total // 2} keys): "
          + ", ".join(f"{b} {ms:.3f} ms" for b, ms in times.items()))


if __name__ == "__main__":
    main()
