"""wan_i2v through a real tritonserver (the shared server fixture): frame parity with WanImageToVideoPipeline
on tiny-wan-i2v (CLIP context), the MP4, bad images, the stage list."""

from __future__ import annotations

import pytest
import tritonclient.grpc as grpcclient
from flux_reference import reference_pipeline
from test_wan_i2v_parity import IMAGES
from test_wan_server import generate
from tritonclient.utils import InferenceServerException
from wan_reference import assert_ensemble_runs_every_stage, assert_frames_match, decode_mp4, reference_frames

from ditserve.wan import WAN_I2V

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def client(triton_server):
    return grpcclient.InferenceServerClient(triton_server.grpc_url)


def test_matches_wan_i2v_pipeline_through_triton(client):
    from diffusers import WanImageToVideoPipeline

    reference = reference_pipeline("tiny-wan-i2v", WanImageToVideoPipeline)
    scalars = dict(HEIGHT=64, WIDTH=96, NUM_FRAMES=5, NUM_INFERENCE_STEPS=2, SEED=11, GUIDANCE_SCALE=4.0, FPS=10)
    mp4, frames = generate(client, "a paper boat on a lake", "dark", model=WAN_I2V.name, image=IMAGES["jpeg"], **scalars)
    expected = reference_frames(reference, "a paper boat on a lake", "dark", IMAGES["jpeg"], **scalars)
    assert_frames_match(frames, expected, scalars)
    video = decode_mp4(mp4)
    assert video.fps == 10 and video.frames.shape == (5, 64, 96, 3)


def test_ensemble_runs_every_stage(client):
    small = dict(HEIGHT=64, WIDTH=64, NUM_FRAMES=5, NUM_INFERENCE_STEPS=2)
    request = lambda: generate(client, "a kite", model=WAN_I2V.name, image=IMAGES["jpeg"], **small)  # noqa: E731
    assert_ensemble_runs_every_stage(client, WAN_I2V, request)


@pytest.mark.parametrize("image,message", [
    (None, r"IMAGE: is required"),
    (b"\x89PNG\r\n\x1a\n not really", r"IMAGE: is not a readable PNG, JPEG or WebP image"),
], ids=["missing", "broken"])
def test_bad_image_names_the_field_and_the_server_stays_up(client, image, message):
    small = dict(HEIGHT=64, WIDTH=64, NUM_FRAMES=1, NUM_INFERENCE_STEPS=1, SEED=1)
    with pytest.raises(InferenceServerException, match=message):
        generate(client, "a cat", model=WAN_I2V.name, image=image, **small)
    _, frames = generate(client, "a cat", model=WAN_I2V.name, image=IMAGES["png"], **small)
    assert frames.shape == (1, 64, 64, 3)
