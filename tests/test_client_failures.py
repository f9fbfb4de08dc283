"""How ditserve.client and the `ditserve generate | edit | video` CLI fail, without tritonserver: a
request past the client's timeout (fake Triton servers over gRPC and HTTP that answer everything but
inference), malformed image URLs, and output folders that cannot be written. Each is one error of its
own kind; the CLI ends with exit code 1 and one line on stderr."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from test_client_cli import _fails
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

import ditserve.client
from ditserve.client import PIPELINES, AsyncClient, Client, RequestError, TritonTimeout
from ditserve.client.download import download, is_url
from ditserve.client.triton import GenerateResult

TIMEOUT_S = 0.5
ENSEMBLE_INPUTS = tuple(PIPELINES["generate"].datatypes())  # what the fakes' configurations declare


class SlowGrpc(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Ready, configured and counted like an ensemble (its stream model not loaded); inference waits
    for ``release``."""

    def __init__(self, release: threading.Event):
        self.release = release

    def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=not request.name.endswith("_stream"))

    def ModelConfig(self, request, context):
        inputs = [model_config_pb2.ModelInput(name=name) for name in ENSEMBLE_INPUTS]
        return service_pb2.ModelConfigResponse(config=model_config_pb2.ModelConfig(name=request.name, input=inputs))

    def ModelStatistics(self, request, context):
        stats = service_pb2.InferStatistics(compute_infer=service_pb2.StatisticDuration(ns=1))
        return service_pb2.ModelStatisticsResponse(model_stats=[service_pb2.ModelStatistics(inference_stats=stats)])

    def ModelInfer(self, request, context):
        self.release.wait()
        context.abort(grpc.StatusCode.INTERNAL, "released")


class HungGrpc(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Answers nothing until ``release``: a server stuck, e.g. in a model load."""

    def __init__(self, release: threading.Event):
        self.release = release

    def ModelReady(self, request, context):
        self.release.wait()
        return service_pb2.ModelReadyResponse(ready=True)

    def RepositoryIndex(self, request, context):
        self.release.wait()
        return service_pb2.RepositoryIndexResponse()


def slow_http(release: threading.Event) -> http.server.ThreadingHTTPServer:
    """Triton's HTTP endpoint as the client reads it: every GET is ready (a config and statistics for
    any model), every POST (inference) waits for ``release``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # one answer for the configuration and the statistics
            body = {"input": [{"name": name} for name in ENSEMBLE_INPUTS], "model_stats": [{"inference_stats": {}}]}
            self.answer(200, json.dumps(body).encode())

        def do_POST(self):
            release.wait()
            self.answer(500, b"")

        def answer(self, status: int, body: bytes) -> None:
            try:
                self.send_response(status)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                pass  # the client gave up first

        def log_message(self, *args):
            pass

    return http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)


@pytest.fixture(scope="module")
def slow_triton():
    """{protocol: host:port} of fake Triton servers whose inference never answers in time."""
    release = threading.Event()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(4))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(SlowGrpc(release), grpc_server)
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    hung_server = grpc.server(futures.ThreadPoolExecutor(4))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(HungGrpc(release), hung_server)
    hung_port = hung_server.add_insecure_port("127.0.0.1:0")
    hung_server.start()
    http_server = slow_http(release)
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    yield {"grpc": f"127.0.0.1:{grpc_port}", "http": f"127.0.0.1:{http_server.server_address[1]}",
           "hung": f"127.0.0.1:{hung_port}"}
    release.set()
    grpc_server.stop(0)
    hung_server.stop(0)
    http_server.shutdown()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_request_past_the_timeout_is_a_timeout_not_an_unreachable_server(slow_triton, protocol):
    url = slow_triton[protocol]
    start = time.monotonic()
    with pytest.raises(TritonTimeout, match=f"did not answer within {TIMEOUT_S:g} s") as info:
        Client(url, protocol, timeout_s=TIMEOUT_S).generate("a", size="64x64")
    assert info.value.timeout_s == TIMEOUT_S and time.monotonic() - start < 5

    async def run_async():
        client = AsyncClient(url, protocol, timeout_s=TIMEOUT_S)
        try:
            await client.generate("a", size="64x64")
        finally:
            await client.close()

    with pytest.raises(TritonTimeout, match=f"did not answer within {TIMEOUT_S:g} s"):
        asyncio.run(run_async())


def test_a_grpc_server_that_answers_nothing_times_out_before_the_request(slow_triton):
    """The readiness check and the repository index carry the client's deadline too, not only inference."""
    client = Client(slow_triton["hung"], "grpc", timeout_s=TIMEOUT_S)
    for call in (lambda: client.generate("a", size="64x64"), client.loaded_ensembles):
        start = time.monotonic()
        with pytest.raises(TritonTimeout, match=f"did not answer within {TIMEOUT_S:g} s"):
            call()
        assert time.monotonic() - start < 5

    async def ready():
        client = AsyncClient(slow_triton["hung"], "grpc", timeout_s=TIMEOUT_S)
        try:
            return await client.streams("flux_t2i")
        finally:
            await client.close()

    with pytest.raises(TritonTimeout):
        asyncio.run(ready())


def test_cli_reports_a_timeout_in_one_line_naming_the_option(slow_triton, capsys, tmp_path):
    argv = ["generate", "--prompt", "a", "--url", slow_triton["grpc"], "--timeout", str(TIMEOUT_S),
            "--output-dir", str(tmp_path)]
    err = _fails(argv, capsys)
    assert f"did not answer within {TIMEOUT_S:g} s" in err and "--timeout" in err and "unreachable" not in err, err


@pytest.mark.parametrize("url", ["http://[::1/x.png", "http://a\x01b/x.png", "https://\x00/x"])
def test_a_malformed_url_is_a_request_error_naming_the_field(url, capsys):
    assert is_url(url)  # a URL, if a bad one: not a file name
    with pytest.raises(RequestError, match="is not a valid URL") as info:
        download(url, "image")
    assert info.value.field == "image"
    assert "image: " in _fails(["edit", "--prompt", "a", "--image", url], capsys)


class FakeClient:
    """ditserve.client.Client for the CLI: records whether a request was sent."""

    sent = 0

    def __init__(self, *args, **kwargs):
        pass

    def streams(self, model: str) -> bool:
        return False

    def run(self, *args, **kwargs) -> GenerateResult:
        FakeClient.sent += 1
        return GenerateResult([b"png"], np.zeros((1, 64, 64, 3), np.uint8), 0.1, {})


def test_cli_output_folder_failures_are_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(ditserve.client, "Client", FakeClient)
    (tmp_path / "a_file").touch()
    err = _fails(["generate", "--prompt", "a", "--output-dir", str(tmp_path / "a_file" / "out")], capsys)
    assert "Not a directory" in err and FakeClient.sent == 0, err  # found before the request
    (tmp_path / "flux_t2i_0.png").mkdir()  # where the image goes: the write fails
    err = _fails(["generate", "--prompt", "a", "--output-dir", str(tmp_path)], capsys)
    assert "Is a directory" in err and "flux_t2i_0.png" in err and FakeClient.sent == 1, err
