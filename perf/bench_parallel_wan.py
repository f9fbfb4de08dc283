#!/usr/bin/env python3
"""One Wan 14B transformer step on 1..N GPUs: Ulysses, Ring, USP and CFG parallelism (ditserve.parallel).

On a multi-GPU host, from the repository root (needs torch with CUDA, diffusers, this checkout importable)::

    python perf/bench_parallel_wan.py                                   # 2 GPUs, 480x832, 81 frames
    python perf/bench_parallel_wan.py --gpus 4 --size 720p --layouts "Ulysses 4;USP 2x2;CFG 2 x Ulysses 2"

Random bf16 weights are built in memory on each GPU from one seed (no checkpoint), so every rank holds
the same model; 480p: latents (1, 16, 21, 60, 104) -> 32,760 video tokens; 720p: (1, 16, 21, 90, 160) ->
75,600; 512 text tokens, batch 1. ``--gpus`` processes (torch.multiprocessing spawn) join one NCCL
group directly (not the worker group), so the numbers are the transformer's alone. Layout names:
* ``sp 1``: rank 0 runs ``transformer(...)`` (diffusers' forward, torch SDPA) while the others wait;
  always measured first, it is the baseline;
* ``Ulysses N``, ``Ring N``, ``USP UxR`` (Ulysses U inside ring R): ``sp_forward`` on the first
  N = U x R ranks; Ulysses attends with torch SDPA over the whole sequence, ring blocks use our Triton
  kernel (it returns the log-sum-exp that merging needs; an SDPA ring block would materialise fp32
  scores, 16,380^2 x 40 heads = 43 GB at 480p);
* ``CFG 2`` and ``CFG 2 x <sp layout>``: the conditional and unconditional forwards on two groups of
  ranks, exchanged through ``ParallelContext.branches`` (what the Wan denoiser runs each step);
* any of them followed by ``, N chunks`` (``ulysses_chunks``). The names are perf/layouts.py's grammar
  ("CFG 2" = "CFG parallel 2"), less the denoiser's modifiers, which this bench has no use for.
A step without CFG is one forward; a step with CFG (WanPipeline's guidance) is two: for the layouts
without CFG parallelism it is reported as twice their forward (the two forwards have the same shapes and
run one after the other), for the CFG layouts it is measured. Per step: median of ``--repeats`` after
``--warmup``; speed-up against sp 1 and scaling efficiency (speed-up / GPUs); the relative L2 error
and max abs error of each layout's output (both predictions for CFG layouts) against sp 1.

Smoke test on CPU (gloo, a tiny config, fp32)::

    python perf/bench_parallel_wan.py --tiny --device cpu --gpus 4 --layouts "Ulysses 2;Ring 4;USP 2x2;CFG 2 x Ring 2"

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layouts import Layout  # noqa: E402
from layouts import parse_layout as parse_any_layout  # noqa: E402

WAN_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True)
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2, cross_attn_norm=True, rope_max_seq_len=64)
# (latent frames, height, width) of 81 frames: 4x temporal, 8x spatial VAE compression. --tiny:
# 3 x 5 x 7 = 105 tokens (odd, so every degree pads).
LATENTS = {"480p": (21, 60, 104), "720p": (21, 90, 160), "tiny": (3, 10, 14)}
TEXT_TOKENS = {False: 512, True: 8}


# This bench builds its meshes itself (no denoiser): of perf/layouts.py's grammar it takes the parallel layout
# and ", N chunks" (ulysses_chunks; default 0, auto: one exchange here, as nothing is captured in a graph).
PARALLEL_OPTIONS = {"sp_degree", "ulysses_degree", "ring_degree", "cfg_parallel", "ulysses_chunks"}


def parse_layout(name: str) -> Layout:
    layout = parse_any_layout(name)
    if set(layout.options) - PARALLEL_OPTIONS or layout.true_cfg != layout.cfg_parallel:
        raise ValueError(f"layout {name!r}: this bench takes a parallel layout ('sp 1', 'Ulysses N', 'Ring N', "
                         f"'USP UxR', 'CFG 2', 'CFG 2 x <one of those>') and ', N chunks' only")
    return layout


DEFAULT_LAYOUTS = {2: "Ulysses 2;Ring 2;CFG 2",
                   4: "Ulysses 2;Ulysses 4;Ring 4;USP 2x2;CFG 2;CFG 2 x Ulysses 2",
                   8: "Ulysses 4;Ulysses 8;USP 4x2;CFG 2 x Ulysses 4"}


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


def inputs(size: str, config: dict, device: torch.device, dtype: torch.dtype) -> tuple[dict, dict]:
    """(conditional, unconditional) forward inputs: the same latents, two text embeddings."""
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, config["in_channels"], *LATENTS[size], generator=g).to(device, dtype)
    texts = [torch.randn(1, TEXT_TOKENS[size == "tiny"], config["text_dim"], generator=g) for _ in range(2)]
    timestep = torch.tensor([999.0], device=device)
    return tuple(dict(hidden_states=latents, timestep=timestep, encoder_hidden_states=t.to(device, dtype))
                 for t in texts)


def timed(fn, warmup: int, repeats: int, sync) -> tuple[float, object]:
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


def meshes(layout: Layout, world: int):
    """(this rank's SPMesh or None, its ParallelContext or None for layouts without CFG parallelism).

    Every rank calls it for every layout: new_group is collective over the default group."""
    from ditserve.parallel import build_mesh
    from ditserve.parallel.group import ParallelConfig, ParallelContext

    rank = dist.get_rank()
    mesh = None
    if layout.sp_degree > 1:
        built = [build_mesh(layout.ulysses_degree, layout.ring_degree, first_rank=b * layout.sp_degree,
                            ulysses_chunks=layout.ulysses_chunks) for b in range(2 if layout.cfg_parallel else 1)]
        mesh = next((m for m in built if m is not None), None)
    if not layout.cfg_parallel:
        return mesh, None
    pairs = [dist.new_group([i, i + layout.sp_degree]) for i in range(layout.sp_degree)]
    if rank >= layout.gpus:
        return None, None
    config = ParallelConfig(layout.ulysses_degree, layout.ring_degree, True, (torch.device("cpu"),) * layout.gpus,
                            ulysses_chunks=layout.ulysses_chunks)
    return mesh, ParallelContext(config, rank, mesh, pairs[rank % layout.sp_degree])


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    from ditserve.kernels.registry import get_backend
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
        config = TINY if args.size == "tiny" else WAN_14B
        t0 = time.perf_counter()
        model = build_model(config, device, dtype)
        positive, negative = inputs(args.size, config, device, dtype)
        diffusers_processors = model.attn_processors
        build_s = time.perf_counter() - t0
        results = {"config": config, "size": args.size, "latents": LATENTS[args.size],
                   "text_tokens": positive["encoder_hidden_states"].shape[1], "gpus": world,
                   "device": torch.cuda.get_device_name(device) if cuda else "cpu", "build_s": build_s, "layouts": {}}
        layouts = [parse_layout(n) for n in args.layouts.split(";") if n.strip()]
        need_negative = any(layout.cfg_parallel for layout in layouts)
        if rank == 0:
            print(f"Wan transformer step, {world} x {results['device']}, latents {results['latents']}, "
                  f"{results['text_tokens']} text tokens, model built in {build_s:.1f} s\n"
                  "| layout | GPUs | step w/o CFG (ms) | speed-up | efficiency | step with CFG (ms) | speed-up | "
                  "efficiency | rel L2 / max abs vs sp 1 |\n"
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |", flush=True)
        with torch.inference_mode():
            reference = None
            if rank == 0:
                ms, out = timed(lambda: model(**positive, return_dict=False)[0], args.warmup, args.repeats, sync)
                reference = [out.float()]
                if need_negative:  # untimed: the CFG layouts' second prediction is checked against it
                    reference.append(model(**negative, return_dict=False)[0].float())
                record(results, parse_layout("sp 1"), {"ms": ms}, args)
            dist.barrier()
            for layout in layouts:
                if layout.gpus > world:
                    if rank == 0:
                        record(results, layout, {"skipped": f"needs {layout.gpus} GPUs, have {world}"}, args)
                    continue
                backend = "triton" if cuda and layout.ring_degree > 1 else "sdpa"
                mesh, context = meshes(layout, world)
                if rank < layout.gpus:
                    try:  # the kernel's and Ulysses' constraints before any collective; every rank skips alike
                        probe = torch.empty(1, 1, config["num_attention_heads"], config["attention_head_dim"],
                                            device=device, dtype=dtype)
                        get_backend(backend).check(probe, probe, probe)
                        if mesh is not None:
                            set_sequence_parallel(model, mesh, backend)
                        else:
                            model.set_attn_processor(diffusers_processors)
                    except ValueError as exc:
                        if rank == 0:
                            record(results, layout, {"skipped": str(exc)}, args)
                        dist.barrier()
                        continue

                    def forward(x):
                        return sp_forward(model, mesh, **x) if mesh is not None else model(**x, return_dict=False)[0]

                    if context is None:
                        ms, out = timed(lambda: forward(positive), args.warmup, args.repeats, sync)
                        outs = [out]
                    else:
                        like = torch.empty_like(positive["hidden_states"])
                        ms, outs = timed(lambda: context.branches(lambda: forward(positive), lambda: forward(negative),
                                                                  like, like), args.warmup, args.repeats, sync)
                    if rank == 0:
                        diffs = [o.float() - ref for o, ref in zip(outs, reference)]
                        record(results, layout, {
                            "ms": ms, "backend": backend,
                            "rel_l2": max(float(d.norm() / ref.norm()) for d, ref in zip(diffs, reference)),
                            "max_abs": max(float(d.abs().max()) for d in diffs),
                        }, args)
                dist.barrier()
    finally:
        dist.destroy_process_group()


def record(results: dict, layout: Layout, row: dict, args: argparse.Namespace) -> None:
    """Print the layout's row now (a run cut short still shows the layouts done) and rewrite the JSON."""
    row = {**row, "gpus": layout.gpus, "cfg_parallel": layout.cfg_parallel, "ulysses": layout.ulysses_degree,
           "ring": layout.ring_degree, "ulysses_chunks": layout.ulysses_chunks}
    if "ms" in row:
        base = results["layouts"]["sp 1"]["ms"] if results["layouts"] else row["ms"]
        # Without CFG parallelism the two CFG forwards run one after the other.
        row["step_ms"] = None if layout.cfg_parallel else row["ms"]
        row["cfg_step_ms"] = row["ms"] if layout.cfg_parallel else 2 * row["ms"]
        row["speedup"] = None if layout.cfg_parallel else base / row["ms"]
        row["cfg_speedup"] = 2 * base / row["cfg_step_ms"]
    results["layouts"][layout.name] = row
    label = layout.name + (f" ({row['backend']})" if row.get("backend") == "triton" else "")

    def cells(ms, speedup):
        if ms is None:
            return "- | - | -"
        return f"{ms:,.1f} | {speedup:.2f}x | {100 * speedup / layout.gpus:.0f}%"

    if "skipped" in row:
        print(f"| {label} | {layout.gpus} | skipped: {row['skipped'][:100]} | | | | | | |", flush=True)
    else:
        error = "-" if layout.name == "sp 1" else f"{row['rel_l2']:.2e} / {row['max_abs']:.3e}"
        cfg_ms = f"{row['cfg_step_ms']:,.1f}" + ("" if layout.cfg_parallel else " (2 x)")
        print(f"| {label} | {layout.gpus} | {cells(row['step_ms'], row['speedup'])} | {cfg_ms} | "
              f"{row['cfg_speedup']:.2f}x | {100 * row['cfg_speedup'] / layout.gpus:.0f}% | {error} |", flush=True)
    out_dir = Path(args.out or os.environ.get("OUT") or "out/bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"bench_parallel_wan_{args.size}_{results['gpus']}gpu.json").write_text(json.dumps(results, indent=2))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--gpus", type=int, default=2, help="processes (GPUs) in the group")
    p.add_argument("--size", default="480p", choices=("480p", "720p"))
    p.add_argument("--tiny", action="store_true", help="a 2-layer model and 105 tokens (CPU smoke test)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layouts", default=None,
                   help="semicolon-separated layouts (see the module doc); default for 2/4/8 GPUs: "
                        + " | ".join(f"{k}: {v}" for k, v in DEFAULT_LAYOUTS.items()))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.tiny:
        args.size = "tiny"
    if args.layouts is None:
        args.layouts = DEFAULT_LAYOUTS.get(args.gpus, f"Ulysses {args.gpus}")
    try:
        for name in args.layouts.split(";"):
            if name.strip():
                parse_layout(name)
    except ValueError as exc:
        p.error(str(exc))
    if args.device == "cuda" and torch.cuda.device_count() < args.gpus:
        p.error(f"--gpus {args.gpus}: torch sees {torch.cuda.device_count()} GPUs")
    # NVLink multicast off, as perf/bench_parallel.py sets it: before the ranks start, so NCCL reads it.
    for var, val in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ[var] = val
    if args.device == "cpu":
        torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.gpus, port, args), nprocs=args.gpus, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
