"""The OpenAI-compatible gateway (`ditserve openai`) in front of the session's real tritonserver:
the official `openai` package and raw HTTP (httpx) against uvicorn in a thread, and Starlette's
TestClient (in-process ASGI) for API keys, image URLs and an unreachable Triton. Images, edits and
videos are as small as the tiny checkpoints allow (64x64, 2 steps, 5 frames)."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image
from starlette.testclient import TestClient
from test_client_cli import EDIT, decode_mp4, http_files, input_image  # noqa: F401 - fixtures
from test_qwen_image_edit_request import encode, gradient, png_declaring

from ditserve.cli import main
from ditserve.client.gateway import MAX_BODY_BYTES, MAX_IMAGE_BYTES, create_app
from ditserve.client.video_jobs import JobError, JobsFull, VideoJob, VideoJobs
from ditserve.server import find_free_ports

pytestmark = pytest.mark.server
SMALL = {"size": "64x64", "num_inference_steps": 2}
REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"
ENSEMBLES = sorted(c.parent.name for c in REPOSITORY.glob("*/config.pbtxt") if 'platform: "ensemble"' in c.read_text())


@pytest.fixture(scope="module")
def gateway(triton_server):
    """Base URL (".../v1") of a gateway over gRPC, served by uvicorn in a thread."""
    port = find_free_ports(1)[0]
    server = uvicorn.Server(uvicorn.Config(create_app(triton_server.grpc_url, "grpc"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(10)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_openai_sdk_images_equal_the_cli_output(gateway, triton_server, tmp_path):
    sdk = openai.OpenAI(base_url=gateway, api_key="unused")
    response = sdk.images.generate(model="flux_t2i", prompt="a paper boat", size="64x64", n=2,
                                   response_format="b64_json", extra_body={"seed": 3, "num_inference_steps": 2})
    images = [decode(item.b64_json) for item in response.data]
    assert [image.size for image in images] == [(64, 64), (64, 64)] and response.created > 0

    argv = ["generate", "--prompt", "a paper boat", "--n", "2", "--size", "64x64", "--seed", "3",
            "--num-inference-steps", "2", "--url", triton_server.grpc_url, "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    for i, image in enumerate(images):
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(tmp_path / f"flux_t2i_{i}.png")))
    # The ensembles of the repository, not their stage models.
    assert sorted(model.id for model in sdk.models.list()) == ENSEMBLES


def test_raw_http_jpeg_and_webp(gateway):
    png = httpx.post(f"{gateway}/images/generations", json={"prompt": "a kite", "seed": 1, **SMALL}, timeout=60).json()
    assert png["output_format"] == "png" and png["size"] == "64x64"
    reference = decode(png["data"][0]["b64_json"])
    for output_format, pil_format in (("jpeg", "JPEG"), ("webp", "WEBP")):
        body = {"prompt": "a kite", "seed": 1, "output_format": output_format, "output_compression": 95, **SMALL}
        response = httpx.post(f"{gateway}/images/generations", json=body, timeout=60)
        assert response.status_code == 200, response.text
        image = decode(response.json()["data"][0]["b64_json"])
        assert (image.format, image.size) == (pil_format, (64, 64))
        expected = io.BytesIO()
        reference.save(expected, pil_format, quality=95)  # the same picture, encoded the same way
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(expected)))


BAD_REQUESTS = [
    pytest.param({"prompt": "a", "size": "64"}, 400, "size", id="size-malformed"),
    pytest.param({"prompt": "a", "size": "8192x64"}, 400, "size", id="size-too-large"),
    pytest.param({"prompt": "a", "size": "72x64"}, 400, "size", id="size-not-multiple-server-side"),
    pytest.param({"prompt": "a", "n": 9}, 400, "n", id="n-too-many"),
    pytest.param({"prompt": "a", "n": "2"}, 400, "n", id="n-string"),
    pytest.param({"prompt": "a", "response_format": "url"}, 400, "response_format", id="url-format"),
    pytest.param({"prompt": "a", "output_format": "gif"}, 400, "output_format", id="gif"),
    pytest.param({"prompt": "a", "output_compression": 101}, 400, "output_compression", id="compression"),
    pytest.param({"size": "64x64"}, 400, "prompt", id="no-prompt"),
    pytest.param({"prompt": ""}, 400, "prompt", id="empty-prompt"),
    pytest.param({"prompt": "a", "HEIGHT": 64}, 400, "HEIGHT", id="tensor-name"),
    pytest.param({"prompt": "a", "seed": -1}, 400, "seed", id="seed-negative"),
    pytest.param({"prompt": "a", "model": "dall-e-3"}, 404, "model", id="unknown-model"),
    # Loaded, but a stage, not a pipeline: named as the model (Triton's own error named PROMPT, an input).
    pytest.param({"prompt": "a", "model": "flux_denoiser"}, 400, "model", id="stage-model"),
]


@pytest.mark.parametrize("body,status,param", BAD_REQUESTS)
def test_bad_requests_get_openai_errors_naming_the_field(gateway, body, status, param):
    response = httpx.post(f"{gateway}/images/generations", json={"num_inference_steps": 2} | body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error", error


def test_malformed_and_oversized_bodies_and_missing_pipelines(gateway):
    post = f"{gateway}/images/generations"
    assert httpx.post(post, content=b"{not json").status_code == 400
    assert httpx.post(post, json=["a list"]).status_code == 400
    too_large = httpx.post(post, json={"prompt": "a" * MAX_BODY_BYTES})
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "body_too_large"
    response = httpx.post(gateway + "/images/edits", json={"prompt": "a"})
    assert response.status_code == 400 and "multipart/form-data" in response.json()["error"]["message"]
    for method, path in (("GET", "/videos/video_1"), ("DELETE", "/videos/video_1"), ("GET", "/videos/video_1/content")):
        response = httpx.request(method, gateway + path)
        assert response.status_code == 404 and response.json()["error"]["param"] == "video_id", response.text
    for query, param in (("order=up", "order"), ("limit=-1", "limit")):
        response = httpx.get(f"{gateway}/videos?{query}")
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=gateway, api_key="unused").images.generate(model="gpt-image-1", prompt="a")
    # After all of the above, both the gateway and Triton still answer.
    ok = httpx.post(post, json={"prompt": "still up", **SMALL}, timeout=60)
    assert ok.status_code == 200 and decode(ok.json()["data"][0]["b64_json"]).size == (64, 64)


def test_api_key(triton_server):
    with TestClient(create_app(triton_server.grpc_url, api_key="s3cret")) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = client.get("/v1/models", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_triton_unreachable_is_503():
    closed = f"127.0.0.1:{find_free_ports(1)[0]}"
    for protocol in ("grpc", "http"):
        with TestClient(create_app(closed, protocol)) as client:
            for response in (client.get("/v1/models"), client.post("/v1/images/generations", json={"prompt": "a"})):
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "triton_unavailable"


# --- /v1/images/edits -----------------------------------------------------------------------------


def test_openai_sdk_image_edit_equals_the_cli_output(gateway, triton_server, tmp_path, input_image):
    path, _ = input_image
    sdk = openai.OpenAI(base_url=gateway, api_key="unused")
    response = sdk.images.edit(model="qwen_image_edit", image=("in.png", path.read_bytes(), "image/png"),
                               prompt="make it red", size="64x64", response_format="b64_json",
                               extra_body={"seed": 4, "num_inference_steps": 2})
    (item,) = response.data
    image = decode(item.b64_json)
    assert image.size == (64, 64)
    assert main(["edit", *EDIT, "--image", str(path), "--url", triton_server.grpc_url, "--output-dir", str(tmp_path)]) == 0
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(tmp_path / "qwen_image_edit_0.png")))


def edit(url: str, files: list, **data) -> httpx.Response:
    fields = {"prompt": "make it red", "size": "64x64", "seed": "4", "num_inference_steps": "2"} | data
    return httpx.post(f"{url}/images/edits", data=fields, files=files, timeout=120)


def test_raw_http_edit_of_an_image_list_as_webp(gateway, input_image):
    response = edit(gateway, [("image[]", ("in.png", input_image[0].read_bytes(), "image/png"))],
                    output_format="webp", n="2")
    assert response.status_code == 200, response.text
    images = [decode(item["b64_json"]) for item in response.json()["data"]]
    assert [(image.format, image.size) for image in images] == [("WEBP", (64, 64))] * 2


PNG = encode(gradient(16, 16))
BAD_EDITS = [
    pytest.param([("image", ("in.png", PNG, "image/png")), ("mask", ("m.png", PNG, "image/png"))], {}, 400, "mask",
                 "takes no mask", id="mask"),
    pytest.param([], {}, 400, "image", "is required", id="no-image"),
    pytest.param([("image", ("in.png", PNG, "image/png"))] * 2, {}, 400, "image", "expected 1 image, got 2", id="two"),
    pytest.param([("image", ("bomb.png", png_declaring(5000, 5000), "image/png"))], {}, 400, "image",
                 "at most 16777216 pixels, got 5000x5000", id="pixels-from-header"),
    pytest.param([("image", ("big.png", PNG + b"\0" * MAX_IMAGE_BYTES, "image/png"))], {}, 413, "image",
                 f"larger than {MAX_IMAGE_BYTES} bytes", id="bytes"),
    pytest.param([], {"image": "http://127.0.0.1:9/in.png"}, 400, "image", "--allow-image-urls", id="url-not-allowed"),
    pytest.param([("image", ("in.png", PNG, "image/png"))], {"n": "two"}, 400, "n", "must be an integer", id="n-text"),
    pytest.param([("image", ("in.png", PNG, "image/png"))], {"size": "72x64"}, 400, "size", "multiple of 16",
                 id="size-server-side"),
]


@pytest.mark.parametrize("files,data,status,param,text", BAD_EDITS)
def test_bad_edits_get_openai_errors_naming_the_field(gateway, files, data, status, param, text):
    response = edit(gateway, files, **data)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and text in error["message"], error


def test_image_urls_are_downloaded_only_when_allowed(triton_server, input_image):
    path, url = input_image
    fields = {"prompt": "make it red", "size": "64x64", "seed": "4", "num_inference_steps": "2", "image": url}
    with TestClient(create_app(triton_server.grpc_url, allow_image_urls=True)) as client:
        response = client.post("/v1/images/edits", data=fields)  # urlencoded: a form without files
        assert response.status_code == 200, response.text
        with_file = client.post("/v1/images/edits", data={k: v for k, v in fields.items() if k != "image"},
                                files=[("image", ("in.png", path.read_bytes(), "image/png"))])
        assert response.json()["data"] == with_file.json()["data"]


# --- /v1/videos -----------------------------------------------------------------------------------

VIDEO = {"size": "64x64", "seed": 2, "num_inference_steps": 2}


def finished(retrieve, video_id: str, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while (video := retrieve(video_id))["status"] in ("queued", "in_progress"):
        assert time.monotonic() < deadline, video
        time.sleep(0.2)
    return video


# The SDK marks its Videos API deprecated (OpenAI's Sora service); the routes are this gateway's own.
@pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")
def test_openai_sdk_video_job_lifecycle(gateway):
    sdk = openai.OpenAI(base_url=gateway, api_key="unused")
    job = sdk.videos.create(prompt="a paper boat", model="wan_t2v", size="64x64",
                            extra_body={"num_frames": 5, "fps": 8, "seed": 2, "num_inference_steps": 2})
    assert (job.object, job.status, job.model, job.size, job.seconds) == ("video", "queued", "wan_t2v", "64x64", "0.5")
    video = finished(lambda video_id: sdk.videos.retrieve(video_id).model_dump(), job.id)
    assert (video["status"], video["progress"], video["error"]) == ("completed", 100, None)
    assert video["completed_at"] >= video["created_at"] == job.created_at
    assert job.id in [v.id for v in sdk.videos.list()]
    content = sdk.videos.download_content(job.id)
    frames, fps, size = decode_mp4(content.content)
    assert (len(frames), fps, size) == (5, 8.0, (64, 64))
    assert sdk.videos.delete(job.id).deleted
    with pytest.raises(openai.NotFoundError):
        sdk.videos.retrieve(job.id)


@pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")
def test_openai_sdk_video_with_input_reference_is_image_to_video(gateway, input_image):
    sdk = openai.OpenAI(base_url=gateway, api_key="unused")
    job = sdk.videos.create(prompt="a paper boat", size="64x64", input_reference=("in.png", input_image[0].read_bytes()),
                            extra_body={"num_frames": 5, "fps": 8, "seed": 2, "num_inference_steps": 2})
    assert job.model == "wan_i2v"
    video = finished(lambda video_id: sdk.videos.retrieve(video_id).model_dump(), job.id)
    assert video["status"] == "completed", video
    frames, fps, size = decode_mp4(sdk.videos.download_content(job.id).content)
    assert (len(frames), fps, size) == (5, 8.0, (64, 64))
    # A reference that is no image is refused before a job, naming OpenAI's field.
    bad = httpx.post(f"{gateway}/videos", data={"prompt": "a kite"}, files={"input_reference": ("x.png", b"not an image")})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input_reference", bad.text
    assert "input_reference: is not a readable PNG, JPEG or WebP image" in bad.json()["error"]["message"]


def test_raw_http_video_in_seconds_and_a_failed_job(gateway):
    # OpenAI's seconds at 1 fps: 4 s is 5 frames.
    response = httpx.post(f"{gateway}/videos", json={"prompt": "a kite", "seconds": "4", "fps": 1, **VIDEO})
    assert response.status_code == 200 and response.json()["seconds"] == "4", response.text

    def retrieve(video_id: str) -> dict:
        return httpx.get(f"{gateway}/videos/{video_id}").json()

    video = finished(retrieve, response.json()["id"])
    content = httpx.get(f"{gateway}/videos/{video['id']}/content")
    assert content.headers["content-type"] == "video/mp4"
    frames, fps, size = decode_mp4(content.content)
    assert (len(frames), fps, size) == (5, 1.0, (64, 64))
    # 8 frames passes the table (1 to 241) but not the checkpoint's 4k+1: the job fails, naming the field.
    failed = httpx.post(f"{gateway}/videos", json={"prompt": "a kite", "num_frames": 8, **VIDEO}).json()
    failed = finished(retrieve, failed["id"])
    assert failed["status"] == "failed" and failed["error"]["message"].startswith("num_frames: "), failed
    not_ready = httpx.get(f"{gateway}/videos/{failed['id']}/content")
    assert not_ready.status_code == 409 and not_ready.json()["error"]["code"] == "video_not_ready"


BAD_VIDEOS = [
    pytest.param({"true_cfg_scale": 2}, 400, "true_cfg_scale", id="true-cfg"),
    pytest.param({"seconds": "4", "num_frames": 5}, 400, "seconds", id="seconds-and-frames"),
    pytest.param({"seconds": "four"}, 400, "seconds", id="seconds-text"),
    pytest.param({"seconds": "16"}, 400, "seconds", id="seconds-too-long"),
    pytest.param({"input_reference": "x"}, 400, "input_reference", id="reference"),
    pytest.param({"size": "64"}, 400, "size", id="size"),
    pytest.param({"prompt": None}, 400, "prompt", id="no-prompt"),
    pytest.param({"model": "sora-2"}, 404, "model", id="model"),
]


def test_video_job_progress_counts_the_steps_over_grpc(gateway):
    """The gateway streams the job's request (gRPC, wan_t2v_stream loaded): progress rises with the steps."""
    body = {"prompt": "a kite", "num_frames": 5, "fps": 8, **VIDEO, "num_inference_steps": 40}
    video_id = httpx.post(f"{gateway}/videos", json=body).json()["id"]
    seen, deadline = [], time.monotonic() + 300
    while (video := httpx.get(f"{gateway}/videos/{video_id}").json())["status"] in ("queued", "in_progress"):
        assert time.monotonic() < deadline, video
        seen.append(video["progress"])
        time.sleep(0.01)
    assert video["status"] == "completed" and video["progress"] == 100
    assert seen == sorted(seen) and any(0 < p < 100 for p in seen), seen


@pytest.mark.parametrize("fields,status,param", BAD_VIDEOS)
def test_bad_video_requests_are_refused_before_a_job(gateway, fields, status, param):
    response = httpx.post(f"{gateway}/videos", json={"prompt": "a kite", **VIDEO} | fields)
    assert response.status_code == status and response.json()["error"]["param"] == param, response.text


def test_video_jobs_are_bounded():
    async def scenario():
        jobs, release = VideoJobs(limit=2), asyncio.Event()

        async def slow() -> bytes:
            await release.wait()
            return b"mp4"

        async def broken() -> bytes:
            raise JobError("invalid_request_error", "num_frames: must be 4k+1")

        def job() -> VideoJob:
            return VideoJob(model="wan_t2v", prompt="a", size="64x64", seconds="1")

        first, second = job(), job()
        jobs.start(first, slow)
        jobs.start(second, broken)
        await asyncio.sleep(0)
        assert (first.status, second.status, second.error.code) == ("in_progress", "failed", "invalid_request_error")
        third = job()
        jobs.start(third, slow)  # replaces the finished one
        assert jobs.get(second.id) is None and [j.id for j in jobs.newest_first()] == [third.id, first.id]
        with pytest.raises(JobsFull):  # two running: no room
            jobs.start(job(), slow)
        release.set()
        await asyncio.gather(first.task, third.task)
        assert (first.status, first.mp4, first.json()["progress"]) == ("completed", b"mp4", 100)
        await jobs.close()

    asyncio.run(scenario())
