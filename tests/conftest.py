"""Shared pytest fixtures for ditserve.

- ``free_port`` / ``free_ports``: TCP ports free on 127.0.0.1 right now.
- ``triton_server`` (session scope): a real tritonserver over the repository's
  ``model_repository/`` with every model loaded, model path ``tiny`` (override with
  ``DITSERVE_TEST_MODEL_PATH``), on CPU in float32, bound to 127.0.0.1 on free ports.
  It yields a :class:`ditserve.server.TritonServer` (``.http_url``, ``.grpc_url``,
  ``.metrics_url``, ``.log_file``, ``.log_tail()``). Tests using it should be marked
  ``server``.
- Loading that repository is the largest single cost of the suite (28 stub processes that
  import torch and diffusers: about 2 minutes of both cores of the 2-core CI machine). So when
  any selected test uses ``triton_server``, the server is started without waiting before the
  first test, and the modules marked ``server`` run after all others: the repository loads
  while the other tests run (they leave about one core idle), and ``triton_server`` only
  waits for whatever is left.
- ``zero_cond_t_edit``: tiny-qwen-image-edit as Qwen-Image-Edit-2511 (``zero_cond_t``), saved in a temporary folder.
- Tests marked ``gpu`` are skipped when torch sees no CUDA device.

Markers themselves are declared in pyproject.toml.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

# Before torch loads OpenMP, which reads it once; subprocesses (gloo workers, tritonserver's stubs)
# inherit it. With OpenMP's default spin-waiting, a 2-thread torch op waits actively for a thread that
# another process (the shared server loading, another rank, another test run) has taken off a core:
# test_wan_i2v_parity took 44-50 s instead of 13-15 s with passive waiting at load 3.5 on 2 cores,
# and passive waiting cost about 6% at load 1.6-2.0 (flux + qwen-image-edit parity 38.0 s
# against 35.7 s). The server sets the same for its stubs (ditserve.server).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run only in Triton's interpreter, and triton reads this variable
# when it is first imported (diffusers may import it before any kernel test does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ditserve.server import TritonServer, TritonServerError, find_free_ports, locate_tritonserver

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = REPO_ROOT / "model_repository"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_items and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
        for item in gpu_items:
            item.add_marker(skip)
    # Whole modules move, in their own order, so that module-scoped fixtures are built once.
    server_modules = {item.module for item in items if item.get_closest_marker("server") is not None}
    items.sort(key=lambda item: item.module in server_modules)


@pytest.fixture
def free_ports():
    """Factory: ``free_ports(n)`` -> n distinct free ports on 127.0.0.1."""
    return lambda n=1: find_free_ports(n)


@pytest.fixture
def free_port() -> int:
    return find_free_ports(1)[0]


@pytest.fixture(scope="session", autouse=True)
def _triton_server_process(request, tmp_path_factory):
    """The shared server's process, started without waiting before the first test when any
    selected test uses ``triton_server``; None when none does, the error when there is no
    tritonserver."""
    if not any("triton_server" in item.fixturenames for item in request.session.items):
        yield None
        return
    try:
        locate_tritonserver()
    except TritonServerError as err:
        yield err
        return
    log_dir = tmp_path_factory.mktemp("tritonserver")
    server = TritonServer(
        MODEL_REPOSITORY,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        host="127.0.0.1",
        model_path=os.environ.get("DITSERVE_TEST_MODEL_PATH", "tiny"),
        device="cpu",
        dtype="float32",
        log_file=log_dir / "tritonserver.log",
        startup_timeout=float(os.environ.get("DITSERVE_TEST_STARTUP_TIMEOUT", "600")),
    )
    server.start(wait=False)
    try:
        yield server
    finally:
        # Killed, not stopped gracefully: the 28 stubs' interpreters take longer to tear down
        # torch than tritonserver's 20 s exit timeout on 2 cores (22 s measured), and nothing is
        # checked after the last test. test_server_lifecycle.py tests the graceful stop.
        server.stop(timeout=0)


@pytest.fixture(scope="session")
def triton_server(_triton_server_process):
    """A running tritonserver over the real model repository (tiny model, CPU, fp32)."""
    if isinstance(_triton_server_process, TritonServerError):
        pytest.skip(f"no tritonserver available: {_triton_server_process}")
    return ready_server(_triton_server_process)


# Triton's Python backend can abort while its stubs start, with this exception from its shared-memory
# mutex (an upstream race, triton-inference-server/server#8882); seen once here, in a fresh-clone run of
# this suite (2026-11-26) while gloo tests loaded the 2 cores. Only this abort gets a second start.
UPSTREAM_LOAD_ABORT = "boost::interprocess::lock_exception"


def ready_server(server):
    """server once it is ready; started once more if it aborted with UPSTREAM_LOAD_ABORT while loading."""
    try:
        server.wait_ready()
    except TritonServerError as err:
        server.stop(timeout=0)
        if UPSTREAM_LOAD_ABORT not in str(err):
            raise
        warnings.warn(f"tritonserver aborted while loading the repository ({UPSTREAM_LOAD_ABORT}); starting it once more")
        server.start(wait=True)
    except BaseException:
        server.stop(timeout=0)
        raise
    return server


@pytest.fixture(scope="session")
def zero_cond_t_edit(tmp_path_factory) -> str:
    """tiny-qwen-image-edit with ``zero_cond_t`` in its transformer config, as Qwen-Image-Edit-2511's: the
    same weights, since the flag adds none."""
    from ditserve.checkpoints import resolve_model_path

    path = tmp_path_factory.mktemp("qwen-edit-zero-cond-t") / "ckpt"
    shutil.copytree(resolve_model_path("tiny-qwen-image-edit"), path)
    config_file = path / "transformer" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "zero_cond_t": True}))
    return str(path)
