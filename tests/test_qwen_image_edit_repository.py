"""model_repository/qwen_image_edit* agrees with the Qwen-Image-Edit stage list (no server needed)."""

from __future__ import annotations

import pytest
from test_model_repository import REPOSITORY, load_config

from ditserve.qwen_image import QWEN_IMAGE_EDIT
from ditserve.triton_model import check_io

PIPELINE = QWEN_IMAGE_EDIT


def test_ensemble_steps_follow_the_stage_list():
    ensemble = load_config(PIPELINE.name)
    assert ensemble["platform"] == "ensemble"
    assert [step["model_name"] for step in ensemble["ensemble_scheduling"]["step"]] == [s.model for s in PIPELINE.stages]


def test_ensemble_has_qwen_image_t2i_inputs_plus_an_optional_image():
    ours, t2i = load_config(PIPELINE.name), load_config("qwen_image_t2i")
    image = {"name": "INPUT_IMAGE", "data_type": "TYPE_STRING", "dims": ["-1"], "optional": True}
    assert ours["input"] == [*t2i["input"], image]
    assert ours["output"] == t2i["output"] and ours["max_batch_size"] == t2i["max_batch_size"]
    # Triton's ensemble scheduler deadlocks on a missing required input: the request stage checks them.
    assert all(tensor.get("optional") for tensor in ours["input"])


@pytest.mark.parametrize("spec", PIPELINE.stages, ids=lambda s: s.model)
def test_stage_configs_declare_the_stage_io_and_batch(spec):
    config = load_config(spec.model)
    assert config["name"] == spec.model
    check_io(spec.stage, config)
    assert config["backend"] == "python" and int(config["max_batch_size"]) >= 8
    assert "dynamic_batching" in config
    assert (REPOSITORY / spec.model / "1" / "model.py").read_text().count(spec.stage.__name__) == 2
    if spec.model.startswith("qwen_image_edit_"):
        assert config["parameters"]["model_path"]["string_value"] == "tiny-qwen-image-edit"


def test_request_stage_defaults_are_the_pipelines():
    from ditserve.qwen_image.request import EditRequestOptions
    from ditserve.stage import parse_options
    from ditserve.triton_model import config_parameters

    params = config_parameters(load_config("qwen_image_edit_request"))
    assert parse_options(EditRequestOptions, params) == EditRequestOptions()


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
