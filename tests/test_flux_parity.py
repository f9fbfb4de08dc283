"""Parity: our FLUX stages equal diffusers' FluxPipeline (fp32, CPU, tiny random weights)."""

from __future__ import annotations

import pytest
from flux_reference import (CPU_FP32, assert_batched_equal_alone, assert_pixels_match, make_row, pixel_diff,
                            reference_pipeline, reference_uint8)

from ditserve.flux import FLUX_T2I
from ditserve.pipeline import LocalPipeline
from ditserve.stage import RequestError, Runtime


@pytest.fixture(scope="module", params=["tiny", "tiny-schnell"])
def pipelines(request):
    runtime = Runtime(model_path=request.param, **CPU_FP32)
    return LocalPipeline(FLUX_T2I, runtime), reference_pipeline(request.param)


CASES = [
    pytest.param(("a red fox in the snow", None), dict(HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=3, SEED=7, NUM_IMAGES=2), id="square"),
    pytest.param(("a tall lighthouse", None), dict(HEIGHT=96, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=1, GUIDANCE_SCALE=5.0), id="non-square"),
    pytest.param(
        ("a bowl of ramen", "blurry, low quality"),
        dict(HEIGHT=64, WIDTH=80, NUM_INFERENCE_STEPS=3, SEED=3, TRUE_CFG_SCALE=4.0),
        id="true-cfg",
    ),
    pytest.param(
        ("a bowl of ramen", "blurry"),
        dict(HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=3, TRUE_CFG_SCALE=1.0),
        id="negative-without-cfg",
    ),
]


@pytest.mark.parametrize("texts,scalars", CASES)
def test_matches_flux_pipeline(pipelines, texts, scalars):
    ours_pipeline, reference = pipelines
    (result,) = ours_pipeline([make_row(*texts, **scalars)])
    assert not isinstance(result, RequestError), result
    expected = reference_uint8(reference, *texts, **scalars)
    assert_pixels_match(result["IMAGE"], expected, (scalars.get("NUM_IMAGES", 1), scalars["HEIGHT"], scalars["WIDTH"], 3))


def test_batched_rows_equal_their_unbatched_results(pipelines):
    """Different prompts, seeds, guidance and CFG in one call equal each row run alone."""
    ours_pipeline, _ = pipelines
    rows = [
        make_row("a cat", HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=1),
        make_row("a dog", "ugly", HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=2, TRUE_CFG_SCALE=3.0, NUM_IMAGES=2),
        make_row("a cow", HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=3, GUIDANCE_SCALE=7.0),
        make_row("a hen", HEIGHT=80, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=4),  # another group
        make_row("", HEIGHT=64, WIDTH=64),  # a bad row fails alone
    ]
    batched = ours_pipeline(rows)
    assert isinstance(batched[-1], RequestError) and batched[-1].field == "PROMPT"
    assert_batched_equal_alone(ours_pipeline, rows[:-1], batched)
    assert pixel_diff(batched[0]["IMAGE"], batched[2]["IMAGE"]) > 10


def test_triton_attention_backend_gives_the_sdpa_image():
    """Issue 5: the denoiser with our Triton attention (interpreter, fp32) equals SDPA's image."""
    from ditserve.flux.denoiser import FluxDenoiserOptions

    runtime = Runtime(model_path="tiny", **CPU_FP32)
    row = make_row("a red fox in the snow", "fog", HEIGHT=64, WIDTH=80, NUM_INFERENCE_STEPS=1, SEED=5, TRUE_CFG_SCALE=2.0)
    images = {
        backend: LocalPipeline(FLUX_T2I, runtime, {"flux_denoiser": FluxDenoiserOptions(attention_backend=backend)})([row])[0]
        for backend in ("sdpa", "triton")
    }
    diff = pixel_diff(images["sdpa"]["IMAGE"], images["triton"]["IMAGE"])
    assert diff <= 1, f"triton attention differs from sdpa by {diff}/255"
