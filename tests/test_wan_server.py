"""wan_t2v through a real tritonserver: frame parity with WanPipeline, the MP4, bad input, stage list."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from flux_reference import reference_pipeline
from tritonclient.utils import InferenceServerException, np_to_triton_dtype
from wan_reference import assert_ensemble_runs_every_stage, assert_frames_match, decode_mp4, reference_frames

from ditserve.wan import WAN_T2V

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def reference():
    from diffusers import WanPipeline

    return reference_pipeline("tiny-wan-t2v", WanPipeline)


@pytest.fixture(scope="module")
def client(triton_server):
    return grpcclient.InferenceServerClient(triton_server.grpc_url)


_TYPES = {"SEED": np.int64, "GUIDANCE_SCALE": np.float32}


def generate(client, prompt: str | None, negative: str | None = None, *, model: str = WAN_T2V.name,
             image: bytes | None = None, **scalars) -> tuple[bytes, np.ndarray]:
    """One wan_t2v (or ``model``) request (batch of one) with ensemble input names; ``image`` is the
    encoded IMAGE of wan_i2v. Returns (MP4 bytes, frames)."""
    arrays = {"PROMPT": prompt, "NEGATIVE_PROMPT": negative}
    arrays = {name: np.array([[text.encode()]], dtype=object) for name, text in arrays.items() if text is not None}
    arrays |= {name: np.array([[value]], dtype=_TYPES.get(name, np.int32)) for name, value in scalars.items()}
    if image is not None:
        arrays["IMAGE"] = np.array([[image]], dtype=object)
    inputs = []
    for name, array in arrays.items():
        item = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array)
        inputs.append(item)
    outputs = [grpcclient.InferRequestedOutput(name) for name in ("VIDEO", "FRAMES")]
    response = client.infer(model, inputs, outputs=outputs, client_timeout=300)
    return bytes(response.as_numpy("VIDEO")[0][0]), response.as_numpy("FRAMES")[0]


def test_matches_wan_pipeline_through_triton(client, reference):
    scalars = dict(HEIGHT=64, WIDTH=80, NUM_FRAMES=9, NUM_INFERENCE_STEPS=2, SEED=11, GUIDANCE_SCALE=4.0, FPS=10)
    mp4, frames = generate(client, "a paper boat on a lake", "dark", **scalars)
    assert_frames_match(frames, reference_frames(reference, "a paper boat on a lake", "dark", **scalars), scalars)
    video = decode_mp4(mp4)
    assert video.fps == 10 and video.frames.shape == (9, 64, 80, 3)


def test_ensemble_runs_every_stage(client):
    small = dict(HEIGHT=64, WIDTH=64, NUM_FRAMES=5, NUM_INFERENCE_STEPS=2)
    assert_ensemble_runs_every_stage(client, WAN_T2V, lambda: generate(client, "a kite", **small))


@pytest.mark.parametrize(
    "prompt,fields,message",
    [
        ("a cat", dict(NUM_FRAMES=8), r"NUM_FRAMES: must be 4k\+1"),
        ("a cat", dict(NUM_FRAMES=1000), r"NUM_FRAMES: must be an integer in \[1, 241\]"),
        ("a cat", dict(HEIGHT=72), r"HEIGHT: must be a multiple of 16"),
        (None, dict(), r"PROMPT: is required"),
    ],
)
def test_bad_input_names_the_field_and_the_server_stays_up(client, prompt, fields, message):
    small = dict(HEIGHT=64, WIDTH=64, NUM_FRAMES=1, NUM_INFERENCE_STEPS=1, SEED=1)
    with pytest.raises(InferenceServerException, match=message):
        generate(client, prompt, **(small | fields))
    _, frames = generate(client, "a cat", **small)
    assert frames.shape == (1, 64, 64, 3)
