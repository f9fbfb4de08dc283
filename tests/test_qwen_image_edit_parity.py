"""Parity: our Qwen-Image-Edit stages equal diffusers' QwenImageEditPipeline (fp32, CPU, tiny random weights).

QwenImageEditPipeline resizes the input image to about 1024 * 1024 pixels (``calculate_dimensions``,
a constant in its ``__call__``): with the tiny model that is about 4000 image tokens and 5 s a case.
Most cases therefore run both sides at a 128 * 128 condition area: ours through the request stage's
``condition_area`` option, the reference with that constant replaced in its module; one case runs
the unchanged reference at the default area.
"""

from __future__ import annotations

import io
from unittest import mock

import numpy as np
import pytest
import torch
from flux_reference import (CPU_FP32, assert_batched_equal_alone, assert_pixels_match, make_row, pixel_diff,
                            reference_pipeline, reference_uint8)
from PIL import Image

from ditserve.checkpoints import resolve_model_path
from ditserve.pipeline import LocalPipeline
from ditserve.qwen_image import QWEN_IMAGE_EDIT
from ditserve.qwen_image.request import EditRequestOptions
from ditserve.stage import RequestError, Runtime

MODEL = "tiny-qwen-image-edit"
SMALL_AREA = 128 * 128


def encoded(width: int, height: int, seed: int, format: str = "PNG") -> tuple[bytes, Image.Image]:
    """A smooth random RGB image (so that resizing matters) as encoded bytes, and as decoded."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    image = coarse.resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    data = buffer.getvalue()
    return data, Image.open(io.BytesIO(data)).convert("RGB")


def edit_row(prompt, negative=None, *, image: bytes, **scalars) -> dict:
    return {**make_row(prompt, negative, **scalars), "INPUT_IMAGE": np.array([image], dtype=object)}


def ours_at(area: int) -> LocalPipeline:
    options = {"qwen_image_edit_request": EditRequestOptions(condition_area=area)}
    return LocalPipeline(QWEN_IMAGE_EDIT, Runtime(model_path=MODEL, **CPU_FP32), options)


@pytest.fixture(scope="module")
def ours():
    return ours_at(SMALL_AREA)


def reference_processor(path):
    """Qwen2VLProcessor from the checkpoint's processor/. transformers 5.24 refuses to construct it
    without torchvision (its class check of the absent video processor raises); only that check is
    skipped, so the reference runs the processor's own __call__."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class"):
        return Qwen2VLProcessor(
            image_processor=AutoImageProcessor.from_pretrained(path / "processor"),
            tokenizer=AutoTokenizer.from_pretrained(path / "processor"),
        )


def reference_edit_pipeline():
    """QwenImageEditPipeline on tiny-qwen-image-edit, with ``reference_processor``."""
    from diffusers import QwenImageEditPipeline

    path = resolve_model_path(MODEL)
    return reference_pipeline(path, QwenImageEditPipeline, processor=reference_processor(path))


@pytest.fixture(scope="module")
def reference():
    return reference_edit_pipeline()


def reference_at(area, pipe, *args, **kwargs) -> np.ndarray:
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as module

    original = module.calculate_dimensions
    with mock.patch.object(module, "calculate_dimensions", lambda _area, ratio: original(area, ratio)):
        return reference_uint8(pipe, *args, **kwargs)


CASES = [
    pytest.param(
        ("make the cat red", None, (80, 48)),  # input 5:3, output square
        dict(HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=7, NUM_IMAGES=2),
        id="square-output-wide-input",
    ),
    pytest.param(
        ("a dog in the snow", "blurry, low quality", (40, 72)),  # portrait input, output 2:3
        dict(HEIGHT=96, WIDTH=64, NUM_INFERENCE_STEPS=3, SEED=3, TRUE_CFG_SCALE=4.0),
        id="non-square-true-cfg",
    ),
    pytest.param(
        ("a red fox", "dark", (90, 60)),  # default size: the condition size (160x96), default true CFG 4.0
        dict(NUM_INFERENCE_STEPS=2, SEED=5),
        id="default-size-from-image-default-cfg",
    ),
    pytest.param(
        ("a bowl of ramen", "blurry", (64, 64)),
        dict(HEIGHT=64, WIDTH=80, NUM_INFERENCE_STEPS=2, SEED=1, TRUE_CFG_SCALE=1.0),
        id="negative-without-cfg",
    ),
]


@pytest.mark.parametrize("texts,scalars", CASES)
def test_matches_qwen_image_edit_pipeline(ours, reference, texts, scalars):
    prompt, negative, size = texts
    data, image = encoded(*size, seed=sum(size))
    (result,) = ours([edit_row(prompt, negative, image=data, **scalars)])
    assert not isinstance(result, RequestError), result
    expected = reference_at(SMALL_AREA, reference, prompt, negative, image=image, **scalars)
    assert_pixels_match(result["IMAGE"], expected)
    if "HEIGHT" in scalars:
        assert expected.shape[1:3] == (scalars["HEIGHT"], scalars["WIDTH"])


def test_matches_at_the_pipelines_own_condition_area(reference):
    """The unchanged reference: the input resized to about 1024 * 1024 pixels (1312x800 here)."""
    ours = ours_at(EditRequestOptions().condition_area)
    data, image = encoded(100, 61, seed=2, format="JPEG")
    scalars = dict(HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=4)
    (result,) = ours([edit_row("make it blue", image=data, **scalars)])
    assert not isinstance(result, RequestError), result
    assert_pixels_match(result["IMAGE"], reference_uint8(reference, "make it blue", image=image, **scalars))


def test_the_image_changes_the_result(ours):
    """Parity within 1/255 can tell a mishandled image: another image moves pixels by more (7/255
    measured; the tiny random transformer attends to the image tokens only weakly)."""
    a, _ = encoded(64, 64, seed=1)
    b, _ = encoded(64, 64, seed=2)
    first, second = ours([edit_row("a cat", image=image, HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=1) for image in (a, b)])
    assert pixel_diff(first["IMAGE"], second["IMAGE"]) > 3


def test_batched_rows_equal_their_unbatched_results(ours):
    """Different images (two condition sizes), prompts, seeds and CFG in one call equal each row alone."""
    wide, _ = encoded(80, 48, seed=1)
    square, _ = encoded(50, 50, seed=2)
    other_wide, _ = encoded(160, 96, seed=3, format="WEBP")
    rows = [
        edit_row("a cat", image=wide, HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=1),
        edit_row("a small dog sitting in a green field", "ugly", image=other_wide, HEIGHT=64, WIDTH=64,
                 NUM_INFERENCE_STEPS=2, SEED=2, TRUE_CFG_SCALE=3.0, NUM_IMAGES=2),
        edit_row("a cow", "a very dark and blurry photo", image=square, HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=3),
        edit_row("a hen", image=wide, NUM_INFERENCE_STEPS=2, SEED=4),  # default size: another group
        edit_row("a cat", image=b"not an image", HEIGHT=64, WIDTH=64),  # a bad row fails alone
    ]
    batched = ours(rows)
    assert isinstance(batched[-1], RequestError) and batched[-1].field == "INPUT_IMAGE"
    assert_batched_equal_alone(ours, rows[:-1], batched)
    assert batched[3]["IMAGE"].shape == (1, 96, 160, 3)


def test_text_encoder_keeps_the_image_tokens(ours):
    from ditserve.qwen_image.text_encoder import QwenImageEditTextEncoder

    stage = next(s for _, s in ours.stages if isinstance(s, QwenImageEditTextEncoder))
    pixels = torch.from_numpy(np.asarray(encoded(160, 96, seed=1)[1]).copy())
    (out,) = stage.execute([{**make_row("a cat"), "CONDITION_IMAGE": pixels}])
    # <|vision_start|>, 6x3 merged patches of the 168x84 processor image, <|vision_end|>, "a cat", the template's tail.
    assert int(out["PROMPT_EMBEDS_MASK"].sum()) == 1 + 18 + 1 + 2 + 5


def test_denoisers_refuse_other_pipelines_checkpoints(tmp_path):
    """Same components, other semantics: a checkpoint is served only by the stages that reproduce its pipeline,
    e.g. not Qwen-Image-Edit-2509/-2511's QwenImageEditPlusPipeline by qwen_image_edit (checked before any
    weights are read)."""
    from ditserve.flux.denoiser import FluxDenoiser
    from ditserve.qwen_image.denoiser import QwenImageDenoiser, QwenImageEditDenoiser
    from ditserve.stage import ConfigError

    edit = resolve_model_path("tiny-qwen-image-edit")
    plus = tmp_path / "edit-plus"
    plus.mkdir()
    for entry in edit.iterdir():  # the same components; only model_index.json names the Plus pipeline
        (plus / entry.name).symlink_to(entry)
    (plus / "model_index.json").unlink()
    (plus / "model_index.json").write_text((edit / "model_index.json").read_text().replace(
        '"QwenImageEditPipeline"', '"QwenImageEditPlusPipeline"'))
    cases = [(QwenImageEditDenoiser, str(plus), "QwenImageEditPlusPipeline", "QwenImageEditPipeline"),
             (QwenImageEditDenoiser, "tiny-qwen-image", "QwenImagePipeline", "QwenImageEditPipeline"),
             (QwenImageDenoiser, "tiny-qwen-image-edit", "QwenImageEditPipeline", "QwenImagePipeline"),
             (FluxDenoiser, "tiny-qwen-image", "QwenImagePipeline", "FluxPipeline")]
    for denoiser, model_path, found, served in cases:
        with pytest.raises(ConfigError, match=rf"^model_path: .* is a {found} checkpoint \(model_index.json\); "
                                              rf"{denoiser.__name__} gives the images of {served}$"):
            denoiser(Runtime(model_path=model_path, **CPU_FP32))
