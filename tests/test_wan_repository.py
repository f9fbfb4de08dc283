"""model_repository/wan_* agrees with the Wan stage list (no server needed)."""

from __future__ import annotations

import pytest
from test_model_repository import REPOSITORY, load_config

from ditserve.triton_model import check_io
from ditserve.wan import WAN_T2V

PIPELINE = WAN_T2V


def test_ensemble_steps_follow_the_stage_list():
    ensemble = load_config(PIPELINE.name)
    assert ensemble["platform"] == "ensemble"
    assert [step["model_name"] for step in ensemble["ensemble_scheduling"]["step"]] == [s.model for s in PIPELINE.stages]


def test_ensemble_inputs_are_the_request_stage_inputs_all_optional():
    ensemble = load_config(PIPELINE.name)
    request = PIPELINE.stages[0].stage
    assert [t["name"] for t in ensemble["input"]] == list(request.inputs)
    assert all(t.get("optional") for t in ensemble["input"])  # missing PROMPT must reach wan_request
    assert {t["name"]: t["data_type"] for t in ensemble["output"]} == {"VIDEO": "TYPE_STRING", "FRAMES": "TYPE_UINT8"}


@pytest.mark.parametrize("spec", PIPELINE.stages, ids=lambda s: s.model)
def test_stage_configs_declare_the_stage_io_and_batch(spec):
    config = load_config(spec.model)
    assert config["name"] == spec.model
    check_io(spec.stage, config)
    assert config["backend"] == "python" and int(config["max_batch_size"]) >= 8
    assert "dynamic_batching" in config
    assert (REPOSITORY / spec.model / "1" / "model.py").read_text().count(spec.stage.__name__) == 2
    if "model_path" in config["parameters"]:  # their own checkpoint, not DITSERVE_MODEL_PATH's FLUX one
        assert config["parameters"]["model_path"]["string_value"] == "tiny-wan-t2v"


def test_every_ensemble_tensor_is_produced_before_it_is_consumed():
    ensemble = load_config(PIPELINE.name)
    available = {tensor["name"] for tensor in ensemble["input"]}
    for step in ensemble["ensemble_scheduling"]["step"]:
        missing = set(step["input_map"].values()) - available
        assert not missing, f"{step['model_name']} reads {missing} before any step writes them"
        available |= set(step["output_map"].values())
    assert {tensor["name"] for tensor in ensemble["output"]} <= available


def test_step_maps_name_the_stage_tensors():
    ensemble = load_config(PIPELINE.name)
    for step, spec in zip(ensemble["ensemble_scheduling"]["step"], PIPELINE.stages):
        assert set(step["input_map"]) <= set(spec.stage.inputs), spec.model
        assert set(step["output_map"]) <= set(spec.stage.outputs), spec.model
