"""`make demo`: start Triton on the built-in tiny model, generate one image, stop."""

from __future__ import annotations

import argparse
from pathlib import Path

from ditserve.client import Client
from ditserve.server import TritonServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", type=Path, default=Path("out"))
    parser.add_argument("--prompt", default="a lighthouse on a cliff at dusk, oil painting")
    parser.add_argument("--size", default="256x256", help="WxH, multiples of 16")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--protocol", choices=("http", "grpc"), default="grpc")
    parser.add_argument("--model-path", default="tiny")
    args = parser.parse_args()

    print(f"starting tritonserver with model {args.model_path!r} on CPU ...", flush=True)
    with TritonServer(http_port=0, grpc_port=0, metrics_port=0, host="127.0.0.1",
                      models=["flux_t2i"], model_path=args.model_path, device="cpu", dtype="float32") as server:
        url = server.grpc_url if args.protocol == "grpc" else server.http_url.removeprefix("http://")
        client = Client(url, protocol=args.protocol)
        result = client.generate(args.prompt, size=args.size, num_inference_steps=args.steps, seed=args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for i, png in enumerate(result.png):
        path = args.output_dir / f"flux_t2i_{i}.png"
        path.write_bytes(png)
        image = result.images[i]
        print(f"wrote {path} ({image.width}x{image.height})")
    print(f"end-to-end latency {result.latency_s * 1000:.0f} ms over {args.protocol}; server compute per stage:")
    for model, ms in result.stage_ms.items():
        print(f"  {model:<20} {ms:8.1f} ms")


if __name__ == "__main__":
    main()
