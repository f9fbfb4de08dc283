"""Wan post-processing: uint8 frames (FLUX's quantisation) and one MP4 per video, encoded with PyAV.

The frames are quantised where they are (GPU or CPU); only the uint8 frames cross to the host,
for the encoder. H.264 in yuv420p, the format every player decodes; sizes are multiples of 16,
so the halved chroma planes need no padding.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import io
from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np
import torch

from ditserve.postprocess import to_uint8
from ditserve.stage import Outputs, RequestError, Row, Stage, check_choice, check_parameter, int_field, tensor_field
from ditserve.wan.limits import DEFAULT_FPS, MAX_FPS


@dataclasses.dataclass(frozen=True)
class VideoOptions:
    # libx264's constant rate factor: 0 is lossless, 23 its default; 17-18 look lossless.
    crf: int = 18
    preset: str = "medium"  # libx264's speed/size trade-off; frames look the same

    def __post_init__(self):
        check_parameter("crf", self.crf, 0, 51)
        check_choice("preset", self.preset, ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow",
                                             "slower", "veryslow"))


X264_CPU_AVX512 = 1 << 16  # x264.h


@functools.cache
def x264_asm_without_avx512() -> dict[str, str]:
    """libx264 options that keep its AVX-512 assembly off, {} where it would not use any.

    Why: with AVX-512 (libx264 core 165, as PyAV 18.1 bundles it, on this project's AVX-512 Xeon dev/CI
    machine) the same frames encode to different bytes from one call to the next, depending on what the heap
    held before - measured 2026-11-27: 12 encodes of one 832x480 5-frame clip gave 12 different MP4s, 40 of a
    64x64 one gave 5; with the AVX-512 bit cleared, or with mbtree=0, every encode was identical. So the fault
    is in x264's AVX-512 macroblock-tree code, which reads memory nobody wrote (the heap dependence says so).
    Clearing just that bit keeps mbtree (quality) and cost nothing measurable (81 frames of 832x480:
    2.25-2.32 s without AVX-512, 2.36-2.48 s with).
    x264 takes only a whole CPU mask ("asm=<flags>"), so the mask is its own detection (x264_cpu_detect, exported
    by the libx264 that libavcodec loaded) less AVX-512. Where that library cannot be found (not Linux, or x264
    linked into libavcodec statically), the encoder keeps its defaults."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libx264" in line}
    except OSError:
        return {}
    for path in sorted(paths):
        try:
            detect = ctypes.CDLL(path).x264_cpu_detect
        except (OSError, AttributeError):
            continue
        detect.restype = ctypes.c_uint32
        flags = detect()
        return {"x264-params": f"asm={flags & ~X264_CPU_AVX512}"} if flags & X264_CPU_AVX512 else {}
    return {}


def encode_mp4(frames: np.ndarray, fps: int, options: VideoOptions) -> bytes:
    """(F, H, W, 3) uint8 RGB -> H.264 MP4 bytes at ``fps`` frames per second; the same frames always give
    the same bytes."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(options.crf), "preset": options.preset, **x264_asm_without_avx512()}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return buffer.getvalue()


class VideoPostprocess(Stage):
    """PIXELS (F, 3, H, W) in [0, 1] and FPS -> FRAMES (F, H, W, 3) uint8 and VIDEO (1,) MP4 bytes."""

    Options = VideoOptions
    inputs = ("PIXELS", "FPS")
    outputs = ("FRAMES", "VIDEO")

    def execute(self, rows: Sequence[Row]) -> list[Outputs | RequestError]:
        results: list[Outputs | RequestError] = []
        for row in rows:
            try:
                pixels = tensor_field(row, "PIXELS", 4, row["PIXELS"].device, torch.float32)
                if pixels.shape[1] != 3:
                    raise RequestError("PIXELS", f"expected 3 channels, got shape {tuple(pixels.shape)}")
                fps = int_field(row, "FPS", DEFAULT_FPS, 1, MAX_FPS)
            except RequestError as error:
                results.append(error)
                continue
            frames = to_uint8(pixels).cpu().numpy()
            results.append({"FRAMES": frames, "VIDEO": np.array([encode_mp4(frames, fps, self.options)], dtype=object)})
        return results
