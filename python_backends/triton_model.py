"""The one Triton Python-backend adapter that every stage model uses.

A model's ``model.py`` is two lines::

    from ditserve.flux.denoiser import FluxDenoiser
    from ditserve.triton_model import triton_model
    TritonPythonModel = triton_model(FluxDenoiser)

At load the adapter checks that config.pbtxt declares exactly the stage's inputs and outputs,
parses the parameters once into the stage's typed options, and builds the stage. At each
``execute`` it splits every request into rows (one per batch element), hands all rows of
all requests to the stage at once, and answers each request with its own outputs or its
own error: a bad request never fails the others batched with it, and an unexpected
exception fails only the requests of that call while the model stays loaded.
"""

from __future__ import annotations

import json
import traceback
from typing import Any

import numpy as np
import torch

from ditserve.model_config import ConfigError, config_parameters
from ditserve.stage import RequestError, RequestParameter, Runtime, Stage, parse_options


def check_io(stage_cls: type[Stage], config: dict[str, Any]) -> None:
    """config.pbtxt must name exactly the stage's inputs and outputs."""
    for kind, declared in (("input", stage_cls.inputs), ("output", stage_cls.outputs)):
        configured = {tensor["name"] for tensor in config.get(kind, [])}
        if configured != set(declared):
            raise ConfigError(
                f"{config.get('name')}: config.pbtxt {kind}s {sorted(configured)} do not match "
                f"{stage_cls.__name__}'s {sorted(declared)}"
            )


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
            if args.get("model_instance_kind") == "GPU" and not params.get("device"):
                params["device"] = f"cuda:{args['model_instance_device_id']}"
            self.string_inputs = {t["name"] for t in config["input"] if t["data_type"] == "TYPE_STRING"}
            self.stage = stage_cls(Runtime.from_parameters(params), parse_options(stage_cls.Options, params))

        def _rows(self, requests) -> tuple[list[dict[str, Any]], list[int]]:
            rows: list[dict[str, Any]] = []
            owners: list[int] = []
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
                batch = len(next(iter(inputs.values()))) if inputs else 1
                parameters = {}
                if stage_cls.request_parameters:
                    sent = json.loads(request.parameters())
                    parameters = {name: sent[name] for name in stage_cls.request_parameters if name in sent}
                for b in range(batch):
                    rows.append({name: value[b] for name, value in inputs.items()}
                                | {name: RequestParameter(value, b) for name, value in parameters.items()})
                    owners.append(index)
            return rows, owners

        def _response(self, outputs: list[dict[str, Any]]):
            pb = self.pb
            tensors = []
            for name in stage_cls.outputs:
                values = [row[name] for row in outputs]
                if len({tuple(v.shape) for v in values}) > 1:
                    raise RequestError(name, "the rows of one request produced different shapes; send them as separate requests")
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
            rows, owners = self._rows(requests)
            try:
                results = self.stage.execute(rows)
            except Exception as exc:  # noqa: BLE001 - the server must stay up; every request gets an answer
                traceback.print_exc()
                error = pb.TritonError(f"{self.name}: internal error: {type(exc).__name__}: {exc}")
                return [pb.InferenceResponse(error=error) for _ in requests]
            per_request: list[list[Any]] = [[] for _ in requests]
            for owner, result in zip(owners, results):
                per_request[owner].append(result)
            responses = []
            for results_of_request in per_request:
                errors = [r for r in results_of_request if isinstance(r, RequestError)]
                try:
                    if errors:
                        raise errors[0]
                    responses.append(self._response(results_of_request))
                except RequestError as error:
                    responses.append(pb.InferenceResponse(error=pb.TritonError(str(error))))
            return responses

        def finalize(self) -> None:
            self.stage.close()

    TritonPythonModel.__name__ = f"TritonPythonModel[{stage_cls.__name__}]"
    return TritonPythonModel
