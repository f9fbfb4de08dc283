"""Python client for ditserve's ensembles over Triton HTTP or gRPC, sync (``Client``) and
asyncio (``AsyncClient``).

Requests use OpenAI-style field names (``n``, ``size``, ``seed``, ...), mapped to ensemble
tensors and checked by ``ditserve.client.pipelines.PIPELINES`` before anything is sent. The
two classes share everything but the awaits.

With ``progress=callback`` a request goes over gRPC streaming to the ensemble's stream model
(``<ensemble>_stream``, ``ditserve.streaming``), which answers the same outputs after one
``Progress`` per denoising step. Triton's HTTP endpoint serves no streaming (decoupled) models.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import io
import queue
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from typing import Any

import numpy as np
from PIL import Image
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from ditserve.client.pipelines import PIPELINES, Pipeline, Tensor
from ditserve.stage import RequestError
from ditserve.streaming import STEP, TOTAL_STEPS, stream_model


class ModelNotLoaded(LookupError):
    def __init__(self, model: str, url: str):
        super().__init__(f"model {model} is not loaded on the server at {url}")
        self.model = model


class TritonUnavailable(ConnectionError):
    """The Triton server could not be reached."""


class TritonTimeout(TimeoutError):
    """A request got no answer within the client's timeout: a long request (a video), not an unreachable
    server; the server may still be working on it."""

    def __init__(self, url: str, timeout_s: float):
        super().__init__(f"Triton server at {url} did not answer within {timeout_s:g} s, the client's timeout")
        self.timeout_s = timeout_s


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    png: list[bytes]
    pixels: np.ndarray  # (n, H, W, 3) uint8
    latency_s: float
    # Server compute time per stage model during this request (from Triton's statistics;
    # exact only when no other request ran at the same time). Empty with stage_timings=False.
    stage_ms: dict[str, float]

    @property
    def images(self) -> list[Image.Image]:
        return [Image.open(io.BytesIO(data)) for data in self.png]


@dataclasses.dataclass(frozen=True)
class VideoResult:
    mp4: bytes
    frames: np.ndarray | None  # (frames, H, W, 3) uint8; None when not requested
    latency_s: float
    stage_ms: dict[str, float]


Result = GenerateResult | VideoResult


@dataclasses.dataclass(frozen=True)
class Progress:
    step: int  # denoising steps done
    total: int  # the request's denoising steps


OnProgress = Callable[[Progress], None]

# A checked request, ready to send: (pipeline, model, inputs, requested outputs).
Request = tuple[Pipeline, str, list, list]


@contextlib.contextmanager
def _reachable(url: str, timeout_s: float) -> Iterator[None]:
    """Connection failures of either protocol, sync or async, as one TritonUnavailable; a request
    past ``timeout_s`` as TritonTimeout."""
    try:
        yield
    except TimeoutError as error:  # HTTP (socket's and asyncio's timeouts); an OSError, so caught first
        raise TritonTimeout(url, timeout_s) from error
    except OSError as error:  # HTTP: refused / reset / DNS (aiohttp's errors are OSErrors too)
        raise TritonUnavailable(f"Triton server at {url} is unreachable: {error}") from error
    except InferenceServerException as error:
        if error.status() == "StatusCode.DEADLINE_EXCEEDED":
            raise TritonTimeout(url, timeout_s) from error
        if error.status() == "StatusCode.UNAVAILABLE":
            raise TritonUnavailable(f"Triton server at {url} is unreachable: {error.message()}") from error
        raise


class _Base:
    def __init__(self, url: str, protocol: str, asyncio: bool, timeout_s: float, stage_timings: bool):
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol: must be http or grpc, got {protocol!r}")
        self.url = url
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.stage_timings = stage_timings
        self._checked_models: set[str] = set()  # models whose inputs were found to fit their requests (_check_takes)
        # InferInput/InferRequestedOutput live in the sync modules; the aio ones reuse them.
        self.triton = importlib.import_module(f"tritonclient.{protocol}")
        client_module = importlib.import_module(f"tritonclient.{protocol}.aio") if asyncio else self.triton
        if protocol == "http":
            timeouts = {"conn_timeout": timeout_s} if asyncio else {"network_timeout": timeout_s, "connection_timeout": timeout_s}
            self.server = client_module.InferenceServerClient(url, **timeouts)
            self._bounded: dict[str, Any] = {}  # the connection's timeouts bound every call
            self._json: dict[str, Any] = {}  # HTTP answers JSON already
        else:
            self.server = client_module.InferenceServerClient(url)
            # Each gRPC call carries its deadline: without one, a server that stopped answering (stuck in a
            # model load) would hang even the readiness check before the request.
            self._bounded = {"client_timeout": timeout_s}
            self._json = {**self._bounded, "as_json": True}

    def _request(self, kind: str, model: str | None, outputs: tuple[str, ...] | None, fields: Mapping[str, Any]) -> Request:
        pipeline = PIPELINES[kind]
        outputs = outputs or pipeline.outputs
        if not set(outputs) <= set(pipeline.outputs):
            raise ValueError(f"outputs: {kind} has {', '.join(pipeline.outputs)}, got {', '.join(outputs)}")
        inputs = [self._input(name, tensor) for name, tensor in pipeline.tensors(fields).items()]
        requested = [self.triton.InferRequestedOutput(name) for name in outputs]
        return pipeline, model or pipeline.model_for(fields), inputs, requested

    def _input(self, name: str, tensor: Tensor):
        datatype, values = tensor
        array = np.array([values], dtype=triton_to_np_dtype(datatype))  # batch of one request
        item = self.triton.InferInput(name, list(array.shape), datatype)
        item.set_data_from_numpy(array)
        return item


def _check_takes(config: dict, model: str, pipeline: Pipeline, inputs: list) -> None:
    """RequestError naming ``model`` unless it declares every input the request sends: a stage model or another
    pipeline's ensemble would answer only Triton's "unexpected inference input"."""
    config = config.get("config", config)  # gRPC wraps the configuration, HTTP does not
    declared = {tensor["name"] for tensor in config.get("input", [])}
    unknown = [item.name() for item in inputs if item.name() not in declared]
    if unknown:
        raise RequestError("model", f"{model} takes no {', '.join(unknown)}: it is not a pipeline for this request "
                                    f"(such as {pipeline.model})")


def _stage_models(config: dict, model: str) -> list[str]:
    config = config.get("config", config)  # gRPC wraps the configuration, HTTP does not
    steps = config.get("ensemble_scheduling", {}).get("step", [])
    return [step["model_name"] for step in steps] or [model]


def _compute_ns(stats: dict) -> int:
    return sum(int(m["inference_stats"].get("compute_infer", {}).get("ns", 0)) for m in stats["model_stats"])


def _result(pipeline: Pipeline, response, latency_s: float, stage_ms: dict[str, float]) -> Result:
    if "VIDEO" in pipeline.outputs:
        frames = response.as_numpy("FRAMES")  # None when not requested
        return VideoResult(mp4=bytes(response.as_numpy("VIDEO")[0][0]), frames=None if frames is None else frames[0],
                           latency_s=latency_s, stage_ms=stage_ms)
    return GenerateResult(
        png=list(response.as_numpy("PNG")[0]),
        pixels=response.as_numpy("IMAGE")[0],
        latency_s=latency_s,
        stage_ms=stage_ms,
    )


# The request logic is written once as a generator that yields the server calls it needs, as
# (method name, args, kwargs), and gets their answers back; Client runs the calls directly,
# AsyncClient awaits them. A name starting with "_" is a method of the client itself.
Call = tuple[str, tuple, dict]
Steps = Generator[Call, Any, Any]


def _callee(client: _Base, name: str) -> Callable:
    return getattr(client if name.startswith("_") else client.server, name)


def _streamed(result, error, progress: OnProgress):
    """One answer of a stream: reports a progress answer and returns None; returns the final one."""
    if error is not None:
        raise error
    step = result.as_numpy(STEP)
    if step is None:  # the ensemble's outputs
        return result
    progress(Progress(int(step[0][0]), int(result.as_numpy(TOTAL_STEPS)[0][0])))  # row 0: one row per request
    return None


class _Requests(_Base):
    def _run(self, request: Request, progress: OnProgress | None) -> Steps:
        pipeline, model, inputs, outputs = request
        target = model
        if progress is not None:
            if self.protocol != "grpc":
                raise ValueError("progress: per-step progress streams over gRPC; Triton's HTTP endpoint serves no "
                                 "streaming (decoupled) models")
            target = stream_model(model)
        if not (yield from self._is_ready(target)):
            raise ModelNotLoaded(target, self.url)
        # The configuration once a model (it does not change while loaded), or each request for stage timings.
        config = None
        if self.stage_timings or model not in self._checked_models:
            config = yield "get_model_config", (model,), self._json
            _check_takes(config, model, pipeline, inputs)
            self._checked_models.add(model)
        stages = _stage_models(config, model) if self.stage_timings else []

        def compute_ns() -> Steps:
            totals = {}
            for m in stages:
                totals[m] = _compute_ns((yield "get_inference_statistics", (m,), self._json))
            return totals

        before = yield from compute_ns()
        start = time.perf_counter()
        if progress is None:
            response = yield "infer", (model, inputs), {"outputs": outputs, **self._bounded}
        else:  # one of the client's own methods: streaming differs between the sync and asyncio clients
            step_outputs = [self.triton.InferRequestedOutput(name) for name in (STEP, TOTAL_STEPS)]
            response = yield "_stream_infer", (target, inputs, outputs + step_outputs, progress), {}
        latency = time.perf_counter() - start
        after = yield from compute_ns()
        return _result(pipeline, response, latency, {m: (after[m] - before[m]) / 1e6 for m in stages})

    def _loaded_ensembles(self) -> Steps:
        index = yield "get_model_repository_index", (), self._json
        # HTTP answers a list, gRPC (as JSON) {"models": [...]}.
        models = index if isinstance(index, list) else index.get("models", [])
        ready = sorted({m["name"] for m in models if m.get("state") == "READY"})
        ensembles = []
        for model in ready:
            config = yield "get_model_config", (model,), self._json
            if config.get("config", config).get("platform") == "ensemble":
                ensembles.append(model)
        return ensembles

    def _is_ready(self, model: str) -> Steps:
        return (yield "is_model_ready", (model,), self._bounded)

    def _streams(self, model: str) -> Steps:
        return self.protocol == "grpc" and (yield from self._is_ready(stream_model(model)))


class Client(_Requests):
    """Synchronous client; one per thread (tritonclient's HTTP client is not thread-safe)."""

    def __init__(self, url: str, protocol: str = "http", timeout_s: float = 600.0, stage_timings: bool = True):
        super().__init__(url, protocol, asyncio=False, timeout_s=timeout_s, stage_timings=stage_timings)

    def _drive(self, steps: Steps) -> Any:
        with _reachable(self.url, self.timeout_s):
            try:
                name, args, kwargs = next(steps)
                while True:
                    name, args, kwargs = steps.send(_callee(self, name)(*args, **kwargs))
            except StopIteration as done:
                return done.value

    def _stream_infer(self, model: str, inputs: list, outputs: list, progress: OnProgress):
        answers: queue.Queue = queue.Queue()
        self.server.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=self.timeout_s)
        try:
            self.server.async_stream_infer(model, inputs, outputs=outputs)
            while (final := _streamed(*answers.get(), progress)) is None:
                pass
            return final
        finally:
            self.server.stop_stream()

    def generate(self, prompt: str, negative_prompt: str | None = None, *, model: str | None = None, **fields) -> GenerateResult:
        """Text to images: ``generate("a cat", n=2, size="512x512", seed=3)``."""
        return self.run("generate", model, prompt=prompt, negative_prompt=negative_prompt, **fields)

    def edit(self, prompt: str, image: list[bytes], *, model: str | None = None, **fields) -> GenerateResult:
        return self.run("edit", model, prompt=prompt, image=image, **fields)

    def video(self, prompt: str, *, model: str | None = None, frames: bool = True, **fields) -> VideoResult:
        """Text to video: ``video("a kite", size="832x480", num_frames=81, fps=16)``; with
        ``image=[png_bytes]`` image to video (wan_i2v); ``frames=False`` leaves the decoded frames on
        the server (only the MP4 comes back)."""
        return self.run("video", model, outputs=None if frames else ("VIDEO",), prompt=prompt, **fields)

    def run(self, kind: str, model: str | None = None, *, outputs: tuple[str, ...] | None = None,
            progress: OnProgress | None = None, **fields) -> Result:
        """One request of a kind in PIPELINES ("generate", "edit", "video"); ``outputs``: a subset
        of the row's outputs (default: all); ``progress``: called with a ``Progress`` after each
        denoising step (gRPC only; the ensemble's stream model must be loaded: ``streams``)."""
        return self._drive(self._run(self._request(kind, model, outputs, fields), progress))

    def streams(self, model: str) -> bool:
        """Whether requests to ensemble ``model`` can report progress: gRPC, and its stream model is loaded."""
        return self._drive(self._streams(model))

    def loaded_ensembles(self) -> list[str]:
        """Names of the ensembles the server has loaded and ready (what can be generated with)."""
        return self._drive(self._loaded_ensembles())

    def close(self) -> None:
        self.server.close()


class AsyncClient(_Requests):
    """asyncio client (tritonclient's ``http.aio`` / ``grpc.aio``); one can serve many tasks."""

    def __init__(self, url: str, protocol: str = "grpc", timeout_s: float = 600.0, stage_timings: bool = False):
        super().__init__(url, protocol, asyncio=True, timeout_s=timeout_s, stage_timings=stage_timings)

    async def _drive(self, steps: Steps) -> Any:
        with _reachable(self.url, self.timeout_s):
            try:
                name, args, kwargs = next(steps)
                while True:
                    name, args, kwargs = steps.send(await _callee(self, name)(*args, **kwargs))
            except StopIteration as done:
                return done.value

    async def _stream_infer(self, model: str, inputs: list, outputs: list, progress: OnProgress):
        import grpc  # with the gRPC protocol only

        async def one_request():
            yield {"model_name": model, "inputs": inputs, "outputs": outputs}

        answers = self.server.stream_infer(one_request(), stream_timeout=self.timeout_s)
        try:
            async for result, error in answers:
                if (final := _streamed(result, error, progress)) is not None:
                    return final
        except grpc.RpcError as error:  # the sync client's stream and the aio unary calls convert these; its stream does not
            raise InferenceServerException(msg=error.details(), status=str(error.code())) from error
        finally:
            answers.cancel()  # the request has ended (or failed): close the stream now
        raise InferenceServerException(msg=f"{model}: the stream ended without a final response")

    async def generate(self, prompt: str, negative_prompt: str | None = None, *, model: str | None = None, **fields) -> GenerateResult:
        return await self.run("generate", model, prompt=prompt, negative_prompt=negative_prompt, **fields)

    async def edit(self, prompt: str, image: list[bytes], *, model: str | None = None, **fields) -> GenerateResult:
        return await self.run("edit", model, prompt=prompt, image=image, **fields)

    async def video(self, prompt: str, *, model: str | None = None, frames: bool = True, **fields) -> VideoResult:
        return await self.run("video", model, outputs=None if frames else ("VIDEO",), prompt=prompt, **fields)

    async def run(self, kind: str, model: str | None = None, *, outputs: tuple[str, ...] | None = None,
                  progress: OnProgress | None = None, **fields) -> Result:
        # In a thread: checking an input image decodes it (up to 4096x4096), which would stall the loop.
        request = await asyncio.to_thread(self._request, kind, model, outputs, fields)
        return await self._drive(self._run(request, progress))

    async def streams(self, model: str) -> bool:
        return await self._drive(self._streams(model))

    async def loaded_ensembles(self) -> list[str]:
        return await self._drive(self._loaded_ensembles())

    async def is_model_ready(self, model: str) -> bool:
        return await self._drive(self._is_ready(model))

    async def close(self) -> None:
        await self.server.close()
