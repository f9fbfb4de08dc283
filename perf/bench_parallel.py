#!/usr/bin/env python3
"""Denoising step with sequence and CFG parallelism: the denoiser stage as rank 0 of its worker group.

On a 2-GPU host (after ``source perf/gpu_env.sh``)::

    python perf/bench_parallel.py                       # FLUX.1-dev architecture, bf16, 1024x1024, 512 text tokens
    python perf/bench_parallel.py --model qwen-image    # Qwen-Image architecture (20B), true CFG: 1 GPU vs CFG parallel 2

Qwen-Image's checkpoint for this is the ``qwen-image`` preset with the transformer's weights only (the
other components config only: the denoiser reads the VAE's and scheduler's configs), built into
``--model-dir`` on first use: ``python -m ditserve.checkpoints build --preset qwen-image --weights
transformer ...`` (41 GB instead of the whole pipeline's 58 GB). On a CPU: ``--preset tiny-qwen-image``.

Each layout builds the denoiser exactly as the Triton model does (rank 0 here on cuda:0, workers
spawned on the next GPUs, warm-up step at load), then times ``dispatch`` (the path of a request:
commands to the workers, the whole denoising loop on every rank). Per-step time is
``(t(N2 steps) - t(N1 steps)) / (N2 - N1)``, best of ``--repeats``, so fixed costs (latent noise,
schedule, commands) cancel. With ``--loads N`` every layout is loaded N times, in rounds (A, B, A, B, ...),
and its per-step time is the median over the loads, shown with their range: the same code measured 2-5% apart
between two loads (FLUX.1-dev at 2048x2048 on 2 H200s, perf/RESULTS.md), more than some differences it was asked
to resolve; whether a later load's latents equal the first's bit for bit is recorded too. Layouts: one GPU (our
Triton attention; also torch SDPA, whose difference from ours is the yardstick of bf16 noise), Ulysses 2, Ring 2;
with true CFG (scale 4, a negative prompt): one GPU against CFG parallel 2.

Error: the latents after N2 steps against the one-GPU latents of the same requests (relative L2
and max abs; filled in once both have run, whatever the order), next to the same measure between our one-GPU
attention and SDPA.

FLOP per step: bench_e2e's formulas (perf/RESULTS.md's convention), split over the GPUs. Memory: the most
rank 0's torch allocator held on its GPU over the load and the runs (`max_memory_reserved`: weights, activations,
CUDA graph pools; the workers hold about as much each).
Writes bench_parallel.json / .md to ``--out`` (default $OUT, else out/bench) after every layout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import re
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e  # noqa: E402  (checkpoint building, FLOP formulas, GPU info)
from layouts import parse_layout  # noqa: E402

BASELINE = {False: "1 GPU", True: "1 GPU, true CFG"}
# Qwen-Image: the CFG layouts (its sequence-parallel ones run too, e.g. "Ulysses 2, true CFG").
DEFAULT_LAYOUTS = {"flux": ["1 GPU", "Ulysses 2", "Ring 2", "Ulysses 2, cuDNN", "1 GPU, true CFG", "CFG parallel 2", "1 GPU, SDPA"], "qwen-image": ["1 GPU, true CFG", "CFG parallel 2"]}
DEFAULT_PRESETS = {"flux": "flux.1-dev", "qwen-image": "qwen-image"}


def requests(args, steps: int, cfg: bool, device) -> list:
    from ditserve.flux.request import GenerationParams

    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    embeds = [torch.randn(args.text_tokens, args.text_dim, generator=g).to(device, dtype) for _ in range(2)]
    params = GenerationParams(height=args.size, width=args.size, steps=steps, guidance=3.5,
                              true_cfg=4.0 if cfg else 1.0, seed=0, num_images=1)
    if args.model == "qwen-image":
        from ditserve.qwen_image.denoiser import QwenRequest

        return [QwenRequest(embeds[0], embeds[1] if cfg else None, params)]
    from ditserve.flux.denoiser import FluxRequest

    pooled = [torch.randn(args.pooled_dim, generator=g).to(device, dtype) for _ in range(2)]
    return [FluxRequest(embeds[0], pooled[0], embeds[1] if cfg else None, pooled[1] if cfg else None, params)]


def stage_classes(model: str) -> tuple[type, type]:
    if model == "qwen-image":
        from ditserve.qwen_image.denoiser import QwenDenoiserOptions, QwenImageDenoiser

        return QwenImageDenoiser, QwenDenoiserOptions
    from ditserve.flux.denoiser import FluxDenoiser, FluxDenoiserOptions

    return FluxDenoiser, FluxDenoiserOptions


def time_layout(args, model_dir: Path, options: dict, cfg_runs: list[bool]) -> dict:
    from ditserve.stage import Runtime

    denoiser_class, options_class = stage_classes(args.model)

    t0 = time.perf_counter()
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device(args.device)
    runtime = Runtime(model_path=str(model_dir), device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.init()  # the allocator's statistics exist only once CUDA is initialised ("Invalid device argument")
        torch.cuda.reset_peak_memory_stats(device)
    denoiser = denoiser_class(runtime, options_class(**options))  # starts the workers and warms up
    out = {"load_s": time.perf_counter() - t0, "runs": {}}
    try:
        for cfg in cfg_runs:
            times, latents = {}, None
            for steps in (args.n1, args.n2):
                best = float("inf")
                for _ in range(args.repeats):
                    batch = requests(args, steps, cfg, runtime.device)
                    sync()
                    t = time.perf_counter()
                    (latents,) = denoiser.dispatch(batch)
                    sync()
                    best = min(best, time.perf_counter() - t)
                times[steps] = best * 1e3
            out["runs"][cfg] = {"ms": times, "step_ms": (times[args.n2] - times[args.n1]) / (args.n2 - args.n1),
                                "latents": latents.float().cpu()}
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            batch = requests(args, args.n1, cfg_runs[0], runtime.device)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                denoiser.dispatch(batch)
                sync()
            out["profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        if device.type == "cuda":
            # What rank 0's allocator took from its GPU at the most (weights, activations, CUDA graph pools):
            # whether a layout that ran on 141 GB H200s fits an 80 GB H100.
            out["peak_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    finally:
        denoiser.close()
        del denoiser
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def error(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"rel_l2": float((a - b).norm() / b.norm()), "max_abs": float((a - b).abs().max())}


def report(res: dict) -> str:
    flops = res.get("flops", {}).get("total_flop")
    lines = ["| layout | GPUs | per step (ms) | speed-up | TFLOP/s per GPU | latents vs 1 GPU (rel L2, max abs) | load (s) "
             "| peak GiB, rank 0 |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for name, row in res["layouts"].items():
        if "error" in row:
            lines.append(f"| {name} | | failed: {row['error'][:120]} | | | | | |")
            continue
        cfg = row["cfg"]
        base = res["layouts"].get(BASELINE[cfg], {})
        step = row["step_ms"]
        speed = f"{base['step_ms'] / step:.2f}x" if "step_ms" in base else "-"  # no baseline in this run
        flop = (flops or float("nan")) * (2 if cfg else 1)
        err = row.get("error_vs_1gpu")
        err_text = f"{err['rel_l2']:.2e}, {err['max_abs']:.3f}" if err else "-"
        loads = [load["step_ms"] for load in row["loads"]]
        step_text = f"{step:.1f}"
        if len(loads) > 1:
            same = "" if row["loads_identical"] else "; latents differ"
            step_text += f" ({min(loads):.1f}-{max(loads):.1f}, {len(loads)} loads{same})"
        peak = row.get("peak_gib")
        lines.append(f"| {name} | {row['gpus']} | {step_text} | {speed} | {flop / step / 1e9 / row['gpus']:.0f} | "
                     f"{err_text} | {row['load_s']:.0f} | {'-' if peak is None else f'{peak:.1f}'} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("flux", "qwen-image"), default="flux")
    p.add_argument("--preset", default=None, help="checkpoint preset (default flux.1-dev / qwen-image; tiny, "
                   "tiny-qwen-image on a CPU)")
    p.add_argument("--model-dir", default=None, help="default /tmp/ditserve_ckpt/<preset>[-transformer]-<dtype> "
                   "(built if missing)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--n1", type=int, default=2)
    p.add_argument("--n2", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--loads", type=int, default=1, help="load every layout this many times, in rounds; per-step "
                   "time = median over the loads")
    p.add_argument("--layouts", default=None, help="semicolon-separated layout names (perf/layouts.py: e.g. "
                   "'1 GPU;Ulysses 4, CUDA graphs;USP 2x2;CFG parallel 2'; default: "
                   "the model's DEFAULT_LAYOUTS)")
    p.add_argument("--profile", action="store_true", help="rank 0's top kernels over one N1-step run, per layout")
    p.add_argument("--device", default="cuda", help="cuda (rank 0 on cuda:0), or cpu for a smoke test with --preset tiny")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    for var, val in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(var, val)
    out_dir = Path(args.out or os.environ.get("OUT") or "out/bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    preset = args.preset or DEFAULT_PRESETS[args.model]
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    # Qwen-Image: the transformer alone (its own directory: the e2e bench needs a complete checkpoint).
    weights = "transformer" if args.model == "qwen-image" else None
    model_dir, _ = bench_e2e.ensure_checkpoint(types.SimpleNamespace(
        model_dir=args.model_dir or f"/tmp/ditserve_ckpt/{preset}{'-transformer' if weights else ''}-{dtype}",
        skip_build=False, preset=preset, dtype=dtype, device=args.device, weights=weights))
    config = json.loads((model_dir / "transformer" / "config.json").read_text())
    args.text_dim, args.pooled_dim = config["joint_attention_dim"], config.get("pooled_projection_dim")
    image_tokens = bench_e2e.image_tokens_for(model_dir, args.size, args.size)
    flops = (bench_e2e.dual_stream_step_flops(config, image_tokens, args.text_tokens) if args.model == "qwen-image"
             else bench_e2e.flux_step_flops(config, image_tokens, args.text_tokens))
    res = {"started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "gpu": bench_e2e.gpu_info(),
           "gpus_visible": torch.cuda.device_count(), "args": dict(vars(args)),
           "flops": flops,
           "layouts": {}}
    latents = {}
    wanted = [name.strip() for name in args.layouts.split(";")] if args.layouts else DEFAULT_LAYOUTS[args.model]
    try:
        layouts = {name: parse_layout(name) for name in wanted}
    except ValueError as exc:
        p.error(str(exc))
    # Layouts sharing options run in one load ("1 GPU" and "1 GPU, true CFG").
    groups: dict[str, list[str]] = {}
    for name, layout in layouts.items():
        groups.setdefault(json.dumps(layout.options, sort_keys=True), []).append(name)
    for load in range(args.loads):
        for key, names in groups.items():
            if any("error" in res["layouts"].get(name, {}) for name in names):
                continue  # failed in an earlier round
            options = json.loads(key)
            world = layouts[names[0]].gpus
            bench_e2e.log(f"layouts {names} (load {load + 1} of {args.loads}): options {options}")
            try:
                if args.device == "cuda" and world > torch.cuda.device_count():
                    raise RuntimeError(f"needs {world} GPUs, {torch.cuda.device_count()} visible")
                timed = time_layout(args, model_dir, options, [layouts[n].true_cfg for n in names])
                if "profile" in timed:
                    slug = re.sub(r"\W+", "_", names[0])
                    (out_dir / f"profile_{slug}_{load + 1}.txt").write_text(timed.pop("profile"))
                for name in names:
                    cfg = layouts[name].true_cfg
                    run = timed["runs"][cfg]
                    run_latents = run.pop("latents")
                    entry = res["layouts"].setdefault(name, {"gpus": world, "cfg": cfg, "loads": [],
                                                             "loads_identical": True})
                    entry["loads"].append({"load_s": timed["load_s"], "peak_gib": timed.get("peak_gib"), **run})
                    entry["step_ms"] = statistics.median(x["step_ms"] for x in entry["loads"])
                    entry["load_s"] = statistics.median(x["load_s"] for x in entry["loads"])
                    if timed.get("peak_gib") is not None:
                        entry["peak_gib"] = max(x["peak_gib"] for x in entry["loads"])
                    if name in latents:  # the first load's latents are the layout's
                        entry["loads_identical"] &= torch.equal(run_latents, latents[name])
                    else:
                        latents[name] = run_latents
                    bench_e2e.log(f"{name}: {run['step_ms']:.1f} ms/step")
                # Against the baseline whenever both have run, in whichever order they came.
                for name, entry in res["layouts"].items():
                    base = BASELINE[entry.get("cfg", False)]
                    if name != base and name in latents and base in latents:
                        entry["error_vs_1gpu"] = error(latents[name], latents[base])
            except Exception as exc:  # noqa: BLE001 - record and go on with the next layout
                for name in names:
                    res["layouts"][name] = {"error": f"{type(exc).__name__}: {exc}"}
                bench_e2e.log(f"{names} FAILED: {exc}")
            (out_dir / "bench_parallel.json").write_text(json.dumps(res, indent=1, default=str))
            (out_dir / "bench_parallel.md").write_text(report(res) + "\n")
    print(report(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
