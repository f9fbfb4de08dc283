"""``<pipeline>_stream``: an ensemble's steps run through BLS by a decoupled model that streams the
denoiser's per-step progress, then the ensemble's outputs.

Why a model beside the ensemble and not a decoupled ensemble or denoiser: Triton sends an ensemble's
response only once every requested output exists for the same response of a step, so it cannot
interleave progress with the final images; and a decoupled denoiser would make Triton treat the
plain ensemble as decoupled, which its HTTP endpoint and gRPC ModelInfer refuse. So the plain
ensembles stay as they are, the denoisers stay one-response models (the same model and weights
serve both paths; their requests are batched together), and the denoiser reports progress to this
model over a Unix socket named in the request parameter ``progress`` (``ditserve.progress``), which
this model gives every step's request; the stages that do not report ignore it.

A stream model is named ``<ensemble>_stream``; its config.pbtxt declares the ensemble's inputs and
batch size, and its outputs plus ``STEP`` and ``TOTAL_STEPS``; the model checks this at load. The steps and their tensor maps are read from the ensemble's config.pbtxt in the same model
repository, so the stream runs exactly what the ensemble runs, one step after the other in the
ensemble's order. A new pipeline gets streaming by declaring its stream model: that config.pbtxt and
a two-line model.py.

Responses to one request: when ``STEP`` is requested (by default every output is), one response per
denoising step with ``STEP`` and ``TOTAL_STEPS`` (per row of the request: steps done and total, 0 for
a row whose denoising has not started yet); then one final response with the requested ensemble
outputs, or one error, the failing stage's own message (e.g. ``WIDTH: must be a multiple of 16``) and
code (INVALID_ARG for bad input, INTERNAL otherwise; gRPC's stream carries only the message).

Cancellation (the client cancels its gRPC stream: tritonclient's ``stop_stream(cancel_requests=True)``,
an asyncio stream call's ``cancel()``): before it starts each step, the model asks Triton whether the
request was cancelled (the response sender's ``is_cancelled()``, in 2.51's Python backend); once it was,
no further step starts and the request ends with one final error response, code CANCELLED (a cancelled
stream no longer delivers it, but the request gets its final flag). Checked through Triton: cancelled
after its first step, a request's VAE decoder and postprocess never run.

What a cancel does not stop: the step already running, in practice the denoiser, whose batch runs to
its end (its progress lines are still read, their responses dropped by Triton). A cancelled row is
not dropped from the running batch, because the other rows would not stay bit-identical and no one
place could do it: every later transformer call would run at another batch size (GEMM and attention
kernels, and their reductions, are chosen by shape: a row's values are not batch-invariant), a CUDA
graph captured for the old size could not be replayed, the rows' latents, guidance and scheduler
state live in each pipeline's own loop, and the workers of a sequence-parallel group run the batch in
lockstep, so rank 0, the only rank that hears the progress socket, would have to broadcast each drop.
Nor can the denoiser tell a cancel from the socket: it drops a listener that is slow as well as one
that is gone (its writes never block).

Only the standard library and numpy at import time: each Python-backend model is its own process,
and this one must not pay for torch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import traceback
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ditserve import progress
from ditserve.model_config import ConfigError, check_parameter_names, config_parameters, read_config

STEP, TOTAL_STEPS = "STEP", "TOTAL_STEPS"
PROGRESS_OUTPUTS = (
    {"name": STEP, "data_type": "TYPE_INT32", "dims": [1]},
    {"name": TOTAL_STEPS, "data_type": "TYPE_INT32", "dims": [1]},
)


def stream_model(ensemble: str) -> str:
    """The name of an ensemble's stream model."""
    return f"{ensemble}_stream"


@dataclasses.dataclass(frozen=True)
class Step:
    model: str
    inputs: Mapping[str, str]  # the model's input -> the ensemble tensor it reads
    outputs: Mapping[str, str]  # the model's output -> the ensemble tensor it writes


class Cancelled(Exception):
    """The request was cancelled before ``stage`` started; no later step ran."""

    def __init__(self, stage: str):
        super().__init__(f"cancelled before step {stage}")


class StageFailed(Exception):
    """A step answered with an error: its message and code (a ``TritonError`` code) are the request's answer."""

    def __init__(self, message: str, code: Any):
        super().__init__(message)
        self.code = code


# (step, its inputs by the model's names, the progress parameter or None) -> its outputs by the model's names
Infer = Callable[[Step, dict[str, Any], Optional[str]], Awaitable[dict[str, Any]]]


def _signature(tensors: list[dict[str, Any]]) -> list[tuple]:
    # Triton's JSON has dims as numbers, protobuf's text-to-dict as strings; optional may be absent.
    return [(t["name"], t["data_type"], tuple(int(d) for d in t.get("dims", [])), bool(t.get("optional", False)))
            for t in tensors]


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    ensemble: str
    steps: tuple[Step, ...]
    inputs: list[dict[str, Any]]  # the ensemble's, as its config declares them
    outputs: list[dict[str, Any]]
    max_batch_size: int

    @classmethod
    def read(cls, repository: str | Path, ensemble: str) -> StreamPlan:
        config = read_config(repository, ensemble)
        if config.get("platform") != "ensemble":
            raise ConfigError(f"parameter ensemble: {ensemble} is not an ensemble")
        steps = tuple(Step(step["model_name"], step.get("input_map", {}), step.get("output_map", {}))
                      for step in config["ensemble_scheduling"]["step"])
        return cls(ensemble, steps, config.get("input", []), config.get("output", []),
                   int(config.get("max_batch_size", 0)))

    def check(self, stream_config: dict[str, Any]) -> None:
        """The stream model's config must declare the ensemble's inputs, outputs plus STEP and TOTAL_STEPS,
        and batch size, and be decoupled."""
        name = stream_config.get("name")
        if not stream_config.get("model_transaction_policy", {}).get("decoupled"):
            raise ConfigError(f"{name}: must be decoupled (model_transaction_policy {{ decoupled: true }})")
        for kind, expected in (("input", self.inputs), ("output", [*self.outputs, *PROGRESS_OUTPUTS])):
            declared = _signature(stream_config.get(kind, []))
            if sorted(declared) != sorted(_signature(expected)):
                raise ConfigError(f"{name}: config.pbtxt {kind}s {sorted(declared)} must be {sorted(_signature(expected))} "
                                  f"(ensemble {self.ensemble}'s{' and STEP, TOTAL_STEPS' if kind == 'output' else ''})")
        if int(stream_config.get("max_batch_size", 0)) != self.max_batch_size:
            raise ConfigError(f"{name}: max_batch_size must be ensemble {self.ensemble}'s {self.max_batch_size}")

    async def run(self, tensors: Mapping[str, Any], infer: Infer, on_step: Optional[progress.OnStep],
                  cancelled: Callable[[], bool] = lambda: False) -> dict[str, Any]:
        """The ensemble's outputs for one request's input tensors; ``on_step`` (if any) hears the
        denoiser's steps, all of them before this returns. ``cancelled()`` is asked before each step
        starts. Raises StageFailed, or Cancelled once ``cancelled()`` is true."""
        if on_step is None:
            return await self._run(tensors, infer, None, cancelled)
        async with progress.Listener(on_step) as listener:
            return await self._run(tensors, infer, listener.name, cancelled)

    async def _run(self, tensors: Mapping[str, Any], infer: Infer, listener: Optional[str],
                   cancelled: Callable[[], bool]) -> dict[str, Any]:
        available = dict(tensors)
        for step in self.steps:
            if cancelled():
                raise Cancelled(step.model)
            inputs = {name: available[tensor] for name, tensor in step.inputs.items() if tensor in available}
            outputs = await infer(step, inputs, listener)
            available.update({tensor: outputs[name] for name, tensor in step.outputs.items() if name in outputs})
        return {t["name"]: available[t["name"]] for t in self.outputs if t["name"] in available}


class TritonStreamModel:
    """The Triton Python-backend model; a stream model's ``model.py`` is::

        from ditserve.streaming import TritonStreamModel
        TritonPythonModel = TritonStreamModel
    """

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils  # exists only inside Triton's stub

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        self.name = args["model_name"]
        ensemble = self.name.removesuffix("_stream")
        if stream_model(ensemble) != self.name:
            raise ConfigError(f"{self.name}: a stream model is named <ensemble>_stream")
        # args["model_repository"] is this model's folder; the ensemble is its sibling.
        self.plan = StreamPlan.read(Path(args["model_repository"]).parent, ensemble)
        self.plan.check(config)
        check_parameter_names(self.name, config_parameters(config), ())  # it has none of its own
        self.inputs = [t["name"] for t in self.plan.inputs]
        self.outputs = [t["name"] for t in self.plan.outputs]

    async def execute(self, requests) -> None:
        # Decoupled and async: Triton hands over the next requests while these wait on their stages,
        # whose own dynamic batchers then batch them with each other and with the plain ensemble's.
        await asyncio.gather(*(self._stream(request) for request in requests))

    async def _stream(self, request) -> None:
        pb = self.pb
        sender = request.get_response_sender()
        try:
            tensors = {name: tensor for name in self.inputs
                       if (tensor := pb.get_input_tensor_by_name(request, name)) is not None}
            batch = next((tensor.shape()[0] for tensor in tensors.values()), 1)
            requested = set(request.requested_output_names())
            on_step = self._progress(sender, batch) if STEP in requested else None
            results = await self.plan.run(tensors, self._infer, on_step, sender.is_cancelled)
            response = pb.InferenceResponse(output_tensors=[
                _renamed(pb, results[name], name) for name in self.outputs if name in requested and name in results
            ])
        except Cancelled as cancel:
            response = pb.InferenceResponse(error=pb.TritonError(f"{self.name}: {cancel}", pb.TritonError.CANCELLED))
        except StageFailed as failure:
            # The stage's code too: bad input stays the client's error (INVALID_ARG), as from the ensemble.
            response = pb.InferenceResponse(error=pb.TritonError(str(failure), failure.code))
        except Exception as exc:  # noqa: BLE001 - the request must end; the server stays up
            traceback.print_exc()
            response = pb.InferenceResponse(error=pb.TritonError(f"{self.name}: internal error: {type(exc).__name__}: {exc}",
                                                                 pb.TritonError.INTERNAL))
        try:
            sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # noqa: BLE001 - e.g. a response the sender refuses: the final flag alone still ends the request
            traceback.print_exc()
            sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _progress(self, sender, batch: int) -> progress.OnStep:
        pb = self.pb
        done = np.zeros((batch, 1), np.int32)
        total = np.zeros((batch, 1), np.int32)

        def on_step(rows: list[int], step: int, steps: int) -> None:
            for row in rows:
                if row < batch:
                    done[row], total[row] = step, steps
            sender.send(pb.InferenceResponse(output_tensors=[pb.Tensor(STEP, done.copy()), pb.Tensor(TOTAL_STEPS, total.copy())]))

        return on_step

    async def _infer(self, step: Step, inputs: dict[str, Any], listener: Optional[str]) -> dict[str, Any]:
        pb = self.pb
        tensors = [_renamed(pb, tensor, name) for name, tensor in inputs.items()]
        request = pb.InferenceRequest(model_name=step.model, inputs=tensors, requested_output_names=list(step.outputs),
                                      parameters={progress.PARAMETER: listener} if listener else {})
        response = await request.async_exec()
        if response.has_error():
            raise StageFailed(response.error().message(), response.error().code())
        return {tensor.name(): tensor for tensor in response.output_tensors()}


def _renamed(pb, tensor, name: str):
    """``tensor`` under the name the next model reads it by (an ensemble renames tensors between steps)."""
    if tensor.name() == name:
        return tensor
    if tensor.is_cpu():  # strings are always on the CPU
        return pb.Tensor(name, tensor.as_numpy())
    return pb.Tensor.from_dlpack(name, tensor.to_dlpack())
