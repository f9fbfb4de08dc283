"""conftest.ready_server: the shared test server gets one more start only after Triton's upstream
Python-backend abort while loading; any other start-up failure is reported as it is."""

from __future__ import annotations

import pytest

from conftest import UPSTREAM_LOAD_ABORT, ready_server
from ditserve.server import TritonServerError


class FakeServer:
    def __init__(self, first_error: str):
        self.first_error, self.calls = first_error, []

    def wait_ready(self):
        self.calls.append("wait_ready")
        raise TritonServerError(self.first_error)

    def stop(self, timeout=None):
        self.calls.append("stop")

    def start(self, wait=True):
        self.calls.append("start")


def test_the_upstream_abort_gets_one_more_start():
    server = FakeServer(f"tritonserver exited with code -6 before becoming ready; ... what():  {UPSTREAM_LOAD_ABORT}")
    with pytest.warns(UserWarning, match="starting it once more"):
        assert ready_server(server) is server
    assert server.calls == ["wait_ready", "stop", "start"]


def test_other_start_up_failures_are_raised():
    server = FakeServer("tritonserver exited with code 1 before becoming ready; ... failed to load 'flux_denoiser'")
    with pytest.raises(TritonServerError, match="failed to load"):
        ready_server(server)
    assert server.calls == ["wait_ready", "stop"]
