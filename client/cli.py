"""``ditserve generate | edit | video`` (one subcommand per row of ``PIPELINES``, options
generated from its fields, OpenAI names) and ``ditserve openai`` (the gateway).

While a request runs, stderr shows the denoising steps (``step 3/28``) when the server can stream
them: over gRPC, with the ensemble's stream model loaded (``ditserve.streaming``); otherwise an
elapsed-time spinner saying why there are no steps (``ditserve.client.terminal``).
Any failure ends with exit code 1 and one line on stderr saying why.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

# Standard library only: `ditserve serve` builds this parser too.
from ditserve.client.terminal import Spinner, StepBar
from ditserve.client.video_jobs import MAX_VIDEO_JOBS

DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
DEFAULT_TIMEOUT_S = 600.0  # the clients' own default


Number = TypeVar("Number", int, float)


def _positive(convert: Callable[[str], Number]) -> Callable[[str], Number]:
    """An argparse type: ``convert``'s value, refused unless finite and > 0 (a job limit of 0 would
    refuse every video; a timeout of 0 every request)."""

    def parse(text: str) -> Number:
        value = convert(text)  # a ValueError is argparse's "invalid int value" message
        if not (math.isfinite(value) and value > 0):
            limit = "an integer >= 1" if convert is int else "a finite number > 0"
            raise argparse.ArgumentTypeError(f"must be {limit}, got {text}")
        return value

    parse.__name__ = convert.__name__
    return parse


KINDS = {"generate": "text to images", "edit": "edit images", "video": "text to video (image to video with --image)"}


class _PipelineParser(argparse.ArgumentParser):
    """Gets its options from ``PIPELINES`` when it first parses: the table imports the serving
    code's limits (torch and diffusers, ~10 s on a busy machine), which `ditserve serve` and
    `ditserve --help` should not pay."""

    kind: str

    def parse_known_args(self, args=None, namespace=None):
        if not any(action.dest == "model" for action in self._actions):
            self._add_options()
        return super().parse_known_args(args, namespace)

    def _add_options(self) -> None:
        from ditserve.client.pipelines import PIPELINES, VALUE_TYPES, Images

        pipeline = PIPELINES[self.kind]
        for name, converter in pipeline.fields.items():
            option = "--" + name.replace("_", "-")
            if isinstance(converter, Images):
                self.add_argument(option, dest=name, action="append", metavar="PATH_OR_URL", help=converter.help)
            else:
                self.add_argument(option, dest=name, type=VALUE_TYPES.get(type(converter), str), help=converter.help)
        routes = "".join(f"; {model} with --{field}" for field, model in pipeline.routes.items())
        self.add_argument("--model", default=None, help=f"ensemble to call (default: {pipeline.model}{routes})")
        self.add_argument("--url", default=None, help=f"Triton server host:port (default: {DEFAULT_URLS})")
        self.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
        self.add_argument("--response-format", choices=("file", "b64_json"), default="file",
                          help="file: write to --output-dir; b64_json: print OpenAI-style JSON on stdout")
        self.add_argument("--output-dir", type=Path, default=Path("."))
        self.add_argument("--timeout", type=_positive(float), default=DEFAULT_TIMEOUT_S,
                          help="seconds to wait for the result")


def register(subparsers: argparse._SubParsersAction) -> None:
    for kind, summary in KINDS.items():
        p = subparsers.add_parser(kind, help=f"{summary} through a running Triton server",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        # The subparsers action makes plain ArgumentParsers; this one fills itself in lazily.
        p.__class__ = _PipelineParser
        p.kind = kind
        p.set_defaults(func=_run, kind=kind)

    p = subparsers.add_parser(
        "openai",
        help="OpenAI-compatible HTTP gateway (/v1/images/generations, /v1/images/edits, /v1/videos, /v1/models) "
             "in front of Triton",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--triton-url", default=None, help=f"Triton server host:port (default: {DEFAULT_URLS})")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--allow-image-urls", action="store_true",
                   help="let /v1/images/edits requests name the image by an http(s) URL, which the gateway then "
                        "downloads (any address it can reach: enable only for trusted callers)")
    p.add_argument("--triton-timeout", type=_positive(float), default=DEFAULT_TIMEOUT_S,
                   help="seconds to wait for one Triton request (a video takes longest); longer ones answer 504 "
                        "(a video job fails with code timeout)")
    p.add_argument("--max-video-jobs", type=_positive(int), default=MAX_VIDEO_JOBS,
                   help="video jobs kept in memory with their MP4; when full, a new job replaces the oldest "
                        "finished one, or is refused (429) while all are queued or running")
    p.set_defaults(func=_openai)


def _run(args: argparse.Namespace) -> int:
    # Imported here: `ditserve serve` builds this parser too and needs no client libraries.
    from tritonclient.utils import InferenceServerException

    from ditserve.client import PIPELINES, Client, ModelNotLoaded, RequestError, TritonTimeout, TritonUnavailable
    from ditserve.client.download import read_image
    from ditserve.streaming import stream_model

    pipeline = PIPELINES[args.kind]
    fields = {name: getattr(args, name) for name in pipeline.fields}
    url = args.url or DEFAULT_URLS[args.protocol]
    try:
        if fields.get("image"):
            fields["image"] = [read_image(source, "image") for source in fields["image"]]
        model = args.model or pipeline.model_for(fields)
        if args.response_format == "file":  # before the request, which a folder that cannot be made would waste
            args.output_dir.mkdir(parents=True, exist_ok=True)
        client = Client(url, protocol=args.protocol, timeout_s=args.timeout)
        label, note = f"ditserve {args.kind}", None
        if client.streams(model):
            display = StepBar(sys.stderr, label)
            options = {"progress": display.update}
        else:
            note = ("per-step progress needs --protocol grpc" if args.protocol == "http"
                    else f"no per-step progress: {stream_model(model)} is not loaded")
            display, options = Spinner(sys.stderr, label, note), {}
        with display:
            # Of a video only the MP4 is written: its decoded frames would be most of the transfer.
            result = client.run(args.kind, model, outputs=("VIDEO",) if args.kind == "video" else None,
                                **options, **fields)
    except ModelNotLoaded as error:
        return _fail(args.kind, f"not available: ensemble {error.model} is not loaded on the server at {url}")
    except InferenceServerException as error:  # the server refused the request
        return _fail(args.kind, error.message())
    except TritonTimeout as error:  # before OSError: a TimeoutError is one
        return _fail(args.kind, f"{error}; give a longer one with --timeout")
    except (RequestError, TritonUnavailable, OSError) as error:
        return _fail(args.kind, str(error))

    payloads, extension = ([result.mp4], "mp4") if args.kind == "video" else (result.png, "png")
    info = sys.stderr if args.response_format == "b64_json" else sys.stdout  # keep stdout pure JSON
    if args.response_format == "b64_json":
        data = [{"b64_json": base64.b64encode(p).decode()} for p in payloads]
        print(json.dumps({"created": int(time.time()), "data": data}))
    else:
        try:
            for i, payload in enumerate(payloads):
                path = args.output_dir / f"{model}_{i}.{extension}"
                path.write_bytes(payload)
                print(f"wrote {path}", file=info)
        except OSError as error:  # full disk, no permission, ...: its message names the file
            return _fail(args.kind, str(error))
    why = f" ({note})" if note else ""
    print(f"latency {result.latency_s * 1000:.0f} ms over {args.protocol}{why}; server compute per stage:", file=info)
    for model, ms in result.stage_ms.items():
        print(f"  {model:<20} {ms:8.1f} ms", file=info)
    return 0


def _fail(kind: str, reason: str) -> int:
    print(f"ditserve {kind}: {' '.join(reason.split())}", file=sys.stderr)
    return 1


def _openai(args: argparse.Namespace) -> int:
    from ditserve.client.gateway import serve

    return serve(args.triton_url or DEFAULT_URLS[args.protocol], args.protocol, args.host, args.port, args.api_key,
                 args.allow_image_urls, args.max_video_jobs, args.triton_timeout)
