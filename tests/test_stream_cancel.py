"""A streamed request that its client cancels starts no further stage (``ditserve.streaming``), through the
session's real tritonserver (tiny FLUX on CPU)."""

from __future__ import annotations

import queue
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from test_client_cli import flux_inputs

from ditserve.client import Client

STAGES = ("flux_denoiser", "flux_vae_decoder", "flux_postprocess")
# About 2.5 s of denoising on the tiny model on 2 CPU cores (45 ms a step at 512x512), far longer than
# the cancel takes to reach the stream model after the first step.
LONG = dict(PROMPT=b"a kite", HEIGHT=512, WIDTH=512, NUM_INFERENCE_STEPS=60)


def successes(server) -> np.ndarray:
    """Each of STAGES' successful inferences, from Triton's statistics."""
    counts = []
    for model in STAGES:
        stats = server.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]
        counts.append(int(stats.get("success", {}).get("count", 0)))
    return np.array(counts)


@pytest.mark.server
def test_a_stream_cancelled_after_its_first_step_starts_no_later_stage(triton_server):
    server = grpcclient.InferenceServerClient(triton_server.grpc_url)
    before = successes(server)
    answers: queue.Queue = queue.Queue()
    server.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=120)
    try:
        server.async_stream_infer("flux_t2i_stream", flux_inputs(**LONG), request_id="cancelled")
        result, error = answers.get(timeout=120)
        assert error is None and result.as_numpy("STEP")[0][0] == 1, error
    finally:
        server.stop_stream(cancel_requests=True)
    # The denoiser's batch runs to its end (see ditserve.streaming); then the stream model checks for the cancel.
    deadline = time.monotonic() + 60
    while (successes(server) - before)[0] == 0:
        assert time.monotonic() < deadline, "the cancelled request's denoising did not end"
        time.sleep(0.1)
    # The server stays up and streams the next request. Without the check, the cancelled request's VAE
    # decoder and postprocess would have run before this one's (they are called as its denoiser answers).
    steps = []
    image = Client(triton_server.grpc_url, protocol="grpc").generate(
        "a lighthouse", size="64x64", num_inference_steps=2, progress=steps.append)
    assert image.pixels.shape[1:3] == (64, 64) and [(p.step, p.total) for p in steps] == [(1, 2), (2, 2)]
    assert (successes(server) - before).tolist() == [2, 1, 1], "a stage ran after the cancel"
