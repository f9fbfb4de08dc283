#!/usr/bin/env python3
"""The Ulysses all_to_alls of one FLUX.1-dev block, alone, under NCCL settings given on the command line.

On a host with 2 or more GPUs (after ``source perf/gpu_env.sh``)::

    python perf/bench_alltoall.py --variants "default;NCCL_MIN_NCHANNELS=32;NCCL_PROTO=Simple"

Each variant is a fresh process group (one spawned process per GPU, the variant's variables set before
NCCL initialises), timing ``all_to_all_single`` on the buffers ``ditserve.parallel.ulysses`` exchanges
per block: Q, K and V interleaved per token (P, 1, L/P, 3, H/P, D) and the attention output
(P, 1, L/P, H/P, D), bf16, FLUX.1-dev at 1024x1024 by default (L = 4608, H = 24, D = 128). A profile
of the Ulysses-2 step on 2 H100s put these at 88.8 us a call, ~160 GB/s (perf/RESULTS.md); NVLink 4
carries 450 GB/s each way, so this asks whether NCCL's settings, not the link, set that rate.

Time per call: CUDA events around ``--iters`` back-to-back calls after ``--warmup``, median of rank 0's
``--repeats``. GB/s: bytes that leave a rank (the (P-1)/P of its buffer bound for its peers) per second.
Prints a table last; writes bench_alltoall.json to --out (default $OUT, else .).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def parse_variant(text: str) -> dict[str, str]:
    """'default' or 'A=1,B=2' -> {'A': '1', 'B': '2'}."""
    text = text.strip()
    if text in ("", "default"):
        return {}
    env = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--variants: {item!r} is not NAME=VALUE")
        env[name.strip()] = value.strip()
    return env


def buffers(world: int, tokens: int, heads: int, head_dim: int, device) -> dict[str, torch.Tensor]:
    """The send buffers of one Ulysses attention (batch 1, one exchange), packed by ditserve's own code."""
    from ditserve.parallel.ulysses import heads_to_seq_send, seq_to_heads_send

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16)
    return {"qkv": seq_to_heads_send([rand(1, tokens // world, heads, head_dim) for _ in "qkv"], world),
            "out": heads_to_seq_send(rand(1, tokens, heads // world, head_dim), world)}


def _worker(rank: int, world: int, port: int, env: dict, args, results) -> None:
    os.environ.update(env)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    row = {}
    for name, send in buffers(world, args.tokens, args.heads, args.head_dim, torch.device("cuda", rank)).items():
        recv = torch.empty_like(send)
        for _ in range(args.warmup):
            dist.all_to_all_single(recv, send)
        times = []
        for _ in range(args.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            dist.barrier()
            torch.cuda.synchronize()
            start.record()
            for _ in range(args.iters):
                dist.all_to_all_single(recv, send)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / args.iters)  # us per call
        us = statistics.median(times)
        sent = send.numel() * send.element_size() * (world - 1) / world
        row[name] = {"us": us, "MB_sent": sent / 1e6, "GB_s": sent / (us * 1e-6) / 1e9}
    if rank == 0:
        results.update(row)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="default", help="';'-separated variants, each 'default' or NAME=VALUE,...")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4608)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a variant may take before it is killed")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    if torch.cuda.device_count() < args.world:
        raise SystemExit(f"--world {args.world} needs as many GPUs, found {torch.cuda.device_count()}")
    if args.tokens % args.world or args.heads % args.world:
        raise SystemExit(f"--world {args.world} must divide --tokens {args.tokens} and --heads {args.heads}")

    rows = []
    ctx = mp.get_context("spawn")
    for i, text in enumerate(args.variants.split(";")):
        env = parse_variant(text)
        with ctx.Manager() as manager:
            results = manager.dict()
            procs = mp.start_processes(_worker, args=(args.world, 29600 + i, env, args, results),
                                       nprocs=args.world, join=False, start_method="spawn")
            deadline = time.monotonic() + args.timeout
            while not procs.join(timeout=max(0.0, deadline - time.monotonic())) and time.monotonic() < deadline:
                pass
            if any(proc.is_alive() for proc in procs.processes):
                # NCCL_P2P_USE_CUDA_MEMCPY=1 gave no result in the ~8 minutes a device call had left (2 H200, 2026-11-27).
                for proc in procs.processes:
                    proc.kill()
                results = {"error": f"no result in {args.timeout:.0f} s (killed)"}
            rows.append({"variant": text.strip() or "default", **dict(results)})
        print(json.dumps(rows[-1]), flush=True)

    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_alltoall.json").write_text(json.dumps(
        {"gpu": torch.cuda.get_device_name(0), "world": args.world, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
         "rows": rows}, indent=1))
    print(f"\n{torch.cuda.get_device_name(0)} x{args.world}, NCCL {torch.cuda.nccl.version()}, "
          f"FLUX block buffers L={args.tokens} H={args.heads} D={args.head_dim}")
    print("| variant | QKV us | QKV GB/s | out us | out GB/s | per block us |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {r['error']} | | | | |")
            continue
        print(f"| {r['variant']} | {r['qkv']['us']:.1f} | {r['qkv']['GB_s']:.0f} | {r['out']['us']:.1f} | "
              f"{r['out']['GB_s']:.0f} | {r['qkv']['us'] + r['out']['us']:.1f} |")


if __name__ == "__main__":
    main()
