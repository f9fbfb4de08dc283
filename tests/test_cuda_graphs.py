"""CUDA-graph replay of the denoiser's transformer call (ditserve.cuda_graphs), on one GPU and, with the
sequence-parallel collectives captured, on two; graphed results against eager ones of the same layout.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from flux_reference import make_row, pixel_diff

from ditserve.cuda_graphs import GraphedCall
from ditserve.flux import FLUX_T2I
from ditserve.flux.denoiser import FluxDenoiserOptions
from ditserve.pipeline import LocalPipeline
from ditserve.qwen_image import QWEN_IMAGE_EDIT, QWEN_IMAGE_T2I
from ditserve.qwen_image.denoiser import QwenDenoiserOptions
from ditserve.qwen_image.request import EditRequestOptions
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
            assert pixel_diff(ours["IMAGE"], ref["IMAGE"]) <= 1
    assert dict(graphed.stages)["flux_denoiser"]._graphed[0].graphs, "no graph was captured"


def _sequence_parallel_graphed_vs_eager(spec, name: str, runtime: Runtime, rows: list, options, *,
                                        stage_options: Optional[dict] = None, images: bool = False) -> int:
    """Denoise `rows` on a 2-GPU group eagerly, then twice with CUDA graphs (captured, then replayed) on a
    fresh group; assert the graphed results equal the eager ones. `options(cuda_graphs)` makes the denoiser's
    options. Returns how many graphs were captured.

    The graphs hold the sequence-parallel collectives (all_to_all / ring P2P, the output all_gather): every
    rank must capture at the same call and replay them in lockstep."""
    def pipeline(cuda_graphs: str) -> LocalPipeline:
        return LocalPipeline(spec, runtime, {**(stage_options or {}), name: options(cuda_graphs)})

    eager = pipeline("false")
    expected = eager(rows)
    dict(eager.stages)[name].close()
    graphed = pipeline("true")
    denoiser = dict(graphed.stages)[name]
    try:
        for _ in range(2):  # captures, then replays
            for ours, ref in zip(graphed(rows), expected):
                torch.testing.assert_close(ours["LATENTS"], ref["LATENTS"], atol=2e-2, rtol=2e-2)
                if images:
                    assert pixel_diff(ours["IMAGE"], ref["IMAGE"]) <= 1
        return len(denoiser._graphed[0].graphs)
    finally:
        denoiser.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("layout", [dict(sp_degree=2), dict(sp_degree=2, ring_degree=2)], ids=["ulysses", "ring"])
def test_sequence_parallel_flux_denoiser_with_cuda_graphs_equals_eager(layout):
    runtime = Runtime(model_path="tiny", device=torch.device("cuda"), dtype=torch.bfloat16)
    rows = [make_row("a red fox", HEIGHT=64, WIDTH=80, NUM_INFERENCE_STEPS=4, SEED=5)]
    captured = _sequence_parallel_graphed_vs_eager(
        FLUX_T2I, "flux_denoiser", runtime, rows,
        lambda cuda_graphs: FluxDenoiserOptions(warmup=False, cuda_graphs=cuda_graphs, **layout))
    assert captured, "no graph was captured"


def _qwen_case(variant: str, request) -> tuple:
    """(pipeline, denoiser name, model path, rows, other stage options): true CFG beside a plain row, texts of
    different lengths (a key mask)."""
    if variant == "t2i":
        # 64x80 and 80x64: one token count, told apart only by img_shapes (the rotary positions), which is
        # part of a graph's signature: each must replay its own graph.
        rows = [make_row("a red fox", "fog", HEIGHT=64, WIDTH=80, NUM_INFERENCE_STEPS=4, SEED=5, TRUE_CFG_SCALE=2.0),
                make_row("a lighthouse by the sea at night", HEIGHT=64, WIDTH=80, NUM_INFERENCE_STEPS=4, SEED=6),
                make_row("a lighthouse", HEIGHT=80, WIDTH=64, NUM_INFERENCE_STEPS=4, SEED=7)]
        return QWEN_IMAGE_T2I, "qwen_image_denoiser", "tiny-qwen-image", rows, {}
    # Qwen-Image-Edit-2511 (zero_cond_t): the condition tokens' modulation index is built inside the graph.
    from test_qwen_image_edit_parity import edit_row, encoded

    data, _ = encoded(64, 48, seed=3)
    rows = [edit_row("make the cat red", "blurry", image=data, HEIGHT=64, WIDTH=80, NUM_INFERENCE_STEPS=4, SEED=3,
                     TRUE_CFG_SCALE=4.0),
            edit_row("a dog", image=data, HEIGHT=64, WIDTH=80, NUM_INFERENCE_STEPS=4, SEED=4)]
    return (QWEN_IMAGE_EDIT, "qwen_image_edit_denoiser", request.getfixturevalue("zero_cond_t_edit"), rows,
            {"qwen_image_edit_request": EditRequestOptions(condition_area=64 * 64)})


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("variant", ["t2i", "edit-zero-cond-t"])
def test_sequence_parallel_qwen_image_denoiser_with_cuda_graphs_equals_eager(variant, request):
    spec, name, model, rows, stage_options = _qwen_case(variant, request)
    runtime = Runtime(model_path=model, device=torch.device("cuda"), dtype=torch.bfloat16)
    captured = _sequence_parallel_graphed_vs_eager(
        spec, name, runtime, rows,
        lambda cuda_graphs: QwenDenoiserOptions(warmup=False, sp_degree=2, cuda_graphs=cuda_graphs),
        stage_options=stage_options, images=True)
    assert captured >= (2 if variant == "t2i" else 1)
