"""A tiny FLUX transformer run sequence-parallel on 2 gloo ranks (Ulysses 2x1, Ring 1x2) gives the
one-process output (fp32), with a joint length that does not divide the degree."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from test_parallel_attention import TOL, run_group


def _tiny_flux(heads: int = 2):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)  # the same weights on every rank
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=heads, joint_attention_dim=24,
                                   pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    # Default init zeroes the AdaLN and output projections, which would hide a wrong attention.
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.05)
    return model.eval()


def _inputs(text_len: int, grid: tuple[int, int]) -> dict:
    from ditserve.flux.denoiser import image_token_ids

    g = torch.Generator().manual_seed(1)
    image_len = grid[0] * grid[1]
    return dict(
        hidden_states=torch.randn(2, image_len, 8, generator=g),
        encoder_hidden_states=torch.randn(2, text_len, 24, generator=g),
        pooled_projections=torch.randn(2, 12, generator=g),
        timestep=torch.tensor([0.7, 0.3]),
        guidance=torch.tensor([3.5, 1.0]),
        txt_ids=torch.zeros(text_len, 3),
        img_ids=image_token_ids(*grid, device="cpu", dtype=torch.float32),
    )


def _checks_flux() -> None:
    from ditserve.parallel import build_mesh
    from ditserve.parallel.flux import set_sequence_parallel, sp_forward
    from ditserve.parallel.usp import install_processor

    for text_len, grid in ((3, (3, 4)), (5, (2, 3))):  # 15 and 11 joint tokens over 2 ranks
        inputs = _inputs(text_len, grid)
        model = _tiny_flux()
        with torch.inference_mode():
            reference = model(**inputs, return_dict=False)[0]
            for u, r in ((2, 1), (1, 2)):
                mesh = build_mesh(u, r)
                set_sequence_parallel(model, mesh)
                err = (sp_forward(model, mesh, **inputs) - reference).abs().max().item()
                assert err < TOL, f"FLUX usp {u}x{r}, text {text_len}, grid {grid}: max abs err {err}"
    # Ulysses with the 2 heads of each rank in 2 pipelined chunks (4 heads in all).
    inputs, model = _inputs(3, (3, 4)), _tiny_flux(heads=4)
    with torch.inference_mode():
        reference = model(**inputs, return_dict=False)[0]
        mesh = build_mesh(2, 1, ulysses_chunks=2)
        set_sequence_parallel(model, mesh)
        err = (sp_forward(model, mesh, **inputs) - reference).abs().max().item()
        assert err < TOL, f"FLUX Ulysses 2, 2 chunks: max abs err {err}"
    with pytest.raises(ValueError, match="ulysses_chunks=2 does not divide the 1 heads a rank attends with"):
        set_sequence_parallel(_tiny_flux(), build_mesh(2, 1, ulysses_chunks=2))
    with pytest.raises(ValueError, match="ulysses_degree=2 does not divide the 3 attention heads"):
        from diffusers import FluxTransformer2DModel

        three_heads = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=0,
                                             attention_head_dim=16, num_attention_heads=3, joint_attention_dim=24,
                                             pooled_projection_dim=12, axes_dims_rope=(4, 6, 6))
        set_sequence_parallel(three_heads, build_mesh(2, 1))
    with pytest.raises(ValueError, match="FluxTransformer2DModel has no attention modules to install on"):
        install_processor(_tiny_flux(), build_mesh(2, 1), object(), [])
    assert dist.get_world_size() == 2


def test_flux_two_ranks(tmp_path):
    run_group(2, tmp_path, _checks_flux)
