"""wan_i2v through a real tritonserver (the shared server fixture): frame parity with WanImageToVideoPipeline
on tiny-wan-i2v (CLIP context), the MP4, bad images, the stage list."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from test_wan_i2v_parity import IMAGES, reference_frames
from test_wan_server import generate
from tritonclient.utils import InferenceServerException

from ditserve.wan import WAN_I2V

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def client(triton_server):
    return grpcclient.InferenceServerClient(triton_server.grpc_url)


def test_matches_wan_i2v_pipeline_through_triton(client):
    import torch
    from diffusers import WanImageToVideoPipeline

    from ditserve.checkpoints import resolve_model_path

    reference = WanImageToVideoPipeline.from_pretrained(resolve_model_path("tiny-wan-i2v"), dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    scalars = dict(HEIGHT=64, WIDTH=96, NUM_FRAMES=5, NUM_INFERENCE_STEPS=2, SEED=11, GUIDANCE_SCALE=4.0, FPS=10)
    mp4, frames = generate(client, "a paper boat on a lake", "dark", model=WAN_I2V.name, image=IMAGES["jpeg"], **scalars)
    expected = reference_frames(reference, "a paper boat on a lake", "dark", IMAGES["jpeg"], **scalars)
    assert frames.shape == expected.shape == (5, 64, 96, 3) and frames.std() > 5
    assert np.abs(frames.astype(int) - expected.astype(int)).max() <= 1
    with av.open(io.BytesIO(mp4)) as container:  # FFmpeg's demuxer and H.264 decoder
        stream = container.streams.video[0]
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        assert stream.average_rate == 10 and (stream.width, stream.height) == (96, 64)
    assert len(decoded) == 5


def test_ensemble_runs_every_stage(client):
    config = client.get_model_config(WAN_I2V.name, as_json=True)["config"]
    assert [step["model_name"] for step in config["ensemble_scheduling"]["step"]] == [s.model for s in WAN_I2V.stages]
    for spec in WAN_I2V.stages:
        assert client.is_model_ready(spec.model), spec.model


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
