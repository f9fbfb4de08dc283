"""What every denoiser refuses or batches in ``parse`` and ``group_key`` (tiny random models, CPU, fp32):
embeddings of another width than the checkpoint's transformer takes are one row's RequestError (not an
exception in the batch's forward that fails every row batched with it), and FLUX rows of different text
lengths run in separate batches (its texts are concatenated without a mask). And how the denoisers combine
guided predictions (``guide``), in every dtype."""

from __future__ import annotations

import functools

import pytest
import torch
from flux_reference import CPU_FP32

from ditserve.stage import SCALAR_FIELD_DTYPES, RequestError, Runtime
from ditserve.wan.request import VideoParams


def scalars(**values) -> dict:
    return {name: torch.tensor([value], dtype=SCALAR_FIELD_DTYPES[name]) for name, value in values.items()}


def text(length: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(length, width, generator=torch.Generator().manual_seed(seed))


def flux_row(denoiser, seed: int, length: int = 16) -> dict:
    config = denoiser.transformer.config
    return {"PROMPT_EMBEDS": text(length, config.joint_attention_dim, seed),
            "POOLED_PROMPT_EMBEDS": text(1, config.pooled_projection_dim, seed + 100)[0],
            "NEGATIVE_PROMPT_EMBEDS": text(length, config.joint_attention_dim, seed + 200),
            "NEGATIVE_POOLED_PROMPT_EMBEDS": text(1, config.pooled_projection_dim, seed + 300)[0],
            **scalars(HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=seed, TRUE_CFG_SCALE=2.0)}


def qwen_row(denoiser, seed: int) -> dict:
    width = denoiser.transformer.config.joint_attention_dim
    row = {"PROMPT_EMBEDS": text(5, width, seed), "NEGATIVE_PROMPT_EMBEDS": text(3, width, seed + 100),
           **scalars(HEIGHT=64, WIDTH=64, NUM_INFERENCE_STEPS=2, SEED=seed, TRUE_CFG_SCALE=2.0)}
    if "IMAGE_LATENTS" in denoiser.inputs:
        row["IMAGE_LATENTS"] = torch.randn(4, 4, 4 * denoiser.latent_channels, generator=torch.Generator().manual_seed(seed))
    return row


def wan_row(denoiser, seed: int) -> dict:
    width = denoiser.transformer.config.text_dim
    row = {"PROMPT_EMBEDS": text(6, width, seed), "NEGATIVE_PROMPT_EMBEDS": text(6, width, seed + 100),
           **scalars(HEIGHT=64, WIDTH=64, NUM_FRAMES=5, NUM_INFERENCE_STEPS=2, GUIDANCE_SCALE=5.0, GUIDANCE_SCALE_2=5.0,
                     SEED=seed)}
    if "CONDITION" in denoiser.inputs:
        shape = denoiser.condition_shape(VideoParams.parse(row, denoiser.geometry))
        row["CONDITION"] = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        row["IMAGE_EMBEDS"] = text(3, denoiser.transformer.config.image_dim, seed + 200)
    return row


def _flux():
    from ditserve.flux.denoiser import FluxDenoiser
    return FluxDenoiser, "tiny", flux_row


def _qwen():
    from ditserve.qwen_image.denoiser import QwenImageDenoiser
    return QwenImageDenoiser, "tiny-qwen-image", qwen_row


def _qwen_edit():
    from ditserve.qwen_image.denoiser import QwenImageEditDenoiser
    return QwenImageEditDenoiser, "tiny-qwen-image-edit", qwen_row


def _wan():
    from ditserve.wan.denoiser import WanDenoiser
    return WanDenoiser, "tiny-wan-t2v", wan_row


def _wan_i2v():
    from ditserve.wan.denoiser import WanImageDenoiser
    return WanImageDenoiser, "tiny-wan-i2v", wan_row


MODELS = {"flux": _flux, "qwen": _qwen, "qwen_edit": _qwen_edit, "wan": _wan, "wan_i2v": _wan_i2v}


@functools.cache
def loaded(kind: str):
    """(denoiser, row(seed) -> a valid row of it)."""
    stage, model_path, make_row = MODELS[kind]()
    denoiser = stage(Runtime(model_path=model_path, **CPU_FP32))
    return denoiser, functools.partial(make_row, denoiser)


def widened(tensor: torch.Tensor) -> torch.Tensor:
    """One value more in the last dimension."""
    return torch.cat([tensor, tensor[..., :1]], dim=-1)


@pytest.mark.parametrize("kind,name", [
    ("flux", "PROMPT_EMBEDS"), ("flux", "POOLED_PROMPT_EMBEDS"), ("flux", "NEGATIVE_PROMPT_EMBEDS"),
    ("flux", "NEGATIVE_POOLED_PROMPT_EMBEDS"),
    ("qwen", "PROMPT_EMBEDS"), ("qwen", "NEGATIVE_PROMPT_EMBEDS"),
    ("qwen_edit", "PROMPT_EMBEDS"), ("qwen_edit", "IMAGE_LATENTS"),
    ("wan", "PROMPT_EMBEDS"), ("wan", "NEGATIVE_PROMPT_EMBEDS"),
    ("wan_i2v", "PROMPT_EMBEDS"), ("wan_i2v", "IMAGE_EMBEDS"),
])
def test_an_embedding_of_another_width_fails_its_row_alone_naming_the_input_and_the_width(kind, name):
    denoiser, row = loaded(kind)
    bad = row(seed=2)
    width = bad[name].shape[-1]
    bad[name] = widened(bad[name])
    good, refused = denoiser.execute([row(seed=1), bad])
    assert set(good) == {"LATENTS"}
    assert isinstance(refused, RequestError) and refused.field == name, refused
    assert str(refused) == f"{name}: last dimension must be {width} for this checkpoint, got shape {tuple(bad[name].shape)}"


def test_flux_rows_of_different_text_lengths_are_denoised_in_batches_of_one_length():
    """flux_denoiser's config allows ragged batches: Triton hands over texts of any length together."""
    denoiser, row = loaded("flux")
    rows = [row(seed=1, length=16), row(seed=2, length=17), row(seed=3, length=16)]
    batches, dispatch = [], denoiser.dispatch

    def recording(requests):
        batches.append([r.prompt_embeds.shape[0] for r in requests])
        return dispatch(requests)

    denoiser.dispatch = recording
    try:
        together = denoiser.execute(rows)
    finally:
        del denoiser.dispatch
    assert sorted(batches) == [[16, 16], [17]]
    for r, result in zip(rows, together):
        (alone,) = denoiser.execute([r])
        torch.testing.assert_close(result["LATENTS"], alone["LATENTS"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["flux", "qwen"])
def test_a_text_without_tokens_fails_its_row_alone(kind):
    denoiser, row = loaded(kind)
    bad = row(seed=2)
    bad["PROMPT_EMBEDS"] = bad["PROMPT_EMBEDS"][:0]
    if kind == "flux":  # FLUX's negative must have its prompt's shape
        bad["NEGATIVE_PROMPT_EMBEDS"] = bad["NEGATIVE_PROMPT_EMBEDS"][:0]
    good, refused = denoiser.execute([row(seed=1), bad])
    assert set(good) == {"LATENTS"}
    assert isinstance(refused, RequestError) and str(refused) == "PROMPT_EMBEDS: has no tokens", refused


def test_a_group_whose_forward_breaks_fails_its_rows_alone():
    """An exception in one group's batch (out of memory at one size, a parallel worker lost) is a StageFailure
    for that group's rows; the groups of other sizes in the same call still get their latents."""
    from ditserve.stage import StageFailure

    denoiser, row = loaded("flux")
    small, large = row(seed=1), {**row(seed=2), "HEIGHT": torch.tensor([80], dtype=torch.int32)}
    dispatch = denoiser.dispatch

    def out_of_memory_at_80(requests):
        if requests[0].params.height == 80:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return dispatch(requests)

    denoiser.dispatch = out_of_memory_at_80
    try:
        good, broken = denoiser.execute([small, large])
    finally:
        del denoiser.dispatch
    assert isinstance(broken, StageFailure) and str(broken) == "OutOfMemoryError: CUDA out of memory"
    (alone,) = denoiser.execute([small])
    torch.testing.assert_close(good["LATENTS"], alone["LATENTS"])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_guidance_rounds_as_the_pipelines_python_float_scale(dtype, device):
    """``guide`` with one scale a row equals ``neg + scale * (pos - neg)`` with a Python float, as the diffusers
    pipelines combine the predictions, bit for bit; scales that the dtype cannot hold (3.7, 7.3 in bf16) included."""
    from ditserve.denoising import guide

    scales = [3.7, 4.0, 7.3, 1.5]
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs each run
    positive, negative = (torch.randn(len(scales), 333, 64, generator=generator).to(device, dtype) for _ in range(2))
    expected = torch.stack([n + s * (p - n) for s, p, n in zip(scales, positive, negative)])
    got = guide(negative, positive, torch.tensor(scales, device=device).view(-1, 1, 1))
    assert got.dtype == dtype and torch.equal(got, expected)
