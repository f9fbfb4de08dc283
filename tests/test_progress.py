"""Per-step progress without Triton: the denoisers' step hook and its socket channel
(``ditserve.progress``), the stream models' ensemble runner (``ditserve.streaming``) with a fake
``infer`` in place of BLS, and the CLI's step bar and spinner."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import sys
import time
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from ditserve import progress
from ditserve.client.terminal import Spinner, StepBar
from ditserve.denoising import DenoiserOptions, GroupedDenoiser
from ditserve.model_config import ConfigError, read_config
from ditserve.stage import RequestError, RequestParameter, Runtime
from ditserve.streaming import Cancelled, StageFailed, StreamPlan

REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"


@dataclasses.dataclass(frozen=True)
class Params:
    height: int
    width: int
    steps: int
    num_images: int = 1


@dataclasses.dataclass(frozen=True)
class Request:
    value: float
    params: Params


class Counter(GroupedDenoiser):
    """A denoiser without a model: each step adds 1 to every row's value, through ``self.steps``."""

    inputs = ("VALUE", "NUM_INFERENCE_STEPS")

    def __init__(self, max_batch_images: int = 8):
        super().__init__(Runtime("none", torch.device("cpu"), torch.float32), DenoiserOptions(max_batch_images=max_batch_images))
        self.timesteps_seen: list[list[int]] = []

    def parse(self, row):
        return Request(float(row["VALUE"]), Params(64, 64, int(row["NUM_INFERENCE_STEPS"])))

    def denoise(self, requests):
        values = torch.tensor([r.value for r in requests])
        seen = []
        for t in self.steps(list(range(10, 10 + requests[0].params.steps))):
            seen.append(t)
            values = values + 1
        self.timesteps_seen.append(seen)
        return list(values)


def row(value: float, steps: int, listener: str | None = None, position: int = 0) -> dict:
    out = {"VALUE": torch.tensor(value), "NUM_INFERENCE_STEPS": torch.tensor(steps)}
    if listener is not None:
        out[progress.PARAMETER] = RequestParameter(listener, position)
    return out


def listen(run):
    """Run ``run(listener_name)`` in a thread while a Listener collects its (rows, done, total) events."""

    async def scenario():
        events = []
        async with progress.Listener(lambda rows, done, total: events.append((rows, done, total))) as listener:
            result = await asyncio.to_thread(run, listener.name)
        return result, events

    return asyncio.run(scenario())


def by_rows(events) -> dict[tuple[int, ...], list[tuple[int, int]]]:
    grouped = defaultdict(list)
    for rows, done, total in events:
        grouped[tuple(rows)].append((done, total))
    return dict(grouped)


def test_without_listeners_the_loop_only_counts():
    stage = Counter()
    results, events = listen(lambda name: stage.execute([row(1.0, 3), row(2.0, 3)]))
    assert [float(r["LATENTS"]) for r in results] == [4.0, 5.0]
    assert events == [] and stage.timesteps_seen == [[10, 11, 12]] and stage.on_step is None


def test_each_row_hears_its_own_steps_and_bad_parameters_fail_alone():
    stage = Counter(max_batch_images=2)

    def run(name):
        return stage.execute([
            row(0.0, 3, name, position=0),  # chunk 1, with the plain row below
            row(10.0, 3),
            row(20.0, 2, name, position=1),  # another step count: another group
            row(30.0, 3, "ditserve-progress/not-hex", position=2),
            row(40.0, 3, name, position=3),  # the third row of 3 steps: a second chunk
        ])

    results, events = listen(run)
    assert [float(r["LATENTS"]) for i, r in enumerate(results) if i != 3] == [3.0, 13.0, 22.0, 43.0]
    assert isinstance(results[3], RequestError) and results[3].field == "progress"
    # Each chunk has its own connection: lines of one connection arrive in order, but the listener's
    # readers of two connections may interleave (seen under load), so compare per row.
    assert by_rows(events) == {(0,): [(1, 3), (2, 3), (3, 3)], (3,): [(1, 3), (2, 3), (3, 3)], (1,): [(1, 2), (2, 2)]}
    assert stage.on_step is None


def test_rows_of_one_request_in_one_chunk_share_a_line():
    stage = Counter()
    _, events = listen(lambda name: stage.execute([row(0.0, 2, name, 0), row(0.0, 2, name, 1)]))
    assert events == [([0, 1], 1, 2), ([0, 1], 2, 2)]


def test_a_listener_that_is_gone_costs_the_denoiser_nothing():
    gone = progress.PREFIX + "0" * 32  # well formed, nobody listening
    results = Counter().execute([row(1.0, 2, gone), row(2.0, 2)])
    assert [float(r["LATENTS"]) for r in results] == [3.0, 4.0]


def test_a_listener_that_does_not_read_never_blocks_the_denoiser():
    async def scenario():
        async with progress.Listener(lambda *event: None) as listener:
            listener._loop.remove_reader(listener._sock.fileno())  # accepts nothing: the backlog holds the connection
            reporter = progress.Reporter([progress.Target(listener.name, 0)])
            start = time.monotonic()
            for step in range(100_000):  # far beyond the socket's buffer
                reporter(step % 10_000, 10_000)
            dropped = not reporter._channels
            reporter.close()
            return time.monotonic() - start, dropped

    seconds, dropped = asyncio.run(scenario())
    assert dropped and seconds < 5


# --- the stream models' runner --------------------------------------------------------------------


def fake_infer(calls: list, steps: int = 3, fail: str | None = None):
    """BLS stand-in: records (model, inputs, parameter); each output is "<model>.<output>"; the denoiser
    reports ``steps`` steps through the parameter's socket, as a GroupedDenoiser does."""

    async def infer(step, inputs, listener):
        calls.append((step.model, dict(inputs), listener))
        if step.model == fail:
            raise StageFailed("HEIGHT: must be a multiple of 16", "INVALID_ARG")
        if step.model.endswith("denoiser") and listener is not None:
            def denoise():
                reporter = progress.Reporter([progress.Target(listener, 0)])
                for done in range(1, steps + 1):
                    reporter(done, steps)
                reporter.close()
            await asyncio.to_thread(denoise)
        return {name: f"{step.model}.{name}" for name in step.outputs}

    return infer


def test_the_stream_runs_the_ensembles_steps_with_its_tensor_maps():
    plan = StreamPlan.read(REPOSITORY, "flux_t2i")
    ensemble = read_config(REPOSITORY, "flux_t2i")
    calls, events = [], []
    outputs = asyncio.run(plan.run({"PROMPT": "prompt", "SEED": "seed"}, fake_infer(calls), lambda *e: events.append(e)))
    assert [model for model, _, _ in calls] == [step["model_name"] for step in ensemble["ensemble_scheduling"]["step"]]
    # Each step reads what the ensemble maps into it: the request's tensors or an earlier step's outputs.
    written = {"PROMPT": "prompt", "SEED": "seed"}
    for (model, inputs, _), step in zip(calls, ensemble["ensemble_scheduling"]["step"]):
        assert inputs == {name: written[tensor] for name, tensor in step["input_map"].items() if tensor in written}, model
        written |= {tensor: f"{model}.{name}" for name, tensor in step["output_map"].items()}
    assert outputs == {"PNG": "flux_postprocess.PNG", "IMAGE": "flux_postprocess.IMAGE"}
    # Every step hears of the one listener; all steps arrive before the outputs.
    assert len({listener for _, _, listener in calls}) == 1 and calls[0][2].startswith(progress.PREFIX)
    assert events == [([0], 1, 3), ([0], 2, 3), ([0], 3, 3)]


def test_without_on_step_nothing_listens_and_a_failing_stage_ends_the_stream():
    plan = StreamPlan.read(REPOSITORY, "wan_t2v")
    calls = []
    asyncio.run(plan.run({"PROMPT": "p"}, fake_infer(calls), None))
    assert all(listener is None for _, _, listener in calls)
    calls, events = [], []
    with pytest.raises(StageFailed, match="HEIGHT: must be a multiple of 16"):
        asyncio.run(plan.run({"PROMPT": "p"}, fake_infer(calls, fail="wan_request"), lambda *e: events.append(e)))
    assert [model for model, _, _ in calls] == ["wan_request"] and events == []


class FakeStreamRequest:
    """A request to a stream model, as its execute sees it: PROMPT alone, the final outputs asked for (no STEP);
    its sender says it is cancelled once ``cancelled()`` is true."""

    def __init__(self, cancelled=lambda: False):
        self.sent = []
        self.cancelled = cancelled

    def get_response_sender(self):
        return types.SimpleNamespace(send=lambda response=None, flags=0: self.sent.append((response, flags)),
                                     is_cancelled=self.cancelled)

    def requested_output_names(self):
        return ["IMAGE", "PNG"]


def stream_pb(monkeypatch, answer):
    """triton_python_backend_utils for a stream model; every BLS request to a step gets ``answer(model)``."""
    from test_triton_adapter import FakeError, FakeResponse, FakeTensor

    class Error(FakeError):
        CANCELLED = "CANCELLED"

    class BlsRequest:
        def __init__(self, model_name, inputs, requested_output_names, parameters):
            self.model_name = model_name

        async def async_exec(self):
            return answer(self.model_name)

    prompt = types.SimpleNamespace(name=lambda: "PROMPT", shape=lambda: (1, 1))
    module = types.SimpleNamespace(
        Tensor=FakeTensor, InferenceResponse=FakeResponse, TritonError=Error, InferenceRequest=BlsRequest,
        get_input_tensor_by_name=lambda request, name: prompt if name == "PROMPT" else None,
        TRITONSERVER_RESPONSE_COMPLETE_FINAL=1,
    )
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    return module


def load_stream(parameters=None):
    from ditserve.streaming import TritonStreamModel

    config = read_config(REPOSITORY, "flux_t2i_stream") | {"parameters": parameters or {}}
    model = TritonStreamModel()
    model.initialize({"model_config": json.dumps(config), "model_name": "flux_t2i_stream",
                      "model_repository": str(REPOSITORY / "flux_t2i_stream")})
    return model


def test_the_stream_model_answers_with_the_failing_stages_message_and_code(monkeypatch):
    """A stage's bad-input error stays the client's error (INVALID_ARG) through the stream model, as through
    the ensemble; an unexpected exception is INTERNAL."""
    from test_triton_adapter import FakeError

    def bad_height(model):
        assert model == "flux_request"
        error = FakeError("HEIGHT: must be a multiple of 16", FakeError.INVALID_ARG)
        return types.SimpleNamespace(has_error=lambda: True, error=lambda: error)

    stream_pb(monkeypatch, bad_height)
    request = FakeStreamRequest()
    asyncio.run(load_stream().execute([request]))
    ((response, flags),) = request.sent
    assert (response.error.message(), response.error.code(), flags) == ("HEIGHT: must be a multiple of 16",
                                                                        FakeError.INVALID_ARG, 1)

    def broken(model):
        raise RuntimeError("BLS broke")

    stream_pb(monkeypatch, broken)
    request = FakeStreamRequest()
    asyncio.run(load_stream().execute([request]))
    ((response, _),) = request.sent
    assert response.error.code() == FakeError.INTERNAL and "internal error: RuntimeError: BLS broke" in response.error.message()


def test_a_cancelled_stream_starts_no_further_step_and_ends_with_cancelled(monkeypatch):
    """Cancelled while the denoiser runs: the denoiser's answer is awaited, the VAE and postprocess never
    start, and the request's one final response is a CANCELLED error (tested through Triton in
    test_stream_cancel.py)."""
    calls = []

    def answer(model):
        calls.append(model)
        return types.SimpleNamespace(has_error=lambda: False, output_tensors=lambda: [])

    pb = stream_pb(monkeypatch, answer)
    request = FakeStreamRequest(cancelled=lambda: "flux_denoiser" in calls)
    asyncio.run(load_stream().execute([request]))
    assert calls == ["flux_request", "flux_text_encoder", "flux_denoiser"]
    ((response, flags),) = request.sent
    assert (response.error.code(), flags) == (pb.TritonError.CANCELLED, 1)
    assert response.error.message() == "flux_t2i_stream: cancelled before step flux_vae_decoder"
    # Cancelled before it starts: no step runs.
    calls.clear()
    with pytest.raises(Cancelled):
        asyncio.run(StreamPlan.read(REPOSITORY, "flux_t2i").run({"PROMPT": "p"}, fake_infer(calls), None, lambda: True))
    assert calls == []


def test_a_final_response_the_sender_refuses_still_ends_the_request(monkeypatch):
    stream_pb(monkeypatch, lambda model: types.SimpleNamespace(has_error=lambda: False, output_tensors=lambda: []))
    request = FakeStreamRequest(cancelled=lambda: True)
    sent = []

    def send(response=None, flags=0):
        if response is not None:
            raise RuntimeError("refused")
        sent.append((response, flags))

    request.get_response_sender = lambda: types.SimpleNamespace(send=send, is_cancelled=lambda: True)
    asyncio.run(load_stream().execute([request]))
    assert sent == [(None, 1)]


def test_a_stream_model_refuses_parameters_at_load(monkeypatch):
    stream_pb(monkeypatch, lambda model: None)
    load_stream({"FORCE_CPU_ONLY_INPUT_TENSORS": {"string_value": "no"}})  # the Python backend's own
    with pytest.raises(ConfigError, match="parameter 'sp_degree' not read by this model"):
        load_stream({"sp_degree": {"string_value": "2"}})


@pytest.mark.parametrize("change,message", [
    (lambda c: c.pop("model_transaction_policy"), "must be decoupled"),
    (lambda c: c["output"].pop(), "outputs"),
    (lambda c: c["input"].pop(0), "inputs"),
    (lambda c: c.update(max_batch_size=4), "max_batch_size"),
])
def test_a_stream_config_that_does_not_match_its_ensemble_is_refused(change, message):
    plan = StreamPlan.read(REPOSITORY, "flux_t2i")
    config = read_config(REPOSITORY, "flux_t2i_stream")
    plan.check(config)
    change(config)
    with pytest.raises(ConfigError, match=message):
        plan.check(config)


# --- the CLI's displays ---------------------------------------------------------------------------


@dataclasses.dataclass
class Step:
    step: int
    total: int


def test_step_bar_writes_a_line_per_step_off_a_terminal_and_redraws_on_one():
    out = io.StringIO()
    with StepBar(out, "ditserve generate", interactive=False) as bar:
        for step in (1, 2):
            bar.update(Step(step, 2))
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == ["ditserve generate: step 1/2",
                                                                             "ditserve generate: step 2/2"]
    tty = io.StringIO()
    with pytest.raises(RuntimeError):
        with StepBar(tty, "ditserve video", interactive=True) as bar:
            bar.update(Step(1, 4))
            raise RuntimeError("the request failed")
    assert "step 1/4 [######" in tty.getvalue() and tty.getvalue().endswith("\r\x1b[K")  # erased for the error line


def test_spinner_shows_the_elapsed_time_and_why_there_are_no_steps():
    out = io.StringIO()
    with Spinner(out, "ditserve generate", "per-step progress needs --protocol grpc", interactive=True) as spinner:
        time.sleep(0.25)
    text = out.getvalue()
    assert text.count("(per-step progress needs --protocol grpc)") >= 2 and text.endswith("\r\x1b[K")
    assert "ditserve generate: 0.0 s" in text and not spinner._thread.is_alive()
    quiet = io.StringIO()
    with Spinner(quiet, "ditserve generate", "note", interactive=False):
        pass
    assert quiet.getvalue() == ""
