#!/usr/bin/env python3
"""Measure the ``flux_t2i`` ensemble (or another, ``--model``) with NVIDIA perf_analyzer (``make perf``).

1. Installs perf_analyzer: the binary shipped in the ``tritonclient==2.41.1`` wheel (the
   perf-analyzer 2.5x wheels need glibc 2.38, Debian 12 has 2.36), plus ``libcudart.so.12``
   from the ``nvidia-cuda-runtime-cu12`` wheel, under ``.cache/perf_analyzer``. Debian's
   ``libb64-0d`` must be installed (the Makefile does it).
2. Starts tritonserver over ``model_repository/`` (tiny model, CPU, float32) on free ports,
   unless ``--http-url``/``--grpc-url`` point at a running server.
3. Reads the model's inputs (names, data types, shapes, optional flags) from the server's
   model configuration and writes perf_analyzer's ``--input-data`` JSON from them; an input
   image (``qwen_image_edit``'s ``INPUT_IMAGE``, ``wan_i2v``'s ``IMAGE``) is a PNG of the
   requested size, sent as base64 of the serialized BYTES tensor.
4. Sends one warm-up request, then runs perf_analyzer at each concurrency over HTTP and gRPC
   and prints a table (also saved as JSON and Markdown under ``out/perf/``).
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

TRITONCLIENT_WITH_PA = "tritonclient==2.41.1"
PA_MEMBER = "tritonclient-2.41.1.data/data/bin/perf_analyzer"
CUDART_REQ = "nvidia-cuda-runtime-cu12==12.9.79"
CUDART_MEMBER = "nvidia/cuda_runtime/lib/libcudart.so.12"

# Values for the inputs we know; anything required and unknown is an error.
NUMPY_OF_TRITON = {
    "TYPE_BOOL": "BOOL", "TYPE_UINT8": "UINT8", "TYPE_UINT16": "UINT16",
    "TYPE_UINT32": "UINT32", "TYPE_UINT64": "UINT64", "TYPE_INT8": "INT8",
    "TYPE_INT16": "INT16", "TYPE_INT32": "INT32", "TYPE_INT64": "INT64",
    "TYPE_FP16": "FP16", "TYPE_FP32": "FP32", "TYPE_FP64": "FP64",
    "TYPE_STRING": "BYTES", "TYPE_BF16": "BF16",
}


# ----------------------------------------------------------------------------- install


def _cache_dir() -> Path:
    try:
        from ditserve.paths import cache_dir

        return cache_dir() / "perf_analyzer"
    except Exception:  # noqa: BLE001 - script must work without the package too
        return REPO_ROOT / ".cache" / "perf_analyzer"


def _pip_download(requirement: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1]

    def _find() -> Path | None:
        for whl in dest.glob("*.whl"):
            if whl.name.lower().startswith(f"{name}-{version}-"):
                return whl
        return None

    found = _find()
    if found is None:
        print(f">> pip download --no-deps {requirement}", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "-q", requirement, "-d", str(dest)],
            check=True,
        )
        found = _find()
        if found is None:
            raise SystemExit(f"pip download {requirement} produced no wheel in {dest}")
    return found


def _extract(wheel: Path, member: str, target: Path, mode: int) -> None:
    if target.is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.chmod(tmp, mode)
    os.replace(tmp, target)


def ensure_perf_analyzer() -> tuple[Path, dict[str, str]]:
    """Path of a working perf_analyzer and the environment to run it with."""
    root = _cache_dir()
    binary = root / "bin" / "perf_analyzer"
    libdir = root / "lib"
    if not binary.is_file():
        _extract(_pip_download(TRITONCLIENT_WITH_PA, root / "wheels"), PA_MEMBER, binary, 0o755)
    if not (libdir / "libcudart.so.12").is_file():
        _extract(_pip_download(CUDART_REQ, root / "wheels"), CUDART_MEMBER,
                 libdir / "libcudart.so.12", 0o644)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(libdir), os.environ.get("LD_LIBRARY_PATH", "")) if p)
    ldd = subprocess.run(["ldd", str(binary)], env=env, capture_output=True, text=True)
    missing = [line.strip() for line in ldd.stdout.splitlines() if "not found" in line]
    if missing:
        hint = " (apt-get install libb64-0d; `make perf` does it)" if any(
            "libb64" in m for m in missing) else ""
        raise SystemExit(f"perf_analyzer cannot load: {missing}{hint}")
    return binary, env


# ----------------------------------------------------------------------------- input data

#: Inputs that take one encoded image, by ensemble: qwen_image_edit's INPUT_IMAGE, wan_i2v's IMAGE.
IMAGE_INPUTS = ("INPUT_IMAGE", "IMAGE")


def sample_png(width: int, height: int) -> bytes:
    """A small RGB PNG (a gradient, so that it is no degenerate flat image) for ensembles that take one."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                       np.full_like(x, 128)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def serialize_bytes(items: list[bytes]) -> bytes:
    """A BYTES tensor as Triton sends it raw: each element's 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)



def model_config(http_url: str, model: str) -> dict:
    with urllib.request.urlopen(f"{http_url}/v2/models/{model}/config", timeout=30) as r:
        return json.load(r)


def request_values(args: argparse.Namespace, config: dict) -> dict[str, object]:
    """The value of each input the script knows, from the command line; an image for ensembles that take one."""
    values: dict[str, object] = {
        "PROMPT": args.prompt, "HEIGHT": args.height, "WIDTH": args.width,
        "NUM_INFERENCE_STEPS": args.steps, "SEED": args.seed,
        "NUM_IMAGES": args.num_images, "GUIDANCE_SCALE": args.guidance_scale,
    }
    if any(i["name"] in IMAGE_INPUTS for i in config.get("input", [])):
        values.update(dict.fromkeys(IMAGE_INPUTS, sample_png(args.width, args.height)))
    return values


def bytes_elements(spec: dict) -> list[bytes]:
    """The elements of a BYTES tensor of the input JSON, given as "content" or as "b64"."""
    if "b64" not in spec:
        return [str(s).encode() for s in spec["content"]]
    raw, items = base64.b64decode(spec["b64"]), []
    while raw:
        (n,) = struct.unpack("<I", raw[:4])
        items.append(raw[4:4 + n])
        raw = raw[4 + n:]
    return items


def build_input_data(config: dict, values: dict[str, object]) -> tuple[dict, list[str]]:
    """perf_analyzer ``--input-data`` JSON for one request, from the model config."""
    entry: dict[str, dict] = {}
    notes = []
    for inp in config.get("input", []):
        name, dtype = inp["name"], inp["data_type"]
        dims = [int(d) for d in inp.get("dims", [])] or [1]
        shape = [1 if d < 0 else d for d in dims]
        count = 1
        for d in shape:
            count *= d
        if name not in values:
            if inp.get("optional"):
                notes.append(f"{name}: optional, not sent")
                continue
            raise SystemExit(f"{config.get('name')}: required input {name} ({dtype}) has no "
                             f"perf value; add it to the input values in {__file__}")
        value = values[name]
        ttype = NUMPY_OF_TRITON.get(dtype)
        if ttype is None:
            raise SystemExit(f"input {name}: unsupported data type {dtype}")
        if ttype == "BYTES" and isinstance(value, bytes):
            # Binary (an image): JSON strings cannot hold it, perf_analyzer takes the raw tensor in base64.
            entry[name] = {"b64": base64.b64encode(serialize_bytes([value] * count)).decode(),
                           "shape": shape}
            notes.append(f"{name}: {ttype} {shape} = {len(value)} bytes (base64)")
            continue
        if ttype == "BYTES":
            content = [str(value)] * count
        elif ttype.startswith(("FP", "BF")):
            content = [float(value)] * count
        elif ttype == "BOOL":
            content = [bool(value)] * count
        else:
            content = [int(value)] * count
        entry[name] = {"content": content, "shape": shape}
        notes.append(f"{name}: {ttype} {shape} = {value!r}")
    return {"data": [entry]}, notes


def warmup(http_url: str, model: str, data: dict, config: dict) -> float:
    """One request through tritonclient (first-call costs stay out of the measurement)."""
    import numpy as np
    import tritonclient.http as httpclient

    np_of = {"BYTES": np.object_, "FP32": np.float32, "FP16": np.float16, "FP64": np.float64,
             "INT32": np.int32, "INT64": np.int64, "INT8": np.int8, "INT16": np.int16,
             "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
             "BOOL": np.bool_}
    types = {i["name"]: NUMPY_OF_TRITON[i["data_type"]] for i in config.get("input", [])}
    client = httpclient.InferenceServerClient(http_url.split("://", 1)[1], network_timeout=600,
                                              connection_timeout=600)
    try:
        # perf_analyzer prepends the batch dimension itself (-b 1); here we do it.
        batch = [1] if int(config.get("max_batch_size", 0)) > 0 else []
        inputs = []
        for name, spec in data["data"][0].items():
            ttype = types[name]
            shape = batch + list(spec["shape"])
            if ttype == "BYTES":
                arr = np.array(bytes_elements(spec), dtype=np.object_)
            else:
                arr = np.array(spec["content"], dtype=np_of[ttype])
            arr = arr.reshape(shape)
            inp = httpclient.InferInput(name, shape, ttype)
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        t0 = time.perf_counter()
        client.infer(model, inputs)
        return time.perf_counter() - t0
    finally:
        client.close()


# ----------------------------------------------------------------------------- measurement


def run_perf_analyzer(binary: Path, env: dict, *, model: str, url: str, protocol: str,
                      concurrency: int, input_json: Path, csv_path: Path, args) -> dict:
    """One perf_analyzer run at one concurrency; retried once with longer, looser windows
    if it cannot reach a stable measurement (perf_analyzer then writes no report)."""
    attempts = [(args.window_ms, args.stability),
                (args.window_ms * 2, max(args.stability * 2, 50))]
    for n, (window_ms, stability) in enumerate(attempts, 1):
        cmd = [
            str(binary), "-m", model, "-u", url, "-i", protocol,
            "--input-data", str(input_json),
            "--concurrency-range", f"{concurrency}:{concurrency}",
            "--measurement-mode", "time_windows",
            "--measurement-interval", str(window_ms),
            "--stability-percentage", str(stability),
            "--max-trials", str(args.max_trials),
            "-f", str(csv_path),
        ]
        print(f">> {' '.join(cmd)}", flush=True)
        csv_path.unlink(missing_ok=True)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=args.run_timeout)
        elapsed = time.monotonic() - t0
        log = csv_path.with_suffix(".log")
        log.write_text(proc.stdout + proc.stderr)
        if csv_path.is_file():
            break
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-4:])
        print(f"   no report (rc {proc.returncode}, attempt {n}/{len(attempts)}); {log}:\n{tail}",
              flush=True)
    else:
        return {"protocol": protocol, "concurrency": concurrency, "failed": True,
                "pa_rc": proc.returncode, "wall_s": round(elapsed, 1), "log": str(log)}
    unstable = "Failed to obtain stable measurement" in proc.stdout + proc.stderr
    with open(csv_path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh)]
    row = rows[0]

    def ms(key: str) -> float:
        return float(row.get(key, 0) or 0) / 1000.0

    # perf_analyzer's text report has the client average and, for an ensemble, the queue
    # and compute time summed over its composing models (the CSV's "Server Queue" is only
    # the ensemble scheduler's own queue).
    text = proc.stdout
    avg = re.search(r"Avg latency: (\d+) usec", text)
    srv = re.search(r"Avg request latency: \d+ usec \(overhead \d+ usec \+ queue (\d+) usec"
                    r" \+ compute (\d+) usec\)", text)
    client_cols = ("Client Send", "Network+Server Send/Recv", "Server Queue",
                   "Server Compute Input", "Server Compute Infer", "Server Compute Output",
                   "Client Recv")
    return {
        "protocol": protocol,
        "concurrency": concurrency,
        "throughput_infer_per_s": float(row["Inferences/Second"]),
        "avg_ms": int(avg.group(1)) / 1000.0 if avg else sum(ms(k) for k in client_cols),
        "p50_ms": ms("p50 latency"),
        "p90_ms": ms("p90 latency"),
        "p99_ms": ms("p99 latency"),
        "server_queue_ms": int(srv.group(1)) / 1000.0 if srv else ms("Server Queue"),
        "server_compute_ms": int(srv.group(2)) / 1000.0 if srv else (
            ms("Server Compute Input") + ms("Server Compute Infer") + ms("Server Compute Output")),
        "stable": not unstable and proc.returncode == 0,
        "window_ms": window_ms,
        "stability_pct": stability,
        "pa_rc": proc.returncode,
        "wall_s": round(elapsed, 1),
    }


def format_table(results: list[dict]) -> str:
    head = ["protocol", "concurrency", "infer/s", "avg ms", "p50 ms", "p90 ms", "p99 ms",
            "queue ms", "compute ms", "window"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.get("failed"):
            cells = [r["protocol"], str(r["concurrency"])] + ["-"] * 7 + [
                f"no stable measurement (see {r['log']})"]
        else:
            cells = [
                r["protocol"], str(r["concurrency"]), f"{r['throughput_infer_per_s']:.2f}",
                f"{r['avg_ms']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p90_ms']:.1f}",
                f"{r['p99_ms']:.1f}", f"{r['server_queue_ms']:.1f}",
                f"{r['server_compute_ms']:.1f}",
                f"{r['window_ms'] / 1000:g}s, ±{r['stability_pct']}%",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="flux_t2i")
    p.add_argument("--model-repository", default=str(REPO_ROOT / "model_repository"))
    p.add_argument("--models", default=None,
                   help="comma list of models to load (default: the whole repository)")
    p.add_argument("--model-path", default="tiny")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--http-url", default=None,
                   help="use a running server (host:port for HTTP) instead of starting one")
    p.add_argument("--grpc-url", default=None, help="host:port for gRPC with --http-url")
    p.add_argument("--prompt", default="a photo of a red fox in the snow")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--guidance-scale", type=float, default=3.5)
    p.add_argument("--concurrency", default="1,2,4")
    p.add_argument("--protocols", default="http,grpc")
    p.add_argument("--window-ms", type=int, default=3000,
                   help="perf_analyzer --measurement-interval (time windows)")
    p.add_argument("--stability", type=int, default=30, help="perf_analyzer -s (percent)")
    p.add_argument("--max-trials", type=int, default=8)
    p.add_argument("--run-timeout", type=float, default=300, help="seconds per perf_analyzer run")
    p.add_argument("--output-dir", default=str(REPO_ROOT / "out" / "perf"))
    args = p.parse_args(argv)

    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    protocols = [x.strip() for x in args.protocols.split(",") if x.strip()]
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    binary, pa_env = ensure_perf_analyzer()
    print(f">> perf_analyzer: {binary}", flush=True)

    server = None
    if args.http_url:
        http_url = args.http_url if "://" in args.http_url else "http://" + args.http_url
        grpc_url = args.grpc_url
        if "grpc" in protocols and not grpc_url:
            raise SystemExit("--grpc-url is needed with --http-url when measuring gRPC")
    else:
        from ditserve.server import TritonServer

        dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
        models = [m for m in (args.models or "").split(",") if m] or None
        server = TritonServer(args.model_repository, http_port=0, grpc_port=0, metrics_port=0,
                              host="127.0.0.1", models=models, model_path=args.model_path,
                              device=args.device, dtype=dtype,
                              log_file=out_dir / "tritonserver.log")
        print(f">> starting tritonserver over {args.model_repository} "
              f"(model path {args.model_path}, {args.device}, {dtype}); log {server.log_file}",
              flush=True)
        t0 = time.monotonic()
        server.start()
        print(f">> server ready in {time.monotonic() - t0:.1f}s: {server.http_url} "
              f"grpc {server.grpc_url}", flush=True)
        http_url, grpc_url = server.http_url, server.grpc_url

    try:
        config = model_config(http_url, args.model)
        values = request_values(args, config)
        data, notes = build_input_data(config, values)
        input_json = out_dir / f"{args.model}_input.json"
        input_json.write_text(json.dumps(data, indent=2))
        print(f">> input data {input_json} (from the server's {args.model} config):", flush=True)
        for n in notes:
            print(f"     {n}")
        first = warmup(http_url, args.model, data, config)
        print(f">> warm-up request: {first * 1000:.0f} ms", flush=True)

        results = []
        for protocol in protocols:
            url = (grpc_url if protocol == "grpc" else http_url.split("://", 1)[1])
            for c in concurrencies:
                results.append(run_perf_analyzer(
                    binary, pa_env, model=args.model, url=url, protocol=protocol,
                    concurrency=c, input_json=input_json,
                    csv_path=out_dir / f"{args.model}_{protocol}_c{c}.csv", args=args))
    finally:
        if server is not None:
            server.stop()

    table = format_table(results)
    header = (f"perf_analyzer, model {args.model}, {args.height}x{args.width}, "
              f"{args.steps} steps, model path {args.model_path}, device {args.device}")
    print()
    print(header)
    print(table)
    (out_dir / "results.json").write_text(json.dumps(
        {"settings": vars(args), "results": results}, indent=2))
    (out_dir / "results.md").write_text(header + "\n\n" + table + "\n")
    print(f"\n(saved to {out_dir}/results.json and results.md)")
    failed = [r for r in results if r.get("failed")]
    if failed:
        print(f"{len(failed)} measurement(s) did not stabilise", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
