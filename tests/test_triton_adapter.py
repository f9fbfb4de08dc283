"""The Triton adapter's request handling, with a test double for triton_python_backend_utils.

The real module exists only inside Triton's stub process; the server tests exercise it. Here
a small double lets the edge cases run fast and deterministically: rows of several requests in
one call, a bad row failing only its own request, an exception in the stage failing that call's
requests without taking the model down, and config checks at load.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import numpy as np
import pytest
import torch

from ditserve.stage import ConfigError, RequestError, RequestParameter, Stage
from ditserve.triton_model import triton_model


class FakeTensor:
    def __init__(self, name, value):
        self._name, self.value = name, value

    def name(self):
        return self._name

    def as_numpy(self):
        return self.value

    def to_dlpack(self):
        return torch.utils.dlpack.to_dlpack(torch.as_tensor(self.value))

    @classmethod
    def from_dlpack(cls, name, capsule):
        value = torch.utils.dlpack.from_dlpack(capsule)
        if not value.numel():  # as Triton's stub (2.51): "DLPack tensor is not contiguous"
            raise RuntimeError("DLPack tensor is not contiguous")
        return cls(name, value)


@dataclasses.dataclass
class FakeResponse:
    output_tensors: list = dataclasses.field(default_factory=list)
    error: object = None


@pytest.fixture
def pb(monkeypatch):
    module = types.SimpleNamespace(
        Tensor=FakeTensor,
        InferenceResponse=FakeResponse,
        TritonError=lambda message: message,
        get_input_tensor_by_name=lambda request, name: request.get(name),
    )
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    return module


class Doubler(Stage):
    """Y = 2 X per row; X = 0 gives an empty Y; X = -1 is bad input; X = 99 breaks the stage."""

    inputs = ("X",)
    outputs = ("Y",)

    def execute(self, rows):
        values = [float(row["X"].reshape(())) for row in rows]
        if 99 in values:
            raise RuntimeError("stage broke")
        return [RequestError("X", "must be >= 0, got -1") if v == -1 else {"Y": torch.tensor([2 * v] if v else [])}
                for v in values]


def load(config_inputs=("X",)):
    model = triton_model(Doubler)()
    config = {
        "name": "doubler",
        "input": [{"name": n, "data_type": "TYPE_FP32"} for n in config_inputs],
        "output": [{"name": "Y", "data_type": "TYPE_FP32"}],
        "parameters": {"device": {"string_value": "cpu"}},
    }
    model.initialize({"model_config": json.dumps(config), "model_name": "doubler"})
    return model


def request(*values):
    return {"X": FakeTensor("X", np.array([[v] for v in values], dtype=np.float32))}


def outputs(response):
    assert response.error is None, response.error
    (tensor,) = response.output_tensors
    return tensor.value.reshape(-1).tolist()


def test_rows_of_all_requests_run_together_and_return_to_their_request(pb):
    responses = load().execute([request(1.0), request(2.0, 3.0), request(4.0)])
    assert [outputs(r) for r in responses] == [[2.0], [4.0, 6.0], [8.0]]


def test_a_bad_row_fails_only_its_own_request(pb):
    responses = load().execute([request(1.0), request(5.0, -1.0), request(4.0)])
    assert outputs(responses[0]) == [2.0] and outputs(responses[2]) == [8.0]
    assert responses[1].error == "X: must be >= 0, got -1"


def test_empty_outputs_go_out_as_numpy(pb):
    # Wan I2V's IMAGE_EMBEDS for checkpoints without CLIP: Triton's DLPack import refuses empty tensors.
    (response,) = load().execute([request(0.0, 0.0)])
    assert outputs(response) == [] and response.output_tensors[0].value.shape == (2, 0)


def test_an_exception_fails_that_call_and_the_model_keeps_serving(pb):
    model = load()
    broken = model.execute([request(1.0), request(99.0)])
    assert all("internal error: RuntimeError: stage broke" in r.error for r in broken)
    assert [outputs(r) for r in model.execute([request(1.0)])] == [[2.0]]


def test_config_that_does_not_match_the_stage_is_refused_at_load(pb):
    with pytest.raises(ConfigError, match="inputs"):
        load(config_inputs=("X", "Z"))


class Recorder(Stage):
    """Y = X; keeps the rows it saw, with the request parameter it declares."""

    inputs = ("X",)
    outputs = ("Y",)
    request_parameters = ("progress",)

    def execute(self, rows):
        self.rows = rows
        return [{"Y": row["X"]} for row in rows]


class ParameterRequest(dict):
    def __init__(self, tensors, parameters):
        super().__init__(tensors)
        self._parameters = parameters

    def parameters(self):
        return json.dumps(self._parameters)


def test_declared_request_parameters_reach_each_row_with_its_position(pb):
    model = triton_model(Recorder)()
    config = {"name": "recorder", "input": [{"name": "X", "data_type": "TYPE_FP32"}],
              "output": [{"name": "Y", "data_type": "TYPE_FP32"}], "parameters": {"device": {"string_value": "cpu"}}}
    model.initialize({"model_config": json.dumps(config), "model_name": "recorder"})
    model.execute([ParameterRequest(request(1.0), {}), ParameterRequest(request(2.0, 3.0), {"progress": "p", "other": 1})])
    assert [row.get("progress") for row in model.stage.rows] == [None, RequestParameter("p", 0), RequestParameter("p", 1)]
    assert all("other" not in row for row in model.stage.rows)
