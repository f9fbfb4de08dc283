#!/usr/bin/env python3
"""One Wan 14B transformer forward, sequence-parallel on 2 GPUs against 1 (ditserve.parallel.wan).

On a 2-GPU host, from the repository root (needs torch with CUDA, diffusers, this checkout importable)::

    python perf/bench_parallel_wan.py            # Wan 2.1/2.2 14B architecture, bf16, 480x832, 81 frames

Random bf16 weights are built in memory on each GPU from one seed (no checkpoint), so every rank holds
the same model; latents (1, 16, 21, 60, 104) -> 32,760 video tokens, 512 text tokens, batch 1. Two
processes (torch.multiprocessing spawn) join one NCCL group directly (not the worker group), so
the numbers are the transformer's alone. Layouts:
* sp 1: rank 0 runs ``transformer(...)`` (diffusers' forward, torch SDPA) while rank 1 waits;
* Ulysses 2: ``sp_forward`` with torch SDPA on 20 heads over the whole sequence;
* Ring 2: ``sp_forward`` with ring blocks on our Triton kernel (it returns the log-sum-exp that merging
  needs; the "sdpa" ring block would materialise fp32 scores, 16,380^2 x 40 heads = 43 GB).
Per forward: median of ``--repeats`` after ``--warmup`` forwards; speed-up against sp 1; the
relative L2 error and max abs error of each layout's output against the sp 1 output.

Smoke test on CPU (gloo, a tiny config, fp32)::

    python perf/bench_parallel_wan.py --tiny --device cpu

Writes bench_parallel_wan.json to ``--out`` (default $OUT, else out/bench).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WAN_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True)
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2, cross_attn_norm=True, rope_max_seq_len=64)
# (latent frames, height, width): 81 frames at 480x832 for 14B; 3 x 5 x 7 = 105 tokens (odd) for --tiny.
LATENTS = {False: (21, 60, 104), True: (3, 10, 14)}
TEXT_TOKENS = {False: 512, True: 8}
# name -> (ulysses_degree, ring_degree, ring block backend on CUDA)
LAYOUTS = {"Ulysses 2": (2, 1, "sdpa"), "Ring 2": (1, 2, "triton")}


def build_model(config: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The same random model on every rank: one seed, built on the device in `dtype` (no fp32 copy of
    14B parameters), then diffusers' fp32 modules (rope tables, time embedder, norms, modulation
    tables) cast back to fp32 as from_pretrained keeps them."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = WanTransformer3DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    keep = model._keep_in_fp32_modules
    for name, module in model.named_modules():
        if any(part in keep for part in name.split(".")):
            module.float()
    for name, param in model.named_parameters():
        if name.split(".")[-1] in keep:  # scale_shift_table is a parameter, not a module
            param.data = param.data.float()
    return model.eval()


def inputs(tiny: bool, config: dict, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, config["in_channels"], *LATENTS[tiny], generator=g)
    text = torch.randn(1, TEXT_TOKENS[tiny], config["text_dim"], generator=g)
    return dict(hidden_states=latents.to(device, dtype), timestep=torch.tensor([999.0], device=device),
                encoder_hidden_states=text.to(device, dtype))


def timed(fn, warmup: int, repeats: int, sync) -> tuple[float, torch.Tensor]:
    """(median ms, last output) of fn() over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), out


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    from ditserve.kernels.registry import get_backend
    from ditserve.parallel import build_mesh
    from ditserve.parallel.wan import set_sequence_parallel, sp_forward

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, **({"device_id": device} if cuda else {}))
    try:
        config = TINY if args.tiny else WAN_14B
        t0 = time.perf_counter()
        model = build_model(config, device, dtype)
        x = inputs(args.tiny, config, device, dtype)
        build_s = time.perf_counter() - t0
        results = {"config": config, "latents": LATENTS[args.tiny], "text_tokens": TEXT_TOKENS[args.tiny],
                   "device": torch.cuda.get_device_name(device) if cuda else "cpu", "build_s": build_s, "layouts": {}}
        reference = None
        if rank == 0:
            print(f"Wan transformer forward, {results['device']}, latents {results['latents']}, "
                  f"{results['text_tokens']} text tokens, model built in {build_s:.1f} s\n"
                  "| layout | ms per forward | speed-up | rel L2 vs sp 1 | max abs vs sp 1 |\n"
                  "| --- | ---: | ---: | ---: | ---: |", flush=True)
        with torch.inference_mode():
            if rank == 0:
                ms, reference = timed(lambda: model(**x, return_dict=False)[0], args.warmup, args.repeats, sync)
                reference = reference.float()
                record(results, "sp 1", {"ms": ms}, args)
            dist.barrier()
            for name in args.layouts.split(";"):
                u, r, ring_backend = LAYOUTS[name]
                backend = ring_backend if cuda and r > 1 else "sdpa"
                mesh = build_mesh(u, r)
                try:  # the kernel's constraints (head dim, dtype, device) before any collective
                    probe = torch.empty(1, 1, config["num_attention_heads"], config["attention_head_dim"],
                                        device=device, dtype=dtype)
                    get_backend(backend).check(probe, probe, probe)
                except ValueError as exc:  # every rank skips alike
                    if rank == 0:
                        record(results, name, {"skipped": str(exc)}, args)
                    continue
                set_sequence_parallel(model, mesh, backend)
                ms, out = timed(lambda: sp_forward(model, mesh, **x), args.warmup, args.repeats, sync)
                if rank == 0:
                    diff = out.float() - reference
                    record(results, name, {
                        "ms": ms, "backend": backend, "speedup": results["layouts"]["sp 1"]["ms"] / ms,
                        "rel_l2": float(diff.norm() / reference.norm()), "max_abs": float(diff.abs().max()),
                    }, args)
    finally:
        dist.destroy_process_group()


def record(results: dict, name: str, row: dict, args: argparse.Namespace) -> None:
    """Print the layout's row now (a run cut short still shows the layouts done) and rewrite the JSON."""
    results["layouts"][name] = row
    if "skipped" in row:
        print(f"| {name} | skipped: {row['skipped'][:100]} | | | |", flush=True)
    elif name == "sp 1":
        print(f"| sp 1 | {row['ms']:.1f} | 1.00x | - | - |", flush=True)
    else:
        print(f"| {name} ({row['backend']}) | {row['ms']:.1f} | {row['speedup']:.2f}x | {row['rel_l2']:.2e} | "
              f"{row['max_abs']:.3e} |", flush=True)
    out_dir = Path(args.out or os.environ.get("OUT") or "out/bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_parallel_wan.json").write_text(json.dumps(results, indent=2))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="a 2-layer model and 105 tokens (CPU smoke test)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layouts", default=";".join(LAYOUTS), help="semicolon-separated subset of: " + "; ".join(LAYOUTS))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        p.error(f"needs 2 GPUs, torch sees {torch.cuda.device_count()}")
    # NVLink multicast off, as perf/bench_parallel.py sets it: before the ranks start, so NCCL reads it.
    for var, val in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ[var] = val
    if args.device == "cpu":
        torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, args), nprocs=2, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
