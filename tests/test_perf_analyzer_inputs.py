"""perf/perf_analyzer.py's --input-data for each ensemble: an input image (qwen_image_edit's INPUT_IMAGE,
wan_i2v's IMAGE) is sent as a PNG; without it those ensembles answered every request "is required"."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from ditserve.images import decode_image
from ditserve.model_config import read_config

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = REPO_ROOT / "model_repository"


@pytest.fixture(scope="module")
def perf_analyzer():
    spec = importlib.util.spec_from_file_location("perf_analyzer_script", REPO_ROOT / "perf" / "perf_analyzer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def input_data(perf_analyzer, model: str, tmp_path: Path) -> dict:
    args = perf_analyzer.argparse.Namespace(prompt="a fox", height=64, width=48, steps=2, seed=0, num_images=1,
                                            guidance_scale=3.5)
    config = read_config(MODEL_REPOSITORY, model)  # the fields of the server's /v2/models/MODEL/config
    data, _notes = perf_analyzer.build_input_data(config, perf_analyzer.request_values(args, config))
    path = tmp_path / f"{model}_input.json"
    path.write_text(json.dumps(data))
    return json.loads(path.read_text())["data"][0]


@pytest.mark.parametrize("model, image_input", [("qwen_image_edit", "INPUT_IMAGE"), ("wan_i2v", "IMAGE")])
def test_ensembles_that_take_an_image_get_a_png(perf_analyzer, tmp_path, model, image_input):
    entry = input_data(perf_analyzer, model, tmp_path)
    assert image_input in entry, f"{model}: {image_input} not sent"
    spec = entry[image_input]
    assert spec["shape"] == [1]
    (png,) = perf_analyzer.bytes_elements(spec)  # the serialized BYTES tensor: one length-prefixed element
    assert png.startswith(b"\x89PNG")
    assert decode_image(png, image_input).size == (48, 64)  # as the request stage decodes it
    assert Image.open(io.BytesIO(png)).mode == "RGB"
    assert entry["PROMPT"] == {"content": ["a fox"], "shape": [1]}


def test_flux_gets_no_image(perf_analyzer, tmp_path):
    entry = input_data(perf_analyzer, "flux_t2i", tmp_path)
    assert not {"IMAGE", "INPUT_IMAGE"} & set(entry)
    assert perf_analyzer.bytes_elements(entry["PROMPT"]) == [b"a fox"]
