"""Sequence-parallel Qwen-Image on gloo ranks (CPU, fp32) gives the one-process result.

* The transformer alone (ditserve.parallel.qwen_image.sp_forward), in one 4-rank group: Ulysses 2
  and Ring 2 on its first 2 ranks, Ring 3 on its first three, USP 2x2 (zero_cond_t) on all four;
  joint lengths that do not divide the degree, a batch of two texts of different lengths (text mask
  with padding), shards holding no text rows or no image rows, and Edit's two image grids (input
  image tokens after the noise tokens); the same for a zero_cond_t transformer (Qwen-Image-Edit-2511),
  whose per-token modulation index changes from noise to condition tokens inside a shard.
* The denoisers as rank 0 of a worker group through the whole pipeline: Qwen-Image with Ulysses 2
  (a true-CFG row and a plain one, texts of different lengths) and Qwen-Image-Edit with a zero_cond_t
  transformer, with Ulysses 2 and with CFG parallel.
* A bad layout fails at load with a ConfigError naming the parameter.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from test_parallel_attention import TOL, run_group

# The spawned ranks import this module: the pipeline-level imports (diffusers' pipelines, ~5 s a
# process) are inside the denoiser tests.


def _tiny_qwen(**config):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)  # the same weights on every rank
    # config may override any of these (the GPU tests use head_dim 128, axes_dims_rope summing to it).
    model = QwenImageTransformer2DModel(**{**dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                                  axes_dims_rope=(4, 6, 6)), **config})
    # Default init zeroes the modulation and output projections, which would hide a wrong attention.
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    return model.eval()


def _inputs(text_lens: tuple[int, int], grids: list[tuple[int, int]]) -> dict:
    """Batch of 2: row i has text_lens[i] real text tokens (the text mask pads the shorter one);
    grids: the image grids of the image stream (Edit: noise grid, then the input image's grid)."""
    g = torch.Generator().manual_seed(1)
    text_len = max(text_lens)
    mask = torch.zeros(2, text_len, dtype=torch.int64)
    for i, n in enumerate(text_lens):
        mask[i, :n] = 1
    image_len = sum(h * w for h, w in grids)
    return dict(
        hidden_states=torch.randn(2, image_len, 16, generator=g),
        encoder_hidden_states=torch.randn(2, text_len, 24, generator=g) * mask[..., None],
        encoder_hidden_states_mask=mask if not bool(mask.all()) else None,
        timestep=torch.tensor([0.7, 0.3]),
        img_shapes=[[(1, h, w) for h, w in grids]] * 2,
    )


def _expect_equal(inputs: dict, layouts, what: str, **config) -> torch.Tensor:
    """sp_forward on each (ulysses, ring) layout, over the first ulysses * ring ranks, equals the
    one-process forward (ranks outside a layout's mesh only join the collective group creation);
    returns that forward's output."""
    from ditserve.parallel import build_mesh
    from ditserve.parallel.qwen_image import set_sequence_parallel, sp_forward

    model = _tiny_qwen(**config)  # fresh: the reference must run diffusers' processors, not installed ones
    with torch.inference_mode():
        reference = model(**inputs, return_dict=False)[0]
        for u, r in layouts:
            mesh = build_mesh(u, r)
            if mesh is None:
                continue
            set_sequence_parallel(model, mesh)
            out = sp_forward(model, mesh, **inputs)
            assert out.shape == reference.shape
            err = (out - reference).abs().max().item()
            assert err < TOL, f"Qwen-Image usp {u}x{r}, {what}: max abs err {err}"
    return reference


def _checks() -> None:
    from ditserve.parallel import build_mesh
    from ditserve.parallel.qwen_image import sp_forward

    # One group for all layouts: each spawn costs ~10 s of imports (a 4th rank added no measurable time).
    assert dist.get_world_size() == 4
    layouts = ((2, 1), (1, 2))
    # 5 + 6 = 11 tokens: rank 1 holds a padding row; masked text (5 and 2 real tokens).
    _expect_equal(_inputs((5, 2), [(2, 3)]), layouts, "text 5/2, grid 2x3")
    # 9 + 6 = 15 tokens, 8 a rank: rank 0 holds only text rows (an empty image stream).
    _expect_equal(_inputs((9, 4), [(2, 3)]), layouts, "text 9/4, grid 2x3")
    # Edit: 4 noise + 6 input-image tokens after 3 text tokens, no text padding: 13 tokens.
    _expect_equal(_inputs((3, 3), [(2, 2), (2, 3)]), layouts, "Edit, text 3, grids 2x2 + 2x3")
    # Ring 3: 4 + 12 = 16 tokens, 6 a rank: ranks 1 and 2 hold no text rows, rank 2 two padding rows.
    _expect_equal(_inputs((4, 1), [(3, 4)]), ((1, 3),), "text 4/1, grid 3x4")

    # zero_cond_t (Edit-2511): 4 noise then 6 condition tokens, modulated at t and at 0.
    # 5 + 10 = 15 tokens; 8 a rank on 2: rank 1 holds the last noise token, the condition tokens and a
    # padding row; 4 a rank on 4 (USP 2x2): noise and condition tokens meet on rank 2, rank 3 a padding row.
    inputs = _inputs((5, 2), [(2, 2), (2, 3)])
    zero_cond = _expect_equal(inputs, (*layouts, (2, 2)), "zero_cond_t, text 5/2, grids 2x2 + 2x3", zero_cond_t=True)
    with torch.inference_mode():  # zero_cond_t matters here, or the check above could not tell the two apart
        plain = _tiny_qwen()(**inputs, return_dict=False)[0]
    assert (zero_cond - plain).abs().max() > 100 * TOL
    # Ring 3: 4 + 10 = 14 tokens, 5 a rank: each rank a different mix of text, noise, condition and padding rows.
    _expect_equal(_inputs((4, 1), [(2, 2), (2, 3)]), ((1, 3),), "zero_cond_t, text 4/1, grids 2x2 + 2x3",
                  zero_cond_t=True)

    mesh = build_mesh(2, 2)
    with pytest.raises(ValueError, match="install the sequence-parallel processors first"):
        sp_forward(_tiny_qwen(), mesh, **_inputs((3, 3), [(2, 2)]))


def test_qwen_image_transformer_layouts(tmp_path):
    run_group(4, tmp_path, _checks)


# --- the denoisers as rank 0 of a worker group --------------------------------------------------


def _edit_rows() -> list[dict]:
    from test_qwen_image_edit_parity import edit_row, encoded

    data, _ = encoded(64, 48, seed=3)
    return [edit_row("make the cat red", "blurry", image=data, HEIGHT=64, WIDTH=80, NUM_INFERENCE_STEPS=2, SEED=3,
                     TRUE_CFG_SCALE=4.0),
            edit_row("a dog", image=data, HEIGHT=64, WIDTH=80, NUM_INFERENCE_STEPS=2, SEED=4)]


def _t2i_rows() -> list[dict]:
    from flux_reference import make_row

    return [make_row("a red kite", "blurry", HEIGHT=64, WIDTH=80, NUM_INFERENCE_STEPS=2, SEED=3, TRUE_CFG_SCALE=4.0),
            make_row("a green field in the morning light", HEIGHT=64, WIDTH=80, NUM_INFERENCE_STEPS=2, SEED=4)]


@functools.cache
def _single_process(variant: str, model: str) -> tuple[list[dict], list[int]]:
    """The one-process results of the variant's rows, and the joint rows of each transformer forward."""
    from flux_reference import CPU_FP32

    from ditserve.pipeline import LocalPipeline
    from ditserve.stage import Runtime

    spec, name, rows, options = _variant(variant)
    single = LocalPipeline(spec, Runtime(model_path=model, **CPU_FP32), options)
    joint_rows = _record_joint_rows(dict(single.stages)[name])
    return single(rows), joint_rows


def _variant(variant: str) -> tuple:
    """(pipeline, denoiser name, rows, stage options) of a variant."""
    from ditserve.qwen_image import QWEN_IMAGE_EDIT, QWEN_IMAGE_T2I
    from ditserve.qwen_image.request import EditRequestOptions

    if variant == "t2i":
        return QWEN_IMAGE_T2I, "qwen_image_denoiser", _t2i_rows(), {}
    return (QWEN_IMAGE_EDIT, "qwen_image_edit_denoiser", _edit_rows(),
            {"qwen_image_edit_request": EditRequestOptions(condition_area=64 * 64)})


# The Edit denoiser's sequence-parallel path is the same with and without zero_cond_t (the transformer
# test covers both): one Edit case, with zero_cond_t, keeps this file's time down (~13 s a case).
@pytest.mark.parametrize("variant,zero_cond_t,layout", [
    ("t2i", False, dict(sp_degree=2)),
    ("edit", True, dict(sp_degree=2)),
    ("edit", True, dict(cfg_parallel=True)),
], ids=["t2i-ulysses2", "edit-zero-cond-t-ulysses2", "edit-zero-cond-t-cfg-parallel"])
def test_denoiser_layouts_equal_the_single_process_result(variant, zero_cond_t, layout, request):
    from flux_reference import CPU_FP32

    from ditserve.pipeline import LocalPipeline
    from ditserve.qwen_image.denoiser import QwenDenoiserOptions
    from ditserve.stage import Runtime

    model = request.getfixturevalue("zero_cond_t_edit") if zero_cond_t else "tiny-qwen-image"
    spec, name, rows, options = _variant(variant)
    reference, single_rows = _single_process(variant, model)
    runtime = Runtime(model_path=model, **CPU_FP32)
    pipeline = LocalPipeline(spec, runtime, {**options, name: QwenDenoiserOptions(**layout)})
    denoiser = dict(pipeline.stages)[name]
    try:
        assert denoiser.transformer.config.zero_cond_t == zero_cond_t
        rank0_rows = _record_joint_rows(denoiser)
        assert len(denoiser.workers.pids()) == 1
        results = pipeline(rows)
    finally:
        denoiser.close()
    for ours, ref in zip(results, reference):
        err = (ours["LATENTS"] - ref["LATENTS"]).abs().max().item()
        assert err < 1e-4, f"{request.node.callspec.id}: latents differ by {err}"
    if layout.get("cfg_parallel"):
        # Rank 0 ran the positive forward of each step (the first of its pair), rank 1 the negative.
        assert rank0_rows == single_rows[::2] and rank0_rows, (rank0_rows, single_rows)
    else:
        # Rank 0 ran every forward (both CFG branches too) on its half of the joint sequence.
        assert rank0_rows == [-(-n // 2) for n in single_rows] and rank0_rows, (rank0_rows, single_rows)


def _record_joint_rows(denoiser) -> list[int]:
    """The text + image rows each forward's first block gets (sp_forward runs the blocks, not the
    transformer's forward)."""
    rows: list[int] = []
    denoiser.transformer.transformer_blocks[0].register_forward_hook(
        lambda _, args, kwargs, out: rows.append(kwargs["hidden_states"].shape[1]
                                                 + kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
    return rows


def test_bad_layout_fails_at_load():
    from flux_reference import CPU_FP32

    from ditserve.qwen_image.denoiser import QwenDenoiserOptions, QwenImageDenoiser
    from ditserve.stage import ConfigError, Runtime

    message = "parameter ulysses_degree: ulysses_degree=3 does not divide the 2 attention heads"
    with pytest.raises(ConfigError, match=message):
        QwenImageDenoiser(Runtime(model_path="tiny-qwen-image", **CPU_FP32), QwenDenoiserOptions(sp_degree=3))
