"""The OpenAI gateway's request checks and error mapping, without Triton: Starlette's TestClient over
``create_app`` with a fake AsyncClient that records what would be sent. Malformed values, options the
gateway cannot honour, bad image URLs and multipart limits are 400s naming the field; a Triton request
past --triton-timeout is a 504 (a video job fails with code timeout)."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient
from test_qwen_image_edit_request import encode, gradient

import ditserve.client.gateway as gateway
from ditserve.cli import main
from ditserve.client.pipelines import PIPELINES, Pipeline
from ditserve.client.triton import GenerateResult, TritonTimeout, VideoResult

PNG = encode(gradient(16, 16))
JSON = {"content-type": "application/json"}


class FakeTriton:
    """AsyncClient's gateway-facing methods; ``sent`` records each run's (kind, model, fields)."""

    def __init__(self, url: str, protocol: str = "grpc", timeout_s: float = 600.0):
        self.url, self.timeout_s = url, timeout_s
        self.sent: list[tuple[str, str, dict]] = []
        self.fail: Exception | None = None
        self.loop_thread: int | None = None  # the event loop's thread, seen by is_model_ready
        FakeTriton.last = self

    async def run(self, kind: str, model: str, *, outputs=None, progress=None, **fields):
        await asyncio.to_thread(PIPELINES[kind].tensors, fields)  # checked as AsyncClient.run checks them
        self.sent.append((kind, model, fields))
        if self.fail is not None:
            raise self.fail
        if kind == "video":
            return VideoResult(mp4=b"mp4", frames=None, latency_s=0.1, stage_ms={})
        png = io.BytesIO()
        Image.new("RGB", (64, 64)).save(png, "PNG")
        return GenerateResult([png.getvalue()], np.zeros((1, 64, 64, 3), np.uint8), 0.1, {})

    async def is_model_ready(self, model: str) -> bool:
        self.loop_thread = threading.get_ident()
        return True

    async def streams(self, model: str) -> bool:
        return False

    async def close(self) -> None:
        pass


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setattr(gateway, "AsyncClient", FakeTriton)
    with TestClient(gateway.create_app("fake:1", allow_image_urls=True), raise_server_exceptions=False) as client:
        yield client


def finished(client: TestClient, video_id: str) -> dict:
    deadline = time.monotonic() + 10
    while (video := client.get(f"/v1/videos/{video_id}").json())["status"] in ("queued", "in_progress"):
        assert time.monotonic() < deadline, video
        time.sleep(0.01)
    return video


GENERATIONS, VIDEOS = "/v1/images/generations", "/v1/videos"
BAD_JSON = [
    pytest.param(GENERATIONS, {"output_format": ["png"]}, "output_format", "must be a string", id="output-format-list"),
    pytest.param(GENERATIONS, {"response_format": ["b64_json"]}, "response_format", "must be a string", id="format-list"),
    pytest.param(GENERATIONS, {"model": ["flux_t2i"]}, "model", "must be a string, got list", id="model-list"),
    pytest.param(GENERATIONS, {"model": 5}, "model", "must be a string, got int", id="model-int"),
    pytest.param(VIDEOS, {"model": ["wan_t2v"]}, "model", "must be a string, got list", id="video-model-list"),
    pytest.param(VIDEOS, {"input_reference": 5}, "input_reference", "got int", id="reference-int"),
    pytest.param(VIDEOS, {"input_reference": {"image_url": "http://x/y.png"}}, "input_reference", "got dict",
                 id="reference-dict"),
    pytest.param(GENERATIONS, {"background": "transparent"}, "background", "allowed: auto, opaque", id="transparent"),
    pytest.param(GENERATIONS, {"quality": "hd"}, "quality", "allowed: auto, standard", id="quality-hd"),
    pytest.param(GENERATIONS, {"style": "natural"}, "style", "leave it out", id="style"),
    pytest.param(GENERATIONS, {"moderation": "auto"}, "moderation", "allowed: low", id="moderation"),
    pytest.param(GENERATIONS, {"input_fidelity": "high"}, "input_fidelity", "allowed: low", id="input-fidelity"),
    pytest.param(GENERATIONS, {"output_compression": 10}, "output_compression", "not png", id="compression-png"),
]


@pytest.mark.parametrize("path,fields,param,text", BAD_JSON)
def test_malformed_or_unhonoured_values_are_400s_naming_the_field(client, path, fields, param, text):
    response = client.post(path, json={"prompt": "a", "size": "64x64"} | fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and text in error["message"], error
    assert FakeTriton.last.sent == []  # refused before anything went to Triton


@pytest.mark.parametrize("path", [GENERATIONS, VIDEOS])
@pytest.mark.parametrize("body,param", [
    pytest.param('{"prompt": "a \\ud800"}', "prompt", id="prompt"),
    pytest.param('{"prompt": "a", "model": "\\ud800"}', "model", id="model"),
    pytest.param('{"prompt": "a", "\\ud800": 1}', "\ud800", id="field-name"),  # echoed in the error body
])
def test_a_lone_surrogate_is_a_400_naming_the_field(client, path, body, param):
    response = client.post(path, content=body, headers=JSON)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error


def test_deeply_nested_json_is_a_400(client):
    response = client.post(GENERATIONS, content="[" * 100_000 + "]" * 100_000, headers=JSON)
    assert response.status_code == 400 and "nested too deeply" in response.json()["error"]["message"], response.text
    assert client.post(GENERATIONS, json={"prompt": "still up"}).status_code == 200


def test_values_the_gateway_honours_as_it_is_are_accepted(client):
    body = {"prompt": "a", "background": "opaque", "quality": "auto", "style": None, "moderation": "low",
            "input_fidelity": "low", "user": "u-1", "safety_identifier": "s-1", "output_format": "jpeg",
            "output_compression": 90}
    response = client.post(GENERATIONS, json=body)
    assert response.status_code == 200, response.text
    # The table's fields only: the OpenAI options are the gateway's, the metadata is not sent.
    assert FakeTriton.last.sent == [("generate", "flux_t2i", {"prompt": "a"})]


@pytest.mark.parametrize("url", ["http://[::1/x.png", "http://a\x01b/x.png"])
def test_a_malformed_image_url_is_a_400_naming_the_field(client, url):
    response = client.post("/v1/images/edits", data={"prompt": "a", "image": url})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "image" and "is not a valid URL" in error["message"], error


@pytest.mark.parametrize("path,field", [("/v1/images/edits", "image[]"), (VIDEOS, "input_reference")])
def test_too_many_files_names_the_routes_file_field(client, path, field):
    response = client.post(path, data={"prompt": "a"}, files=[(field, ("a.png", PNG, "image/png"))] * 4)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field.removesuffix("[]"), response.text


def test_a_video_request_is_checked_once_off_the_event_loop(client, monkeypatch):
    """Checking the reference image decodes it: in a thread, once before the job (also with seconds),
    then once more by the job's AsyncClient.run."""
    checks: list[int] = []
    tensors = Pipeline.tensors

    def recorded(self, fields):
        checks.append(threading.get_ident())
        return tensors(self, fields)

    monkeypatch.setattr(Pipeline, "tensors", recorded)
    response = client.post(VIDEOS, data={"prompt": "a", "size": "64x64", "seconds": "4", "fps": "1"},
                           files={"input_reference": ("in.png", encode(gradient(64, 64)), "image/png")})
    assert response.status_code == 200, response.text
    video = finished(client, response.json()["id"])
    assert video["status"] == "completed", video["error"]
    assert len(checks) == 2 and FakeTriton.last.loop_thread not in checks, checks
    # A frame count that the table refuses still names seconds.
    response = client.post(VIDEOS, json={"prompt": "a", "seconds": "16", "fps": 16})
    assert response.status_code == 400 and response.json()["error"]["param"] == "seconds", response.text


def test_a_triton_request_past_the_timeout_is_a_504_and_a_failed_video(monkeypatch):
    monkeypatch.setattr(gateway, "AsyncClient", FakeTriton)
    with TestClient(gateway.create_app("fake:1", triton_timeout_s=7.5)) as client:
        assert FakeTriton.last.timeout_s == 7.5  # --triton-timeout reaches the client
        FakeTriton.last.fail = TritonTimeout("fake:1", 7.5)
        response = client.post(GENERATIONS, json={"prompt": "a"})
        assert response.status_code == 504, response.text
        error = response.json()["error"]
        assert error["code"] == "timeout" and "7.5 s" in error["message"] and "--triton-timeout" in error["message"]
        video = finished(client, client.post(VIDEOS, json={"prompt": "a"}).json()["id"])
        assert video["status"] == "failed" and video["error"]["code"] == "timeout", video
        assert "--triton-timeout" in video["error"]["message"]


@pytest.mark.parametrize("status, message, expected, param", [
    ("400", "flux_request: a message naming no input", 400, None),  # HTTP: the stage's INVALID_ARG
    ("StatusCode.INVALID_ARGUMENT", "no input named here", 400, None),  # the same over gRPC
    (None, "HEIGHT: must be a multiple of 16", 400, "size"),  # a gRPC stream's error: no code, an input named
    ("500", "flux_denoiser: internal error: RuntimeError: boom", 500, None),
])
def test_triton_errors_map_by_their_code_then_by_the_input_named(client, status, message, expected, param):
    from tritonclient.utils import InferenceServerException

    FakeTriton.last.fail = InferenceServerException(message, status=status)
    response = client.post(GENERATIONS, json={"prompt": "a"})
    assert response.status_code == expected, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_openai_command_options(monkeypatch, capsys):
    served = []

    def serve(*args) -> int:
        served.append(args)
        return 0

    monkeypatch.setattr(gateway, "serve", serve)
    assert main(["openai", "--triton-timeout", "1800", "--max-video-jobs", "4"]) == 0
    assert served[0][-2:] == (4, 1800.0)
    for option, value, text in [("--max-video-jobs", "0", "must be an integer >= 1, got 0"),
                                ("--max-video-jobs", "-3", "must be an integer >= 1, got -3"),
                                ("--triton-timeout", "0", "must be a finite number > 0, got 0")]:
        with pytest.raises(SystemExit):
            main(["openai", option, value])
        assert f"argument {option}: {text}" in capsys.readouterr().err
