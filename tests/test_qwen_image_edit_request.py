"""Bad input images and fields of qwen_image_edit, checked by ditserve.images and the Edit request stage
(no model weights: the request stage reads only the checkpoint's configs)."""

from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from flux_reference import CPU_FP32, make_row
from PIL import Image

from ditserve.images import ImageInputOptions, ImageLimits, decode_image
from ditserve.qwen_image.request import EditRequestOptions, QwenImageEditRequestCheck, condition_size
from ditserve.stage import RequestError, Runtime


def encode(image: Image.Image, format: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save)
    return buffer.getvalue()


def gradient(width: int, height: int, mode: str = "RGB") -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None, None]
    return Image.fromarray(np.broadcast_to(x // 2 + y // 2, (height, width, 3)).copy()).convert(mode)


def noise(width: int, height: int) -> Image.Image:
    """Incompressible: its encodings are long enough to cut in the middle of the pixel data."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring width x height, then one tiny IDAT: a decompression
    bomb's header. Decoding it would fail as truncated; only a header check reports the size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


# --- ditserve.images ------------------------------------------------------------------------------


@pytest.mark.parametrize("format", ["PNG", "JPEG", "WEBP"])
def test_decodes_the_supported_formats_to_rgb(format):
    image = decode_image(encode(gradient(40, 24), format), "IMAGE")
    assert image.mode == "RGB" and image.size == (40, 24)


def test_alpha_and_palette_images_become_rgb():
    assert decode_image(encode(gradient(16, 16, "RGBA")), "IMAGE").mode == "RGB"
    assert decode_image(encode(gradient(16, 16, "P")), "IMAGE").mode == "RGB"


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: a portrait photo stored landscape
    image = decode_image(encode(gradient(40, 24), "JPEG", exif=exif.tobytes()), "IMAGE")
    assert image.size == (24, 40)


BAD = {
    "empty": (b"", "is empty"),
    "text": (b"a cat, not an image", "is not a readable PNG, JPEG or WebP image"),
    "gif": (encode(gradient(16, 16), "GIF"), "is not a readable PNG, JPEG or WebP image"),  # an image, not accepted
    "bmp": (encode(gradient(16, 16), "BMP"), "is not a readable PNG, JPEG or WebP image"),
    "truncated-png": (half(encode(noise(64, 64))), "truncated or corrupt PNG"),
    "truncated-jpeg": (half(encode(noise(64, 64), "JPEG")), "truncated or corrupt JPEG"),
    # PIL's WebP plugin decodes the whole file when opening it: a cut one is not readable at all.
    "truncated-webp": (half(encode(noise(64, 64), "WEBP")), "is not a readable PNG, JPEG or WebP image"),
    "header-only-png": (png_declaring(64, 64), "truncated or corrupt PNG"),
    # Above our limit, below PIL's own bomb check (89 MP): our header check refuses it.
    "bomb-over-our-limit": (png_declaring(5000, 5000), "must have at most 16777216 pixels, got 5000x5000"),
    # Above PIL's bomb check too: PIL refuses it in open(), reported the same way.
    "bomb-over-pils-limit": (png_declaring(100_000, 100_000), "declares more than 16777216 pixels"),
    "too-small": (encode(gradient(4, 64)), "sides must be at least 8 pixels, got 4x64"),
    # 16-bit grayscale PNG: its RGB conversion would clip it nearly white.
    "gray-16-bit": (encode(Image.fromarray(np.linspace(0, 65535, 256, dtype=np.uint16).reshape(16, 16))),
                    r"is a I;16 \(16- or 32-bit grayscale\) image"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_images_name_the_field(name):
    data, message = BAD[name]
    with pytest.raises(RequestError, match=message) as error:
        decode_image(data, "IMAGE")
    assert error.value.field == "IMAGE" and str(error.value).startswith("IMAGE: ")


def test_byte_and_pixel_limits_are_parameters():
    data = encode(gradient(64, 64))
    with pytest.raises(RequestError, match=rf"at most 100 bytes, got {len(data)}"):
        decode_image(data, "IMAGE", ImageLimits(max_bytes=100))
    with pytest.raises(RequestError, match="at most 4000 pixels, got 64x64"):
        decode_image(data, "IMAGE", ImageLimits(max_pixels=4000))


def test_8_bit_grayscale_is_accepted():
    assert decode_image(encode(gradient(16, 16, "L")), "IMAGE").mode == "RGB"


def test_a_pixel_limit_above_pillows_own_is_refused_at_load():
    """Pillow refuses images above Image.MAX_IMAGE_PIXELS itself: a larger limit would not hold."""
    assert ImageInputOptions(max_image_pixels=Image.MAX_IMAGE_PIXELS).limits.max_pixels == Image.MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match=rf"max_image_pixels must be at most {Image.MAX_IMAGE_PIXELS}"):
        ImageInputOptions(max_image_pixels=Image.MAX_IMAGE_PIXELS + 1)


# --- the Edit request stage ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage():
    return QwenImageEditRequestCheck(Runtime(model_path="tiny-qwen-image-edit", **CPU_FP32))


def edit_row(*images: bytes, prompt="make it red", **scalars) -> dict:
    return {**make_row(prompt, **scalars), "INPUT_IMAGE": np.array(list(images), dtype=object)}


def test_condition_size_is_the_pipelines():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    for width, height in [(100, 61), (61, 100), (1, 1), (4096, 256), (333, 777)]:
        assert condition_size(1024 * 1024, width, height) == calculate_dimensions(1024 * 1024, width / height)[:2]


def test_defaults_come_from_the_image(stage):
    (out,) = stage.execute([edit_row(encode(gradient(100, 61)))])
    assert tuple(out["CONDITION_IMAGE"].shape) == (800, 1312, 3) and out["CONDITION_IMAGE"].dtype == torch.uint8
    assert (int(out["WIDTH"]), int(out["HEIGHT"])) == (1312, 800)
    assert int(out["NUM_INFERENCE_STEPS"]) == 50 and float(out["TRUE_CFG_SCALE"]) == 4.0
    (explicit,) = stage.execute([edit_row(encode(gradient(100, 61)), HEIGHT=512)])
    assert (int(explicit["WIDTH"]), int(explicit["HEIGHT"])) == (1312, 512)  # as the pipeline: height or calculated


REQUEST_ERRORS = {
    "no-image": (lambda: make_row("make it red"), "INPUT_IMAGE", "is required"),
    "zero-images": (lambda: edit_row(), "INPUT_IMAGE", "expected 1 image, got 0"),
    "two-images": (lambda: edit_row(encode(gradient(16, 16)), encode(gradient(16, 16))), "INPUT_IMAGE", "expected 1 image, got 2"),
    "not-an-image": (lambda: edit_row(b"GIF89a nonsense"), "INPUT_IMAGE", "not a readable PNG, JPEG or WebP"),
    "bomb": (lambda: edit_row(png_declaring(5000, 5000)), "INPUT_IMAGE", "at most 16777216 pixels, got 5000x5000"),
    # 1024 x 20: 1:51.2, resized to about 1 MP it would be 7328 pixels wide.
    "extreme-aspect": (lambda: edit_row(encode(gradient(1024, 20))), "INPUT_IMAGE", r"aspect ratio of 1024x20 is too extreme"),
    "no-prompt": (lambda: {"INPUT_IMAGE": np.array([encode(gradient(16, 16))], dtype=object)}, "PROMPT", "is required"),
    "image-token-in-prompt": (lambda: edit_row(encode(gradient(16, 16)), prompt="a <|image_pad|>"), "PROMPT", "must not contain"),
    "bad-height": (lambda: edit_row(encode(gradient(16, 16)), HEIGHT=72), "HEIGHT", "multiple of 16"),
}


def test_request_errors_name_the_field_and_fail_only_their_row(stage):
    good = edit_row(encode(gradient(64, 48), "JPEG"), HEIGHT=64, WIDTH=64)
    rows = [make() for make, _, _ in REQUEST_ERRORS.values()]
    *bad, ok = stage.execute([*rows, good])
    for (name, (_, field, message)), result in zip(REQUEST_ERRORS.items(), bad):
        assert isinstance(result, RequestError), name
        assert result.field == field and str(result).startswith(f"{field}: "), (name, result)
        assert re.search(message, str(result)), (name, result)
    assert not isinstance(ok, RequestError) and tuple(ok["CONDITION_IMAGE"].shape) == (896, 1184, 3)


def test_options_are_checked():
    with pytest.raises(ValueError, match="condition_area"):
        EditRequestOptions(condition_area=10)
