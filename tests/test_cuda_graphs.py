"""CUDA-graph replay of the denoiser's transformer call (ditserve.cuda_graphs), on a GPU.

The multi-GPU case (graphs with the sequence-parallel collectives captured) is checked by
perf/bench_parallel.py's "CUDA graphs" layouts, which compare the latents with one GPU's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flux_reference import make_row

from ditserve.cuda_graphs import GraphedCall
from ditserve.flux import FLUX_T2I
from ditserve.flux.denoiser import FluxDenoiserOptions
from ditserve.pipeline import LocalPipeline
from ditserve.stage import Runtime

pytestmark = pytest.mark.gpu


def test_graphed_call_replays_fresh_inputs_per_signature():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).cuda()

    def fn(x, scale=None):
        y = layer(x)
        return y if scale is None else y * scale

    graphed = GraphedCall(fn, warmup=1, max_graphs=2)
    with torch.inference_mode():
        for shape in [(3, 16), (5, 16), (3, 16), (7, 16), (3, 16)]:  # a third signature evicts the oldest
            for _ in range(3):
                x, scale = torch.randn(shape, device="cuda"), torch.rand(1, device="cuda")
                torch.testing.assert_close(graphed(x=x, scale=scale), fn(x, scale))
                torch.testing.assert_close(graphed(x=x, scale=None), fn(x))
    assert len(graphed.graphs) == 2


def test_flux_denoiser_with_cuda_graphs_equals_eager():
    # bf16: the default attention on CUDA is our Triton kernel, which takes bf16/fp16 only.
    runtime = Runtime(model_path="tiny", device=torch.device("cuda"), dtype=torch.bfloat16)
    rows = [make_row("a red fox", "fog", HEIGHT=64, WIDTH=80, NUM_INFERENCE_STEPS=4, SEED=5, TRUE_CFG_SCALE=2.0),
            make_row("a lighthouse", HEIGHT=80, WIDTH=80, NUM_INFERENCE_STEPS=4, SEED=7)]
    eager = LocalPipeline(FLUX_T2I, runtime, {"flux_denoiser": FluxDenoiserOptions(warmup=False)})(rows)
    graphed = LocalPipeline(FLUX_T2I, runtime, {"flux_denoiser": FluxDenoiserOptions(warmup=False, cuda_graphs="true")})
    for _ in range(2):  # the second request replays the graphs the first one captured
        for ours, ref in zip(graphed(rows), eager):
            torch.testing.assert_close(ours["LATENTS"], ref["LATENTS"], atol=2e-2, rtol=2e-2)
            assert np.abs(ours["IMAGE"].astype(int) - ref["IMAGE"].astype(int)).max() <= 1
    assert dict(graphed.stages)["flux_denoiser"]._graphed[0].graphs, "no graph was captured"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("layout", [dict(sp_degree=2), dict(sp_degree=2, ring_degree=2)], ids=["ulysses", "ring"])
def test_sequence_parallel_flux_denoiser_with_cuda_graphs_equals_eager(layout):
    # The graphs hold the sequence-parallel collectives (all_to_all / ring P2P, the output all_gather):
    # every rank must capture at the same call and replay them in lockstep.
    runtime = Runtime(model_path="tiny", device=torch.device("cuda"), dtype=torch.bfloat16)
    rows = [make_row("a red fox", HEIGHT=64, WIDTH=80, NUM_INFERENCE_STEPS=4, SEED=5)]
    eager = LocalPipeline(FLUX_T2I, runtime, {"flux_denoiser": FluxDenoiserOptions(warmup=False, **layout)})
    expected = eager(rows)
    dict(eager.stages)["flux_denoiser"].close()
    graphed = LocalPipeline(FLUX_T2I, runtime,
                            {"flux_denoiser": FluxDenoiserOptions(warmup=False, cuda_graphs="true", **layout)})
    denoiser = dict(graphed.stages)["flux_denoiser"]
    try:
        for _ in range(2):
            for ours, ref in zip(graphed(rows), expected):
                torch.testing.assert_close(ours["LATENTS"], ref["LATENTS"], atol=2e-2, rtol=2e-2)
        assert denoiser._graphed[0].graphs, "no graph was captured"
    finally:
        denoiser.close()
