"""Shared by the Wan tests (text- and image-to-video, local and through the server): request rows,
diffusers' reference video for the same fields, our stages and the reference on one checkpoint,
the frame-parity check, the two-expert call count and MP4 decoding."""

from __future__ import annotations

import contextlib
import io
import typing
from fractions import Fraction

import av
import numpy as np
import torch
from flux_reference import CPU_FP32, assert_pixels_match, make_row, reference_pipeline
from PIL import Image

from ditserve.checkpoints import resolve_model_path
from ditserve.pipeline import LocalPipeline, PipelineSpec
from ditserve.stage import RequestError, Runtime


def video_row(prompt: str, negative: str | None = None, image: bytes | None = None, **scalars) -> dict:
    """A request row of wan_t2v, or of wan_i2v with the encoded ``image``."""
    row = make_row(prompt, negative, **scalars)
    if image is not None:
        row["IMAGE"] = np.array([image], dtype=object)
    return row


def reference_frames(pipe, prompt, negative=None, image: bytes | None = None, **kw) -> np.ndarray:
    """WanPipeline's (or, with ``image``, WanImageToVideoPipeline's) frames for the same request fields,
    as uint8 (F, H, W, 3); the image is decoded as the server decodes it."""
    frames = pipe(
        **({} if image is None else {"image": Image.open(io.BytesIO(image)).convert("RGB")}),
        prompt=prompt,
        negative_prompt=negative,
        height=kw["HEIGHT"],
        width=kw["WIDTH"],
        num_frames=kw["NUM_FRAMES"],
        num_inference_steps=kw["NUM_INFERENCE_STEPS"],
        generator=torch.Generator("cpu").manual_seed(kw["SEED"]),
        output_type="np",
        **({"guidance_scale": kw["GUIDANCE_SCALE"]} if "GUIDANCE_SCALE" in kw else {}),
        **({"guidance_scale_2": kw["GUIDANCE_SCALE_2"]} if "GUIDANCE_SCALE_2" in kw else {}),
    ).frames
    return (frames[0] * 255).round().astype(np.uint8)  # as diffusers' numpy_to_pil


def assert_frames_match(frames: np.ndarray, expected: np.ndarray, scalars: dict) -> None:
    """Our frames have the requested shape, are not flat, and are within 1/255 of the reference's."""
    assert_pixels_match(frames, expected, (scalars["NUM_FRAMES"], scalars["HEIGHT"], scalars["WIDTH"], 3))


class Models:
    """Our pipeline ``spec`` and the diffusers ``pipeline_class`` on one checkpoint (built once per module)."""

    def __init__(self, spec: PipelineSpec, model_path, pipeline_class):
        path = resolve_model_path(model_path)
        self.ours = LocalPipeline(spec, Runtime(model_path=str(path), **CPU_FP32))
        self.reference = reference_pipeline(path, pipeline_class)

    def stage(self, cls):
        return next(stage for _, stage in self.ours.stages if isinstance(stage, cls))

    def assert_parity(self, prompt, negative, scalars, image: bytes | None = None) -> np.ndarray:
        """Our frames for one request equal the reference's; returns them."""
        (result,) = self.ours([video_row(prompt, negative, image, **scalars)])
        assert not isinstance(result, RequestError), result
        assert_frames_match(result["FRAMES"], reference_frames(self.reference, prompt, negative, image, **scalars), scalars)
        return result["FRAMES"]


@contextlib.contextmanager
def expert_calls(denoiser) -> typing.Iterator[dict[str, int]]:
    """Counts the forward calls of a Wan 2.2 denoiser's two experts while the block runs."""
    calls = {"transformer": 0, "transformer_2": 0}
    hooks = [
        getattr(denoiser, name).register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        for name in calls
    ]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


class Mp4(typing.NamedTuple):
    frames: np.ndarray  # (F, H, W, 3) uint8 RGB
    codec: str
    fps: Fraction
    seconds: float


def decode_mp4(data: bytes) -> Mp4:
    """An MP4 through FFmpeg's demuxer and H.264 decoder (PyAV)."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
        return Mp4(frames, stream.codec_context.name, stream.average_rate, container.duration / av.time_base)


def assert_ensemble_runs_every_stage(client, spec: PipelineSpec, request: typing.Callable[[], typing.Any]) -> None:
    """The ensemble's steps are the spec's stages, in order, and ``request()`` (one request to it) runs each
    of them once more: their execution counts, from Triton's statistics (gRPC client)."""
    config = client.get_model_config(spec.name, as_json=True)["config"]
    assert [step["model_name"] for step in config["ensemble_scheduling"]["step"]] == [s.model for s in spec.stages]

    def executions() -> list[int]:
        stats = [client.get_inference_statistics(stage.model, as_json=True)["model_stats"][0] for stage in spec.stages]
        return [int(s.get("execution_count", 0)) for s in stats]

    before = executions()
    request()
    grown = [after - was for after, was in zip(executions(), before)]
    assert all(n >= 1 for n in grown), dict(zip([s.model for s in spec.stages], grown))
