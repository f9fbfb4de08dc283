"""Sequence parallelism through a real tritonserver: flux_denoiser with sp_degree 2 (gloo on CPU).

The image equals the single-process pipeline's; a worker killed mid-request fails that request
alone and the next one succeeds; unloading the model or stopping the server leaves no worker.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flux_reference import CPU_FP32, make_row, pixel_diff
from test_parallel_denoiser import cpu_seconds

from ditserve.client import Client
from ditserve.flux import FLUX_T2I
from ditserve.pipeline import LocalPipeline
from ditserve.server import TritonServer, TritonServerError, locate_tritonserver
from ditserve.stage import Runtime

pytestmark = pytest.mark.server
REPO = Path(__file__).resolve().parent.parent / "model_repository"
MODELS = [FLUX_T2I.name, *(s.model for s in FLUX_T2I.stages)]


def worker_pids(server: TritonServer) -> list[int]:
    """ditserve.parallel.worker processes in the server's session (its stubs' children)."""
    sid = os.getsid(server.pid)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"ditserve.parallel.worker" in f.read() and os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return pids


def wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@pytest.fixture(scope="module")
def sp_server(tmp_path_factory):
    try:
        locate_tritonserver()
    except TritonServerError as err:
        pytest.skip(f"no tritonserver available: {err}")
    repo = tmp_path_factory.mktemp("sp_repo")
    for model in MODELS:
        shutil.copytree(REPO / model, repo / model)
    config = repo / "flux_denoiser" / "config.pbtxt"
    text = config.read_text()
    assert 'key: "sp_degree" value: { string_value: "1" }' in text
    config.write_text(text.replace('key: "sp_degree" value: { string_value: "1" }', 'key: "sp_degree" value: { string_value: "2" }'))
    server = TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, host="127.0.0.1", models=MODELS,
                          model_path="tiny", device="cpu", dtype="float32",
                          log_file=tmp_path_factory.mktemp("sp_log") / "tritonserver.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def reference_image(row) -> np.ndarray:
    return LocalPipeline(FLUX_T2I, Runtime(model_path="tiny", **CPU_FP32))([row])[0]["IMAGE"]


def test_sequence_parallel_image_equals_the_single_process_one(sp_server):
    assert len(worker_pids(sp_server)) == 1
    scalars = dict(HEIGHT=64, WIDTH=80, NUM_INFERENCE_STEPS=2, SEED=3, TRUE_CFG_SCALE=2.0)
    result = Client(sp_server.grpc_url, protocol="grpc").generate("a paper boat", "dark", **scalars)
    expected = reference_image(make_row("a paper boat", "dark", **scalars))
    assert pixel_diff(result.pixels, expected) <= 1


def test_killed_worker_fails_one_request_and_the_next_succeeds(sp_server):
    (worker,) = worker_pids(sp_server)
    client = Client(sp_server.grpc_url, protocol="grpc")
    outcome: dict = {}

    def slow_request():
        try:
            outcome["result"] = client.generate("a slow request", HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=200, SEED=1)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    before = cpu_seconds(worker)
    thread = threading.Thread(target=slow_request)
    thread.start()
    assert wait_for(lambda: cpu_seconds(worker) > before + 0.3 or not thread.is_alive(), 60)
    assert thread.is_alive(), f"the request ended before the worker was killed: {outcome}"
    os.kill(worker, 9)
    thread.join(60)
    assert "error" in outcome, outcome
    assert f"parallel worker rank 1 (pid {worker}) exited with status -9" in str(outcome["error"])
    assert sp_server.is_ready()

    scalars = dict(HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=4)
    result = Client(sp_server.grpc_url, protocol="grpc").generate("a second try", **scalars)
    expected = reference_image(make_row("a second try", **scalars))
    assert pixel_diff(result.pixels, expected) <= 1
    assert len(worker_pids(sp_server)) == 1 and worker not in worker_pids(sp_server)


def test_unload_and_stop_leave_no_worker(sp_server):
    import tritonclient.http as httpclient

    control = httpclient.InferenceServerClient(sp_server.http_url.removeprefix("http://"))
    assert len(worker_pids(sp_server)) == 1
    control.unload_model("flux_denoiser")
    assert wait_for(lambda: not worker_pids(sp_server)), f"workers left after unload: {worker_pids(sp_server)}"
    control.load_model("flux_denoiser")
    (worker,) = worker_pids(sp_server)
    # An open keep-alive connection holds tritonserver's shutdown for its whole exit timeout (20 s).
    control.close()
    sp_server.stop()
    assert wait_for(lambda: not os.path.exists(f"/proc/{worker}")), "a worker outlived the server"
