"""``ditserve`` command line.

Subcommands are registered from a table: each entry is a module exposing
``register(subparsers)``, which adds its own parser and sets ``func`` (a callable taking the
parsed ``argparse.Namespace`` and returning an exit code). Modules listed in
``OPTIONAL_SUBCOMMAND_MODULES`` are used when they exist (e.g. ``ditserve.client.cli``
provides ``generate``), so a new subcommand needs no change here beyond, at most, one entry.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import types
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["main", "build_parser", "register_serve", "SUBCOMMANDS", "OPTIONAL_SUBCOMMAND_MODULES"]


# ----------------------------------------------------------------------------- serve


def _default_device() -> str:
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _default_dtype(device: str) -> str:
    return "bfloat16" if device == "cuda" else "float32"


def _split_models(value: str | None) -> list[str] | None:
    if not value:
        return None
    models = [m.strip() for m in value.split(",") if m.strip()]
    return models or None


class _Shutdown(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _repository(path: str | None, settings: Sequence[str], workdir: str) -> str:
    """The repository to serve: ``path`` or the checkout's, copied with the --set ``settings`` applied into
    ``workdir`` (a folder the caller removes)."""
    if path is None:
        from ditserve.paths import model_repository

        path = str(model_repository())
    if settings:
        from ditserve.repository import overlay

        path = str(overlay(Path(path), settings, Path(workdir) / "model_repository"))
    return path


#: The option of each port, for the errors that name it.
PORT_OPTIONS = {"http_port": "--http-port", "grpc_port": "--grpc-port", "metrics_port": "--metrics-port"}


def _serve(args: argparse.Namespace) -> int:
    import tempfile

    # The --set copy of the repository lives there, removed however serve ends.
    with tempfile.TemporaryDirectory(prefix="ditserve-repo-") as workdir:
        return _serve_repository(args, workdir)


def _serve_repository(args: argparse.Namespace, workdir: str) -> int:
    from ditserve.server import TritonServer, TritonServerError

    device = args.device or _default_device()
    dtype = args.dtype or _default_dtype(device)
    try:
        args.model_repository = _repository(args.model_repository, args.set, workdir)
    except (FileNotFoundError, ValueError) as exc:  # installed without a checkout (pip install .), a bad --set
        print(f"ditserve: {exc}", file=sys.stderr, flush=True)
        return 2

    def _on_signal(signum, _frame):
        # Later signals are ignored: stopping has its own timeouts and ends in SIGKILL.
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        raise _Shutdown(signum)

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    server = TritonServer(
        args.model_repository,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        host=args.host,
        models=_split_models(args.models),
        model_path=args.model_path,
        device=device,
        dtype=dtype,
        gpus=args.gpus,
        log_file=args.log_file,
        log_verbose=args.log_verbose,
        startup_timeout=args.startup_timeout,
    )
    rc = 0
    try:
        # A port another server holds would otherwise pass for ours: its /v2/health/ready answers.
        server.check_ports(PORT_OPTIONS)
        print(f"ditserve: starting tritonserver (repository {server.model_repository}, "
              f"device {device}, dtype {dtype}, model path {args.model_path}); "
              f"log: {server.log_file}", flush=True)
        server.start()
        print(
            "ditserve: ready\n"
            f"  HTTP    {server.http_url}\n"
            f"  gRPC    {server.grpc_url}\n"
            f"  metrics {server.metrics_url}",
            flush=True,
        )
        code = server.wait()
        print(f"ditserve: tritonserver exited by itself with code {code}; last log lines:\n"
              f"{server.log_tail()}", file=sys.stderr, flush=True)
        rc = 1
    except _Shutdown as sig:
        print(f"ditserve: {sig}, stopping tritonserver", flush=True)
    except TritonServerError as err:
        print(f"ditserve: {err}", file=sys.stderr, flush=True)
        rc = 1
    finally:
        # A second signal while stopping must not interrupt the cleanup.
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        try:
            server.stop()
        except TritonServerError as err:
            print(f"ditserve: {err}", file=sys.stderr, flush=True)
            rc = 1
        for s, handler in previous.items():
            signal.signal(s, handler)
    print("ditserve: stopped", flush=True)
    return rc


def register_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run tritonserver over the ditserve model repository",
        description="Start a real Triton Inference Server over the model repository and keep it "
                    "running until SIGINT/SIGTERM.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model-repository", default=None,
                   help="Triton model repository (default: <repo>/model_repository)")
    p.add_argument("--set", action="append", default=[], metavar="MODEL.PARAM=VALUE",
                   help="set a model parameter in a copy of the repository, e.g. flux_denoiser.sp_degree=2 "
                        "(repeatable)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (0: pick a free one)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (0: pick a free one)")
    p.add_argument("--metrics-port", type=int, default=8002, help="metrics port (0: pick a free one)")
    p.add_argument("--host", default="0.0.0.0", help="address the server binds to")
    p.add_argument("--model-path", default=os.environ.get("DITSERVE_MODEL_PATH", "tiny"),
                   help="checkpoint passed to the models as DITSERVE_MODEL_PATH "
                        "('tiny' = small random-weight model)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="DITSERVE_DEVICE (default: cuda if torch sees a GPU, else cpu)")
    p.add_argument("--gpus", default=None, help="CUDA_VISIBLE_DEVICES for the server, e.g. 0,1")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="DITSERVE_DTYPE (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--models", default=None,
                   help="comma-separated models to load (explicit model control); default: all")
    p.add_argument("--log-file", default=None, help="tritonserver log file (default: a temp file, removed after a clean stop)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    p.add_argument("--startup-timeout", type=float, default=600.0,
                   help="seconds to wait for /v2/health/ready")
    p.set_defaults(func=_serve)


# ----------------------------------------------------------------------------- table

# Built-in subcommands: name -> register function.
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "serve": register_serve,
}

# Modules with a ``register(subparsers)`` function, used when present.
OPTIONAL_SUBCOMMAND_MODULES: tuple[str, ...] = (
    "ditserve.client.cli",
)


def _optional_module(name: str) -> types.ModuleType | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        # Only "this module does not exist (yet)" is optional; a broken import inside it is not.
        if err.name is not None and (name == err.name or name.startswith(err.name + ".")):
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ditserve",
        description="Diffusion-transformer image generation on NVIDIA Triton Inference Server",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for register in SUBCOMMANDS.values():
        register(subparsers)
    for modname in OPTIONAL_SUBCOMMAND_MODULES:
        module = _optional_module(modname)
        if module is not None and hasattr(module, "register"):
            module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
