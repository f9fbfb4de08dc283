"""The one Triton Python-backend adapter that every stage model uses.

A model's ``model.py`` is two lines::

    from ditserve.flux.denoiser import FluxDenoiser
    from ditserve.triton_model import triton_model
    TritonPythonModel = triton_model(FluxDenoiser)

At load the adapter checks that config.pbtxt declares exactly the stage's inputs and outputs,
refuses parameters that neither the stage's options, its runtime nor the Python backend read,
parses the parameters once into the stage's typed options, and builds the stage. At each
``execute`` it splits every request into rows (one per batch element), refuses a request whose
rows differ in one of the stage's ``uniform_fields``, hands all rows of all other requests to the
stage at once, and answers each request with its own outputs or its own error: a bad request never
fails the others batched with it; a ``StageFailure`` (an exception the stage caught for one batch of
its rows) fails only those rows' requests, and an exception out of the stage only the requests of that
call, while the model stays loaded. Bad input (a ``RequestError``) is answered as the client's error,
INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT); anything else as INTERNAL (HTTP 500, gRPC INTERNAL).
"""

from __future__ import annotations

import dataclasses
import json
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ditserve.model_config import ConfigError, check_parameter_names, config_parameters
from ditserve.stage import (RUNTIME_PARAMETERS, RequestError, RequestParameter, Runtime, Stage, StageFailure,
                            parse_options)


def check_io(stage_cls: type[Stage], config: dict[str, Any]) -> None:
    """config.pbtxt must name exactly the stage's inputs and outputs."""
    for kind, declared in (("input", stage_cls.inputs), ("output", stage_cls.outputs)):
        configured = {tensor["name"] for tensor in config.get(kind, [])}
        if configured != set(declared):
            raise ConfigError(
                f"{config.get('name')}: config.pbtxt {kind}s {sorted(configured)} do not match "
                f"{stage_cls.__name__}'s {sorted(declared)}"
            )


def check_uniform(fields: Sequence[str], inputs: dict[str, Any]) -> None:
    """RequestError when one request's rows (the first dimension of its ``inputs``) differ in one of
    ``fields`` (the stage's ``uniform_fields``): they would run, each at its own shape, and fail only
    once their outputs could not be stacked into the request's one tensor."""
    for name in fields:
        values = inputs.get(name)
        if values is None or len(values) < 2:
            continue
        first = values[0]
        for i, value in enumerate(values[1:], 1):
            same = torch.equal(value, first) if isinstance(value, torch.Tensor) else np.array_equal(value, first)
            if not same:
                raise RequestError(name, f"must be equal for every row of a request, got {_shown(first)} in row 0 and "
                                         f"{_shown(value)} in row {i}; send rows that differ as separate requests")


def _shown(value: Any) -> Any:
    flat = value.reshape(-1).tolist()
    return flat[0] if len(flat) == 1 else flat


def stack_rows(values: list[Any]) -> Any:
    """Stack one request's row outputs along a new batch dimension."""
    if isinstance(values[0], torch.Tensor):
        # contiguous() also after stack: stack keeps a channels-last layout (seen from the VAE's
        # convolutions on CPU), and Triton's DLPack import takes only C-order tensors.
        return torch.stack(values).contiguous()
    return np.stack(values)


def triton_model(stage_cls: type[Stage]) -> type:
    class TritonPythonModel:
        def initialize(self, args: dict[str, str]) -> None:
            import triton_python_backend_utils as pb_utils  # exists only inside Triton's stub

            self.pb = pb_utils
            config = json.loads(args["model_config"])
            self.name = args["model_name"]
            check_io(stage_cls, config)
            params = config_parameters(config)
            check_parameter_names(self.name, params,
                                  (*RUNTIME_PARAMETERS, *(field.name for field in dataclasses.fields(stage_cls.Options))))
            if args.get("model_instance_kind") == "GPU" and not params.get("device"):
                params["device"] = f"cuda:{args['model_instance_device_id']}"
            self.string_inputs = {t["name"] for t in config["input"] if t["data_type"] == "TYPE_STRING"}
            self.stage = stage_cls(Runtime.from_parameters(params), parse_options(stage_cls.Options, params))

        def _rows(self, requests) -> tuple[list[dict[str, Any]], list[int], dict[int, RequestError]]:
            """The rows of all requests and the index of each row's request; and the requests refused
            before any of their rows runs, by index."""
            rows: list[dict[str, Any]] = []
            owners: list[int] = []
            refused: dict[int, RequestError] = {}
            for index, request in enumerate(requests):
                inputs: dict[str, Any] = {}
                for name in stage_cls.inputs:
                    tensor = self.pb.get_input_tensor_by_name(request, name)
                    if tensor is None:
                        continue
                    if name in self.string_inputs:
                        inputs[name] = tensor.as_numpy()
                    else:
                        inputs[name] = torch.from_dlpack(tensor.to_dlpack())
                try:
                    check_uniform(stage_cls.uniform_fields, inputs)
                except RequestError as error:
                    refused[index] = error
                    continue
                batch = len(next(iter(inputs.values()))) if inputs else 1
                parameters = {}
                if stage_cls.request_parameters:
                    sent = json.loads(request.parameters())
                    parameters = {name: sent[name] for name in stage_cls.request_parameters if name in sent}
                for b in range(batch):
                    rows.append({name: value[b] for name, value in inputs.items()}
                                | {name: RequestParameter(value, b) for name, value in parameters.items()})
                    owners.append(index)
            return rows, owners, refused

        def _response(self, outputs: list[dict[str, Any]]):
            pb = self.pb
            tensors = []
            for name in stage_cls.outputs:
                values = [row[name] for row in outputs]
                shapes = [tuple(v.shape) for v in values]
                if (row := next((i for i, shape in enumerate(shapes) if shape != shapes[0]), None)) is not None:
                    raise RequestError(stage_cls.sources.get(name, name),
                                       f"the rows of one request must give {name} one shape, got {shapes[0]} in row 0 "
                                       f"and {shapes[row]} in row {row}; send them as separate requests")
                value = stack_rows(values)
                if isinstance(value, torch.Tensor) and not value.numel():
                    # Triton's DLPack import refuses empty tensors ("not contiguous"); numpy carries them.
                    tensors.append(pb.Tensor(name, value.cpu().numpy()))
                elif isinstance(value, torch.Tensor):
                    tensors.append(pb.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value)))
                else:
                    tensors.append(pb.Tensor(name, value))
            return pb.InferenceResponse(output_tensors=tensors)

        def execute(self, requests):
            pb = self.pb
            rows, owners, refused = self._rows(requests)
            try:
                results = self.stage.execute(rows)
            except Exception as exc:  # noqa: BLE001 - the server must stay up; every request gets an answer
                traceback.print_exc()
                failure = StageFailure(exc)
                return [self._refusal(refused[i]) if i in refused else self._internal(failure)
                        for i in range(len(requests))]
            per_request: list[list[Any]] = [[] for _ in requests]
            for owner, result in zip(owners, results):
                per_request[owner].append(result)
            responses = []
            for index, results_of_request in enumerate(per_request):
                if index in refused:
                    responses.append(self._refusal(refused[index]))
                    continue
                failures = [r for r in results_of_request if isinstance(r, StageFailure)]
                if failures:
                    responses.append(self._internal(failures[0]))
                    continue
                errors = [r for r in results_of_request if isinstance(r, RequestError)]
                try:
                    if errors:
                        raise errors[0]
                    responses.append(self._response(results_of_request))
                except RequestError as error:
                    responses.append(self._refusal(error))
            return responses

        def _internal(self, failure: StageFailure):
            """The answer to a stage's unexpected exception: INTERNAL (HTTP 500). A TritonError of its own per
            response: responses sharing one crashed tritonserver 2.51 (SIGSEGV in libtriton_python.so) once a
            failed batch held several requests (tests/test_server_lifecycle.py)."""
            return self.pb.InferenceResponse(error=self.pb.TritonError(f"{self.name}: internal error: {failure}",
                                                                       self.pb.TritonError.INTERNAL))

        def _refusal(self, error: RequestError):
            """The answer to bad input: the client's error, INVALID_ARG, which Triton sends as HTTP 400 and gRPC
            INVALID_ARGUMENT (a TritonError's code is INTERNAL, 500, unless given)."""
            return self.pb.InferenceResponse(error=self.pb.TritonError(str(error), self.pb.TritonError.INVALID_ARG))

        def finalize(self) -> None:
            self.stage.close()

    TritonPythonModel.__name__ = f"TritonPythonModel[{stage_cls.__name__}]"
    return TritonPythonModel
