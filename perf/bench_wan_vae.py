#!/usr/bin/env python3
"""Wan 2.1 VAE decode of one 81-frame video at 480p and 720p through our ``WanVaeDecoder`` stage.

Issue 8 asks that decoding long videos does not run out of memory on an 80 GB card at 720p, 81 frames.
``AutoencoderKLWan.decode`` (what the stage and WanPipeline call) already decodes one latent frame at a
time with a causal feature cache, so the activations scale with one frame, not 81; this script measures
that rather than assuming it: peak GPU memory (allocated and reserved) and decode time per size and
dtype (bfloat16 is what ``ditserve serve --dtype bfloat16`` loads; float32 is what the diffusers Wan
examples load the VAE in).

Random weights of the real Wan 2.1 VAE architecture (the ``wan2.1-t2v-14b`` preset's config, seeded),
saved in diffusers format to a temporary folder and loaded through ``ditserve.loading.Checkpoint`` as
the server does. From the repository root on a GPU host::

    python perf/bench_wan_vae.py                      # 480p and 720p, bfloat16 and float32
    python perf/bench_wan_vae.py --sizes 720p --dtypes bfloat16 --repeats 1

CPU smoke run (tiny sizes)::

    python perf/bench_wan_vae.py --device cpu --sizes 64x96 --frames 5 --dtypes float32 --repeats 1

Writes bench_wan_vae.json to ``--out`` (default $OUT, else out/bench) and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

SIZES = {"480p": (480, 832), "720p": (720, 1280)}


def parse_size(text: str) -> tuple[int, int]:
    if text in SIZES:
        return SIZES[text]
    height, _, width = text.partition("x")
    return int(height), int(width)


def write_vae_checkpoint(folder: Path, seed: int) -> None:
    from diffusers import AutoencoderKLWan

    from ditserve.wan.checkpoint import preset

    torch.manual_seed(seed)
    AutoencoderKLWan(**preset("wan2.1-t2v-14b")["vae"]).save_pretrained(folder / "vae")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline",
                                                         "vae": ["diffusers", "AutoencoderKLWan"]}))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(folder: Path, device: torch.device, dtype: torch.dtype, size: tuple[int, int], frames: int,
            repeats: int, seed: int) -> dict:
    from ditserve.stage import Runtime
    from ditserve.wan.vae import WanVaeDecoder

    decoder = WanVaeDecoder(Runtime(model_path=str(folder), device=device, dtype=dtype))
    config = decoder.vae.config
    latent_frames = (frames - 1) // config.scale_factor_temporal + 1
    shape = (1, config.z_dim, latent_frames, size[0] // config.scale_factor_spatial,
             size[1] // config.scale_factor_spatial)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    result = {"size": f"{size[0]}x{size[1]}", "frames": frames, "dtype": str(dtype).removeprefix("torch."),
              "latents": list(shape)}
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            weights = torch.cuda.memory_allocated(device)
        times = []
        for _ in range(repeats + 1):  # the first run warms up cuDNN's algorithm choice
            synchronize(device)
            start = time.perf_counter()
            pixels = decoder.decode(latents)
            synchronize(device)
            times.append(time.perf_counter() - start)
        result.update(decode_ms=1000 * statistics.median(times[1:]), first_ms=1000 * times[0],
                      output=list(pixels.shape), finite=bool(torch.isfinite(pixels).all()))
        if device.type == "cuda":
            result.update(weights_gib=weights / 2**30,
                          peak_allocated_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                          peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30)
    except torch.OutOfMemoryError as exc:
        result["error"] = f"CUDA out of memory: {str(exc).splitlines()[0]}"
    del decoder
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="480p,720p", help="480p, 720p or HxW, comma-separated")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.environ.get("OUT", "out/bench"))
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        write_vae_checkpoint(Path(tmp), args.seed)
        for dtype_name in args.dtypes.split(","):
            for size in args.sizes.split(","):
                results.append(measure(Path(tmp), device, getattr(torch, dtype_name), parse_size(size), args.frames,
                                       args.repeats, args.seed))
                print(json.dumps(results[-1]), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_wan_vae.json").write_text(json.dumps({"gpu": gpu, "total_gib": total, "results": results}, indent=2))
    print(f"\nWan 2.1 VAE decode through WanVaeDecoder, {args.frames} frames, batch 1, on {gpu}"
          + (f" ({total:.1f} GiB)" if total else ""))
    print("| size | dtype | decode (ms) | peak allocated (GiB) | peak reserved (GiB) | weights (GiB) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in results:
        if "error" in r:
            print(f"| {r['size']} | {r['dtype']} | {r['error']} | | | |")
        else:
            print(f"| {r['size']} | {r['dtype']} | {r['decode_ms']:,.1f} | {r.get('peak_allocated_gib', 0):.2f} | "
                  f"{r.get('peak_reserved_gib', 0):.2f} | {r.get('weights_gib', 0):.2f} |")


if __name__ == "__main__":
    main()
