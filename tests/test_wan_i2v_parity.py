"""Parity: wan_i2v equals diffusers' WanImageToVideoPipeline frame by frame (fp32, CPU, tiny random weights),
for Wan 2.1 I2V (CLIP context), Wan 2.2 I2V A14B (two experts) and Wan 2.2 TI2V-5B (expand_timesteps);
and the image request check names the field and limit of bad input."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from flux_reference import CPU_FP32, assert_batched_equal_alone, make_row, pixel_diff
from PIL import Image
from test_qwen_image_edit_request import encode, half, noise, png_declaring
from wan_reference import Models, expert_calls, video_row

from ditserve.stage import ConfigError, RequestError, Runtime
from ditserve.wan import WAN_I2V
from ditserve.wan.denoiser import WanDenoiser, WanImageDenoiser
from ditserve.wan.image_encoder import WanImageEncoder
from ditserve.wan.request import WanImageRequestCheck
from ditserve.wan.text_encoder import WanTextEncoder


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colours with some noise: an image whose resizing and encoding are not trivial."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    base = np.stack([x, y, (x + y) / 2], axis=-1) * 200 + rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


# Input images whose aspect ratios differ from the outputs' (64x64, 64x96): the resize is not a crop.
IMAGES = {"png": encode(picture(56, 40)), "jpeg": encode(picture(48, 72, seed=1), "JPEG", quality=90)}


def i2v_models(model_path) -> Models:
    return Models(WAN_I2V, model_path, WanImageToVideoPipeline)


@pytest.fixture(scope="module")
def wan21():
    return i2v_models("tiny-wan-i2v")


@pytest.fixture(scope="module")
def wan22():
    return i2v_models("tiny-wan2.2-i2v")


@pytest.fixture(scope="module")
def ti2v():
    return i2v_models("tiny-wan2.2-ti2v")


CASES = [
    pytest.param(("a red fox in the snow", None, "png"), dict(HEIGHT=64, WIDTH=64, NUM_FRAMES=5, NUM_INFERENCE_STEPS=2, SEED=7),
                 id="64x64x5-cfg-empty-negative"),
    pytest.param(("a tall lighthouse at night", "blurry, low quality", "jpeg"),
                 dict(HEIGHT=64, WIDTH=96, NUM_FRAMES=9, NUM_INFERENCE_STEPS=2, SEED=1, GUIDANCE_SCALE=4.0),
                 id="64x96x9-cfg-negative"),
]


@pytest.mark.parametrize("texts,scalars", CASES)
def test_matches_wan_i2v_pipeline_with_clip(wan21, texts, scalars):
    prompt, negative, image = texts
    wan21.assert_parity(prompt, negative, scalars, IMAGES[image])


def test_two_experts_match_wan22_i2v_pipeline_and_both_run(wan22):
    denoiser = wan22.stage(WanImageDenoiser)
    assert denoiser.transformer.config.image_dim is None  # no CLIP: IMAGE_EMBEDS travels empty
    with expert_calls(denoiser) as calls:
        # 3 UniPC steps with flow_shift 3: timesteps 1000, 857, 600 against the boundary 900.
        wan22.assert_parity("a bowl of ramen", "dark", dict(HEIGHT=64, WIDTH=96, NUM_FRAMES=5, NUM_INFERENCE_STEPS=3, SEED=3),
                            IMAGES["png"])
    assert calls == {"transformer": 1, "transformer_2": 2}


def test_ti2v_matches_wan_i2v_pipeline_with_expand_timesteps(ti2v):
    frames = ti2v.assert_parity("a paper boat", "ugly", dict(HEIGHT=64, WIDTH=96, NUM_FRAMES=9, NUM_INFERENCE_STEPS=2, SEED=2),
                                IMAGES["jpeg"])
    assert frames.shape[0] == 9


def test_the_image_and_its_clip_context_reach_the_video_and_rows_batch(wan21):
    """Two images in one call equal each alone, and differ from each other: the image is not ignored.
    Without the CLIP context the latents change too: it is not ignored either."""
    common = dict(HEIGHT=64, WIDTH=64, NUM_FRAMES=5, NUM_INFERENCE_STEPS=2, SEED=4)
    rows = [video_row("a cat", None, IMAGES[name], **common) for name in ("png", "jpeg")]
    batched = wan21.ours(rows)
    assert_batched_equal_alone(wan21.ours, rows, batched, "FRAMES")
    assert pixel_diff(batched[0]["FRAMES"], batched[1]["FRAMES"]) > 10

    (checked,) = wan21.stage(WanImageRequestCheck).execute([rows[0]])
    (text,) = wan21.stage(WanTextEncoder).execute([checked])
    (encoded,) = wan21.stage(WanImageEncoder).execute([checked])
    row = {**checked, **text, **encoded}
    denoiser = wan21.stage(WanImageDenoiser)
    with_clip = denoiser.execute([row])[0]["LATENTS"]
    without = denoiser.execute([{**row, "IMAGE_EMBEDS": torch.zeros_like(encoded["IMAGE_EMBEDS"])}])[0]["LATENTS"]
    assert (with_clip - without).abs().max() > 1e-3


def test_the_condition_latents_and_mask_are_the_pipelines(wan21):
    """CONDITION = [mask, normalised VAE latents of the image and black frames], as prepare_latents makes it."""
    scalars = dict(HEIGHT=64, WIDTH=96, NUM_FRAMES=9, SEED=1)
    (checked,) = wan21.stage(WanImageRequestCheck).execute([video_row("a cat", None, IMAGES["png"], **scalars)])
    condition = wan21.stage(WanImageEncoder).execute([checked])[0]["CONDITION"]
    pipe = wan21.reference
    pixels = pipe.video_processor.preprocess(Image.open(io.BytesIO(IMAGES["png"])).convert("RGB"), height=64, width=96)
    _, expected = pipe.prepare_latents(pixels, 1, 16, 64, 96, 9, torch.float32, torch.device("cpu"),
                                       torch.Generator().manual_seed(1))
    assert condition.shape == expected[0].shape == (4 + 16, 3, 8, 12)
    torch.testing.assert_close(condition, expected[0])
    assert condition[:4, 0].eq(1).all() and not condition[:4, 1:].any()


def test_text_to_video_checkpoints_are_refused_by_the_image_denoiser_and_back():
    with pytest.raises(ConfigError, match="needs a transformer taking 36 input channels .* got 16: a text-to-video"):
        WanImageDenoiser(Runtime(model_path="tiny-wan-t2v", **CPU_FP32))
    with pytest.raises(ConfigError, match="needs a transformer taking 16 input channels .* got 36: an image-to-video"):
        WanDenoiser(Runtime(model_path="tiny-wan-i2v", **CPU_FP32))


# --- bad input ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def request_check():
    return WanImageRequestCheck(Runtime(model_path="tiny-wan-i2v", **CPU_FP32))


SMALL = dict(HEIGHT=64, WIDTH=64, NUM_FRAMES=5)


@pytest.mark.parametrize(
    "image,fields,field,message",
    [
        (None, {}, "IMAGE", r"^IMAGE: is required$"),
        (b"a cat, not an image", {}, "IMAGE", r"is not a readable PNG, JPEG or WebP image"),
        (half(encode(noise(64, 64))), {}, "IMAGE", r"is a truncated or corrupt PNG image"),
        (png_declaring(5000, 5000), {}, "IMAGE", r"must have at most 16777216 pixels, got 5000x5000"),
        ([IMAGES["png"], IMAGES["jpeg"]], {}, "IMAGE", r"expected 1 image, got 2"),
        (IMAGES["png"], dict(NUM_FRAMES=6), "NUM_FRAMES", r"must be 4k\+1 \(1, 5, 9, ...\) in \[1, 241\], got 6"),
        (IMAGES["png"], dict(HEIGHT=72), "HEIGHT", r"must be a multiple of 16 in \[64, 4096\], got 72"),
        (IMAGES["png"], dict(WIDTH=120), "WIDTH", r"must be a multiple of 16 in \[64, 4096\], got 120"),
    ],
    ids=["missing", "not-an-image", "truncated", "oversized", "two-images", "frames-not-4k+1", "height", "width"],
)
def test_bad_input_names_the_field_and_limit(request_check, image, fields, field, message):
    row = make_row("a cat", **(SMALL | fields))
    if image is not None:
        row["IMAGE"] = np.array(image if isinstance(image, list) else [image], dtype=object)
    good = video_row("a dog", None, IMAGES["png"], **SMALL)
    error, fine = request_check.execute([row, good])
    assert isinstance(error, RequestError) and error.field == field
    assert re.search(message, str(error)), str(error)
    assert not isinstance(fine, RequestError)  # the other row of the call is unaffected


def test_ti2v_sizes_are_multiples_of_32():
    stage = WanImageRequestCheck(Runtime(model_path="tiny-wan2.2-ti2v", **CPU_FP32))
    (error,) = stage.execute([video_row("a cat", None, IMAGES["png"], HEIGHT=80, WIDTH=64, NUM_FRAMES=5)])
    assert isinstance(error, RequestError) and "HEIGHT: must be a multiple of 32" in str(error)


def test_request_outputs_the_resized_image_and_the_clip_image(request_check):
    (out,) = request_check.execute([video_row("a cat", None, IMAGES["png"], HEIGHT=64, WIDTH=96, NUM_FRAMES=5)])
    assert tuple(out["CONDITION_IMAGE"].shape) == (64, 96, 3) and out["CONDITION_IMAGE"].dtype == torch.uint8
    assert tuple(out["CLIP_IMAGE"].shape) == (40, 56, 3)  # as sent: CLIP's processor resizes it itself
    no_clip = WanImageRequestCheck(Runtime(model_path="tiny-wan2.2-i2v", **CPU_FP32))
    (out,) = no_clip.execute([video_row("a cat", None, IMAGES["png"], **SMALL)])
    assert tuple(out["CLIP_IMAGE"].shape) == (0, 0, 3)
