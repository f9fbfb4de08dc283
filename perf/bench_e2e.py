#!/usr/bin/env python3
"""End-to-end benchmark: a diffusers reference pipeline vs ditserve's ensemble on Triton, same run.

On the GPU host (after ``source perf/gpu_env.sh``; perf/README.md has the device commands)::

    python perf/bench_e2e.py --pipeline flux                 # = perf/bench_flux.py: FLUX.1-dev, 1024x1024, 28 steps
    python perf/bench_e2e.py --pipeline qwen-image           # Qwen-Image, 1024x1024, 50 steps, true CFG 4.0
    python perf/bench_e2e.py --pipeline wan-t2v --preset wan2.1-t2v-14b --measure-steps 2,4   # 50-step estimate
    python perf/bench_e2e.py --pipeline wan-t2v --preset wan2.1-t2v-1.3b --link-from /tmp/ditserve_ckpt/wan2.1-t2v-14b-bfloat16

On a CPU machine (every code path with the pipeline's tiny built-in checkpoint)::

    python perf/bench_e2e.py --pipeline qwen-image --tiny

The pipelines are rows of ``PIPELINES``: default and tiny presets, the diffusers pipeline class and
which settings become its call arguments and the ensemble's inputs, the ensemble and its stage
models (for Triton's per-model statistics), and the FLOP formula of a denoising step.

Phases (each prints a timestamped line; results are written after each phase, so a run cut off by a
time limit still leaves what it measured):

a. checkpoint: ``python -m ditserve.checkpoints build --preset P --out DIR --dtype D --device DEV``
   (``--link-from``) into ``--model-dir`` (default ``/tmp/ditserve_ckpt/<preset>-<dtype>``); skipped
   when ``DIR/model_index.json`` exists.
b. diffusers: a child process (so its GPU memory is freed when it exits) loads the reference pipeline
   from DIR in D (components ditserve's config.pbtxt keeps in float32, the Wan VAE, loaded in float32
   as WanPipeline's examples do), runs ``--warmup`` generations of ``--warmup-steps`` steps, then
   ``--runs`` generations for each step count (seeded CPU generator, as ditserve draws its noise),
   ``torch.cuda.synchronize()`` around each, and times the stages with CUDA events (encode_prompt,
   every transformer forward, vae.decode). Videos are then quantised to uint8 and MP4-encoded with
   ditserve's own encoder settings (``ditserve.wan.postprocess.encode_mp4``), timed as "export".
c. ours: ``python -m ditserve.cli serve --model-path DIR --models <ensemble and its stages>`` on free
   ports (stages whose config.pbtxt names a checkpoint get ``--set <stage>.model_path=DIR``); the same
   warm-up and requests through tritonclient gRPC (or plain HTTP with binary outputs if
   tritonclient.grpc cannot be imported: ``--protocol auto``); end-to-end latency at the client,
   per-stage times as deltas of Triton's inference statistics over each step count's requests; then
   the server is stopped (SIGTERM, then SIGKILL of its process group).
d. report: ``<stem>.json`` and ``<stem>.md`` in ``--out`` (default ``$OUT``, else ``./out/bench``;
   stem ``bench_flux`` for FLUX, else ``bench_<preset>``) and a short table printed last.

Step-difference mode (``--measure-steps N1,N2``): a run of ``--steps`` (50) steps does not fit the
time limit (Wan 14B), so both sides run N1 and N2 steps; per step = (t(N2) - t(N1)) / (N2 - N1) from
the end-to-end latencies (and from the denoising stage alone), fixed costs = t(N1) - N1 x step, and the
``--steps`` end-to-end latency is reported as an ESTIMATE: fixed + steps x step.

FLOP estimate of one denoising step (perf/RESULTS.md's convention): every linear layer costs
2 x weights x the tokens it is applied to (each MMDiT stream only over its own tokens), attention
4 x L^2 x (heads x head_dim) per block; with CFG every forward of the step counts (two per step).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping

REPO = Path(__file__).resolve().parent.parent
H100_BF16_PEAK_TFLOPS = 790.0  # dense bf16 matmul, as measured on the H100 host
STATE_DIR = Path(os.environ.get("DITSERVE_BENCH_STATE_DIR", "/tmp/ditserve_bench"))

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[bench {time.monotonic() - _T0:7.1f}s] {msg}", flush=True)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ============================================================================ FLOP model


def flux_step_flops(transformer_cfg: dict, image_tokens: int, text_tokens: int) -> dict:
    """FLOPs of one FluxTransformer2DModel forward (batch 1), split into linear and attention."""
    heads = int(transformer_cfg.get("num_attention_heads", 24))
    head_dim = int(transformer_cfg.get("attention_head_dim", 128))
    d = heads * head_dim
    n_double = int(transformer_cfg.get("num_layers", 19))
    n_single = int(transformer_cfg.get("num_single_layers", 38))
    in_ch = int(transformer_cfg.get("in_channels", 64))
    out_ch = int(transformer_cfg.get("out_channels") or in_ch)
    patch = int(transformer_cfg.get("patch_size", 1))
    joint = int(transformer_cfg.get("joint_attention_dim", 4096))
    li, lt = image_tokens, text_tokens
    L = li + lt
    mlp = 4  # FLUX's mlp_ratio (fixed in diffusers' blocks)
    # Double-stream block, per stream: q,k,v,out (4 d^2) + MLP d->4d->d (8 d^2); image weights over
    # image tokens, the text stream's own weights over text tokens.
    per_stream = (4 + 2 * mlp) * d * d
    double_linear = 2 * per_stream * (li + lt)
    # Single-stream block over all L tokens: q,k,v (3 d^2) + proj_mlp (4 d^2) + proj_out (5 d^2).
    single_linear = 2 * (3 * d * d + mlp * d * d + (1 + mlp) * d * d) * L
    attention = 4 * L * L * d  # QK^T and PV, per block
    embed = 2 * (in_ch * d * li + joint * d * lt + d * patch * patch * out_ch * li)
    linear = n_double * double_linear + n_single * single_linear + embed
    attn = (n_double + n_single) * attention
    return {
        "hidden": d,
        "double_blocks": n_double,
        "single_blocks": n_single,
        "image_tokens": li,
        "text_tokens": lt,
        "linear_flop": float(linear),
        "attention_flop": float(attn),
        "total_flop": float(linear + attn),
    }


def dual_stream_step_flops(config: dict, image_tokens: int, text_tokens: int) -> dict:
    """Qwen-Image: every block is a dual-stream (MMDiT) block, each stream's weights over its own tokens:
    q,k,v,out (4 d^2) + MLP d->4d->d (8 d^2) per stream; joint attention 4 L^2 d per block."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    length = image_tokens + text_tokens
    linear = config["num_layers"] * 2 * 12 * d * d * length
    attention = config["num_layers"] * 4 * length * length * d
    return {"hidden": d, "image_tokens": image_tokens, "text_tokens": text_tokens, "linear_flop": float(linear),
            "attention_flop": float(attention), "total_flop": float(linear + attention)}


def wan_forward_flops(config: dict, video_tokens: int, text_tokens: int) -> dict:
    """WanTransformer3DModel, batch 1: per block self-attention q,k,v,o (4 d^2) and cross-attention q,o
    (2 d^2) over the video tokens, cross-attention k,v (2 d^2) over the text tokens, FFN d->ffn->d;
    self-attention 4 Lv^2 d, cross-attention 4 Lv Lt d. Patch/text/time embedders left out (< 0.1%)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    layers, ffn, lv, lt = config["num_layers"], config["ffn_dim"], video_tokens, text_tokens
    linear = layers * 2 * (lv * (6 * d * d + 2 * d * ffn) + lt * 2 * d * d)
    attention = layers * (4 * lv * lv * d + 4 * lv * lt * d)
    return {"hidden": d, "image_tokens": lv, "text_tokens": lt, "linear_flop": float(linear),
            "attention_flop": float(attention), "total_flop": float(linear + attention)}


def image_tokens_for(model_dir: Path, height: int, width: int) -> int:
    """FLUX: 2x2 latent patches of the VAE's latent grid (vae_scale 2 ** (blocks - 1))."""
    vae_scale = 8
    with contextlib.suppress(Exception):
        vae_cfg = read_json(model_dir / "vae" / "config.json")
        vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)
    return (height // (vae_scale * 2)) * (width // (vae_scale * 2))


def qwen_text_tokens(model_dir: Path, text: str) -> int:
    """Hidden states QwenImagePipeline keeps for ``text``: the templated prompt's tokens minus the dropped
    template prefix, at most max_sequence_length (512)."""
    from transformers import AutoTokenizer

    from ditserve.qwen_image.checkpoint import PROMPT_TEMPLATE, PROMPT_TEMPLATE_DROP

    tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
    return min(len(tokenizer(PROMPT_TEMPLATE.format(text)).input_ids) - PROMPT_TEMPLATE_DROP, 512)


def _combine(forwards: list[dict]) -> dict:
    """One denoising step = these transformer forwards (two with CFG)."""
    out = dict(forwards[0])
    for key in ("linear_flop", "attention_flop", "total_flop"):
        out[key] = sum(f[key] for f in forwards)
    out["forwards"] = len(forwards)
    out["text_tokens"] = [f["text_tokens"] for f in forwards] if len(forwards) > 1 else forwards[0]["text_tokens"]
    return out


def flux_flops(model_dir: Path, s: dict) -> dict:
    config = read_json(model_dir / "transformer" / "config.json")
    return _combine([flux_step_flops(config, image_tokens_for(model_dir, s["height"], s["width"]), s["text_tokens"])])


def qwen_image_flops(model_dir: Path, s: dict) -> dict:
    config = read_json(model_dir / "transformer" / "config.json")
    scale = 2 ** len(read_json(model_dir / "vae" / "config.json")["temperal_downsample"])
    image_tokens = (s["height"] // (2 * scale)) * (s["width"] // (2 * scale))
    texts = [s["prompt"]] + ([s["negative_prompt"]] if s["negative_prompt"] and s["true_cfg"] > 1 else [])
    return _combine([dual_stream_step_flops(config, image_tokens, qwen_text_tokens(model_dir, t)) for t in texts])


def wan_flops(model_dir: Path, s: dict) -> dict:
    config = read_json(model_dir / "transformer" / "config.json")
    vae = read_json(model_dir / "vae" / "config.json")
    _, patch_h, patch_w = config["patch_size"]
    frames = (s["frames"] - 1) // vae["scale_factor_temporal"] + 1
    spatial = vae["scale_factor_spatial"]
    tokens = frames * (s["height"] // spatial // patch_h) * (s["width"] // spatial // patch_w)
    forward = wan_forward_flops(config, tokens, 512)  # WanPipeline pads every prompt to max_sequence_length 512
    return _combine([forward] * (2 if s["guidance"] > 1 else 1))


# ============================================================================ the pipelines

# setting -> (diffusers __call__ argument, ensemble input); None: not passed on that side.
FIELDS: Mapping[str, tuple[str | None, str | None]] = {
    "prompt": ("prompt", "PROMPT"),
    "negative_prompt": ("negative_prompt", "NEGATIVE_PROMPT"),
    "true_cfg": ("true_cfg_scale", "TRUE_CFG_SCALE"),
    "height": ("height", "HEIGHT"),
    "width": ("width", "WIDTH"),
    "frames": ("num_frames", "NUM_FRAMES"),
    "steps": ("num_inference_steps", "NUM_INFERENCE_STEPS"),
    "guidance": ("guidance_scale", "GUIDANCE_SCALE"),
    "seed": (None, "SEED"),  # diffusers: a seeded CPU generator
    "fps": (None, "FPS"),  # diffusers: the export's frame rate
}
ROLES = ("request", "text_encoder", "denoiser", "vae_decoder", "postprocess")


@dataclasses.dataclass(frozen=True)
class Pipeline:
    title: str
    preset: str  # full-size default
    tiny_preset: str  # --tiny
    reference: str  # diffusers pipeline class
    fp32_components: tuple[str, ...]  # loaded in float32 by the reference, as ditserve's config.pbtxt does
    ensemble: str
    stages: tuple[str, ...]  # Triton models, in ROLES order
    settings: tuple[str, ...]  # FIELDS sent to both sides
    request_constants: Mapping[str, Any]  # more ensemble inputs
    outputs: tuple[str, str]  # (uint8 pixels, encoded bytes) ensemble outputs
    video: bool
    flops: Callable[[Path, dict], dict]
    defaults: Mapping[str, Any]
    tiny: Mapping[str, Any]  # --tiny overrides

    def __post_init__(self):
        assert len(self.stages) == len(ROLES)

    def stage(self, role: str) -> str:
        return self.stages[ROLES.index(role)]


_PROMPT = "a photo of an astronaut riding a horse on the moon"
PIPELINES: Mapping[str, Pipeline] = {
    "flux": Pipeline(
        "FLUX", "flux.1-dev", "tiny", "FluxPipeline", (), "flux_t2i",
        ("flux_request", "flux_text_encoder", "flux_denoiser", "flux_vae_decoder", "flux_postprocess"),
        ("prompt", "height", "width", "steps", "guidance", "seed"), {"NUM_IMAGES": 1}, ("IMAGE", "PNG"), False,
        flux_flops,
        defaults=dict(prompt=_PROMPT, height=1024, width=1024, steps=28, guidance=3.5, runs=3, warmup_steps=None),
        tiny=dict(height=64, width=64, steps=2, runs=2),
    ),
    "qwen-image": Pipeline(
        "Qwen-Image", "qwen-image", "tiny-qwen-image", "QwenImagePipeline", (), "qwen_image_t2i",
        ("qwen_image_request", "qwen_image_text_encoder", "qwen_image_denoiser", "qwen_image_vae_decoder",
         "flux_postprocess"),
        ("prompt", "negative_prompt", "true_cfg", "height", "width", "steps", "seed"), {"NUM_IMAGES": 1},
        ("IMAGE", "PNG"), False,
        qwen_image_flops,
        defaults=dict(prompt=_PROMPT, negative_prompt="blurry, low quality", true_cfg=4.0, height=1024, width=1024,
                      steps=50, runs=3, warmup_steps=2),
        tiny=dict(height=64, width=64, steps=2, runs=1),
    ),
    "wan-t2v": Pipeline(
        "Wan T2V", "wan2.1-t2v-14b", "tiny-wan-t2v", "WanPipeline", ("vae",), "wan_t2v",
        ("wan_request", "wan_text_encoder", "wan_denoiser", "wan_vae_decoder", "wan_postprocess"),
        ("prompt", "negative_prompt", "height", "width", "frames", "steps", "guidance", "seed", "fps"), {},
        ("FRAMES", "VIDEO"), True,
        wan_flops,
        defaults=dict(prompt="a cat and a dog playing in a garden on a sunny day, cinematic",
                      negative_prompt="blurry, low quality, static, overexposed", height=480, width=832, frames=81,
                      steps=50, guidance=5.0, fps=16, runs=1, warmup_steps=2),
        tiny=dict(height=64, width=64, frames=5, steps=2, runs=1),
    ),
}


def report_stem(args) -> str:
    return "bench_flux" if args.pipeline == "flux" else f"bench_{args.preset}"


# ============================================================================ helpers


def summarize(xs: list[float]) -> dict:
    if not xs:
        return {}
    return {
        "median": statistics.median(xs),
        "mean": statistics.fmean(xs),
        "min": min(xs),
        "max": max(xs),
        "n": len(xs),
        "all": xs,
    }


def gpu_info() -> dict:
    info: dict = {}
    smi = shutil.which("nvidia-smi")
    if smi:
        with contextlib.suppress(Exception):
            out = subprocess.run(
                [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            ).stdout.strip()
            info["nvidia_smi"] = out
    return info


def gpu_memory_used_mib() -> float | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    with contextlib.suppress(Exception):
        out = subprocess.run([smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout.split()
        return float(out[0])
    return None


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_json(url: str, body: dict | None = None, timeout: float = 30.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


# ============================================================================ (a) checkpoint


def ensure_checkpoint(args) -> tuple[Path, float | None]:
    """The checkpoint in ``args.model_dir``, built with the CLI if missing. ``args``: model_dir, preset,
    dtype, device, skip_build, and optionally link_from and weights (components with weights; the
    others config only: a denoiser-only bench)."""
    from ditserve.checkpoints import read_build_stamp

    model_dir = Path(args.model_dir)
    weights = getattr(args, "weights", None)
    if (model_dir / "model_index.json").is_file():
        stamp = read_build_stamp(model_dir) or {"components": {}}
        missing = [name for name, entry in stamp["components"].items()
                   if not entry["weights"] and (weights is None or name in weights.split(","))]
        if missing:
            raise SystemExit(f"{model_dir} has no weights for {', '.join(missing)} (built with --weights): "
                             f"give another --model-dir")
        log(f"checkpoint present: {model_dir}")
        return model_dir, None
    if args.skip_build:
        raise SystemExit(f"no checkpoint at {model_dir} and --skip-build given")
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    log(f"{shutil.disk_usage(model_dir.parent).free / 2**30:.0f} GiB free under {model_dir.parent}")
    cmd = [sys.executable, "-m", "ditserve.checkpoints", "build", "--preset", args.preset,
           "--out", str(model_dir), "--dtype", args.dtype, "--device", args.device]
    if getattr(args, "link_from", None):
        cmd += ["--link-from", str(args.link_from)]
    if weights:
        cmd += ["--weights", weights]
    log("building checkpoint: " + " ".join(cmd))
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    dt = time.perf_counter() - t
    size = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())
    log(f"checkpoint built in {dt:.1f}s ({size / 2**30:.1f} GiB, hard links counted)")
    return model_dir, dt


# ============================================================================ (b) diffusers


def diffusers_worker(job: dict) -> None:
    """Runs in a child process (the job: settings, step counts, paths); writes its result JSON."""
    import diffusers
    import numpy as np
    import torch

    p = PIPELINES[job["pipeline"]]
    s = job["settings"]
    device = torch.device(job["device"])
    dtype = getattr(torch, job["dtype"])
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    t = time.perf_counter()
    model_dir = Path(job["model_dir"])
    index = read_json(model_dir / "model_index.json")
    fp32 = {name: getattr(diffusers, index[name][1]).from_pretrained(model_dir / name, dtype=torch.float32)
            for name in p.fp32_components}
    pipe = getattr(diffusers, p.reference).from_pretrained(model_dir, dtype=dtype, **fp32)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    sync()
    load_s = time.perf_counter() - t
    log(f"diffusers: {p.reference} loaded in {load_s:.1f}s")

    # Stage timers: CUDA events on the current stream (no extra syncs), wall clock on CPU.
    class Span:
        def __init__(self):
            self.pairs = []

        def start(self):
            if cuda:
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                self.pairs.append([e, None])
            else:
                self.pairs.append([time.perf_counter(), None])

        def stop(self):
            if cuda:
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                self.pairs[-1][1] = e
            else:
                self.pairs[-1][1] = time.perf_counter()

        def total_ms(self):
            if cuda:
                return sum(a.elapsed_time(b) for a, b in self.pairs if b is not None)
            return sum((b - a) * 1e3 for a, b in self.pairs if b is not None)

        def count(self):
            return len(self.pairs)

        def reset(self):
            self.pairs = []

    spans = {"text_encoder": Span(), "transformer": Span(), "vae_decode": Span()}

    def wrap(fn, span):
        def inner(*a, **k):
            span.start()
            try:
                return fn(*a, **k)
            finally:
                span.stop()
        return inner

    pipe.encode_prompt = wrap(pipe.encode_prompt, spans["text_encoder"])
    pipe.vae.decode = wrap(pipe.vae.decode, spans["vae_decode"])
    for name in ("transformer", "transformer_2"):  # Wan 2.2's second expert, where there is one
        module = getattr(pipe, name, None)
        if module is not None:
            module.register_forward_pre_hook(lambda *_: spans["transformer"].start())
            module.register_forward_hook(lambda *_: spans["transformer"].stop())

    if p.video:
        from ditserve.wan.postprocess import VideoOptions, encode_mp4

    def run_once(steps: int):
        kwargs = {FIELDS[k][0]: v for k, v in s.items() if k in p.settings and FIELDS[k][0] and v is not None}
        kwargs["num_inference_steps"] = steps
        gen = torch.Generator("cpu").manual_seed(s["seed"])  # as ditserve: seeds draw on the CPU
        sync()
        t0 = time.perf_counter()
        out = pipe(**kwargs, generator=gen, output_type="np" if p.video else "pil")
        sync()
        if not p.video:  # the PIL image is the pipeline's output; the array is only for the comparison
            latency_ms = (time.perf_counter() - t0) * 1e3
            return latency_ms, None, np.asarray(out.images[0].convert("RGB"), dtype=np.uint8)
        # As ditserve's postprocess: uint8 frames (diffusers' numpy_to_pil rounding), one MP4.
        t1 = time.perf_counter()
        pixels = (out.frames[0] * 255).round().astype(np.uint8)
        encode_mp4(pixels, s["fps"], VideoOptions())
        t2 = time.perf_counter()
        return (t2 - t0) * 1e3, (t2 - t1) * 1e3, pixels

    for i in range(job["warmup"]):
        dt, _, _ = run_once(job["warmup_steps"])
        log(f"diffusers: warm-up {i + 1}/{job['warmup']} ({job['warmup_steps']} steps): {dt:.1f} ms")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    runs, first, transformer_calls = {}, None, {}
    for steps in job["step_counts"]:
        lat, stage_ms = [], {k: [] for k in [*spans, *(["export"] if p.video else [])]}
        for i in range(job["runs"]):
            for span in spans.values():
                span.reset()
            dt, export_ms, pixels = run_once(steps)
            lat.append(dt)
            for k, span in spans.items():
                stage_ms[k].append(span.total_ms())
            if p.video:
                stage_ms["export"].append(export_ms)
            transformer_calls[steps] = spans["transformer"].count()
            if first is None:
                first = pixels
            log(f"diffusers: {steps} steps, run {i + 1}/{job['runs']}: {dt:.1f} ms "
                f"(transformer {stage_ms['transformer'][-1]:.1f} ms over {transformer_calls[steps]} calls)")
        runs[str(steps)] = {"latency_ms": summarize(lat), "stage_ms": {k: summarize(v) for k, v in stage_ms.items()}}
    if first is not None:
        np.save(job["image_out"], first)
    result = {
        "load_s": load_s,
        "runs": runs,
        "transformer_calls_per_run": transformer_calls,
        "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30) if cuda else None,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "sdpa_note": "diffusers default attention processor (torch SDPA)",
    }
    Path(job["worker_out"]).write_text(json.dumps(result, indent=1))


def run_diffusers(args, model_dir: Path, workdir: Path) -> dict:
    out = workdir / "diffusers_result.json"
    out.unlink(missing_ok=True)
    job = {"pipeline": args.pipeline, "settings": args.settings, "step_counts": args.step_counts,
           "warmup": args.warmup, "warmup_steps": args.warmup_steps, "runs": args.runs,
           "device": args.device, "dtype": args.dtype, "model_dir": str(model_dir),
           "worker_out": str(out), "image_out": str(workdir / "diffusers_image.npy")}
    job_file = workdir / "diffusers_job.json"
    job_file.write_text(json.dumps(job))
    log("diffusers: starting child process")
    subprocess.run([sys.executable, os.path.abspath(__file__), "--_diffusers-worker", str(job_file)],
                   check=True, timeout=args.diffusers_timeout)
    return read_json(out)


# ============================================================================ (c) ours


class HttpInfer:
    """Minimal KServe-v2 HTTP client with binary outputs (needs only the standard library)."""

    name = "http"

    def __init__(self, base: str, timeout: float):
        self.base, self.timeout = base, timeout

    def infer(self, model: str, inputs: list[tuple[str, str, object]], outputs: list[str]) -> dict:
        body = {
            "inputs": [
                {"name": n, "shape": [1, 1], "datatype": dt,
                 "data": [v.decode() if isinstance(v, bytes) else v]}
                for n, dt, v in inputs
            ],
            "outputs": [{"name": o, "parameters": {"binary_data": True}} for o in outputs],
        }
        req = urllib.request.Request(f"{self.base}/v2/models/{model}/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            raw = r.read()
            hlen = r.headers.get("Inference-Header-Content-Length")
        hlen = int(hlen) if hlen is not None else len(raw)
        header = json.loads(raw[:hlen])
        pos, result = hlen, {}
        import numpy as np

        for o in header.get("outputs", []):
            size = o.get("parameters", {}).get("binary_data_size")
            if size is None:
                result[o["name"]] = o.get("data")
                continue
            blob = raw[pos:pos + size]
            pos += size
            if o["datatype"] == "BYTES":
                items, p = [], 0
                while p < len(blob):
                    (n,) = struct.unpack_from("<I", blob, p)
                    items.append(blob[p + 4:p + 4 + n])
                    p += 4 + n
                result[o["name"]] = np.array(items, dtype=object).reshape(o["shape"])
            else:
                np_dt = {"UINT8": np.uint8, "FP32": np.float32, "FP16": np.float16, "INT32": np.int32,
                         "INT64": np.int64}[o["datatype"]]
                result[o["name"]] = np.frombuffer(blob, dtype=np_dt).reshape(o["shape"])
        return result


class GrpcInfer:
    name = "grpc"

    def __init__(self, url: str, timeout: float):
        import tritonclient.grpc as grpcclient

        self.g = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.timeout = timeout

    def infer(self, model: str, inputs: list[tuple[str, str, object]], outputs: list[str]) -> dict:
        import numpy as np

        items = []
        np_dt = {"BYTES": object, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "FP16": np.float16}
        for n, dt, v in inputs:
            arr = np.array([[v]], dtype=np_dt[dt])
            it = self.g.InferInput(n, list(arr.shape), dt)
            it.set_data_from_numpy(arr)
            items.append(it)
        res = self.client.infer(model, items, outputs=[self.g.InferRequestedOutput(o) for o in outputs],
                                client_timeout=self.timeout)
        return {o: res.as_numpy(o) for o in outputs}


def stats_snapshot(http_base: str, wait_for: Mapping[str, int] | None = None, timeout: float = 10.0) -> dict:
    """Triton's per-model statistics. Triton records a request in a model's statistics after the response
    is sent, so right after the client has its answer the last stages may not count it yet: with
    ``wait_for`` (model -> success count), wait up to ``timeout`` s until every model counts that many."""
    deadline = time.monotonic() + timeout
    while True:
        snap = _stats(http_base)
        done = all(snap.get(m, {}).get("success_count", 0) >= n for m, n in (wait_for or {}).items())
        if done or time.monotonic() > deadline:
            return snap
        time.sleep(0.05)


def _stats(http_base: str) -> dict:
    data = http_json(f"{http_base}/v2/models/stats", timeout=30)
    snap = {}
    for m in data.get("model_stats", []):
        st = m.get("inference_stats", {})
        snap[m["name"]] = {
            "inference_count": int(m.get("inference_count", 0)),
            "execution_count": int(m.get("execution_count", 0)),
            **{f"{k}_ns": int(st.get(k, {}).get("ns", 0)) for k in
               ("success", "queue", "compute_input", "compute_infer", "compute_output")},
            **{f"{k}_count": int(st.get(k, {}).get("count", 0)) for k in ("success", "compute_infer")},
        }
    return snap


def stats_delta(before: dict, after: dict, n_requests: int) -> dict:
    out = {}
    for name, a in after.items():
        b = before.get(name, {})
        d = {k: a[k] - b.get(k, 0) for k in a}
        out[name] = {
            "requests": d["success_count"],
            "executions": d["execution_count"],
            "compute_infer_ms": d["compute_infer_ns"] / 1e6 / max(n_requests, 1),
            "compute_input_ms": d["compute_input_ns"] / 1e6 / max(n_requests, 1),
            "compute_output_ms": d["compute_output_ns"] / 1e6 / max(n_requests, 1),
            "queue_ms": d["queue_ns"] / 1e6 / max(n_requests, 1),
            "success_ms": d["success_ns"] / 1e6 / max(n_requests, 1),
        }
    return out


def checkpoint_settings(p: Pipeline, model_dir: Path) -> list[str]:
    """``--set`` of every stage whose config.pbtxt names its own checkpoint (Qwen-Image, Wan: model_path
    "tiny-..."); FLUX's stages leave it empty and take ``--model-path``."""
    out = []
    for stage in p.stages:
        config = (REPO / "model_repository" / stage / "config.pbtxt").read_text()
        if re.search(r'key:\s*"model_path"\s*value:\s*\{\s*string_value:\s*"[^"]+"', config):
            out.append(f"{stage}.model_path={model_dir}")
    return out


def run_ours(args, model_dir: Path, workdir: Path) -> dict:
    p = PIPELINES[args.pipeline]
    http_port, grpc_port, metrics_port = free_ports(3)
    http_base = f"http://127.0.0.1:{http_port}"
    server_log = workdir / "tritonserver.log"
    server_log.unlink(missing_ok=True)
    settings = [*checkpoint_settings(p, model_dir), *args.set]
    cmd = [sys.executable, "-m", "ditserve.cli", "serve", "--model-path", str(model_dir),
           "--models", ",".join([p.ensemble, *dict.fromkeys(p.stages)]),
           "--device", args.device, "--dtype", args.dtype,
           "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
           "--host", "127.0.0.1", "--log-file", str(server_log),
           "--startup-timeout", str(args.server_timeout), *(f"--set={s}" for s in settings)]
    cli_log = open(workdir / "ditserve_serve.out", "wb")
    log("ours: " + " ".join(cmd))
    with contextlib.suppress(OSError):  # stage outputs on the host (a video's frames: ~100 MB) pass through it
        log(f"ours: {shutil.disk_usage('/dev/shm').free / 2**30:.1f} GiB free in /dev/shm")
    mem_before = gpu_memory_used_mib()
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=cli_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    result: dict = {"server_log": str(server_log)}
    try:
        deadline = time.monotonic() + args.server_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ditserve serve exited with {proc.returncode} before ready")
            if http_ok(f"{http_base}/v2/health/ready") and http_ok(f"{http_base}/v2/models/{p.ensemble}/ready"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {args.server_timeout}s")
            time.sleep(0.5)
        result["startup_s"] = time.perf_counter() - t_start
        mem_ready = gpu_memory_used_mib()
        log(f"ours: server ready in {result['startup_s']:.1f}s")
        result.update(measure_ours(args, http_base, f"127.0.0.1:{grpc_port}", workdir))
        result["gpu_memory_used_mib"] = {"before_start": mem_before, "ready": mem_ready,
                                         "after_runs": gpu_memory_used_mib()}
    finally:
        t = time.perf_counter()
        stop_server(proc)
        cli_log.close()
        result["stop_s"] = time.perf_counter() - t
        log(f"ours: server stopped in {result['stop_s']:.1f}s (rc {proc.returncode})")
    return result


def measure_ours(args, http_base: str, grpc_url: str, workdir: Path) -> dict:
    """The warm-up and timed requests against a ready server: per step count the client's latencies and
    each model's statistics over its requests; the first output saved to ``workdir/ours_image.npy``."""
    p = PIPELINES[args.pipeline]
    meta = http_json(f"{http_base}/v2/models/{p.ensemble}")
    in_types = {i["name"]: i["datatype"] for i in meta.get("inputs", [])}
    out_names = [o["name"] for o in meta.get("outputs", [])]

    def inputs(steps: int) -> list[tuple[str, str, object]]:
        wanted = {FIELDS[k][1]: v for k, v in args.settings.items() if k in p.settings and FIELDS[k][1] and v is not None}
        wanted.update(p.request_constants, NUM_INFERENCE_STEPS=steps)
        for text in ("PROMPT", "NEGATIVE_PROMPT"):
            if text in wanted:
                wanted[text] = wanted[text].encode()
        missing = [n for n in wanted if n not in in_types]
        if missing:
            raise RuntimeError(f"ensemble {p.ensemble} has no inputs {missing}")
        return [(n, in_types[n], v) for n, v in wanted.items()]

    result: dict = {"runs": {}}
    client = None
    if args.protocol in ("auto", "grpc"):
        try:
            client = GrpcInfer(grpc_url, args.request_timeout)
        except Exception as e:  # host grpcio/protobuf older than tritonclient's generated code
            if args.protocol == "grpc":
                raise
            log(f"ours: tritonclient.grpc unusable ({type(e).__name__}: {e}); using HTTP")
    if client is None:
        client = HttpInfer(http_base, args.request_timeout)
    result["protocol"] = client.name

    def one(steps: int):
        request = inputs(steps)
        t = time.perf_counter()
        res = client.infer(p.ensemble, request, out_names)
        return (time.perf_counter() - t) * 1e3, res

    models = (p.ensemble, *dict.fromkeys(p.stages))
    start = stats_snapshot(http_base)

    def counted(sent: int) -> dict[str, int]:  # each model sees every request once
        return {m: start.get(m, {}).get("success_count", 0) + sent for m in models}

    for i in range(args.warmup):
        dt, _ = one(args.warmup_steps)
        log(f"ours: warm-up {i + 1}/{args.warmup} ({args.warmup_steps} steps): {dt:.1f} ms")
    first, sent = None, args.warmup
    for steps in args.step_counts:
        before = stats_snapshot(http_base, counted(sent))
        lat = []
        for i in range(args.runs):
            dt, res = one(steps)
            lat.append(dt)
            if first is None:
                first = res
            log(f"ours: {steps} steps, run {i + 1}/{args.runs}: {dt:.1f} ms")
        sent += args.runs
        after = stats_snapshot(http_base, counted(sent))
        result["runs"][str(steps)] = {"latency_ms": summarize(lat), "stats": stats_delta(before, after, args.runs)}
    pixels_name, encoded_name = p.outputs
    if first is not None and first.get(pixels_name) is not None:
        import numpy as np

        pixels = np.asarray(first[pixels_name])
        item_dims = 4 if p.video else 3  # (frames, H, W, 3) or (H, W, 3)
        np.save(workdir / "ours_image.npy", pixels.reshape(-1, *pixels.shape[-item_dims:])[0])
        result["output_shape"] = list(pixels.shape)
    if first is not None and first.get(encoded_name) is not None:
        result["encoded_bytes"] = len(first[encoded_name].reshape(-1)[0])
    return result


def stop_server(proc: subprocess.Popen, timeout: float = 90.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)  # ditserve serve stops tritonserver and its stubs
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    # Anything left in the process group we created (tritonserver runs in its own session,
    # which `ditserve serve` cleans up; this is only the fallback for our direct child).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(10)


# ============================================================================ (d) report


def image_agreement(workdir: Path) -> dict | None:
    """The first output of both sides (an image, or all frames of a video), uint8."""
    a, b = workdir / "diffusers_image.npy", workdir / "ours_image.npy"
    if not (a.is_file() and b.is_file()):
        return None
    import numpy as np

    x, y = np.load(a).astype(np.float64), np.load(b).astype(np.float64)
    if x.shape != y.shape:
        return {"shape_diffusers": list(x.shape), "shape_ours": list(y.shape)}
    mse = float(((x - y) ** 2).mean())
    return {"max_abs_diff": float(np.abs(x - y).max()), "mean_abs_diff": float(np.abs(x - y).mean()),
            "psnr_db": (99.0 if mse == 0 else float(10 * np.log10(255.0**2 / mse)))}


def fmt(v, unit="", nd=1):
    if v is None:
        return "-"
    return f"{v:,.{nd}f}{unit}"


def stage_times(p: Pipeline, side: str, run: dict | None) -> dict[str, float | None]:
    """role -> ms per request for one step count: diffusers' CUDA-event spans, or Triton's per-request
    ``success`` time of each model (queue + input + compute + output: the output part holds the wait
    for a stage's GPU work, which compute_infer alone misses because stages hand on GPU tensors
    without synchronising)."""
    if not run:
        return dict.fromkeys(ROLES)
    if side == "diffusers":
        spans = run.get("stage_ms", {})
        named = {"text_encoder": "text_encoder", "denoiser": "transformer", "vae_decoder": "vae_decode",
                 "postprocess": "export"}
        return {role: spans.get(named.get(role, ""), {}).get("median") for role in ROLES}
    stats = run.get("stats", {})
    return {role: stats.get(p.stage(role), {}).get("success_ms") for role in ROLES}


def denoiser_gpus(sets: list[str]) -> int:
    """GPUs our denoiser drives under `--set` MODEL.PARAM=VALUE options: sp_degree, times 2 with cfg_parallel."""
    params = dict(item.split(".", 1)[1].split("=", 1) for item in sets if "." in item.split("=", 1)[0])
    return int(params.get("sp_degree", 1)) * (2 if params.get("cfg_parallel", "false").lower() == "true" else 1)


def build_report(res: dict) -> tuple[str, str]:
    """(markdown, short text table)."""
    cfg, flops = res["config"], res.get("flops", {})
    p = PIPELINES[cfg["pipeline"]]
    s = cfg["settings"]
    counts = cfg["step_counts"]
    estimate = len(counts) > 1
    step_flop = flops.get("total_flop")
    sides = {"diffusers": res.get("diffusers"), "ours": res.get("ours")}

    def run(side, n):
        return ((sides[side] or {}).get("runs") or {}).get(str(n))

    def lat(side, n):
        r = run(side, n)
        return r["latency_ms"].get("median") if r and r.get("latency_ms") else None

    def stage(side, role, n):
        return stage_times(p, side, run(side, n))[role]

    def per_step(side, pick):
        """Per-step time: the difference between step counts, or the denoiser's time / steps."""
        if estimate:
            n1, n2 = counts[0], counts[-1]
            a, b = pick(side, n1), pick(side, n2)
            return (b - a) / (n2 - n1) if a is not None and b is not None else None
        v = pick(side, counts[0])
        return v / counts[0] if v is not None else None

    def both(fn):
        return fn("diffusers"), fn("ours")

    rows = []  # (what, diffusers, ours)
    post = "uint8 + MP4 encoding (ms)" if p.video else "uint8 + copy to host + PNG (ms)"
    if estimate:
        n1, target = counts[0], cfg["steps"]
        rows += [(f"end-to-end latency, {n} steps, median (ms)", *both(lambda side, n=n: lat(side, n))) for n in counts]
        step = both(lambda side: per_step(side, lat))
        rows.append(("per step, from end-to-end latencies (ms)", *step))
        rows.append(("per step, from the denoising stage (ms)",
                     *both(lambda side: per_step(side, lambda sd, n: stage(sd, "denoiser", n)))))
        fixed = [lat(side, n1) - n1 * st if lat(side, n1) is not None and st is not None else None
                 for side, st in zip(sides, step)]
        rows.append((f"fixed costs: end-to-end at {n1} steps - {n1} x step (ms)", *fixed))
        rows.append(("  request check (ms)", *both(lambda side: stage(side, "request", n1))))
        rows.append(("  text encoding (ms)", *both(lambda side: stage(side, "text_encoder", n1))))
        rows.append(("  VAE decode (ms)", *both(lambda side: stage(side, "vae_decoder", n1))))
        rows.append((f"  {post}", *both(lambda side: stage(side, "postprocess", n1))))
        est = [f + target * st if f is not None and st is not None else None for f, st in zip(fixed, step)]
        rows.append((f"ESTIMATE: end-to-end at {target} steps = fixed + {target} x step (ms)", *est))
        if all(est):
            rows.append(("ESTIMATE: speed-up vs diffusers (x)", 1.0, est[0] / est[1]))
        step_ms = step
    else:
        n = counts[0]
        rows.append(("end-to-end latency, median (ms)", *both(lambda side: lat(side, n))))
        if lat("diffusers", n) and lat("ours", n):
            rows.append(("speed-up vs diffusers (x)", 1.0, lat("diffusers", n) / lat("ours", n)))
        rows.append(("request check (ms)", *both(lambda side: stage(side, "request", n))))
        rows.append(("text encoding (ms)", *both(lambda side: stage(side, "text_encoder", n))))
        rows.append((f"denoising, {n} steps (ms)", *both(lambda side: stage(side, "denoiser", n))))
        rows.append(("VAE decode (ms)", *both(lambda side: stage(side, "vae_decoder", n))))
        rows.append((post, *both(lambda side: stage(side, "postprocess", n))))
        step_ms = both(lambda side: per_step(side, lambda sd, k: stage(sd, "denoiser", k)))
        rows.append(("per denoising step (ms)", *step_ms))
    if step_flop:
        # Per GPU: a sequence-parallel denoiser's step spreads the FLOP over its GPUs (diffusers uses one).
        gpus = (1, cfg.get("our_gpus", 1))

        def tf(ms, n):
            return step_flop / (ms * 1e-3) / 1e12 / n if ms else None
        rows.append(("achieved TFLOP/s per GPU (step FLOP / step time / GPUs)", *map(tf, step_ms, gpus)))
        if cfg["device"].startswith("cuda"):
            rows.append(("% of 790 TFLOP/s bf16 peak", *((tf(ms, n) / H100_BF16_PEAK_TFLOPS * 100) if ms else None
                                                         for ms, n in zip(step_ms, gpus))))
    ostats = (run("ours", counts[0]) or {}).get("stats")
    if ostats:
        rows.append(("Triton queue time, all stages (ms)", None,
                     sum(v.get("queue_ms", 0) for k, v in ostats.items() if k in p.stages)))
        if lat("ours", counts[0]) is not None:
            stage_sum = sum(v or 0 for v in stage_times(p, "ours", run("ours", counts[0])).values())
            rows.append(("outside the stages (ms): transfer, client", None, lat("ours", counts[0]) - stage_sum))

    size = f"{s['height']}x{s['width']}" + (f", {s['frames']} frames" if p.video else "")
    cfg_text = ", ".join(f"{k} {s[k]}" for k in ("guidance", "true_cfg") if k in p.settings and s.get(k) is not None)
    neg = ", with negative prompt" if s.get("negative_prompt") and "negative_prompt" in p.settings else ""
    steps_text = (f"{'/'.join(map(str, counts))} steps measured for a {cfg['steps']}-step estimate" if estimate
                  else f"{counts[0]} steps")
    head = (f"{p.title} bench: preset {cfg['preset']}, {size}, {steps_text}, {cfg_text}{neg}, seed {s['seed']}, "
            f"{cfg['dtype']} on {cfg['device']} ({res.get('gpu', {}).get('nvidia_smi', 'no GPU')}); "
            f"{cfg['runs']} timed run(s) per step count after {cfg['warmup']} warm-up of {cfg['warmup_steps']} steps")
    flop_line = ""
    if step_flop:
        texts = flops["text_tokens"]
        flop_line = (f"denoising step estimate: {step_flop / 1e12:.2f} TFLOP over {flops['forwards']} transformer "
                     f"forward(s) (linear {flops['linear_flop'] / 1e12:.2f} + attention "
                     f"{flops['attention_flop'] / 1e12:.2f}; {flops['image_tokens']} image/video + {texts} text "
                     f"tokens, hidden {flops['hidden']})")
    md = [f"# {head}", "", flop_line, "", f"| metric | diffusers {p.reference} | ditserve (Triton) |",
          "| --- | ---: | ---: |"]
    for what, a, b in rows:
        nd = 2 if "x)" in what else 1
        md.append(f"| {what} | {fmt(a, nd=nd)} | {fmt(b, nd=nd)} |")
    extra = []
    ours, dif = sides["ours"], sides["diffusers"]
    if ours:
        extra.append(f"- ours: protocol {ours.get('protocol')}, server startup {fmt(ours.get('startup_s'), ' s')}, "
                     f"GPU memory used (nvidia-smi) {ours.get('gpu_memory_used_mib')}, "
                     f"output {ours.get('output_shape')}, "
                     f"encoded {ours.get('encoded_bytes')} bytes")
        for n, r in (ours.get("runs") or {}).items():
            for k, v in (r.get("stats") or {}).items():
                extra.append(f"  - {n} steps, {k}: {json.dumps({kk: round(vv, 2) for kk, vv in v.items()})}")
    if dif:
        extra.append(f"- diffusers: load {fmt(dif.get('load_s'), ' s')}, peak allocated "
                     f"{fmt(dif.get('peak_memory_gib'), ' GiB', 2)}, transformer calls/run "
                     f"{dif.get('transformer_calls_per_run')}, torch {dif.get('torch')}, "
                     f"diffusers {dif.get('diffusers')}")
    if res.get("checkpoint_build_s"):
        extra.append(f"- checkpoint built in {res['checkpoint_build_s']:.1f} s")
    if res.get("image_agreement"):
        what = "video (all frames)" if p.video else "image"
        extra.append(f"- first {what}, diffusers vs ours (uint8): {res['image_agreement']}")
    if res.get("carried_over"):
        extra.append(f"- carried over from an earlier invocation: {res['carried_over']}")
    for key in ("diffusers_error", "ours_error"):
        if res.get(key):
            extra.append(f"- {key}: {res[key]}")
    md += [""] + extra
    w = max(len(r[0]) for r in rows)
    txt = [head, flop_line, f"{'':{w}}  {'diffusers':>12}  {'ditserve':>12}"]
    for what, a, b in rows:
        nd = 2 if "x)" in what else 1
        txt.append(f"{what:{w}}  {fmt(a, nd=nd):>12}  {fmt(b, nd=nd):>12}")
    if res.get("image_agreement"):
        txt.append(f"first output, diffusers vs ours (uint8): {res['image_agreement']}")
    txt += [f"{key}: {res[key]}" for key in ("diffusers_error", "ours_error") if res.get(key)]
    return "\n".join(md) + "\n", "\n".join(t for t in txt if t)


# ============================================================================ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pipeline", choices=list(PIPELINES), default="flux")
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke test: the pipeline's tiny built-in, float32 on cpu, small size and few steps")
    p.add_argument("--preset", default=None, help="ditserve.checkpoints preset (default: the pipeline's full size)")
    p.add_argument("--model-dir", default=None, help="checkpoint dir (default /tmp/ditserve_ckpt/<preset>-<dtype>)")
    p.add_argument("--link-from", default=None, metavar="DIR",
                   help="checkpoint build: hard-link DIR's identical components (Wan 1.3B next to the 14B)")
    p.add_argument("--device", default=None, help="cuda or cpu (default cuda; cpu with --tiny)")
    p.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--size", type=int, default=None, help="height = width")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--frames", type=int, default=None, help="video frames (wan-t2v: 81)")
    p.add_argument("--fps", type=int, default=None, help="video frame rate (wan-t2v: 16)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (with --measure-steps: the estimate's)")
    p.add_argument("--measure-steps", default=None, metavar="N1,N2",
                   help="run N1 and N2 steps and estimate --steps from the difference (runs too long for a call)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (FLUX: embedded; Wan: CFG)")
    p.add_argument("--true-cfg", type=float, default=None, help="Qwen-Image true CFG scale (4.0)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=None)
    p.add_argument("--runs", type=int, default=None, help="timed runs per side and step count")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="steps of a warm-up run (FLUX: --steps; Qwen-Image, Wan: 2, the same kernels as a long run)")
    p.add_argument("--text-tokens", type=int, default=512, help="FLUX: T5 sequence length (FluxPipeline default 512)")
    p.add_argument("--set", action="append", default=[], metavar="MODEL.PARAM=VALUE",
                   help="model parameter for our server (ditserve serve --set), e.g. flux_denoiser.sp_degree=2")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--skip-build", action="store_true", help="fail instead of building a missing checkpoint")
    p.add_argument("--protocol", choices=("auto", "grpc", "http"), default="auto",
                   help="client protocol for our server (auto: gRPC if tritonclient.grpc imports)")
    p.add_argument("--out", default=None, help="results folder (default $OUT, else ./out/bench)")
    p.add_argument("--server-timeout", type=float, default=900.0, help="seconds to wait for server readiness")
    p.add_argument("--request-timeout", type=float, default=1200.0)
    p.add_argument("--diffusers-timeout", type=float, default=1800.0)
    p.add_argument("--no-carry-over", action="store_true",
                   help=f"do not fill skipped sides from {STATE_DIR}/<stem>.json (same config only)")
    p.add_argument("--_diffusers-worker", dest="diffusers_job", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.diffusers_job:
        return args
    pipe = PIPELINES[args.pipeline]
    defaults = {**pipe.defaults, **(pipe.tiny if args.tiny else {})}
    if args.tiny:
        args.preset = args.preset or pipe.tiny_preset
        args.device = args.device or "cpu"
    args.preset = args.preset or pipe.preset
    args.device = args.device or "cuda"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.model_dir is None:
        args.model_dir = f"/tmp/ditserve_ckpt/{args.preset}-{args.dtype}"
    if args.size is not None:
        args.height = args.height or args.size
        args.width = args.width or args.size
    for key in ("height", "width", "frames", "fps", "steps", "guidance", "true_cfg", "negative_prompt", "prompt",
                "runs", "warmup_steps"):
        if getattr(args, key) is None:
            setattr(args, key, defaults.get(key))
    args.step_counts = [int(n) for n in args.measure_steps.split(",")] if args.measure_steps else [args.steps]
    if len(args.step_counts) not in (1, 2) or args.step_counts != sorted(set(args.step_counts)):
        p.error("--measure-steps: two step counts N1 < N2")
    if args.warmup_steps is None:
        args.warmup_steps = args.steps
    args.settings = {k: getattr(args, k) for k in FIELDS}
    args.settings["text_tokens"] = args.text_tokens
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.diffusers_job:
        diffusers_worker(read_json(Path(args.diffusers_job)))
        return 0
    # `timeout` sends SIGTERM: turn it into SystemExit so the finally blocks stop the server and
    # write what was measured.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for var, val in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(var, val)
    out_dir = Path(args.out or os.environ.get("OUT") or "out/bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = report_stem(args)
    state_file = STATE_DIR / f"{stem}.json"
    workdir = Path(tempfile.mkdtemp(prefix="ditserve-bench-"))
    config = {"pipeline": args.pipeline, "preset": args.preset, "device": args.device, "dtype": args.dtype,
              "settings": args.settings, "steps": args.steps, "step_counts": args.step_counts,
              "warmup_steps": args.warmup_steps, "runs": args.runs, "warmup": args.warmup,
              "our_gpus": denoiser_gpus(args.set)}
    res: dict = {"config": config, "gpu": gpu_info(),
                 "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}

    def save():
        md, txt = build_report(res)
        (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
        (out_dir / f"{stem}.md").write_text(md)
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps(res, default=str))
        return txt

    # Sides skipped now may come from an earlier invocation with the same config (e.g. two device
    # calls on one warm machine).
    if not args.no_carry_over and (args.skip_diffusers or args.skip_ours) and state_file.is_file():
        with contextlib.suppress(Exception):
            prev = read_json(state_file)
            ignored = ("runs", "warmup")
            if {k: v for k, v in prev.get("config", {}).items() if k not in ignored} == \
                    {k: v for k, v in config.items() if k not in ignored}:
                carried = []
                for side, skipped in (("diffusers", args.skip_diffusers), ("ours", args.skip_ours)):
                    if skipped and prev.get(side):
                        res[side] = prev[side]
                        carried.append(side)
                if carried:
                    res["carried_over"] = carried

    rc = 0
    try:
        model_dir, build_s = ensure_checkpoint(args)
        res["model_dir"] = str(model_dir)
        if build_s is not None:
            res["checkpoint_build_s"] = build_s
        try:
            res["flops"] = PIPELINES[args.pipeline].flops(model_dir, args.settings)
        except Exception as e:  # the report goes on without the FLOP rows
            log(f"FLOP estimate failed: {type(e).__name__}: {e}")
        save()
        for side, skipped, run in (("diffusers", args.skip_diffusers, run_diffusers), ("ours", args.skip_ours, run_ours)):
            if skipped:
                continue
            try:
                res[side] = run(args, model_dir, workdir)
            except Exception as e:
                rc = 1
                res[f"{side}_error"] = f"{type(e).__name__}: {e}"
                log(f"{side} FAILED: {e}")
            save()
        if not args.skip_ours:
            # Keep the server log's tail with the results (the full log can be large).
            slog = workdir / "tritonserver.log"
            if slog.is_file():
                lines = slog.read_text(errors="replace").splitlines()
                (out_dir / f"{stem}_tritonserver.log").write_text("\n".join(lines[-3000:]) + "\n")
                if rc:
                    print("---- tritonserver.log (tail) ----\n" + "\n".join(lines[-40:]), flush=True)
            clog = workdir / "ditserve_serve.out"
            if rc and clog.is_file():
                print("---- ditserve serve output (tail) ----\n" + "\n".join(
                    clog.read_text(errors="replace").splitlines()[-20:]), flush=True)
        res["image_agreement"] = image_agreement(workdir)
    finally:
        res["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        txt = save()
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n" + txt, flush=True)
    print(f"\nresults: {out_dir / f'{stem}.json'}, {out_dir / f'{stem}.md'}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
