"""qwen_image_edit through a real tritonserver: parity with QwenImageEditPipeline, bad input images."""

from __future__ import annotations

import numpy as np
import pytest
from flux_reference import pixel_diff, reference_uint8
from test_qwen_image_edit_parity import encoded, reference_edit_pipeline
from test_qwen_image_edit_request import encode, gradient, half, noise, png_declaring


pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def reference():
    return reference_edit_pipeline()


def test_matches_qwen_image_edit_pipeline_through_triton(triton_server, reference):
    """The repository's config: the pipeline's own 1024 * 1024 condition area (1312x800 here)."""
    data, image = encoded(100, 61, seed=8)
    scalars = dict(HEIGHT=80, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=11, TRUE_CFG_SCALE=3.0)
    pixels = infer(triton_server, [data], NEGATIVE_PROMPT="dark", **scalars)
    expected = reference_uint8(reference, "make it red", "dark", image=image, **scalars)
    assert pixels[0].shape == expected.shape == (1, 80, 64, 3)
    assert pixel_diff(pixels[0], expected) <= 1


def infer(triton_server, images: list[bytes] | None, **fields):
    """A raw request with ensemble input names: ditserve's client would refuse some of these bad
    requests itself, and the server's own answers are what is tested here."""
    import tritonclient.http as http

    client = http.InferenceServerClient(triton_server.http_url.removeprefix("http://"))
    inputs = []

    def add(name, array, datatype):
        item = http.InferInput(name, list(array.shape), datatype)
        item.set_data_from_numpy(array)
        inputs.append(item)

    add("PROMPT", np.array([[b"make it red"]], dtype=object), "BYTES")
    if images is not None:
        add("INPUT_IMAGE", np.array(images, dtype=object).reshape(1, len(images)), "BYTES")
    for name, value in fields.items():
        if isinstance(value, str):
            add(name, np.array([[value.encode()]], dtype=object), "BYTES")
        elif isinstance(value, float):
            add(name, np.array([[value]], dtype=np.float32), "FP32")
        elif name == "SEED":
            add(name, np.array([[value]], dtype=np.int64), "INT64")
        else:
            add(name, np.array([[value]], dtype=np.int32), "INT32")
    return client.infer("qwen_image_edit", inputs).as_numpy("IMAGE")


BAD = {
    "missing": (None, "INPUT_IMAGE: is required"),
    "zero": ([], "INPUT_IMAGE: expected 1 image, got 0"),
    "two": ([encode(gradient(16, 16))] * 2, "INPUT_IMAGE: expected 1 image, got 2"),
    "text": ([b"a cat, not an image"], "INPUT_IMAGE: is not a readable PNG, JPEG or WebP image"),
    "truncated": ([half(encode(noise(64, 64), "JPEG"))], "INPUT_IMAGE: is a truncated or corrupt JPEG image"),
    "bomb": ([png_declaring(5000, 5000)], r"INPUT_IMAGE: must have at most 16777216 pixels, got 5000x5000"),
    "pil-bomb": ([png_declaring(100_000, 100_000)], "INPUT_IMAGE: declares more than 16777216 pixels"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_images_name_the_field_and_the_server_stays_up(triton_server, name):
    images, message = BAD[name]
    with pytest.raises(Exception, match=message):
        infer(triton_server, images, HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=1)
    assert triton_server_ready(triton_server)


def triton_server_ready(triton_server) -> bool:
    import tritonclient.http as http

    client = http.InferenceServerClient(triton_server.http_url.removeprefix("http://"))
    return client.is_server_live() and client.is_model_ready("qwen_image_edit")


def test_after_bad_requests_a_good_one_is_served(triton_server):
    pixels = infer(triton_server, [encode(gradient(48, 48))], HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=1)
    assert pixels.shape == (1, 1, 64, 64, 3)
