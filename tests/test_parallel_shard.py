"""Pure sequence-parallel maths: shard plans, shard/gather, rotary tables, the LSE merge, USP layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ditserve.parallel import block_attention, gather, local_key_mask, merge, plan, shard, usp_layout

LENGTHS = [(0, 1), (0, 7), (0, 8), (5, 7), (3, 9), (1, 2), (12, 1), (4, 12)]


@pytest.mark.parametrize("degree", [1, 2, 3, 4])
@pytest.mark.parametrize("text_len,image_len", LENGTHS)
def test_shard_gather_identity(text_len, image_len, degree):
    p = plan(text_len, image_len, degree)
    joint = torch.randn(2, p.total, 3)
    parts = [shard(joint, p, r, dim=1) for r in range(degree)]
    assert all(part.shape == (2, p.local_len, 3) for part in parts)
    assert torch.equal(gather(parts, p, dim=1), joint)
    # Per stream, as a model with separate text and image inputs receives them.
    text, image = joint[:, :text_len], joint[:, text_len:]
    texts = [shard(text, p, r, dim=1, stream="text") for r in range(degree)]
    images = [shard(image, p, r, dim=1, stream="image") for r in range(degree)]
    for r in range(degree):  # a rank's joint shard is its text rows then its image rows (and padding)
        assert torch.equal(torch.cat([texts[r], images[r]], dim=1), parts[r])
    assert torch.equal(gather(texts, p, dim=1, stream="text"), text)
    assert torch.equal(gather(images, p, dim=1, stream="image"), image)


def test_padding_rule():
    p = plan(5, 7, 5)  # 12 tokens over 5 ranks: 3 each, 15 padded, the last 3 are padding
    assert (p.local_len, p.padded) == (3, 15)
    assert [p.pad(r) for r in range(5)] == [0, 0, 0, 0, 3]
    assert [p.text_slice(r) for r in range(3)] == [slice(0, 3), slice(3, 5), slice(5, 5)]
    assert p.image_slice(1) == slice(0, 1) and p.image_slice(4) == slice(7, 7)
    masks = torch.cat([local_key_mask(p, r) for r in range(5)], dim=1)
    assert masks.tolist() == [[True] * 12 + [False] * 3]
    user = torch.tensor([[True] * 11 + [False]])
    assert torch.cat([local_key_mask(p, r, user) for r in range(5)], dim=1).sum() == 11


def test_plan_errors():
    with pytest.raises(ValueError, match="degree"):
        plan(1, 1, 0)
    with pytest.raises(ValueError, match="rows"):
        shard(torch.zeros(1, 5), plan(1, 3, 2), 0, dim=1)
    with pytest.raises(ValueError, match="rank 2"):
        plan(1, 3, 2).text_slice(2)


def test_rotary_tables_shard_with_their_tokens():
    """cos/sin tables computed from sharded position ids equal the sharded full table."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    p = plan(4, 9, 3)
    ids = torch.arange(p.total, dtype=torch.float64)
    cos, _ = get_1d_rotary_pos_embed(8, ids, use_real=True, repeat_interleave_real=True)
    for r in range(3):
        local_ids = shard(ids, p, r, dim=0)
        local_cos, _ = get_1d_rotary_pos_embed(8, local_ids, use_real=True, repeat_interleave_real=True)
        real = p.local_len - p.pad(r)
        assert torch.equal(local_cos[:real], shard(cos, p, r, dim=0)[:real])


def _full(q, k, v, mask):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None, None, :])
    return out.transpose(1, 2)


def test_merge_equals_full_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 8, generator=g) for _ in range(3))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 1:] = False  # batch row 1: its second key block is fully masked (lse -inf, out 0)
    cuts = [(0, 1), (1, 4), (4, 5)]
    out, lse = None, None
    for a, b in cuts:
        o, l = block_attention(q, k[:, a:b], v[:, a:b], mask[:, a:b])
        out, lse = (o, l) if out is None else merge(out, lse, o, l)
    assert (out - _full(q, k, v, mask)).abs().max() < 1e-6
    full_out, full_lse = block_attention(q, k, v, mask)
    assert (lse - full_lse).abs().max() < 1e-5
    # Both sides empty: the merged row stays 0 with lse -inf, not NaN.
    empty = torch.full((2, 3, 5), float("-inf"))
    zero, zero_lse = merge(torch.zeros_like(q), empty, torch.zeros_like(q), empty)
    assert torch.equal(zero, torch.zeros_like(q)) and torch.isneginf(zero_lse).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sdpa_blocks_in_bf16_merge_as_precisely_as_one_bf16_attention(device):
    """Ring blocks on torch's fused kernels in bf16 (their outputs rounded to bf16, merged in fp32) are as
    close to fp64 attention as one bf16 SDPA call over all keys; a batch row with every key of a
    block masked (Qwen's text padding) gets LSE -inf there, not the kernels' 0."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 37, 4, 64, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 37, generator=g) > 0.2
    mask[:, 0] = True
    mask[1, 13:30] = False  # batch row 1: block [13, 30) fully masked
    exact = _full(q, k, v, mask)
    q, k, v, mask = (x.to(device) for x in (q, k, v, mask))
    q, k, v = (x.bfloat16() for x in (q, k, v))
    out = lse = None
    for a, b in [(0, 13), (13, 30), (30, 37)]:  # odd lengths, as shards have
        o, l = block_attention(q, k[:, a:b], v[:, a:b], mask[:, a:b])
        assert o.dtype == torch.bfloat16 and l.dtype == torch.float32 and l.shape == (2, 4, 37)
        if (a, b) == (13, 30):
            assert torch.isneginf(l[1]).all() and not o[1].any()
        out, lse = (o, l) if out is None else merge(out, lse, o, l)
    one = _full(q, k, v, mask)

    def rel(x):
        return ((x.cpu().double() - exact).norm() / exact.norm()).item()

    # 3.6e-3 against 3.3e-3 on CPU; 3.1e-2 when the masked block's LSE is left at 0.
    assert rel(out.bfloat16()) < 1.5 * rel(one), (rel(out.bfloat16()), rel(one))


def test_usp_layout():
    lay = usp_layout(4, 2, 2)
    assert lay.ulysses_groups == ((0, 1), (2, 3)) and lay.ring_groups == ((0, 2), (1, 3))
    assert usp_layout(3, 1, 3).ring_groups == ((0, 1, 2),)
    with pytest.raises(ValueError, match="ulysses_degree=2, ring_degree=2"):
        usp_layout(3, 2, 2)


def test_block_attention_needs_an_lse_backend():
    x = torch.zeros(1, 2, 1, 16)
    with pytest.raises(ValueError, match=r"backend must be one of \('triton', 'sdpa'\), got 'triton_fp8'"):
        block_attention(x, x, x, None, backend="triton_fp8")


def test_block_attention_triton_lse_matches_reference():
    """The Triton kernel's LSE (what ring attention merges on the GPU) equals the torch reference's."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 70, 2, 16, generator=g) for _ in range(3))
    mask = torch.rand(1, 70, generator=g) > 0.2
    out, lse = block_attention(q, k, v, mask, backend="triton")
    ref_out, ref_lse = block_attention(q, k, v, mask, backend="sdpa")
    assert (out - ref_out).abs().max() < 1e-5 and (lse - ref_lse).abs().max() < 1e-5
