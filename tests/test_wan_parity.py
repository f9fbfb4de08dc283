"""Parity: our Wan stages equal diffusers' WanPipeline frame by frame (fp32, CPU, tiny random weights),
and the request check, MP4 and batching behave."""

from __future__ import annotations

import ctypes
import hashlib
import json
import random
import re
import shutil

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from flux_reference import assert_batched_equal_alone, make_row, pixel_diff
from wan_reference import Models, decode_mp4, expert_calls

from ditserve.checkpoints import resolve_model_path
from ditserve.stage import RequestError
from ditserve.wan import WAN_T2V
from ditserve.wan.denoiser import WanDenoiser
from ditserve.wan.postprocess import VideoOptions, encode_mp4
from ditserve.wan.request import WanRequestCheck


def t2v_models(model_path) -> Models:
    return Models(WAN_T2V, model_path, WanPipeline)


@pytest.fixture(scope="module")
def wan21():
    return t2v_models("tiny-wan-t2v")


@pytest.fixture(scope="module")
def wan22():
    return t2v_models("tiny-wan2.2-t2v")


@pytest.fixture(scope="module")
def ti2v():
    return t2v_models("tiny-wan2.2-ti2v")


@pytest.fixture(scope="module")
def wan21_euler(tmp_path_factory):
    """tiny-wan-t2v with FlowMatch Euler and a fixed shift instead of UniPC: the other Wan scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    path = tmp_path_factory.mktemp("wan-euler") / "ckpt"
    shutil.copytree(resolve_model_path("tiny-wan-t2v"), path)
    shutil.rmtree(path / "scheduler")
    FlowMatchEulerDiscreteScheduler(shift=5.0).save_pretrained(path / "scheduler")
    index = json.loads((path / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (path / "model_index.json").write_text(json.dumps(index))
    return t2v_models(path)


CASES = [
    pytest.param(("a red fox in the snow", None), dict(HEIGHT=64, WIDTH=64, NUM_FRAMES=5, NUM_INFERENCE_STEPS=2, SEED=7), id="64x64x5-cfg-empty-negative"),
    pytest.param(
        ("a tall lighthouse at night", "blurry, low quality"),
        dict(HEIGHT=64, WIDTH=96, NUM_FRAMES=9, NUM_INFERENCE_STEPS=3, SEED=1, GUIDANCE_SCALE=4.0),
        id="64x96x9-cfg-negative",
    ),
    pytest.param(("a castle on a hill", None), dict(HEIGHT=80, WIDTH=64, NUM_FRAMES=1, NUM_INFERENCE_STEPS=2, SEED=5, GUIDANCE_SCALE=1.0), id="80x64x1-no-cfg"),
]


@pytest.mark.parametrize("texts,scalars", CASES)
def test_matches_wan_pipeline(wan21, texts, scalars):
    wan21.assert_parity(*texts, scalars)


def test_two_experts_match_wan22_pipeline_and_both_run(wan22):
    with expert_calls(wan22.stage(WanDenoiser)) as calls:
        # 3 UniPC steps with flow_shift 3: timesteps 1000, 857, 600 against the boundary 875.
        wan22.assert_parity("a bowl of ramen", "dark", dict(HEIGHT=64, WIDTH=64, NUM_FRAMES=5, NUM_INFERENCE_STEPS=3, SEED=3))
    assert calls == {"transformer": 1, "transformer_2": 2}


def test_second_expert_guidance_scale_matches_wan22_pipeline(wan22):
    """guidance_scale_2 on transformer_2's steps (here 2 of 3), with guidance on from GUIDANCE_SCALE."""
    wan22.assert_parity("a bowl of ramen", "dark",
                        dict(HEIGHT=64, WIDTH=64, NUM_FRAMES=5, NUM_INFERENCE_STEPS=3, SEED=3, GUIDANCE_SCALE=4.0, GUIDANCE_SCALE_2=1.5))


def test_second_expert_guidance_scale_is_refused_for_one_expert(wan21):
    (result,) = wan21.ours([make_row("a cat", GUIDANCE_SCALE_2=2.0, HEIGHT=64, WIDTH=64, NUM_FRAMES=5)])
    assert isinstance(result, RequestError) and result.field == "GUIDANCE_SCALE_2"
    assert "applies only to two-expert (Wan 2.2 A14B) checkpoints" in str(result)


def test_ti2v_text_to_video_matches_wan_pipeline(ti2v):
    """Wan 2.2 TI2V-5B style (expand_timesteps: a timestep per token; the Wan 2.2 VAE, spatial factor 16)."""
    ti2v.assert_parity("a paper boat", "ugly", dict(HEIGHT=64, WIDTH=96, NUM_FRAMES=5, NUM_INFERENCE_STEPS=2, SEED=2))


def test_flow_match_euler_checkpoint_matches(wan21_euler):
    wan21_euler.assert_parity("a paper boat", "ugly", dict(HEIGHT=64, WIDTH=64, NUM_FRAMES=5, NUM_INFERENCE_STEPS=3, SEED=2))


def test_batched_rows_equal_their_unbatched_results(wan21):
    """Prompts, seeds and guidance scales (CFG on and off) in one call equal each row run alone."""
    common = dict(HEIGHT=64, WIDTH=64, NUM_FRAMES=5, NUM_INFERENCE_STEPS=2)
    rows = [
        make_row("a cat", SEED=1, GUIDANCE_SCALE=1.0, **common),
        make_row("a small dog sitting in a green field", "ugly", SEED=2, GUIDANCE_SCALE=3.0, **common),
        make_row("a cow", SEED=1, **common),
        make_row("a hen", SEED=4, **{**common, "NUM_FRAMES": 9}),  # another group
        make_row("a cat", **{**common, "NUM_FRAMES": 6}),  # a bad row fails alone
    ]
    batched = wan21.ours(rows)
    assert isinstance(batched[-1], RequestError) and batched[-1].field == "NUM_FRAMES"
    assert_batched_equal_alone(wan21.ours, rows[:-1], batched, "FRAMES")
    # Same seed, other prompt and guidance: the prompt reaches the video.
    assert pixel_diff(batched[0]["FRAMES"], batched[2]["FRAMES"]) > 10


def test_mp4_decodes_to_the_frames_at_the_fps(wan21):
    (result,) = wan21.ours([make_row("a red fox", HEIGHT=64, WIDTH=96, NUM_FRAMES=9, NUM_INFERENCE_STEPS=2, SEED=3, FPS=12)])
    frames = result["FRAMES"]
    assert result["VIDEO"].shape == (1,)
    video = decode_mp4(result["VIDEO"][0])
    assert video.codec == "h264" and video.fps == 12 and video.seconds == pytest.approx(9 / 12)
    decoded = video.frames
    assert decoded.shape == frames.shape == (9, 64, 96, 3)
    # Lossy, and random-weight frames are noise: each decoded frame is nearest to its own frame.
    distance = np.abs(decoded[:, None].astype(int) - frames[None].astype(int)).mean(axis=(2, 3, 4))
    assert (distance.argmin(axis=1) == np.arange(9)).all()


def dirty_the_heap(rng: random.Random) -> None:
    """Leave random bytes in freed blocks of many sizes, where the next mallocs will find them."""
    libc = ctypes.CDLL(None)
    libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
    blocks = []
    for _ in range(200):
        size = rng.choice([64, 1024, 4096, 12288, 65536, 100000, 300000])
        block = ctypes.c_void_p()
        assert libc.posix_memalign(ctypes.byref(block), 64, size) == 0
        ctypes.memset(block, rng.randrange(256), size)
        blocks.append(block)
    for block in blocks:
        libc.free(block)


def test_mp4_bytes_depend_only_on_the_frames():
    # libx264's AVX-512 code read memory nobody wrote: the same frames gave different MP4s after different heap
    # histories (the plain and streamed Wan requests on one server, 2026-11-27). encode_mp4 keeps it off.
    smooth = torch.rand(5, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    frames = torch.nn.functional.interpolate(smooth, size=(128, 192), mode="bilinear")
    frames = (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    rng, seen = random.Random(0), set()
    for _ in range(8):
        dirty_the_heap(rng)
        seen.add(hashlib.sha256(encode_mp4(frames, 8, VideoOptions())).hexdigest())
    assert len(seen) == 1, f"{len(seen)} different MP4s from the same frames"


@pytest.mark.parametrize(
    "fields,field,message",
    [
        (dict(NUM_FRAMES=6), "NUM_FRAMES", r"must be 4k\+1 \(1, 5, 9, ...\) in \[1, 241\], got 6"),
        (dict(NUM_FRAMES=245), "NUM_FRAMES", r"must be an integer in \[1, 241\], got 245"),
        (dict(NUM_FRAMES=0), "NUM_FRAMES", r"must be an integer in \[1, 241\], got 0"),
        (dict(HEIGHT=72), "HEIGHT", r"must be a multiple of 16 in \[64, 4096\], got 72"),
        (dict(WIDTH=120), "WIDTH", r"must be a multiple of 16 in \[64, 4096\], got 120"),
        (dict(FPS=0), "FPS", r"must be an integer in \[1, 120\], got 0"),
        (dict(NUM_INFERENCE_STEPS=0), "NUM_INFERENCE_STEPS", r"must be an integer in \[1, 200\]"),
        (dict(GUIDANCE_SCALE=-1.0), "GUIDANCE_SCALE", r"must be a finite number in \[0.0, 100.0\]"),
    ],
)
def test_request_check_names_the_field_and_limit(wan21, fields, field, message):
    (error,) = wan21.stage(WanRequestCheck).execute([make_row("a cat", **fields)])
    assert isinstance(error, RequestError) and error.field == field
    assert re.search(message, str(error)), str(error)


def test_request_defaults_are_wan_pipelines(wan21):
    stage = wan21.stage(WanRequestCheck)
    (out,) = stage.execute([make_row("a cat", SEED=3)])
    assert (int(out["HEIGHT"]), int(out["WIDTH"]), int(out["NUM_FRAMES"])) == (480, 832, 81)
    assert int(out["NUM_INFERENCE_STEPS"]) == 50 and float(out["GUIDANCE_SCALE"]) == 5.0 and int(out["FPS"]) == 16
    (missing,) = stage.execute([{}])
    assert isinstance(missing, RequestError) and str(missing) == "PROMPT: is required"


def test_text_encoder_zero_pads_and_encodes_the_empty_negative(wan21):
    from ditserve.wan.text_encoder import WanTextEncoder

    stage = wan21.stage(WanTextEncoder)
    (out,) = stage.execute([make_row("a cat")])
    prompt, negative = out["PROMPT_EMBEDS"], out["NEGATIVE_PROMPT_EMBEDS"]
    assert prompt.shape == negative.shape == (512, 32)
    real = int(prompt.abs().sum(-1).gt(0).sum())
    assert 0 < real < 10 and not prompt[real:].any()
    expected = wan21.reference.encode_prompt("a cat", None, max_sequence_length=512, device="cpu")
    torch.testing.assert_close(prompt, expected[0][0])
    torch.testing.assert_close(negative, expected[1][0])
