"""ditserve.client (request table, sync and asyncio clients) and the `ditserve generate | edit |
video` CLI, through the session's real tritonserver (tiny model, 64x64, 2 steps)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ditserve.cli import main
from ditserve.client import PIPELINES, AsyncClient, Client, RequestError
from ditserve.server import find_free_ports

SMALL = dict(size="64x64", num_inference_steps=2)


def urls(triton_server) -> dict[str, str]:
    return {"grpc": triton_server.grpc_url, "http": triton_server.http_url.removeprefix("http://")}


@pytest.mark.parametrize(
    "fields,field,text",
    [
        pytest.param(dict(prompt=" "), "prompt", "empty", id="blank-prompt"),
        pytest.param(dict(prompt="a" * 20_001), "prompt", "20000", id="long-prompt"),
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
            assert np.abs(result.pixels.astype(int) - sync.pixels.astype(int)).max() <= 1


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_cli_generate_writes_the_requested_images(triton_server, tmp_path, capsys, protocol):
    argv = ["generate", "--prompt", "a red kite", "--n", "2", "--size", "80x64", "--seed", "7",
            "--num-inference-steps", "2", "--url", urls(triton_server)[protocol], "--protocol", protocol,
            "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "flux_denoiser" in out and f"over {protocol}" in out
    images = [Image.open(tmp_path / f"flux_t2i_{i}.png") for i in range(2)]
    assert [image.size for image in images] == [(80, 64), (80, 64)]
    expected = Client(urls(triton_server)["grpc"], protocol="grpc").generate("a red kite", n=2, seed=7, size="80x64",
                                                                          num_inference_steps=2)
    assert np.array_equal(np.stack([np.asarray(image) for image in images]), expected.pixels)


def _fails(argv: list[str], capsys) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.server
def test_cli_errors_are_one_line_with_exit_code_1(triton_server, capsys):
    url = ["--url", triton_server.grpc_url]
    assert "size: must be WIDTHxHEIGHT" in _fails(["generate", "--prompt", "a", "--size", "64by64", *url], capsys)
    # The size multiple depends on the checkpoint: the server's own check answers.
    assert "WIDTH: must be a multiple of 16" in _fails(["generate", "--prompt", "a", "--size", "72x64", *url], capsys)
    assert "prompt: is required" in _fails(["generate", *url], capsys)
    closed = f"127.0.0.1:{find_free_ports(1)[0]}"
    for protocol in ("grpc", "http"):
        assert "unreachable" in _fails(["generate", "--prompt", "a", "--url", closed, "--protocol", protocol], capsys)


@pytest.mark.server
def test_cli_b64_json_prints_openai_shaped_json(triton_server, capsys):
    argv = ["generate", "--prompt", "a", "--seed", "1", "--size", "64x64", "--num-inference-steps", "2",
            "--response-format", "b64_json", "--url", triton_server.grpc_url]
    assert main(argv) == 0
    body = json.loads(capsys.readouterr().out)
    assert Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).size == (64, 64)
