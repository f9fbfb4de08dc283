"""model_repository/ agrees with the Python stage lists of every pipeline, and every pipeline has a
stream model that agrees with its ensemble (no server needed)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from ditserve.denoising import GroupedDenoiser
from ditserve.flux import FLUX_T2I
from ditserve.flux.request import GenerationParams
from ditserve.model_config import read_config
from ditserve.qwen_image import QWEN_IMAGE_EDIT, QWEN_IMAGE_T2I
from ditserve.streaming import StreamPlan, stream_model
from ditserve.triton_model import check_io
from ditserve.wan import WAN_I2V, WAN_T2V
from ditserve.wan.request import VideoParams

REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"
PIPELINES = [FLUX_T2I, QWEN_IMAGE_T2I, QWEN_IMAGE_EDIT, WAN_T2V, WAN_I2V]
STAGES = list({s.model: s for p in PIPELINES for s in p.stages}.values())  # flux_postprocess is shared
# Models of the pipelines other than FLUX name their own checkpoint: DITSERVE_MODEL_PATH
# (`ditserve serve --model-path`) is FLUX's.
MODEL_PATHS = {"qwen_image_edit_": "tiny-qwen-image-edit", "qwen_image_": "tiny-qwen-image", "wan_i2v_": "tiny-wan-i2v",
               "wan_": "tiny-wan-t2v"}


def load_config(name: str) -> dict:
    return read_config(REPOSITORY, name)


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.name)
def test_ensemble_steps_follow_the_stage_list(pipeline):
    ensemble = load_config(pipeline.name)
    assert ensemble["platform"] == "ensemble"
    steps = ensemble["ensemble_scheduling"]["step"]
    assert [step["model_name"] for step in steps] == [stage.model for stage in pipeline.stages]
    for step, spec in zip(steps, pipeline.stages):
        assert set(step["input_map"]) <= set(spec.stage.inputs), spec.model
        assert set(step["output_map"]) <= set(spec.stage.outputs), spec.model


@pytest.mark.parametrize("params", [
    GenerationParams(height=256, width=512, steps=4, guidance=3.5, true_cfg=1.0, seed=7, num_images=2),
    VideoParams(height=480, width=832, num_frames=81, steps=4, guidance=5.0, guidance_2=3.0, seed=7, fps=16),
], ids=lambda p: type(p).__name__)
def test_generation_fields_are_what_as_row_writes(params):
    """The request checks and denoisers list their parameter inputs as ``fields``: as_row must write those."""
    assert list(params.as_row()) == list(params.fields)


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.name)
def test_every_ensemble_tensor_is_produced_before_it_is_consumed(pipeline):
    ensemble = load_config(pipeline.name)
    available = {tensor["name"] for tensor in ensemble["input"]}
    for step in ensemble["ensemble_scheduling"]["step"]:
        missing = set(step["input_map"].values()) - available
        assert not missing, f"{step['model_name']} reads {missing} before any step writes them"
        available |= set(step["output_map"].values())
    assert {tensor["name"] for tensor in ensemble["output"]} <= available


@pytest.mark.parametrize("pipeline", [p for p in PIPELINES if p is not FLUX_T2I], ids=lambda p: p.name)
def test_ensemble_inputs_are_all_optional(pipeline):
    # Triton's ensemble scheduler deadlocks on a missing required input: the request stage checks them.
    assert all(tensor.get("optional") for tensor in load_config(pipeline.name)["input"])


@pytest.mark.parametrize("spec", STAGES, ids=lambda s: s.model)
def test_stage_configs_declare_the_stage_io_and_batch(spec):
    config = load_config(spec.model)
    assert config["name"] == spec.model
    check_io(spec.stage, config)  # raises on any mismatch
    assert config["backend"] == "python" and int(config["max_batch_size"]) >= 8
    assert "dynamic_batching" in config
    assert (REPOSITORY / spec.model / "1" / "model.py").read_text().count(spec.stage.__name__) == 2
    prefix = next((p for p in MODEL_PATHS if spec.model.startswith(p)), None)
    if prefix and "model_path" in config.get("parameters", {}):
        assert config["parameters"]["model_path"]["string_value"] == MODEL_PATHS[prefix]


@pytest.mark.parametrize("spec", STAGES, ids=lambda s: s.model)
def test_stage_configs_declare_every_option_and_nothing_else(spec):
    """What the adapter checks at load (a parameter nothing reads is refused), and what `ditserve serve --set`
    relies on (it sets only parameters a config declares): every option of the stage is declared."""
    import dataclasses

    from ditserve.model_config import check_parameter_names, config_parameters
    from ditserve.stage import RUNTIME_PARAMETERS

    params = config_parameters(load_config(spec.model))
    options = {field.name for field in dataclasses.fields(spec.stage.Options)}
    check_parameter_names(spec.model, params, (*RUNTIME_PARAMETERS, *options))
    assert options <= set(params), f"{spec.model}: options {sorted(options - set(params))} not declared"
    assert set(spec.stage.uniform_fields) <= set(spec.stage.inputs)
    assert set(spec.stage.sources) <= set(spec.stage.outputs) and set(spec.stage.sources.values()) <= set(spec.stage.inputs)


def test_qwen_image_ensembles_have_flux_t2i_inputs_and_outputs_plus_the_edit_image():
    flux, t2i, edit = load_config("flux_t2i"), load_config("qwen_image_t2i"), load_config("qwen_image_edit")
    assert t2i["input"] == flux["input"] and t2i["output"] == flux["output"]
    image = {"name": "INPUT_IMAGE", "data_type": "TYPE_STRING", "dims": ["-1"], "optional": True}
    assert edit["input"] == [*t2i["input"], image] and edit["output"] == t2i["output"]
    assert flux["max_batch_size"] == t2i["max_batch_size"] == edit["max_batch_size"]


def test_wan_ensemble_takes_the_request_stage_inputs_and_gives_video_and_frames():
    ensemble = load_config(WAN_T2V.name)
    assert [t["name"] for t in ensemble["input"]] == list(WAN_T2V.stages[0].stage.inputs)
    assert {t["name"]: t["data_type"] for t in ensemble["output"]} == {"VIDEO": "TYPE_STRING", "FRAMES": "TYPE_UINT8"}


def test_wan_i2v_ensemble_is_wan_t2v_plus_the_image():
    t2v, i2v = load_config(WAN_T2V.name), load_config(WAN_I2V.name)
    image = {"name": "IMAGE", "data_type": "TYPE_STRING", "dims": ["-1"], "optional": True}
    assert i2v["input"] == [*t2v["input"], image] and i2v["output"] == t2v["output"]
    assert [t["name"] for t in i2v["input"]] == list(WAN_I2V.stages[0].stage.inputs)


@pytest.mark.parametrize("model", ["qwen_image_edit_request", "wan_i2v_request"])
def test_image_request_stage_defaults_are_the_pipelines(model):
    from ditserve.stage import parse_options
    from ditserve.triton_model import config_parameters

    stage = next(s.stage for p in PIPELINES for s in p.stages if s.model == model)
    params = config_parameters(load_config(model))
    assert parse_options(stage.Options, params) == stage.Options()


@pytest.mark.parametrize("spec", [s for s in STAGES if issubclass(s.stage, GroupedDenoiser)], ids=lambda s: s.model)
def test_every_denoiser_config_chooses_its_attention_backend(spec):
    """attention_backend in every denoiser's config.pbtxt, "auto" (each model resolves it at load), parsed
    by the stage's options with its other parameters."""
    from ditserve.stage import parse_options
    from ditserve.triton_model import config_parameters

    params = config_parameters(load_config(spec.model))
    assert params.get("attention_backend") == "auto"
    assert parse_options(spec.stage.Options, params).attention_backend == "auto"


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.name)
def test_every_pipeline_streams_through_its_stream_model(pipeline):
    """<ensemble>_stream: decoupled, the ensemble's inputs, outputs (plus STEP, TOTAL_STEPS) and batch
    size (the check it runs at load), the two-line model.py; and a denoiser whose loop reports steps."""
    name = stream_model(pipeline.name)
    config = load_config(name)
    assert config["name"] == name and config["backend"] == "python"
    StreamPlan.read(REPOSITORY, pipeline.name).check(config)  # raises on any mismatch
    assert "dynamic_batching" not in config  # its stage models batch; the stream model only waits on them
    assert (REPOSITORY / name / "1" / "model.py").read_text().count("TritonStreamModel") == 2
    (denoiser,) = [spec.stage for spec in pipeline.stages if issubclass(spec.stage, GroupedDenoiser)]
    # What reports the steps (run through a server for every pipeline in test_client_cli.py, not for a new one).
    assert "in self.steps(" in inspect.getsource(denoiser.denoise), f"{denoiser.__name__}'s loop must iterate self.steps(...)"


def test_only_the_stream_models_are_decoupled():
    """A decoupled step would make Triton treat an ensemble as decoupled: no plain HTTP or gRPC ModelInfer."""
    decoupled = {path.parent.name for path in REPOSITORY.glob("*/config.pbtxt")
                 if load_config(path.parent.name).get("model_transaction_policy", {}).get("decoupled")}
    assert decoupled == {stream_model(p.name) for p in PIPELINES}


@pytest.mark.parametrize("params, message", [
    ({"preset": "fastest"}, "parameter preset: must be one of ultrafast, superfast, .*, veryslow, got 'fastest'"),
    ({"crf": "52"}, r"parameter crf: must be in \[0, 51\], got 52"),
    ({"crf": "high"}, "parameter crf: expected int, got 'high'"),
])
def test_bad_config_parameters_are_refused_at_load_naming_the_field_and_its_limit(params, message):
    from ditserve.stage import ConfigError, parse_options
    from ditserve.wan.postprocess import VideoOptions

    with pytest.raises(ConfigError, match=message):
        parse_options(VideoOptions, params)
