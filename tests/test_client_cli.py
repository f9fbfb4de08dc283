"""ditserve.client (request table, sync and asyncio clients, URL downloads, per-step progress over
the stream models) and the `ditserve generate | edit | video` CLI, through the session's real
tritonserver (tiny models, 64x64, 2 or 3 steps, 5 frames)."""

from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import io
import json
import math
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from flux_reference import pixel_diff
from PIL import Image
from test_qwen_image_edit_request import encode, gradient, png_declaring
from tritonclient.utils import InferenceServerException

from ditserve.cli import main
from ditserve.client import PIPELINES, AsyncClient, Client, RequestError
from ditserve.client.download import download
from ditserve.server import find_free_ports

SMALL = dict(size="64x64", num_inference_steps=2)
# An edit and a video request as small as the tiny checkpoints allow, as CLI options.
EDIT = ["--prompt", "make it red", "--size", "64x64", "--seed", "4", "--num-inference-steps", "2"]
VIDEO = ["--prompt", "a paper boat", "--size", "64x64", "--num-frames", "5", "--fps", "8", "--seed", "2",
         "--num-inference-steps", "2"]


def urls(triton_server) -> dict[str, str]:
    return {"grpc": triton_server.grpc_url, "http": triton_server.http_url.removeprefix("http://")}


def check_progress(kind: str, protocol: str, captured, steps: int) -> None:
    """Over gRPC the CLI counts every step on stderr; over HTTP it says why it cannot."""
    shown = re.findall(rf"^ditserve {kind}: step (\d+)/(\d+) ", captured.err, re.M)
    if protocol == "grpc":
        assert shown == [(str(i), str(steps)) for i in range(1, steps + 1)], captured.err
    else:
        assert shown == [] and "over http (per-step progress needs --protocol grpc)" in captured.out


@pytest.mark.parametrize(
    "fields,field,text",
    [
        pytest.param(dict(prompt=" "), "prompt", "empty", id="blank-prompt"),
        pytest.param(dict(prompt="a" * 20_001), "prompt", "20000", id="long-prompt"),
        pytest.param(dict(prompt="a \ud800"), "prompt", "not valid Unicode", id="lone-surrogate"),  # JSON's "\ud800"
        pytest.param(dict(), "prompt", "required", id="no-prompt"),
        pytest.param(dict(prompt="a", size="64"), "size", "WIDTHxHEIGHT", id="size-malformed"),
        pytest.param(dict(prompt="a", size="48x64"), "size", "[64, 4096]", id="size-too-small"),
        pytest.param(dict(prompt="a", n=9), "n", "[1, 8]", id="n-too-many"),
        pytest.param(dict(prompt="a", n=True), "n", "integer", id="n-bool"),
        pytest.param(dict(prompt="a", seed=-1), "seed", "[0,", id="seed-negative"),
        pytest.param(dict(prompt="a", num_inference_steps=201), "num_inference_steps", "[1, 200]", id="steps"),
        pytest.param(dict(prompt="a", guidance_scale=math.nan), "guidance_scale", "finite", id="guidance-nan"),
        pytest.param(dict(prompt="a", true_cfg_scale=101), "true_cfg_scale", "[0.0, 100.0]", id="true-cfg"),
        pytest.param(dict(prompt="a", quality="hd"), "quality", "unknown field", id="unknown-field"),
    ],
)
def test_table_rejects_bad_fields_naming_them(fields, field, text):
    with pytest.raises(RequestError) as info:
        PIPELINES["generate"].tensors(fields)
    assert info.value.field == field and text in str(info.value), str(info.value)


def test_table_maps_openai_fields_to_ensemble_tensors():
    tensors = PIPELINES["generate"].tensors(dict(prompt="a cat", n=2, size="80x64", seed=3, guidance_scale=2))
    assert tensors == {
        "PROMPT": ("BYTES", [b"a cat"]),
        "NUM_IMAGES": ("INT32", [2]),
        "WIDTH": ("INT32", [80]),
        "HEIGHT": ("INT32", [64]),
        "SEED": ("INT64", [3]),
        "GUIDANCE_SCALE": ("FP32", [2.0]),
    }
    assert PIPELINES["generate"].field_of("in ensemble 'flux_t2i', HEIGHT: must be ...") == "size"
    assert PIPELINES["video"].tensors(dict(prompt="a", num_frames=9, fps=8))["NUM_FRAMES"] == ("INT32", [9])


@pytest.mark.parametrize(
    "kind,fields,field,text",
    [
        pytest.param("edit", dict(image=[png_declaring(5000, 5000)]), "image", "at most 16777216 pixels, got 5000x5000",
                     id="edit-pixels-from-header"),
        pytest.param("edit", dict(image=[encode(gradient(16, 16))] * 2), "image", "expected 1 image, got 2", id="edit-two"),
        pytest.param("edit", dict(image=encode(gradient(16, 16))), "image", "must be a list", id="edit-bare-bytes"),
        pytest.param("edit", dict(image=[b"not an image"]), "image", "not a readable", id="edit-text"),
        pytest.param("video", dict(true_cfg_scale=2.0), "true_cfg_scale", "unknown field", id="video-true-cfg"),
        pytest.param("video", dict(n=2), "n", "unknown field", id="video-n"),
        pytest.param("video", dict(num_frames=242), "num_frames", "[1, 241]", id="video-frames"),
        pytest.param("video", dict(fps=121), "fps", "[1, 120]", id="video-fps"),
    ],
)
def test_edit_and_video_rows_check_with_the_servers_limits(kind, fields, field, text):
    with pytest.raises(RequestError) as info:
        PIPELINES[kind].tensors(dict(prompt="a") | fields)
    assert info.value.field == field and text in str(info.value), str(info.value)


def test_building_the_cli_parser_does_not_import_the_serving_code():
    """`ditserve serve` builds the same parser; the request table (torch, diffusers) stays out."""
    code = ("import sys; from ditserve.cli import build_parser; build_parser(); "
            "assert 'ditserve.client.pipelines' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.server
def test_sync_and_async_clients_over_both_protocols_give_the_same_images(triton_server):
    sync = Client(urls(triton_server)["http"], protocol="http").generate("a lighthouse", n=2, seed=5, **SMALL)
    assert sync.pixels.shape == (2, 64, 64, 3)
    assert [image.size for image in sync.images] == [(64, 64), (64, 64)]
    assert list(sync.stage_ms) == ["flux_request", "flux_text_encoder", "flux_denoiser", "flux_vae_decoder", "flux_postprocess"]

    async def concurrently(protocol: str) -> list:
        client = AsyncClient(urls(triton_server)[protocol], protocol=protocol)
        try:
            return await asyncio.gather(*(client.generate("a lighthouse", n=2, seed=5, **SMALL) for _ in range(2)))
        finally:
            await client.close()

    for protocol in ("grpc", "http"):
        for result in asyncio.run(concurrently(protocol)):
            assert pixel_diff(result.pixels, sync.pixels) <= 1


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_cli_generate_writes_the_requested_images(triton_server, tmp_path, capsys, protocol):
    """Over gRPC the CLI streams (flux_t2i_stream): the same images as the plain ensemble's."""
    argv = ["generate", "--prompt", "a red kite", "--n", "2", "--size", "80x64", "--seed", "7",
            "--num-inference-steps", "3", "--url", urls(triton_server)[protocol], "--protocol", protocol,
            "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "flux_denoiser" in captured.out and f"over {protocol}" in captured.out
    check_progress("generate", protocol, captured, steps=3)
    images = [Image.open(tmp_path / f"flux_t2i_{i}.png") for i in range(2)]
    assert [image.size for image in images] == [(80, 64), (80, 64)]
    expected = Client(urls(triton_server)["grpc"], protocol="grpc").generate("a red kite", n=2, seed=7, size="80x64",
                                                                          num_inference_steps=3)
    assert np.array_equal(np.stack([np.asarray(image) for image in images]), expected.pixels)


def _fails(argv: list[str], capsys) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.server
def test_cli_errors_are_one_line_with_exit_code_1(triton_server, capsys, tmp_path):
    url = ["--url", triton_server.grpc_url]
    assert "size: must be WIDTHxHEIGHT" in _fails(["generate", "--prompt", "a", "--size", "64by64", *url], capsys)
    # The size multiple depends on the checkpoint: the server's own check answers.
    assert "WIDTH: must be a multiple of 16" in _fails(["generate", "--prompt", "a", "--size", "72x64", *url], capsys)
    assert "prompt: is required" in _fails(["generate", *url], capsys)
    closed = f"127.0.0.1:{find_free_ports(1)[0]}"
    for protocol in ("grpc", "http"):
        assert "unreachable" in _fails(["generate", "--prompt", "a", "--url", closed, "--protocol", protocol], capsys)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(5000, 5000))
    assert _fails(["edit", "--prompt", "a", "--image", str(bomb), *url], capsys) == (
        "ditserve edit: image: must have at most 16777216 pixels, got 5000x5000")
    assert "NUM_FRAMES: must be 4k+1" in _fails(["video", *VIDEO, "--num-frames", "8", *url], capsys)


@pytest.mark.server
def test_cli_b64_json_prints_openai_shaped_json(triton_server, capsys):
    argv = ["generate", "--prompt", "a", "--seed", "1", "--size", "64x64", "--num-inference-steps", "2",
            "--response-format", "b64_json", "--url", triton_server.grpc_url]
    assert main(argv) == 0
    body = json.loads(capsys.readouterr().out)
    assert Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).size == (64, 64)


# --- edit and video, URL images -------------------------------------------------------------------


@pytest.fixture(scope="module")
def http_files(tmp_path_factory):
    """(folder, base URL) of a local http.server over a fresh folder; /slow trickles a byte every 0.1 s."""
    folder = tmp_path_factory.mktemp("served")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/slow":
                return super().do_GET()
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(30):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up, as the limit tests make it: no traceback in the test output

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def input_image(http_files) -> tuple[Path, str]:
    """An input image to edit, as a file and as a URL."""
    folder, base = http_files
    (folder / "in.png").write_bytes(encode(gradient(48, 40)))
    return folder / "in.png", f"{base}/in.png"


def test_downloads_have_size_and_time_limits(http_files, input_image):
    path, url = input_image
    assert download(url, "image") == path.read_bytes()
    for source, limits, text in [
        (url, dict(max_bytes=100), "the limit is 100"),  # from Content-Length, before the body
        (f"{http_files[1]}/slow", dict(max_bytes=10), "more than 10 bytes"),  # counted: no Content-Length
        (f"{http_files[1]}/slow", dict(timeout_s=0.5), "took more than 0.5 s"),  # a trickle never times out a read
        (f"{http_files[1]}/missing.png", {}, "HTTP 404"),
    ]:
        start = time.monotonic()
        with pytest.raises(RequestError, match=text) as info:
            download(source, "image", **limits)
        assert info.value.field == "image" and time.monotonic() - start < 2


@pytest.fixture(scope="module")
def edited(triton_server, input_image) -> np.ndarray:
    """The Python client's edit of the input image (the EDIT options), to compare the CLI's with."""
    client = Client(urls(triton_server)["grpc"], protocol="grpc")
    result = client.edit("make it red", [input_image[0].read_bytes()], size="64x64", seed=4, num_inference_steps=2)
    assert result.pixels.shape == (1, 64, 64, 3) and [image.size for image in result.images] == [(64, 64)]
    return result.pixels[0]


@pytest.mark.server
@pytest.mark.parametrize("protocol,source", [("grpc", "path"), ("http", "url")])
def test_cli_edit_writes_the_clients_image(triton_server, tmp_path, capsys, input_image, edited, protocol, source):
    image = str(input_image[0]) if source == "path" else input_image[1]
    argv = ["edit", *EDIT, "--image", image, "--url", urls(triton_server)[protocol], "--protocol", protocol,
            "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "qwen_image_edit_vae_encoder" in captured.out
    check_progress("edit", protocol, captured, steps=2)
    written = Image.open(tmp_path / "qwen_image_edit_0.png")
    assert written.size == (64, 64) and np.array_equal(np.asarray(written), edited)


def decode_mp4(data: bytes) -> tuple[list[np.ndarray], float, tuple[int, int]]:
    """(RGB frames, frames per second, (width, height)) of an MP4."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return frames, float(stream.average_rate), (stream.width, stream.height)


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_cli_video_writes_an_mp4_of_the_requested_frames(triton_server, tmp_path, capsys, protocol):
    argv = ["video", *VIDEO, "--url", urls(triton_server)[protocol], "--protocol", protocol, "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "wan_denoiser" in captured.out
    check_progress("video", protocol, captured, steps=2)
    frames, fps, size = decode_mp4((tmp_path / "wan_t2v_0.mp4").read_bytes())
    assert (len(frames), fps, size) == (5, 8.0, (64, 64))


def test_video_row_routes_requests_with_an_image_to_wan_i2v():
    video = PIPELINES["video"]
    assert video.model_for(dict(prompt="a")) == "wan_t2v" and video.model_for(dict(prompt="a", image=None)) == "wan_t2v"
    image = encode(gradient(48, 40))
    assert video.model_for(dict(prompt="a", image=[image])) == "wan_i2v"
    assert video.tensors(dict(prompt="a", image=[image]))["IMAGE"] == ("BYTES", [image])
    with pytest.raises(RequestError, match="image: expected 1 image, got 2"):
        video.tensors(dict(prompt="a", image=[image, image]))


@pytest.mark.server
def test_cli_video_with_an_image_writes_the_image_to_video_mp4(triton_server, tmp_path, capsys, input_image):
    argv = ["video", *VIDEO, "--image", str(input_image[0]), "--url", urls(triton_server)["grpc"], "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    assert "wan_i2v_image_encoder" in capsys.readouterr().out
    frames, fps, size = decode_mp4((tmp_path / "wan_i2v_0.mp4").read_bytes())
    assert (len(frames), fps, size) == (5, 8.0, (64, 64))


@pytest.mark.server
def test_client_video_returns_the_mp4_and_its_frames(triton_server):
    client = Client(urls(triton_server)["http"], protocol="http")
    result = client.video("a paper boat", size="64x64", num_frames=5, fps=8, seed=2, num_inference_steps=2)
    assert result.frames.shape == (5, 64, 64, 3) and result.frames.std() > 0
    frames, _, _ = decode_mp4(result.mp4)

    def coarse(video: np.ndarray) -> np.ndarray:  # gray means of 8x8 blocks
        return video.astype(float).mean(-1).reshape(len(video), 8, 8, 8, 8).mean(axis=(2, 4))

    # H.264 (4:2:0, lossy) keeps the tiny model's noisy frames only roughly: compare them coarsely.
    error = np.abs(coarse(np.stack(frames)) - coarse(result.frames)).mean()
    assert error < 6, error
    mp4_only = client.video("a paper boat", size="64x64", num_frames=5, fps=8, seed=2, num_inference_steps=2, frames=False)
    assert mp4_only.frames is None and len(decode_mp4(mp4_only.mp4)[0]) == 5


# --- per-step progress through the stream models -----------------------------------------------------


@pytest.mark.server
def test_streamed_results_equal_plain_ones_and_count_the_steps(triton_server):
    grpc_client = Client(urls(triton_server)["grpc"], protocol="grpc")
    steps = []
    video = dict(size="64x64", num_frames=5, fps=8, seed=2, num_inference_steps=3)
    streamed = grpc_client.video("a paper boat", progress=lambda p: steps.append((p.step, p.total)), **video)
    assert steps == [(1, 3), (2, 3), (3, 3)]
    plain = grpc_client.video("a paper boat", **video)
    assert np.array_equal(streamed.frames, plain.frames) and streamed.mp4 == plain.mp4

    async def generate_streamed() -> tuple:
        client, seen = AsyncClient(urls(triton_server)["grpc"], protocol="grpc"), []
        try:
            result = await client.generate("a lighthouse", seed=5, progress=seen.append, **SMALL)
            return result, seen, await client.streams("flux_t2i")
        finally:
            await client.close()

    result, seen, streams = asyncio.run(generate_streamed())
    assert [(p.step, p.total) for p in seen] == [(1, 2), (2, 2)] and streams
    assert np.array_equal(result.pixels, grpc_client.generate("a lighthouse", seed=5, **SMALL).pixels)
    http_client = Client(urls(triton_server)["http"], protocol="http")
    assert not http_client.streams("flux_t2i")
    with pytest.raises(ValueError, match="gRPC"):
        http_client.generate("a lighthouse", progress=print, **SMALL)


def stream_answers(triton_server, requests: list[tuple[str, list]]) -> list[tuple[str, str]]:
    """Send (request id, inputs) to flux_t2i_stream on one gRPC stream; every answer as (id, what), up to
    the last request's final one."""
    answers: queue.Queue = queue.Queue()
    server = grpcclient.InferenceServerClient(triton_server.grpc_url)
    server.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=120)
    try:
        for request_id, inputs in requests:
            server.async_stream_infer("flux_t2i_stream", inputs, request_id=request_id)
        seen = []
        while not seen or seen[-1] != (requests[-1][0], "final"):
            result, error = answers.get(timeout=120)
            if error is not None:
                seen.append(("?", f"error {error.message()}"))  # an error answer carries no request id
                continue
            request_id = result.get_response().id
            step = result.as_numpy("STEP")
            seen.append((request_id, "final" if step is None else f"step {step[0][0]}/{result.as_numpy('TOTAL_STEPS')[0][0]}"))
        return seen
    finally:
        server.stop_stream()


def flux_inputs(**values) -> list:
    types = {"PROMPT": ("BYTES", object), "SEED": ("INT64", np.int64)}
    inputs = []
    for name, value in values.items():
        datatype, dtype = types.get(name, ("INT32", np.int32))
        item = grpcclient.InferInput(name, [1, 1], datatype)
        item.set_data_from_numpy(np.array([[value]], dtype=dtype))
        inputs.append(item)
    return inputs


@pytest.mark.server
def test_a_bad_request_over_the_stream_gets_one_error_naming_the_field(triton_server):
    small = dict(PROMPT=b"a kite", WIDTH=64, NUM_INFERENCE_STEPS=2)
    answers = stream_answers(triton_server, [("bad", flux_inputs(HEIGHT=72, **small)), ("good", flux_inputs(HEIGHT=64, **small))])
    assert answers == [("?", "error HEIGHT: must be a multiple of 16 in [64, 4096], got 72"),
                       ("good", "step 1/2"), ("good", "step 2/2"), ("good", "final")]
    seen = []
    with pytest.raises(InferenceServerException, match="NUM_IMAGES: must be an integer in"):
        Client(triton_server.grpc_url, protocol="grpc").generate("a", NUM_IMAGES=9, progress=seen.append)
    assert seen == []


def denoiser_counts(server, model: str) -> np.ndarray:
    stats = server.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return np.array([int(stats.get("execution_count", 0)), int(stats.get("inference_count", 0))])


@pytest.mark.server
def test_a_streamed_request_batched_with_a_plain_one(triton_server):
    """While a long request holds the denoiser, a streamed and a plain request of one shape queue and
    run as one batch; each gets its own answers."""
    url = urls(triton_server)["grpc"]
    alone = Client(url, protocol="grpc").generate("a red kite", seed=8, **SMALL).pixels
    server = grpcclient.InferenceServerClient(url)
    before = denoiser_counts(server, "flux_denoiser")
    busy = threading.Event()  # the long request's first step is done: the denoiser is taken for ~150 more
    blocker = threading.Thread(target=lambda: Client(url, protocol="grpc").generate(
        "a", size="128x128", num_inference_steps=150, progress=lambda p: busy.set()))
    blocker.start()
    assert busy.wait(120)
    results, steps = {}, []
    plain = threading.Thread(target=lambda: results.update(plain=Client(url, protocol="grpc").generate("a red kite", seed=8, **SMALL)))
    plain.start()
    streamed = Client(url, protocol="grpc").generate("a blue kite", seed=9, progress=steps.append, **SMALL)
    plain.join()
    blocker.join()
    executions, inferences = denoiser_counts(server, "flux_denoiser") - before
    assert (inferences, executions) == (3, 2), "the streamed and the plain request were not batched"
    assert [(p.step, p.total) for p in steps] == [(1, 2), (2, 2)]
    # Within 1/255, not equal: the two requests leave the denoiser together and may reach the VAE
    # decoder together (timing), whose CPU convolutions are not bitwise batch-invariant (up to 1.5e-6
    # apart, measured; 1/255 after rounding for one of three random latents).
    streamed_alone = Client(url, protocol="grpc").generate("a blue kite", seed=9, **SMALL).pixels
    for ours, expected in ((results["plain"].pixels, alone), (streamed.pixels, streamed_alone)):
        assert pixel_diff(ours, expected) <= 1
