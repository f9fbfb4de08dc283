"""flux_t2i through a real tritonserver: parity, batching, bad input, health."""

from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from flux_reference import pixel_diff, reference_pipeline, reference_uint8
from PIL import Image
from tritonclient.utils import InferenceServerException

from ditserve.client import Client
from ditserve.flux import FLUX_T2I

pytestmark = pytest.mark.server
SMALL = dict(HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=2)


@pytest.fixture(scope="module")
def client(triton_server):
    return Client(triton_server.http_url.removeprefix("http://"), protocol="http")


def concurrently(triton_server, calls: list) -> list:
    """Run calls(client) at the same time, one client each (HTTP clients are not thread-safe)."""
    url = triton_server.http_url.removeprefix("http://")
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(Client(url, protocol="http")), calls))


def executions(server_client, model: str) -> int:
    stats = server_client.get_inference_statistics(model)["model_stats"]
    return sum(int(m["execution_count"]) for m in stats)


def test_matches_flux_pipeline_through_triton(triton_server):
    """The ensemble's image over gRPC equals diffusers' FluxPipeline, pixels within 1/255."""
    client = Client(triton_server.grpc_url, protocol="grpc")
    scalars = dict(HEIGHT=80, WIDTH=64, NUM_INFERENCE_STEPS=3, SEED=11, TRUE_CFG_SCALE=3.0, NUM_IMAGES=2)
    result = client.generate("a paper boat on a lake", "dark", **scalars)
    expected = reference_uint8(reference_pipeline("tiny"), "a paper boat on a lake", "dark", **scalars)
    assert result.pixels.shape == expected.shape == (2, 80, 64, 3)
    assert pixel_diff(result.pixels, expected) <= 1
    for png, pixels in zip(result.png, result.pixels):
        image = Image.open(io.BytesIO(png))
        assert image.size == (64, 80)
        assert np.array_equal(np.asarray(image), pixels)
    assert list(result.stage_ms) == [s.model for s in FLUX_T2I.stages]


def test_concurrent_requests_are_batched_and_equal_their_unbatched_results(triton_server, client):
    prompts = [("a cat", 1), ("a dog", 2), ("a red car", 3), ("a tree", 4), ("a boat", 5), ("a moon", 6)]
    before = executions(client.server, "flux_denoiser")
    together = concurrently(
        triton_server, [lambda c, p=p, s=s: c.generate(p, SEED=s, **SMALL) for p, s in prompts]
    )
    runs = executions(client.server, "flux_denoiser") - before
    assert runs < len(prompts), f"{runs} denoiser executions for {len(prompts)} concurrent requests"
    for (prompt, seed), result in zip(prompts, together):
        alone = client.generate(prompt, SEED=seed, **SMALL)
        assert pixel_diff(alone.pixels, result.pixels) <= 1


def test_same_seed_same_image_other_seed_other_image(client):
    first = client.generate("a lighthouse", SEED=5, **SMALL).pixels
    assert np.array_equal(first, client.generate("a lighthouse", SEED=5, **SMALL).pixels)
    assert pixel_diff(first, client.generate("a lighthouse", SEED=6, **SMALL).pixels) > 10


BAD_INPUTS = [
    pytest.param(dict(prompt=""), "PROMPT", "empty", id="empty-prompt"),
    pytest.param(dict(prompt="   "), "PROMPT", "empty", id="blank-prompt"),
    pytest.param(dict(HEIGHT=72), "HEIGHT", "multiple of 16", id="height-not-multiple"),
    pytest.param(dict(WIDTH=4112), "WIDTH", "4096", id="width-too-large"),
    pytest.param(dict(HEIGHT=48), "HEIGHT", "[64, 4096]", id="height-too-small"),
    pytest.param(dict(NUM_INFERENCE_STEPS=0), "NUM_INFERENCE_STEPS", "[1, 200]", id="steps-zero"),
    pytest.param(dict(NUM_INFERENCE_STEPS=201), "NUM_INFERENCE_STEPS", "[1, 200]", id="steps-too-many"),
    pytest.param(dict(GUIDANCE_SCALE=math.nan), "GUIDANCE_SCALE", "finite", id="guidance-nan"),
    pytest.param(dict(GUIDANCE_SCALE=-1.0), "GUIDANCE_SCALE", "[0.0, 100.0]", id="guidance-negative"),
    pytest.param(dict(TRUE_CFG_SCALE=math.inf), "TRUE_CFG_SCALE", "finite", id="true-cfg-inf"),
    pytest.param(dict(NUM_IMAGES=0), "NUM_IMAGES", "[1, 8]", id="images-zero"),
    pytest.param(dict(NUM_IMAGES=9), "NUM_IMAGES", "[1, 8]", id="images-too-many"),
    pytest.param(dict(SEED=-1), "SEED", "[0,", id="seed-negative"),
]


@pytest.mark.parametrize("change,field,limit", BAD_INPUTS)
def test_bad_input_gets_a_clear_error_and_the_server_stays_up(client, change, field, limit):
    request = dict(prompt="a cat", **SMALL) | change
    with pytest.raises(InferenceServerException) as info:
        client.generate(request.pop("prompt"), **request)
    message = str(info.value)
    assert field in message and limit in message, message
    assert info.value.status() == "400", message  # the client's error, not the server's (500)
    assert client.server.is_server_ready()
    assert client.generate("a cat", SEED=1, **SMALL).pixels.shape == (1, 64, 64, 3)


def _infer_raw(triton_server, inputs):
    server = httpclient.InferenceServerClient(triton_server.http_url.removeprefix("http://"))
    items = []
    for name, datatype, array in inputs:
        item = httpclient.InferInput(name, list(array.shape), datatype)
        item.set_data_from_numpy(array)
        items.append(item)
    return server.infer("flux_t2i", items)


@pytest.mark.parametrize(
    "inputs,field",
    [
        pytest.param([("HEIGHT", "INT32", np.array([[64]], dtype=np.int32))], "PROMPT", id="missing-prompt"),
        pytest.param(
            [("PROMPT", "BYTES", np.array([[b"a"]], dtype=object)), ("HEIGHT", "FP32", np.array([[64.0]], dtype=np.float32))],
            "HEIGHT",
            id="wrong-dtype",
        ),
        pytest.param([("PROMPT", "BYTES", np.array([[b"a", b"b"]], dtype=object))], "PROMPT", id="wrong-shape"),
    ],
)
def test_malformed_tensors_are_rejected_naming_the_input(triton_server, inputs, field):
    with pytest.raises(InferenceServerException) as info:
        _infer_raw(triton_server, inputs)
    assert field in str(info.value), str(info.value)


def test_bad_request_batched_with_good_ones_fails_alone(triton_server, client):
    requests = [dict(HEIGHT=64), dict(HEIGHT=72), dict(HEIGHT=64), dict(NUM_IMAGES=9), dict(HEIGHT=64)]

    def send(c, i, change):
        try:
            return c.generate(f"prompt {i}", SEED=i, **(SMALL | change))
        except InferenceServerException as error:
            return error

    # Whether Triton batches these is up to timing; that a bad row fails alone inside one batch
    # is tested deterministically in test_flux_parity.py (the same stage code, all rows at once).
    results = concurrently(triton_server, [lambda c, i=i, x=x: send(c, i, x) for i, x in enumerate(requests)])
    assert [isinstance(r, InferenceServerException) for r in results] == [False, True, False, True, False]
    assert "HEIGHT" in str(results[1]) and "NUM_IMAGES" in str(results[3])


def _grpc_request(prompts: list[bytes], **scalars: list[int]) -> list:
    inputs = []
    prompt = grpcclient.InferInput("PROMPT", [len(prompts), 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[p] for p in prompts], dtype=object))
    inputs.append(prompt)
    for name, values in scalars.items():
        item = grpcclient.InferInput(name, [len(values), 1], "INT32")
        item.set_data_from_numpy(np.array([[v] for v in values], dtype=np.int32))
        inputs.append(item)
    return inputs


@pytest.mark.parametrize("scalars,message", [
    pytest.param(dict(HEIGHT=[72]), "HEIGHT: must be a multiple of 16", id="bad-height"),
    pytest.param(dict(NUM_IMAGES=[1, 2]), "NUM_IMAGES: must be equal for every row of a request, got 1 in row 0 and 2",
                 id="rows-of-different-sizes"),
])
def test_grpc_bad_input_is_invalid_argument(triton_server, scalars, message):
    """Bad input is the client's error over gRPC too (INVALID_ARGUMENT, not INTERNAL), through the ensemble;
    rows of one request that would give images of different shapes are refused as bad input, naming the field."""
    server = grpcclient.InferenceServerClient(triton_server.grpc_url)
    rows = len(next(iter(scalars.values())))
    with pytest.raises(InferenceServerException) as info:
        server.infer("flux_t2i", _grpc_request([b"a cat"] * rows, NUM_INFERENCE_STEPS=[2] * rows, **scalars))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and message in info.value.message(), info.value


def test_grpc_batch_of_two_prompts_in_one_request(triton_server):
    """A client-side batch (batch dimension 2) answers both rows, each with its own image."""
    server = grpcclient.InferenceServerClient(triton_server.grpc_url)
    prompt = grpcclient.InferInput("PROMPT", [2, 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[b"a cat"], [b"a dog"]], dtype=object))
    inputs = [prompt]
    for name, value in (("HEIGHT", 64), ("WIDTH", 64), ("NUM_INFERENCE_STEPS", 2)):
        item = grpcclient.InferInput(name, [2, 1], "INT32")
        item.set_data_from_numpy(np.full((2, 1), value, dtype=np.int32))
        inputs.append(item)
    seed = grpcclient.InferInput("SEED", [2, 1], "INT64")
    seed.set_data_from_numpy(np.array([[1], [1]], dtype=np.int64))
    result = server.infer("flux_t2i", inputs + [seed])
    images = result.as_numpy("IMAGE")
    assert images.shape == (2, 1, 64, 64, 3)
    assert pixel_diff(images[0], images[1]) > 10
