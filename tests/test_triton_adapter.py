"""The Triton adapter's request handling, with a test double for triton_python_backend_utils.

The real module exists only inside Triton's stub process; the server tests exercise it. Here
a small double lets the edge cases run fast and deterministically: rows of several requests in
one call, a bad row failing only its own request (as the client's error, INVALID_ARG), an exception
in the stage failing that call's requests (INTERNAL) without taking the model down, a request whose
rows differ in a uniform field refused before it runs, and config checks at load.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import numpy as np
import pytest
import torch

from ditserve.stage import ConfigError, RequestError, RequestParameter, Runtime, Stage, StageFailure
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


class FakeError:
    """pb_utils.TritonError: a message and a code, INTERNAL unless given (Triton answers INVALID_ARG as
    HTTP 400 and gRPC INVALID_ARGUMENT, INTERNAL as 500 and INTERNAL)."""

    INTERNAL, INVALID_ARG = "INTERNAL", "INVALID_ARG"

    def __init__(self, message, code=INTERNAL):
        self._message, self._code = message, code

    def message(self):
        return self._message

    def code(self):
        return self._code


@pytest.fixture
def pb(monkeypatch):
    module = types.SimpleNamespace(
        Tensor=FakeTensor,
        InferenceResponse=FakeResponse,
        TritonError=FakeError,
        get_input_tensor_by_name=lambda request, name: request.get(name),
    )
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    return module


class Doubler(Stage):
    """Y = 2 X per row; X = 0 gives an empty Y; X = -1 is bad input; X = 98 a row whose batch broke; X = 99
    breaks the stage."""

    inputs = ("X",)
    outputs = ("Y",)

    def execute(self, rows):
        values = [float(row["X"].reshape(())) for row in rows]
        if 99 in values:
            raise RuntimeError("stage broke")
        return [RequestError("X", "must be >= 0, got -1") if v == -1
                else StageFailure(torch.OutOfMemoryError("CUDA out of memory")) if v == 98
                else {"Y": torch.tensor([2 * v] if v else [])} for v in values]


def load(config_inputs=("X",), stage=None, parameters=None):
    stage = stage or Doubler
    model = triton_model(stage)()
    config = {
        "name": "doubler",
        "input": [{"name": n, "data_type": "TYPE_FP32"} for n in config_inputs],
        "output": [{"name": n, "data_type": "TYPE_FP32"} for n in stage.outputs],
        "parameters": {name: {"string_value": value} for name, value in ({"device": "cpu"} | (parameters or {})).items()},
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
    assert responses[1].error.message() == "X: must be >= 0, got -1"
    assert responses[1].error.code() == FakeError.INVALID_ARG  # the client's error: HTTP 400, gRPC INVALID_ARGUMENT


def test_empty_outputs_go_out_as_numpy(pb):
    # Wan I2V's IMAGE_EMBEDS for checkpoints without CLIP: Triton's DLPack import refuses empty tensors.
    (response,) = load().execute([request(0.0, 0.0)])
    assert outputs(response) == [] and response.output_tensors[0].value.shape == (2, 0)


def test_an_exception_fails_that_call_and_the_model_keeps_serving(pb):
    model = load()
    broken = model.execute([request(1.0), request(99.0)])
    assert all("internal error: RuntimeError: stage broke" in r.error.message() for r in broken)
    assert all(r.error.code() == FakeError.INTERNAL for r in broken)
    assert [outputs(r) for r in model.execute([request(1.0)])] == [[2.0]]


def test_a_row_whose_batch_broke_fails_its_request_as_internal_and_no_other(pb):
    responses = load().execute([request(1.0), request(5.0, 98.0), request(4.0, -1.0)])
    assert outputs(responses[0]) == [2.0]
    error = responses[1].error
    assert (error.message(), error.code()) == ("doubler: internal error: OutOfMemoryError: CUDA out of memory",
                                               FakeError.INTERNAL)
    assert responses[2].error.code() == FakeError.INVALID_ARG


def test_config_that_does_not_match_the_stage_is_refused_at_load(pb):
    with pytest.raises(ConfigError, match="inputs"):
        load(config_inputs=("X", "Z"))


@dataclasses.dataclass(frozen=True)
class ScaleOptions:
    scale: float = 1.0


class Tiler(Stage):
    """Y = X repeated N times (N sets Y's shape, so a request's rows must agree on it); keeps the rows it saw;
    X = 99 breaks the stage."""

    Options = ScaleOptions
    inputs = ("X", "N")
    outputs = ("Y",)
    uniform_fields = ("N",)

    def execute(self, rows):
        self.rows = rows
        if any(float(row["X"].reshape(())) == 99 for row in rows):
            raise RuntimeError("stage broke")
        return [{"Y": row["X"].repeat(int(row["N"].reshape(()))) * self.options.scale} for row in rows]


def tiler_request(xs, ns):
    return {"X": FakeTensor("X", np.array([[x] for x in xs], dtype=np.float32)),
            "N": FakeTensor("N", np.array([[n] for n in ns], dtype=np.int32))}


def test_rows_of_a_request_that_differ_in_a_uniform_field_are_refused_before_they_run(pb):
    model = load(("X", "N"), stage=Tiler)
    responses = model.execute([tiler_request([1.0], [2]), tiler_request([2.0, 3.0], [1, 2]), tiler_request([4.0, 5.0], [3, 3])])
    assert outputs(responses[0]) == [1.0, 1.0] and outputs(responses[2]) == [4.0] * 3 + [5.0] * 3
    error = responses[1].error
    assert error.message() == ("N: must be equal for every row of a request, got 1 in row 0 and 2 in row 1; "
                               "send rows that differ as separate requests")
    assert error.code() == FakeError.INVALID_ARG
    assert [float(row["X"].reshape(())) for row in model.stage.rows] == [1.0, 4.0, 5.0]  # the refused rows never ran
    # Refused, they stay the client's error when the stage breaks on the others.
    broken, refused = model.execute([tiler_request([99.0], [1]), tiler_request([2.0, 3.0], [1, 2])])
    assert broken.error.code() == FakeError.INTERNAL and refused.error.message() == error.message()
    assert refused.error.code() == FakeError.INVALID_ARG


class Expander(Tiler):
    """Tiler whose rows may differ in N: Y's shape follows N's value, as a decoded image's size follows the image."""

    uniform_fields = ()
    sources = {"Y": "N"}


def test_rows_whose_outputs_differ_in_shape_are_refused_naming_the_input_they_come_from(pb):
    responses = load(("X", "N"), stage=Expander).execute([tiler_request([2.0, 3.0], [1, 2]), tiler_request([4.0], [3])])
    assert responses[0].error.message() == ("N: the rows of one request must give Y one shape, got (1,) in row 0 and "
                                            "(2,) in row 1; send them as separate requests")
    assert responses[0].error.code() == FakeError.INVALID_ARG
    assert outputs(responses[1]) == [4.0] * 3
    # Without a source the output's own name is the field.
    (response,) = load(("X", "N"), stage=type("Bare", (Expander,), {"sources": {}})).execute([tiler_request([2.0, 3.0], [1, 2])])
    assert response.error.message().startswith("Y: the rows of one request must give Y one shape")


def test_parameters_nothing_reads_are_refused_at_load_naming_them_and_the_valid_ones(pb):
    # The stage's options, the runtime's and the Python backend's own parameters are read.
    model = load(("X", "N"), stage=Tiler, parameters={"scale": "2", "model_path": "", "dtype": "float32",
                                                      "FORCE_CPU_ONLY_INPUT_TENSORS": "no", "EXECUTION_ENV_PATH": ""})
    assert model.stage.options.scale == 2.0
    with pytest.raises(ConfigError) as info:
        load(("X", "N"), stage=Tiler, parameters={"scal": "2"})
    assert str(info.value) == ("doubler: config.pbtxt parameter 'scal' not read by this model; its parameters are: "
                               "EXECUTION_ENV_PATH, FORCE_CPU_ONLY_INPUT_TENSORS, device, dtype, model_path, scale")


def test_a_gpu_torch_does_not_see_is_refused_at_load_naming_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert Runtime.from_parameters({"device": "cuda:1", "dtype": "float32"}, env={}).device == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"^device: 'cuda:2' is not a GPU torch sees: it sees 2 \(cuda:0 to cuda:1\)$"):
        Runtime.from_parameters({"device": "cuda:2"}, env={})


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


@pytest.mark.parametrize("model,field,values", [
    ("flux_request", "NUM_IMAGES", (1, 2)),
    ("qwen_image_request", "HEIGHT", (64, 80)),
    ("wan_request", "NUM_FRAMES", (5, 9)),
])
def test_request_checks_refuse_rows_that_would_make_outputs_of_different_shapes(pb, model, field, values):
    """Before any model runs: otherwise the request would be encoded and denoised, and refused only by the last
    stage's outputs (test_rows_of_a_request_that_differ_in_a_uniform_field_are_refused_before_they_run)."""
    from pathlib import Path

    from ditserve.flux import FLUX_T2I
    from ditserve.model_config import read_config
    from ditserve.qwen_image import QWEN_IMAGE_T2I
    from ditserve.wan import WAN_T2V

    stage = next(s.stage for p in (FLUX_T2I, QWEN_IMAGE_T2I, WAN_T2V) for s in p.stages if s.model == model)
    config = read_config(Path(__file__).resolve().parent.parent / "model_repository", model)
    config["parameters"]["device"] = {"string_value": "cpu"}
    adapter = triton_model(stage)()
    adapter.initialize({"model_config": json.dumps(config), "model_name": model})
    requests = [{"PROMPT": FakeTensor("PROMPT", np.array([[b"a"], [b"b"]], dtype=object)),
                 field: FakeTensor(field, np.array([[v] for v in values], dtype=np.int32))} for values in (values, values[:1] * 2)]
    refused, answered = adapter.execute(requests)
    assert refused.error.message().startswith(f"{field}: must be equal for every row of a request, got {values[0]} in row 0 "
                                              f"and {values[1]} in row 1")
    assert refused.error.code() == FakeError.INVALID_ARG
    assert answered.error is None and {t.name(): t.value for t in answered.output_tensors}[field].tolist() == [[values[0]]] * 2
