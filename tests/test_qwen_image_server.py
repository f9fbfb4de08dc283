"""qwen_image_t2i through a real tritonserver: parity with QwenImagePipeline, bad input, stage list."""

from __future__ import annotations

import pytest
from flux_reference import pixel_diff, reference_pipeline, reference_uint8

from ditserve.client import Client
from ditserve.qwen_image import QWEN_IMAGE_T2I

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def reference():
    from diffusers import QwenImagePipeline

    return reference_pipeline("tiny-qwen-image", QwenImagePipeline)


def test_matches_qwen_image_pipeline_through_triton(triton_server, reference):
    client = Client(triton_server.grpc_url, protocol="grpc")
    scalars = dict(HEIGHT=80, WIDTH=64, NUM_INFERENCE_STEPS=3, SEED=11, TRUE_CFG_SCALE=3.0, NUM_IMAGES=2)
    result = client.generate("a paper boat on a lake", "dark", model="qwen_image_t2i", **scalars)
    expected = reference_uint8(reference, "a paper boat on a lake", "dark", **scalars)
    assert result.pixels.shape == expected.shape == (2, 80, 64, 3)
    assert pixel_diff(result.pixels, expected) <= 1
    assert list(result.stage_ms) == [s.model for s in QWEN_IMAGE_T2I.stages]


def test_bad_input_names_the_field_and_the_server_stays_up(triton_server):
    client = Client(triton_server.http_url.removeprefix("http://"), protocol="http")
    with pytest.raises(Exception, match="HEIGHT"):
        client.generate("a cat", model="qwen_image_t2i", HEIGHT=72, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=1)
    with pytest.raises(Exception, match=r"NUM_INFERENCE_STEPS: must be an integer in \[2, 200\]"):
        client.generate("a cat", model="qwen_image_t2i", HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=1, SEED=1)
    ok = client.generate("a cat", model="qwen_image_t2i", HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=1)
    assert ok.pixels.shape == (1, 64, 64, 3)
