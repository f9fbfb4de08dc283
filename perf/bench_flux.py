#!/usr/bin/env python3
"""End-to-end FLUX.1 benchmark: diffusers' FluxPipeline vs ditserve's flux_t2i ensemble on Triton.

On the GPU host (after ``source perf/gpu_env.sh``)::

    python perf/bench_flux.py                       # flux.1-dev, bf16, cuda, 1024x1024, 28 steps, 3 runs

On a CPU machine (end-to-end smoke test of the same code paths)::

    python perf/bench_flux.py --preset tiny --size 64 --steps 2 --device cpu --runs 2

Phases (each prints a timestamped line; results are written after each phase, so a run cut off
by a time limit still leaves what it measured):

a. checkpoint: ``python -m ditserve.checkpoints build --preset P --out DIR --dtype D --device DEV``
   into ``--model-dir`` (default ``/tmp/ditserve_ckpt/<preset>-<dtype>``); skipped when
   ``DIR/model_index.json`` exists.
b. diffusers: a child process (so its GPU memory is freed when it exits) loads
   ``FluxPipeline.from_pretrained(DIR, torch_dtype=D).to(DEV)``, runs ``--warmup`` then ``--runs``
   generations (``output_type="pil"``, seeded generator), ``torch.cuda.synchronize()`` around each,
   and times the stages with CUDA events (encode_prompt, every transformer forward, vae.decode).
c. ours: ``python -m ditserve.cli serve --model-path DIR --device DEV --dtype D`` on free ports;
   ``--warmup`` then ``--runs`` requests to ``flux_t2i`` through tritonclient gRPC (or plain HTTP with
   binary outputs if tritonclient.grpc cannot be imported: ``--protocol auto``); end-to-end latency
   at the client, per-stage compute/queue times as deltas of Triton's inference statistics over the
   timed requests; then the server is stopped (SIGTERM, then SIGKILL of its process group).
d. report: ``bench_flux.json`` and ``bench_flux.md`` in ``--out`` (default ``$OUT``, else
   ``./out/bench``), and a short table printed last.

FLOP estimate of one transformer step (ENVIRONMENT.md's convention): every linear layer costs
2 x weights x the tokens it is applied to (each MMDiT stream only over its own tokens: image-stream
weights over image tokens, text-stream weights over text tokens; single-stream blocks over both),
attention 4 x L^2 x (heads x head_dim) per block with L = image + text tokens. Per-sample
modulation/timestep layers (one vector per image) are left out (< 0.01%).
"""

from __future__ import annotations

import argparse
import contextlib
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

ENSEMBLE = "flux_t2i"
# The ensemble's steps, read from its config so that the bench needs no torch import.
STAGES = tuple(re.findall(
    r'model_name:\s*"(\w+)"',
    (Path(__file__).resolve().parent.parent / "model_repository" / ENSEMBLE / "config.pbtxt").read_text(),
))
H100_BF16_PEAK_TFLOPS = 790.0  # dense bf16 matmul, as measured on the host (ENVIRONMENT.md)
STATE_FILE = Path(os.environ.get("DITSERVE_BENCH_STATE", "/tmp/ditserve_bench/last.json"))

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[bench {time.monotonic() - _T0:7.1f}s] {msg}", flush=True)


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


def image_tokens_for(model_dir: Path, height: int, width: int) -> int:
    vae_scale = 8
    with contextlib.suppress(Exception):
        vae_cfg = json.loads((model_dir / "vae" / "config.json").read_text())
        vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)
    # FLUX packs 2x2 latent patches into one token.
    return (height // (vae_scale * 2)) * (width // (vae_scale * 2))


# ============================================================================ helpers


def median(xs):
    return statistics.median(xs) if xs else None


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
    model_dir = Path(args.model_dir)
    if (model_dir / "model_index.json").is_file():
        log(f"checkpoint present: {model_dir}")
        return model_dir, None
    if args.skip_build:
        raise SystemExit(f"no checkpoint at {model_dir} and --skip-build given")
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    free_gib = shutil.disk_usage(model_dir.parent).free / 2**30
    log(f"{free_gib:.0f} GiB free under {model_dir.parent} (flux.1-dev in bf16 needs about 32 GiB)")
    cmd = [sys.executable, "-m", "ditserve.checkpoints", "build", "--preset", args.preset,
           "--out", str(model_dir), "--dtype", args.dtype, "--device", args.device]
    log("building checkpoint: " + " ".join(cmd))
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    dt = time.perf_counter() - t
    size = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())
    log(f"checkpoint built in {dt:.1f}s ({size / 2**30:.1f} GiB)")
    return model_dir, dt


# ============================================================================ (b) diffusers


def diffusers_worker(args) -> None:
    """Runs in a child process; writes its result JSON to args.worker_out."""
    import numpy as np
    import torch
    from diffusers import FluxPipeline

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    t = time.perf_counter()
    pipe = FluxPipeline.from_pretrained(args.model_dir, torch_dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    sync()
    load_s = time.perf_counter() - t
    log(f"diffusers: pipeline loaded in {load_s:.1f}s")

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
    pipe.transformer.register_forward_pre_hook(lambda *_: spans["transformer"].start())
    pipe.transformer.register_forward_hook(lambda *_: spans["transformer"].stop())

    def run_once():
        gen = torch.Generator("cpu").manual_seed(args.seed)  # as ditserve: seeds draw on the CPU
        sync()
        t0 = time.perf_counter()
        out = pipe(
            prompt=args.prompt,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=gen,
            output_type="pil",
        )
        sync()
        return time.perf_counter() - t0, out.images[0]

    for i in range(args.warmup):
        dt, _ = run_once()
        log(f"diffusers: warm-up {i + 1}/{args.warmup}: {dt * 1e3:.1f} ms")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    lat, stage_ms = [], {k: [] for k in spans}
    first_image = None
    transformer_calls = 0
    for i in range(args.runs):
        for s in spans.values():
            s.reset()
        dt, img = run_once()
        lat.append(dt * 1e3)
        for k, s in spans.items():
            stage_ms[k].append(s.total_ms())
        transformer_calls = spans["transformer"].count()
        if first_image is None:
            first_image = img
        log(f"diffusers: run {i + 1}/{args.runs}: {dt * 1e3:.1f} ms "
            f"(transformer {stage_ms['transformer'][-1]:.1f} ms over {transformer_calls} calls)")
    if first_image is not None and args.image_out:
        np.save(args.image_out, np.asarray(first_image.convert("RGB"), dtype=np.uint8))
    result = {
        "load_s": load_s,
        "latency_ms": summarize(lat),
        "stage_ms": {k: summarize(v) for k, v in stage_ms.items()},
        "transformer_calls_per_run": transformer_calls,
        "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30) if cuda else None,
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "sdpa_note": "diffusers default attention processor (torch SDPA)",
    }
    Path(args.worker_out).write_text(json.dumps(result, indent=1))


def run_diffusers(args, model_dir: Path, workdir: Path) -> dict:
    out = workdir / "diffusers_result.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--_diffusers-worker",
           "--worker-out", str(out), "--image-out", str(workdir / "diffusers_image.npy"),
           "--model-dir", str(model_dir), "--device", args.device, "--dtype", args.dtype,
           "--size", str(args.size), "--steps", str(args.steps), "--guidance", str(args.guidance),
           "--seed", str(args.seed), "--runs", str(args.runs), "--warmup", str(args.warmup),
           "--prompt", args.prompt]
    log("diffusers: starting child process")
    subprocess.run(cmd, check=True, timeout=args.diffusers_timeout)
    return json.loads(out.read_text())


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


def stats_snapshot(http_base: str) -> dict:
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


def run_ours(args, model_dir: Path, workdir: Path) -> dict:
    http_port, grpc_port, metrics_port = free_ports(3)
    http_base = f"http://127.0.0.1:{http_port}"
    server_log = workdir / "tritonserver.log"
    server_log.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "ditserve.cli", "serve", "--model-path", str(model_dir),
           "--device", args.device, "--dtype", args.dtype,
           "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
           "--host", "127.0.0.1", "--log-file", str(server_log),
           # Only this pipeline (Triton loads the ensemble's composing models): the other pipelines'
           # tiny checkpoints would cost start-up time, and Wan's MP4 stage needs PyAV.
           "--models", ENSEMBLE,
           "--startup-timeout", str(args.server_timeout), *(f"--set={s}" for s in args.set)]
    cli_log = open(workdir / "ditserve_serve.out", "wb")
    log("ours: " + " ".join(cmd))
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
            if http_ok(f"{http_base}/v2/health/ready") and http_ok(f"{http_base}/v2/models/{ENSEMBLE}/ready"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {args.server_timeout}s")
            time.sleep(0.5)
        result["startup_s"] = time.perf_counter() - t_start
        mem_ready = gpu_memory_used_mib()
        log(f"ours: server ready in {result['startup_s']:.1f}s")

        meta = http_json(f"{http_base}/v2/models/{ENSEMBLE}")
        in_types = {i["name"]: i["datatype"] for i in meta.get("inputs", [])}
        out_names = [o["name"] for o in meta.get("outputs", [])]
        wanted = {
            "PROMPT": args.prompt.encode(),
            "HEIGHT": args.size,
            "WIDTH": args.size,
            "NUM_INFERENCE_STEPS": args.steps,
            "GUIDANCE_SCALE": args.guidance,
            "SEED": args.seed,
            "NUM_IMAGES": 1,
        }
        inputs = [(n, in_types[n], v) for n, v in wanted.items() if n in in_types]
        missing = [n for n in wanted if n not in in_types]
        if missing:
            log(f"ours: ensemble has no inputs {missing}; sent {[n for n, _, _ in inputs]}")

        client = None
        if args.protocol in ("auto", "grpc"):
            try:
                client = GrpcInfer(f"127.0.0.1:{grpc_port}", args.request_timeout)
            except Exception as e:  # host grpcio/protobuf older than tritonclient's generated code
                if args.protocol == "grpc":
                    raise
                log(f"ours: tritonclient.grpc unusable ({type(e).__name__}: {e}); using HTTP")
        if client is None:
            client = HttpInfer(http_base, args.request_timeout)
        result["protocol"] = client.name

        def one():
            t = time.perf_counter()
            res = client.infer(ENSEMBLE, inputs, out_names)
            return (time.perf_counter() - t) * 1e3, res

        for i in range(args.warmup):
            dt, _ = one()
            log(f"ours: warm-up {i + 1}/{args.warmup}: {dt:.1f} ms")
        before = stats_snapshot(http_base)
        lat, first = [], None
        for i in range(args.runs):
            dt, res = one()
            lat.append(dt)
            if first is None:
                first = res
            log(f"ours: run {i + 1}/{args.runs}: {dt:.1f} ms")
        after = stats_snapshot(http_base)
        result["latency_ms"] = summarize(lat)
        result["stats"] = stats_delta(before, after, args.runs)
        result["gpu_memory_used_mib"] = {"before_start": mem_before, "ready": mem_ready,
                                         "after_runs": gpu_memory_used_mib()}
        if first is not None:
            for name in ("IMAGE", "IMAGES"):
                if name in first and first[name] is not None:
                    import numpy as np

                    img = np.asarray(first[name])
                    np.save(workdir / "ours_image.npy", img.reshape(-1, *img.shape[-3:])[0])
                    result["image_shape"] = list(img.shape)
                    break
            if "PNG" in first and first["PNG"] is not None:
                png = first["PNG"].reshape(-1)[0]
                result["png_bytes"] = len(png)
    finally:
        t = time.perf_counter()
        stop_server(proc)
        cli_log.close()
        result["stop_s"] = time.perf_counter() - t
        log(f"ours: server stopped in {result['stop_s']:.1f}s (rc {proc.returncode})")
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


def build_report(res: dict) -> tuple[str, str]:
    """(markdown, short text table)."""
    cfg, flops = res["config"], res.get("flops", {})
    step_flop = flops.get("total_flop")
    steps = cfg["steps"]
    dif, ours = res.get("diffusers"), res.get("ours")
    rows = []  # (what, diffusers, ours)

    def lat(r):
        return r["latency_ms"]["median"] if r and r.get("latency_ms") else None

    rows.append(("end-to-end latency, median (ms)", lat(dif), lat(ours)))
    if dif and ours and lat(dif) and lat(ours):
        rows.append(("speed-up vs diffusers (x)", 1.0, lat(dif) / lat(ours)))
    dstage = (dif or {}).get("stage_ms", {})
    ostats = (ours or {}).get("stats", {})

    def dmed(k):
        return dstage.get(k, {}).get("median")

    def ostage(k):
        # Triton's per-request success time (queue + input + compute + output): the output part
        # holds the wait for a stage's GPU work, which compute_infer alone misses because stages
        # hand on GPU tensors without synchronising.
        return ostats.get(k, {}).get("success_ms")

    rows.append(("text encoding (ms)", dmed("text_encoder"), ostage("flux_text_encoder")))
    rows.append(("denoising, all steps (ms)", dmed("transformer"), ostage("flux_denoiser")))
    rows.append(("VAE decode (ms)", dmed("vae_decode"), ostage("flux_vae_decoder")))
    rows.append(("uint8 + copy to host + PNG (ms)", None, ostage("flux_postprocess")))
    d_step = dmed("transformer") / steps if dmed("transformer") else None
    o_step = ostage("flux_denoiser") / steps if ostage("flux_denoiser") else None
    rows.append(("per denoising step (ms)", d_step, o_step))
    if step_flop:
        def tf(ms):
            return step_flop / (ms * 1e-3) / 1e12 if ms else None
        rows.append(("achieved TFLOP/s (step FLOP / step time)", tf(d_step), tf(o_step)))
        if cfg["device"].startswith("cuda"):
            rows.append(("% of 790 TFLOP/s bf16 peak", (tf(d_step) or 0) / H100_BF16_PEAK_TFLOPS * 100 if d_step else None,
                         (tf(o_step) or 0) / H100_BF16_PEAK_TFLOPS * 100 if o_step else None))
    queue = sum(v.get("queue_ms", 0) for k, v in ostats.items() if k in STAGES) if ostats else None
    rows.append(("Triton queue time, all stages (ms)", None, queue))
    if ours and ours.get("latency_ms") and ostats:
        stage_sum = sum(ostage(k) or 0 for k in STAGES)
        rows.append(("outside the stages (ms): gRPC transfer, client", None, lat(ours) - stage_sum))

    head = (f"FLUX bench: preset {cfg['preset']}, {cfg['size']}x{cfg['size']}, {steps} steps, guidance "
            f"{cfg['guidance']}, seed {cfg['seed']}, {cfg['dtype']} on {cfg['device']} "
            f"({res.get('gpu', {}).get('nvidia_smi', 'no GPU')}); {cfg['runs']} timed runs after {cfg['warmup']} warm-up")
    flop_line = ""
    if step_flop:
        flop_line = (f"transformer step estimate: {step_flop / 1e12:.2f} TFLOP "
                     f"(linear {flops['linear_flop'] / 1e12:.2f} + attention {flops['attention_flop'] / 1e12:.2f}; "
                     f"{flops['image_tokens']} image + {flops['text_tokens']} text tokens, "
                     f"{flops['double_blocks']}+{flops['single_blocks']} blocks, hidden {flops['hidden']})")
    md = [f"# {head}", "", flop_line, "", "| metric | diffusers FluxPipeline | ditserve (Triton) |", "| --- | ---: | ---: |"]
    for what, a, b in rows:
        nd = 2 if "x)" in what else 1
        md.append(f"| {what} | {fmt(a, nd=nd)} | {fmt(b, nd=nd)} |")
    extra = []
    if ours:
        extra.append(f"- ours: protocol {ours.get('protocol')}, server startup {fmt(ours.get('startup_s'), ' s')}, "
                     f"GPU memory used (nvidia-smi) {ours.get('gpu_memory_used_mib')}")
        for k, v in (ours.get("stats") or {}).items():
            extra.append(f"  - {k}: {json.dumps({kk: round(vv, 2) for kk, vv in v.items()})}")
    if dif:
        extra.append(f"- diffusers: load {fmt(dif.get('load_s'), ' s')}, peak allocated "
                     f"{fmt(dif.get('peak_memory_gib'), ' GiB', 2)}, transformer calls/run {dif.get('transformer_calls_per_run')}, "
                     f"torch {dif.get('torch')}, diffusers {dif.get('diffusers')}")
    if res.get("checkpoint_build_s"):
        extra.append(f"- checkpoint built in {res['checkpoint_build_s']:.1f} s")
    if res.get("image_agreement"):
        extra.append(f"- first image, diffusers vs ours (uint8): {res['image_agreement']}")
    if res.get("carried_over"):
        extra.append(f"- carried over from an earlier invocation: {res['carried_over']}")
    md += [""] + extra
    w = max(len(r[0]) for r in rows)
    txt = [head, flop_line, f"{'':{w}}  {'diffusers':>12}  {'ditserve':>12}"]
    for what, a, b in rows:
        nd = 2 if "x)" in what else 1
        txt.append(f"{what:{w}}  {fmt(a, nd=nd):>12}  {fmt(b, nd=nd):>12}")
    return "\n".join(md) + "\n", "\n".join(t for t in txt if t)


# ============================================================================ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="flux.1-dev", help="ditserve.checkpoints preset")
    p.add_argument("--model-dir", default=None, help="checkpoint dir (default /tmp/ditserve_ckpt/<preset>-<dtype>)")
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--size", type=int, default=1024, help="height = width")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse on the moon")
    p.add_argument("--runs", type=int, default=3, help="timed runs per side")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--text-tokens", type=int, default=512, help="T5 sequence length (FluxPipeline default 512)")
    p.add_argument("--set", action="append", default=[], metavar="MODEL.PARAM=VALUE",
                   help="model parameter for our server (ditserve serve --set), e.g. flux_denoiser.sp_degree=2")
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--skip-build", action="store_true", help="fail instead of building a missing checkpoint")
    p.add_argument("--protocol", choices=("auto", "grpc", "http"), default="auto",
                   help="client protocol for our server (auto: gRPC if tritonclient.grpc imports)")
    p.add_argument("--out", default=None, help="results folder (default $OUT, else ./out/bench)")
    p.add_argument("--server-timeout", type=float, default=900.0, help="seconds to wait for server readiness")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--diffusers-timeout", type=float, default=1800.0)
    p.add_argument("--no-carry-over", action="store_true",
                   help=f"do not fill skipped sides from {STATE_FILE} (same config only)")
    # internal: the diffusers child process
    p.add_argument("--_diffusers-worker", dest="diffusers_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--image-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.model_dir is None:
        args.model_dir = f"/tmp/ditserve_ckpt/{args.preset}-{args.dtype}"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.diffusers_worker:
        diffusers_worker(args)
        return 0
    # `timeout` sends SIGTERM: turn it into SystemExit so the finally blocks stop the server and
    # write what was measured.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for var, val in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(var, val)
    out_dir = Path(args.out or os.environ.get("OUT") or "out/bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="ditserve-bench-"))
    config = {k: getattr(args, k) for k in ("preset", "device", "dtype", "size", "steps", "guidance", "seed",
                                             "runs", "warmup", "prompt")}
    res: dict = {"config": config, "gpu": gpu_info(),
                 "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}

    def save():
        md, txt = build_report(res)
        (out_dir / "bench_flux.json").write_text(json.dumps(res, indent=1, default=str))
        (out_dir / "bench_flux.md").write_text(md)
        STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
        STATE_FILE.write_text(json.dumps(res, default=str))
        return txt

    # Sides skipped now may come from an earlier invocation with the same config (e.g. two device
    # calls on one warm machine).
    if not args.no_carry_over and (args.skip_diffusers or args.skip_ours) and STATE_FILE.is_file():
        with contextlib.suppress(Exception):
            prev = json.loads(STATE_FILE.read_text())
            same = {k: v for k, v in prev.get("config", {}).items() if k not in ("runs", "warmup")} == \
                   {k: v for k, v in config.items() if k not in ("runs", "warmup")}
            if same:
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
        with contextlib.suppress(Exception):
            tcfg = json.loads((model_dir / "transformer" / "config.json").read_text())
            res["flops"] = flux_step_flops(tcfg, image_tokens_for(model_dir, args.size, args.size), args.text_tokens)
        save()
        if not args.skip_diffusers:
            try:
                res["diffusers"] = run_diffusers(args, model_dir, workdir)
            except Exception as e:
                rc = 1
                res["diffusers_error"] = f"{type(e).__name__}: {e}"
                log(f"diffusers FAILED: {e}")
            save()
        if not args.skip_ours:
            try:
                res["ours"] = run_ours(args, model_dir, workdir)
            except Exception as e:
                rc = 1
                res["ours_error"] = f"{type(e).__name__}: {e}"
                log(f"ours FAILED: {e}")
            # Keep the server log's tail with the results (the full log can be large).
            slog = workdir / "tritonserver.log"
            if slog.is_file():
                lines = slog.read_text(errors="replace").splitlines()
                (out_dir / "tritonserver.log").write_text("\n".join(lines[-3000:]) + "\n")
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
    print(f"\nresults: {out_dir / 'bench_flux.json'}, {out_dir / 'bench_flux.md'}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
