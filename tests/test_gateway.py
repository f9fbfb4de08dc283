"""The OpenAI-compatible gateway (`ditserve openai`) in front of the session's real tritonserver:
the official `openai` package and raw HTTP (httpx) against uvicorn in a thread, and Starlette's
TestClient (in-process ASGI) for API keys and an unreachable Triton."""

from __future__ import annotations

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

from ditserve.cli import main
from ditserve.client.gateway import MAX_BODY_BYTES, create_app
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
    assert response.status_code == 404 and "model qwen_image_edit is not loaded" in response.json()["error"]["message"]
    # wan_t2v is in the repository now; the gateway does not serve video requests yet.
    for method, path in (("POST", "/videos"), ("GET", "/videos/video_1"), ("GET", "/videos/video_1/content")):
        response = httpx.request(method, gateway + path, json={"prompt": "a"})
        assert response.status_code == 501 and "wan_t2v is loaded" in response.json()["error"]["message"]
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
