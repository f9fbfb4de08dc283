"""The FLUX denoiser as rank 0 of a worker group (gloo on CPU) gives the single-process result.

Layouts: Ulysses 2, Ring 2, Ring 3, CFG parallel 2 and CFG parallel x Ring 2 (4 ranks), on joint
sequences whose length does not divide the degree, with per-step progress (reported by rank 0 alone) (USP 2x2 attention is tested on its own in
test_parallel_attention; a 4-rank group of whole denoisers costs 40 s on 2 cores). Faults: a worker killed mid-request fails that
request with an error naming the worker, and the next request runs on a fresh group; close()
leaves no worker behind. Bad parallel parameters fail at load, before any worker starts.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from flux_reference import CPU_FP32, make_row, pixel_diff
from test_progress import listen

from ditserve.flux import FLUX_T2I
from ditserve.flux.denoiser import FluxDenoiser, FluxDenoiserOptions
from ditserve.parallel.group import ParallelConfig, ParallelOptions, WorkerGroupError
from ditserve.pipeline import LocalPipeline
from ditserve.progress import PARAMETER
from ditserve.stage import ConfigError, RequestParameter, Runtime, StageFailure

RUNTIME = Runtime(model_path="tiny", **CPU_FP32)
# 64x80 has 20 image tokens, 80x80 has 25: with the prompt's tokens, one of the two joint lengths is
# odd, and neither divides 3 unless the text length makes it so (checked below).
ROWS = [
    make_row("a red fox in the snow", "fog", HEIGHT=64, WIDTH=80, NUM_INFERENCE_STEPS=2, SEED=5, TRUE_CFG_SCALE=2.0),
    make_row("a lighthouse", HEIGHT=80, WIDTH=80, NUM_INFERENCE_STEPS=2, SEED=7),
]


@pytest.fixture(scope="module")
def reference():
    return LocalPipeline(FLUX_T2I, RUNTIME)(ROWS)


def parallel_pipeline(**options) -> tuple[LocalPipeline, FluxDenoiser]:
    pipeline = LocalPipeline(FLUX_T2I, RUNTIME, {"flux_denoiser": FluxDenoiserOptions(**options)})
    return pipeline, dict(pipeline.stages)["flux_denoiser"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_same(results, reference, what: str) -> None:
    for ours, ref in zip(results, reference):
        err = (ours["LATENTS"] - ref["LATENTS"]).abs().max().item()
        assert err < 1e-4, f"{what}: latents differ by {err}"
        assert pixel_diff(ours["IMAGE"], ref["IMAGE"]) <= 1, what


@pytest.mark.parametrize("options", [
    dict(sp_degree=2),  # Ulysses 2
    dict(sp_degree=2, ring_degree=2),
    dict(sp_degree=3, ring_degree=3),
    dict(cfg_parallel=True),
    dict(sp_degree=2, ring_degree=2, cfg_parallel=True),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_layouts_equal_the_single_process_result(reference, options):
    pipeline, denoiser = parallel_pipeline(**options)
    try:
        text_len = reference[0]["PROMPT_EMBEDS"].shape[0]
        degree = denoiser.parallel_config.sp_degree
        if degree > 1:
            assert any((text_len + image) % degree for image in (20, 25)), "no case with padding"
        assert len(denoiser.workers.pids()) == denoiser.parallel_config.world_size - 1
        results, steps = listen(lambda name: pipeline([row | {PARAMETER: RequestParameter(name, i)} for i, row in enumerate(ROWS)]))
        assert_same(results, reference, str(options))
        assert sorted(steps) == [([0], 1, 2), ([0], 2, 2), ([1], 1, 2), ([1], 2, 2)]  # once per step: rank 0
    finally:
        denoiser.close()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_killed_worker_fails_the_request_and_the_group_restarts(reference):
    pipeline, denoiser = parallel_pipeline(sp_degree=2)
    try:
        (worker,) = denoiser.workers.pids()
        long_row = make_row("a slow request", HEIGHT=64, WIDTH=80, NUM_INFERENCE_STEPS=200, SEED=1)
        outcome: dict = {}

        def request():
            try:
                outcome["result"] = pipeline([long_row])
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                outcome["error"] = exc

        thread = threading.Thread(target=request)
        before = cpu_seconds(worker)
        thread.start()
        deadline = time.monotonic() + 60
        while cpu_seconds(worker) < before + 0.3:  # the worker is denoising: mid-request
            assert time.monotonic() < deadline and thread.is_alive(), "the worker never started the request"
            time.sleep(0.02)
        os.kill(worker, 9)
        thread.join(60)
        error = outcome.get("error")
        assert isinstance(error, StageFailure) and isinstance(error.__cause__, WorkerGroupError), outcome
        assert f"parallel worker rank 1 (pid {worker}) exited with status -9 (rank 0: " in str(error)
        assert "restarts for the next one" in str(error)

        assert_same(pipeline(ROWS), reference, "after the restart")
        (fresh,) = denoiser.workers.pids()
        assert fresh != worker and not alive(worker)
    finally:
        denoiser.close()
    assert not alive(fresh), "close() left a worker running"


@pytest.mark.parametrize("options, message", [
    (dict(sp_degree=3), "parameter ulysses_degree: ulysses_degree=3 does not divide the 2 attention heads"),
    (dict(sp_degree=2, ulysses_chunks=2), "parameter ulysses_chunks: ulysses_chunks=2 does not divide the 1 heads"),
    (dict(sp_degree=2, ring_degree=2, attention_backend="triton_fp8"),
     "parameter ring_degree: ring attention merges partial results by their log-sum-exp"),
    (dict(sp_degree=2, gpus="0,1"), "parameter gpus: set to '0,1' but the model runs on cpu"),
    (dict(cuda_graphs="true"), "parameter cuda_graphs: needs a CUDA device, the model runs on cpu"),
])
def test_bad_layouts_fail_at_load(options, message):
    with pytest.raises(ConfigError, match=message):
        parallel_pipeline(**options)


def test_graph_signature_keeps_non_tensor_values():
    """Qwen-Image's latent grids (img_shapes) are no tensor: two grids of one token count must not share a graph."""
    from ditserve.cuda_graphs import signature

    x = torch.zeros(2, 3)
    one = signature({"x": x, "shapes": ((1, 4, 5),), "mask": None})
    assert one == signature({"x": torch.ones(2, 3), "shapes": ((1, 4, 5),), "mask": None})
    assert one != signature({"x": x, "shapes": ((1, 5, 4),), "mask": None})
    assert one != signature({"x": x, "shapes": ((1, 4, 5),), "mask": torch.ones(2, dtype=torch.bool)})


def test_graphed_call_bounds_the_signatures_waiting_for_capture():
    """Eager-call counts of signatures not captured yet stay bounded (Qwen-Image's texts come in ever new
    lengths), the least recently seen dropped. On CPU: no signature here reaches capture."""
    from ditserve.cuda_graphs import GraphedCall, signature

    def key(n: int):
        return signature({"x": torch.ones(n)})

    graphed = GraphedCall(lambda x: 2 * x, warmup=2, max_pending=3)
    for n in (1, 2, 3, 1, 4):  # 1 seen again before 4 comes: 2 is the least recently seen
        assert torch.equal(graphed(x=torch.ones(n)), torch.full((n,), 2.0))
    assert list(graphed.eager_calls) == [key(3), key(1), key(4)]
    assert graphed.eager_calls[key(1)] == 2 and not graphed.graphs


def test_cuda_graphs_auto_means_sequence_parallel_on_cuda():
    from ditserve.flux.denoiser import FluxDenoiserOptions

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert FluxDenoiserOptions(sp_degree=2).graphs_enabled(cuda)
    assert not FluxDenoiserOptions(sp_degree=2).graphs_enabled(cpu)
    assert not FluxDenoiserOptions(cfg_parallel=True).graphs_enabled(cuda)
    assert FluxDenoiserOptions(cuda_graphs="true").graphs_enabled(cuda)
    assert not FluxDenoiserOptions(sp_degree=4, cuda_graphs="false").graphs_enabled(cuda)
    with pytest.raises(ValueError, match="parameter cuda_graphs: must be one of auto, true, false, got 'yes'"):
        FluxDenoiserOptions(cuda_graphs="yes")


def test_qwen_image_graphs_need_sequence_parallel():
    """On one GPU Qwen-Image runs diffusers' forward, which graph capture refuses: said at load, not mid-request."""
    from ditserve.qwen_image.denoiser import QwenDenoiserOptions, QwenImageDenoiser

    with pytest.raises(ConfigError, match="parameter cuda_graphs: 'true' needs sp_degree > 1 for Qwen-Image"):
        QwenImageDenoiser(Runtime(model_path="tiny-qwen-image", **CPU_FP32),
                          QwenDenoiserOptions(cuda_graphs="true", warmup=False))


@pytest.mark.parametrize("options, message", [
    (dict(sp_degree=0), "parameters sp_degree"),
    (dict(sp_degree=4, ring_degree=3), "parameter ring_degree: 3 does not divide sp_degree 4"),
    (dict(sp_degree=4, ulysses_degree=2, ring_degree=3), "must equal sp_degree 4, got 2 \\* 3"),
    (dict(parallel_timeout_s=0), "parameter parallel_timeout_s: must be a finite number > 0, got 0"),
    (dict(parallel_timeout_s=float("nan")), "parameter parallel_timeout_s: must be a finite number > 0, got nan"),
    (dict(parallel_timeout_s=float("inf")), "parameter parallel_timeout_s: must be a finite number > 0, got inf"),
    (dict(sp_degree=2, ulysses_chunks=-1), "parameter ulysses_chunks: must be >= 0 \\(0: auto\\), got -1"),
    (dict(sp_degree=2, ring_degree=2, ulysses_chunks=2), "parameter ulysses_chunks: 2 given, but only Ulysses"),
    (dict(cfg_parallel=False, gpus="1"), "parameter gpus: set to '1', but it names the GPUs of a parallel group"),
])
def test_parallel_config_validation(options, message):
    with pytest.raises(ConfigError, match=message):
        ParallelConfig.from_options(ParallelOptions(**options), torch.device("cpu"))


def test_parallel_config_layout():
    config = ParallelConfig.from_options(ParallelOptions(sp_degree=4, ring_degree=2, cfg_parallel=True),
                                         torch.device("cpu"))
    assert (config.ulysses_degree, config.ring_degree, config.world_size, config.ulysses_chunks) == (2, 2, 8, 0)
    assert [config.cfg_branch(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert not ParallelConfig.from_options(ParallelOptions(), torch.device("cpu")).enabled


def test_a_denoiser_without_parallel_hooks_refuses_parallel_parameters():
    from ditserve.denoising import DenoiserOptions, GroupedDenoiser

    class NoHooks(GroupedDenoiser):
        def __init__(self, runtime, options):
            super().__init__(runtime, options)
            self.start_parallel()

        parse = denoise = None

    with pytest.raises(ConfigError, match="NoHooks: parameters sp_degree and cfg_parallel are not supported"):
        NoHooks(RUNTIME, DenoiserOptions(cfg_parallel=True))


def test_qwen_image_cfg_parallel_equals_the_single_process_result():
    """Qwen-Image's true CFG (norm-preserving combination) with its two branches on two ranks."""
    from ditserve.qwen_image import QWEN_IMAGE_T2I
    from ditserve.qwen_image.denoiser import QwenDenoiserOptions

    runtime = Runtime(model_path="tiny-qwen-image", **CPU_FP32)
    rows = [make_row("a red kite", "blurry", HEIGHT=64, WIDTH=80, NUM_INFERENCE_STEPS=2, SEED=3, TRUE_CFG_SCALE=4.0),
            make_row("a green field", HEIGHT=64, WIDTH=80, NUM_INFERENCE_STEPS=2, SEED=4)]
    reference = LocalPipeline(QWEN_IMAGE_T2I, runtime)(rows)
    pipeline = LocalPipeline(QWEN_IMAGE_T2I, runtime, {"qwen_image_denoiser": QwenDenoiserOptions(cfg_parallel=True)})
    denoiser = dict(pipeline.stages)["qwen_image_denoiser"]
    forwards = []  # rank 0's transformer calls: the conditional branch only, one a step
    hook = denoiser.transformer.register_forward_hook(lambda _, args, kwargs, __: forwards.append(1), with_kwargs=True)
    try:
        assert len(denoiser.workers.pids()) == 1
        assert_same(pipeline(rows), reference, "qwen-image cfg_parallel")
    finally:
        hook.remove()
        denoiser.close()
    assert len(forwards) == 2, forwards  # 2 steps; in one process true CFG calls it twice a step

