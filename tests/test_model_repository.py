"""model_repository/ agrees with the Python stage lists (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from ditserve.flux import FLUX_T2I
from ditserve.triton_model import check_io

REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"
PIPELINES = [FLUX_T2I]


def load_config(name: str) -> dict:
    message = text_format.Parse((REPOSITORY / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.name)
def test_ensemble_steps_follow_the_stage_list(pipeline):
    ensemble = load_config(pipeline.name)
    assert ensemble["platform"] == "ensemble"
    steps = [step["model_name"] for step in ensemble["ensemble_scheduling"]["step"]]
    assert steps == [stage.model for stage in pipeline.stages]


@pytest.mark.parametrize("spec", [s for p in PIPELINES for s in p.stages], ids=lambda s: s.model)
def test_stage_configs_declare_the_stage_io_and_batch(spec):
    config = load_config(spec.model)
    assert config["name"] == spec.model
    check_io(spec.stage, config)  # raises on any mismatch
    assert config["backend"] == "python" and int(config["max_batch_size"]) >= 8
    assert "dynamic_batching" in config
    assert (REPOSITORY / spec.model / "1" / "model.py").read_text().count(spec.stage.__name__) == 2


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.name)
def test_every_ensemble_tensor_is_produced_before_it_is_consumed(pipeline):
    ensemble = load_config(pipeline.name)
    available = {tensor["name"] for tensor in ensemble["input"]}
    for step in ensemble["ensemble_scheduling"]["step"]:
        missing = set(step["input_map"].values()) - available
        assert not missing, f"{step['model_name']} reads {missing} before any step writes them"
        available |= set(step["output_map"].values())
    assert {tensor["name"] for tensor in ensemble["output"]} <= available
