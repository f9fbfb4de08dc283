"""Parity: our Qwen-Image stages equal diffusers' QwenImagePipeline (fp32, CPU, tiny random weights)."""

from __future__ import annotations

import pytest
import torch
from flux_reference import (CPU_FP32, assert_batched_equal_alone, assert_pixels_match, make_row, pixel_diff,
                            reference_pipeline, reference_uint8)

from ditserve.pipeline import LocalPipeline
from ditserve.qwen_image import QWEN_IMAGE_T2I
from ditserve.stage import RequestError, Runtime

MODEL = "tiny-qwen-image"


@pytest.fixture(scope="module")
def ours():
    return LocalPipeline(QWEN_IMAGE_T2I, Runtime(model_path=MODEL, **CPU_FP32))


@pytest.fixture(scope="module")
def reference():
    from diffusers import QwenImagePipeline

    return reference_pipeline(MODEL, QwenImagePipeline)


CASES = [
    pytest.param(("a red fox in the snow", None), dict(HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=3, SEED=7, NUM_IMAGES=2), id="square"),
    pytest.param(("a tall lighthouse at night", None), dict(HEIGHT=96, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=1), id="non-square"),
    pytest.param(
        ("a bowl of ramen", "blurry, low quality"),
        dict(HEIGHT=64, WIDTH=80, NUM_INFERENCE_STEPS=3, SEED=3, TRUE_CFG_SCALE=4.0),
        id="true-cfg-non-square",
    ),
    pytest.param(
        ("a castle on a hill", "dark"),
        dict(HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=5, NUM_IMAGES=2),  # default true_cfg_scale 4.0
        id="true-cfg-square-default-scale",
    ),
    pytest.param(
        ("a bowl of ramen", "blurry"),
        dict(HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=3, TRUE_CFG_SCALE=1.0),
        id="negative-without-cfg",
    ),
]


@pytest.mark.parametrize("texts,scalars", CASES)
def test_matches_qwen_image_pipeline(ours, reference, texts, scalars):
    (result,) = ours([make_row(*texts, **scalars)])
    assert not isinstance(result, RequestError), result
    expected = reference_uint8(reference, *texts, **scalars)
    assert_pixels_match(result["IMAGE"], expected, (scalars.get("NUM_IMAGES", 1), scalars["HEIGHT"], scalars["WIDTH"], 3))


def test_batched_rows_equal_their_unbatched_results(ours):
    """Prompts of different lengths, seeds and CFG scales in one call equal each row run alone."""
    rows = [
        make_row("a cat", HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=1),
        make_row("a small dog sitting in a green field", "ugly", HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=2,
                 TRUE_CFG_SCALE=3.0, NUM_IMAGES=2),
        make_row("a cow", "a very dark and blurry photo", HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=3),
        make_row("a hen", HEIGHT=80, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=4),  # another group
        make_row("", HEIGHT=64, WIDTH=64),  # a bad row fails alone
    ]
    batched = ours(rows)
    assert isinstance(batched[-1], RequestError) and batched[-1].field == "PROMPT"
    assert_batched_equal_alone(ours, rows[:-1], batched)
    assert pixel_diff(batched[0]["IMAGE"], batched[2]["IMAGE"]) > 10


def test_request_defaults_are_qwen_image_pipelines(ours):
    from ditserve.qwen_image.request import QwenImageRequestCheck

    stage = next(s for name, s in ours.stages if isinstance(s, QwenImageRequestCheck))
    (out,) = stage.execute([make_row("a cat", SEED=3)])
    assert int(out["NUM_INFERENCE_STEPS"]) == 50 and float(out["TRUE_CFG_SCALE"]) == 4.0
    assert int(out["HEIGHT"]) == int(out["WIDTH"]) == 1024
    (bad,) = stage.execute([make_row("a cat", HEIGHT=72)])
    assert isinstance(bad, RequestError) and bad.field == "HEIGHT" and "multiple of 16" in str(bad)
    # One step is a NaN image in QwenImagePipeline (shift_terminal stretches by 1/0): refused.
    (one_step,) = stage.execute([make_row("a cat", NUM_INFERENCE_STEPS=1)])
    assert isinstance(one_step, RequestError) and one_step.field == "NUM_INFERENCE_STEPS" and "[2, 200]" in str(one_step)


def test_text_encoder_pads_rows_and_carries_the_mask(ours):
    from ditserve.qwen_image.text_encoder import QwenImageTextEncoder

    stage = next(s for name, s in ours.stages if isinstance(s, QwenImageTextEncoder))
    short, long_ = stage.execute([make_row("a cat"), make_row("a small dog sitting in a green field", "ugly")])
    assert short["PROMPT_EMBEDS"].shape == long_["PROMPT_EMBEDS"].shape
    assert 0 < int(short["PROMPT_EMBEDS_MASK"].sum()) < int(long_["PROMPT_EMBEDS_MASK"].sum())
    assert short["NEGATIVE_PROMPT_EMBEDS"].shape[0] == 0 and long_["NEGATIVE_PROMPT_EMBEDS_MASK"].all()
    (alone,) = stage.execute([make_row("a cat")])
    n = int(alone["PROMPT_EMBEDS_MASK"].sum())
    torch.testing.assert_close(short["PROMPT_EMBEDS"][:n], alone["PROMPT_EMBEDS"], atol=1e-5, rtol=1e-5)
