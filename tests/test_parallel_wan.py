"""Sequence- and CFG-parallel Wan on gloo ranks (CPU, fp32) gives the one-process result.

* The transformer alone (ditserve.parallel.wan.sp_forward): Ulysses 2 and Ring 2 on 2 ranks (Ring 2 also on
  the triton backend under Triton's interpreter), Ring 3 on 3 ranks, on token counts that do not divide the
  degree (and one that does: no key mask), plus an I2V-style transformer (image context in its cross-attention).
* The transformer with a timestep per token (Wan 2.2 TI2V), sharded with its tokens.
* The Wan denoiser as rank 0 of a worker group: Ulysses 2 (tiny-wan2.2-t2v, both experts) and CFG
  parallel 2 (tiny-wan-t2v), with a guided and an unguided request in one batch; the image-to-video
  denoiser with Ulysses 2 on tiny-wan-i2v (condition channels and CLIP context) and tiny-wan2.2-ti2v
  (the image's latent frame in place, per-token timesteps), and with CFG parallel 2 on tiny-wan-i2v.
* Bad layouts fail at load with a ConfigError naming the parameter.
"""

from __future__ import annotations

import pytest
import torch
from flux_reference import CPU_FP32

from test_parallel_attention import TOL, run_group

from ditserve.stage import ConfigError, Runtime
from ditserve.wan.denoiser import WanDenoiser, WanDenoiserOptions, WanImageDenoiser

# (latent frames, height, width): 25 tokens divide neither 2 nor 3, 18 tokens divide both.
LATENT_SHAPES = ((1, 10, 10), (3, 4, 6))


def _tiny_wan(**config):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)  # the same weights on every rank
    # config may override any of these (the GPU tests use head_dim 128).
    model = WanTransformer3DModel(**{**dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                            in_channels=4, out_channels=4, text_dim=12, freq_dim=16, ffn_dim=32,
                                            num_layers=2, rope_max_seq_len=32), **config})
    # Default init zeroes no output projection here, but keep every weight random and O(1) so a wrong
    # attention or a misplaced shard cannot hide behind a small contribution.
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    return model.eval()


def _inputs(latent_shape: tuple[int, int, int], text_len: int = 7, image_tokens: int = 0) -> dict:
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(2, 4, *latent_shape, generator=g),
        timestep=torch.tensor([700.0, 300.0]),
        encoder_hidden_states=torch.randn(2, text_len, 12, generator=g),
    )
    if image_tokens:
        inputs["encoder_hidden_states_image"] = torch.randn(2, image_tokens, 8, generator=g)
    return inputs


def _expect_equal(model, inputs: dict, layouts, what: str, backend: str = "sdpa") -> None:
    from ditserve.parallel import build_mesh
    from ditserve.parallel.wan import set_sequence_parallel, sp_forward

    with torch.inference_mode():
        reference = model(**inputs, return_dict=False)[0]
        for u, r in layouts:
            mesh = build_mesh(u, r)
            set_sequence_parallel(model, mesh, backend)
            out = sp_forward(model, mesh, **inputs)
            assert out.shape == reference.shape
            err = (out - reference).abs().max().item()
            assert err < TOL, f"Wan usp {u}x{r}, {what}: max abs err {err}"


def _checks_2() -> None:
    from ditserve.parallel import build_mesh
    from ditserve.parallel.wan import set_sequence_parallel, sp_forward

    model = _tiny_wan()
    for shape in LATENT_SHAPES:
        _expect_equal(model, _inputs(shape), ((2, 1), (1, 2)), f"latent {shape}")
    # I2V: diffusers' cross-attention processor splits off the image context (text is 512 tokens).
    i2v = _tiny_wan(image_dim=8, added_kv_proj_dim=32)
    _expect_equal(i2v, _inputs(LATENT_SHAPES[0], text_len=512, image_tokens=3), ((2, 1),), "I2V")
    # TI2V: a timestep per token (25 tokens: rank 1 holds a padding row), the first frame's tokens at 0.
    per_token = _inputs(LATENT_SHAPES[0])
    per_token["timestep"] = torch.tensor([[0.0] * 5 + [700.0] * 20, [0.0] * 5 + [300.0] * 20])
    _expect_equal(model, per_token, ((2, 1), (1, 2)), "per-token timesteps")
    # Ring blocks on our Triton kernel (the interpreter: conftest sets TRITON_INTERPRET=1 for the ranks too): its
    # log-sum-exp merges them; rank 1's padding row masked.
    _expect_equal(model, _inputs(LATENT_SHAPES[0]), ((1, 2),), "ring on the triton backend", backend="triton")

    with pytest.raises(ValueError, match="install the sequence-parallel processors first"):
        sp_forward(_tiny_wan(), build_mesh(2, 1), **_inputs(LATENT_SHAPES[0]))
    with pytest.raises(ValueError, match="ulysses_degree=2 does not divide the 3 attention heads"):
        from diffusers import WanTransformer3DModel

        set_sequence_parallel(WanTransformer3DModel(num_attention_heads=3, attention_head_dim=16, text_dim=12,
                                                    ffn_dim=32, num_layers=1, freq_dim=16), build_mesh(2, 1))


def _checks_3() -> None:
    _expect_equal(_tiny_wan(), _inputs(LATENT_SHAPES[0]), ((1, 3),), f"latent {LATENT_SHAPES[0]}")


def test_wan_transformer_two_ranks(tmp_path):
    run_group(2, tmp_path, _checks_2)


def test_wan_transformer_ring_three_ranks(tmp_path):
    run_group(3, tmp_path, _checks_3)


# --- the denoiser as rank 0 of a worker group ---------------------------------------------------


def _rows(text_dim: int) -> list[dict]:
    """A guided and an unguided request of one group key: 80x80 pixels, 9 frames -> 3 x 5 x 5 = 75
    video tokens (odd: rank 1 holds a padding row). 3 UniPC steps with flow_shift 3 have timesteps
    1000, 857, 600: with tiny-wan2.2-t2v's boundary 875 the first runs transformer, the others
    transformer_2."""
    g = torch.Generator().manual_seed(2)

    def row(seed: int, guidance: float) -> dict:
        return {
            "PROMPT_EMBEDS": torch.randn(6, text_dim, generator=g),
            "NEGATIVE_PROMPT_EMBEDS": torch.randn(6, text_dim, generator=g),
            "HEIGHT": torch.tensor([80], dtype=torch.int32),
            "WIDTH": torch.tensor([80], dtype=torch.int32),
            "NUM_FRAMES": torch.tensor([9], dtype=torch.int32),
            "NUM_INFERENCE_STEPS": torch.tensor([3], dtype=torch.int32),
            "GUIDANCE_SCALE": torch.tensor([guidance], dtype=torch.float32),
            "SEED": torch.tensor([seed], dtype=torch.int64),
        }

    return [row(3, 4.0), row(4, 1.0)]


@pytest.mark.parametrize("model_path, options", [
    ("tiny-wan2.2-t2v", dict(sp_degree=2)),  # Ulysses 2 on both experts
    ("tiny-wan-t2v", dict(cfg_parallel=True)),
], ids=["wan2.2-ulysses2", "wan2.1-cfg_parallel"])
def test_denoiser_layouts_equal_the_single_process_result(model_path, options):
    runtime = Runtime(model_path=model_path, **CPU_FP32)
    single = WanDenoiser(runtime)
    rows = _rows(single.transformer.config.text_dim)
    reference = single.execute(rows)
    assert all("LATENTS" in ref for ref in reference), reference
    denoiser = WanDenoiser(runtime, WanDenoiserOptions(**options))
    # sp_forward runs the blocks, not the transformer's forward: record the tokens the first block sees.
    calls: dict = {expert: [] for expert in denoiser.experts()}
    hooks = [expert.blocks[0].register_forward_hook(lambda _, args, __, e=expert: calls[e].append(args[0].shape[1]))
             for expert in calls]
    try:
        assert len(denoiser.workers.pids()) == denoiser.parallel_config.world_size - 1
        for ours, ref in zip(denoiser.execute(rows), reference):
            err = (ours["LATENTS"] - ref["LATENTS"]).abs().max().item()
            assert err < 1e-4, f"{model_path} {options}: latents differ by {err}"
    finally:
        for hook in hooks:
            hook.remove()
        denoiser.close()
    # Rank 0 runs one forward per step (the batched one, or with cfg_parallel its conditional branch),
    # on its shard of the 75 tokens with sp_degree 2.
    tokens = 38 if denoiser.parallel_config.sp_degree == 2 else 75
    expected = [[tokens], [tokens] * 2] if denoiser.transformer_2 is not None else [[tokens] * 3]
    assert list(calls.values()) == expected


@pytest.mark.parametrize("options, message", [
    (dict(sp_degree=3), "parameter ulysses_degree: ulysses_degree=3 does not divide the 2 attention heads"),
    (dict(sp_degree=2, gpus="0,1"), "parameter gpus: set to '0,1' but the model runs on cpu"),
])
def test_bad_layouts_fail_at_load(options, message):
    with pytest.raises(ConfigError, match=message):
        WanDenoiser(Runtime(model_path="tiny-wan-t2v", **CPU_FP32), WanDenoiserOptions(**options))


def single_tokens(denoiser: WanImageDenoiser, rows: list[dict]) -> int:
    """The video tokens the first block of ``denoiser`` (one process) sees for ``rows``."""
    seen: list[int] = []
    hook = denoiser.transformer.blocks[0].register_forward_hook(lambda _, args, __: seen.append(args[0].shape[1]))
    try:
        denoiser.execute(rows)
    finally:
        hook.remove()
    return seen[0]


def _image_rows(denoiser: WanImageDenoiser) -> list[dict]:
    """_rows with the image-to-video inputs: a condition of the shape the image encoder makes and, where the
    transformer takes one, a CLIP context (17 tokens, as tiny-wan-i2v's CLIP)."""
    rows = _rows(denoiser.transformer.config.text_dim)
    g = torch.Generator().manual_seed(5)
    channels, frames = denoiser.latent_channels, 3
    shape = (channels, 1, 10, 10) if denoiser.expand_timesteps else (channels + 4, frames, 10, 10)
    image_dim = denoiser.transformer.config.image_dim
    for row in rows:
        row["CONDITION"] = torch.randn(*shape, generator=g)
        row["IMAGE_EMBEDS"] = torch.randn(17, image_dim, generator=g) if image_dim else torch.zeros(0, 0)
    return rows


@pytest.mark.parametrize("model_path, options", [
    ("tiny-wan-i2v", dict(sp_degree=2)),
    ("tiny-wan2.2-ti2v", dict(sp_degree=2)),
    ("tiny-wan-i2v", dict(cfg_parallel=True)),  # the CLIP context of the unconditional branch's rows
], ids=["wan2.1-i2v-ulysses2", "ti2v-ulysses2", "wan2.1-i2v-cfg_parallel"])
def test_image_denoiser_layouts_equal_the_single_process_result(model_path, options):
    runtime = Runtime(model_path=model_path, **CPU_FP32)
    single = WanImageDenoiser(runtime)
    rows = _image_rows(single)
    if single.expand_timesteps:  # 80x80 is not a multiple of the TI2V VAE's 32: 160x160, still 3 x 5 x 5 tokens
        for row in rows:
            row["HEIGHT"] = row["WIDTH"] = torch.tensor([160], dtype=torch.int32)
    reference = single.execute(rows)
    assert all("LATENTS" in ref for ref in reference), reference
    denoiser = WanImageDenoiser(runtime, WanDenoiserOptions(**options))
    tokens: list[int] = []  # what rank 0's first block sees: its shard under Ulysses (sp_forward runs the blocks)
    hook = denoiser.transformer.blocks[0].register_forward_hook(lambda _, args, __: tokens.append(args[0].shape[1]))
    try:
        assert len(denoiser.workers.pids()) == denoiser.parallel_config.world_size - 1
        for ours, ref in zip(denoiser.execute(rows), reference):
            err = (ours["LATENTS"] - ref["LATENTS"]).abs().max().item()
            assert err < 1e-4, f"{model_path} {options}: latents differ by {err}"
    finally:
        hook.remove()
        denoiser.close()
    full = single_tokens(single, rows)
    assert set(tokens) == {-(-full // 2) if denoiser.parallel_config.sp_degree == 2 else full}, (tokens, full)
