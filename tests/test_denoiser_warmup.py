"""Warm-up at load (``ditserve.denoising.TransformerDenoiser``: parameter ``warmup``, hook ``warmup_batches``).

On CUDA a denoiser denoises its model's warm-up batches while it loads, so that no request pays for Triton
compiling and autotuning our attention kernels (or for capturing a CUDA graph). Here, on CPU with the tiny
models: every model's batches are valid requests of its own (they run through its denoise), Qwen-Image's call
the four variants of the kernel (key mask or not, sequence length a multiple of 16 or not), a warm-up leaves
the outputs of later requests and the global random state alone, and loading on CPU warms nothing up (the
tests do not pay for it). Image sizes are shrunk where the default size would cost seconds here.
"""

from __future__ import annotations

import dataclasses
import numpy as np
import pytest
import torch
from flux_reference import CPU_FP32

from ditserve.denoising import TransformerDenoiser
from ditserve.kernels import attention as A
from ditserve.stage import Runtime


def _qwen(model: str = "tiny-qwen-image", **runtime):
    from ditserve.qwen_image.denoiser import QwenImageDenoiser, QwenImageEditDenoiser

    denoiser = QwenImageEditDenoiser if model == "tiny-qwen-image-edit" else QwenImageDenoiser
    return denoiser(Runtime(model_path=model, **(runtime or CPU_FP32)))


def _wan(model: str, **options):
    from ditserve.wan.denoiser import WanDenoiser, WanDenoiserOptions, WanImageDenoiser

    denoiser = WanDenoiser if model.endswith("t2v") else WanImageDenoiser
    return denoiser(Runtime(model_path=model, **CPU_FP32), WanDenoiserOptions(**options))


def warm_up(denoiser: TransformerDenoiser) -> list[torch.Tensor]:
    """denoiser.warm_up(), returning the latents it denoised."""
    latents, dispatch = [], denoiser.dispatch

    def recording(batch: list) -> list[torch.Tensor]:
        out = dispatch(batch)
        latents.extend(out)
        return out

    denoiser.dispatch = recording
    denoiser.warm_up()
    return latents


def test_loading_on_cpu_warms_nothing_up(monkeypatch):
    def refuse(self):
        raise AssertionError("warm_up ran on CPU")

    monkeypatch.setattr(TransformerDenoiser, "warm_up", refuse)
    denoiser = _qwen()
    assert denoiser.options.warmup  # the default: on, for CUDA
    assert not _wan("tiny-wan-t2v").needs_warmup()  # and Wan's only with our kernels: sdpa (auto on CPU) needs none


@pytest.mark.skipif(not A.INTERPRET, reason="the triton backend on CPU needs Triton's interpreter")
def test_wan_warms_up_with_our_kernels():
    assert _wan("tiny-wan-t2v", attention_backend="triton").needs_warmup()


@pytest.mark.parametrize("model", ["tiny-qwen-image", "tiny-qwen-image-edit"], ids=["t2i", "edit"])
def test_qwen_image_warmup_calls_every_kernel_variant(model):
    """Triton compiles a kernel per (key mask, length divisible by 16) at its first call: the warm-up must make
    all four, with true CFG. Recorded at each block's joint attention (text + image tokens)."""
    denoiser = _qwen(model)
    denoiser.default_size = 64  # 4 x 4 image tokens (a multiple of 16, as 1024 x 1024's 4096): seconds less
    calls = set()

    def record(module, args, kwargs):
        tokens = kwargs["hidden_states"].shape[1] + kwargs["encoder_hidden_states"].shape[1]
        calls.add((kwargs["encoder_hidden_states_mask"] is not None, tokens % 16 == 0))

    for block in denoiser.transformer.transformer_blocks:
        block.attn.register_forward_pre_hook(record, with_kwargs=True)
    latents = warm_up(denoiser)
    assert calls == {(masked, aligned) for masked in (False, True) for aligned in (False, True)}
    assert len(latents) == 3 and all(bool(torch.isfinite(x).all()) for x in latents)
    # With max_batch_images 1 no batch pads a text: the masked variants are never called, nor warmed up.
    denoiser.options = dataclasses.replace(denoiser.options, max_batch_images=1)
    assert [len(batch) for batch in denoiser.warmup_batches(1)] == [1]


@pytest.mark.parametrize("model", ["tiny", "tiny-wan-t2v", "tiny-wan-i2v", "tiny-wan2.2-ti2v"],
                         ids=["flux", "wan-t2v", "wan-i2v-clip", "wan-ti2v"])
def test_warmup_batches_are_requests_of_the_model(model, monkeypatch):
    """They run through the model's denoise; Wan's at a smaller default size (one latent frame of 2 x 2 tokens)
    with its CONDITION and, for Wan 2.1 I2V, the CLIP context of the checkpoint's image encoder."""
    if model == "tiny":
        from ditserve.flux.denoiser import FluxDenoiser

        denoiser = FluxDenoiser(Runtime(model_path=model, **CPU_FP32))
    else:
        from ditserve.wan import denoiser as wan

        for name, value in (("DEFAULT_HEIGHT", 32), ("DEFAULT_WIDTH", 32), ("DEFAULT_FRAMES", 1)):
            monkeypatch.setattr(wan, name, value)
        denoiser = _wan(model)
    (batch,) = denoiser.warmup_batches(1)
    if model == "tiny-wan-i2v":
        assert batch[0].image_embeds.shape == (17, denoiser.transformer.config.image_dim)  # (32 / 8)^2 + class token
    (latents,) = warm_up(denoiser)
    assert bool(torch.isfinite(latents).all())


def test_warmup_leaves_later_requests_alone():
    """Same latents for a request before and after a warm-up, and the global random state untouched."""
    denoiser = _qwen()
    denoiser.default_size = 64
    generator = torch.Generator().manual_seed(0)
    row = {"PROMPT_EMBEDS": torch.randn(5, 32, generator=generator),
           "NEGATIVE_PROMPT_EMBEDS": torch.randn(3, 32, generator=generator),
           "HEIGHT": torch.tensor([64]), "WIDTH": torch.tensor([80]), "NUM_INFERENCE_STEPS": torch.tensor([2]),
           "TRUE_CFG_SCALE": torch.tensor([4.0]), "SEED": torch.tensor([7])}
    (before,) = denoiser.execute([row])
    state = torch.get_rng_state()
    warm_up(denoiser)
    assert torch.equal(torch.get_rng_state(), state)
    (after,) = denoiser.execute([row])
    np.testing.assert_array_equal(after["LATENTS"].numpy(), before["LATENTS"].numpy())


@pytest.mark.gpu
def test_qwen_image_loads_warm_on_cuda():
    """On CUDA (auto: our Triton kernel) the load tunes the kernel for the warm-up's (length bucket, mask) keys:
    1024 x 1024's 4096 image tokens plus 512 (positive texts) and 7 (negative texts) text tokens."""
    from ditserve.qwen_image.denoiser import WARMUP_NEGATIVE_TOKENS

    denoiser = _qwen(device=torch.device("cuda"), dtype=torch.bfloat16)
    assert denoiser.attention_name == "triton" and denoiser.default_size == 1024
    tuned = {(key[0], key[3]) for key in A._attn_fwd_tuned.cache}  # (LQ_TUNE, HAS_MASK): A._TUNE_KEY
    lengths = (4096 + 512, 4096 + WARMUP_NEGATIVE_TOKENS)
    assert {(A.tune_length(length), masked) for length in lengths for masked in (False, True)} <= tuned
