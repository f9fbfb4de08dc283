"""Attention backend registry and the FLUX processor (CPU, Triton's interpreter for `triton`)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

from ditserve.kernels import attention as A  # noqa: E402
from ditserve.kernels.attention import Prologue  # noqa: E402
from ditserve.kernels.registry import available_backends, get_backend  # noqa: E402

interp = pytest.mark.skipif(
    not A.INTERPRET,
    reason="needs Triton's interpreter: TRITON_INTERPRET=1 before triton is first imported (run this file alone)",
)


def qkv(B=1, L=17, H=2, D=16, dtype=torch.float32):
    return tuple(torch.randn(B, L, H, D, dtype=dtype) for _ in range(3))


def test_registry_names():
    names = available_backends()
    assert {"sdpa", "triton", "triton_fp8"} <= set(names)
    try:
        import flash_attn  # noqa: F401

        assert "flash_attn" in names
    except ImportError:
        assert "flash_attn" not in names
        with pytest.raises(ValueError, match="flash_attn is not installed"):
            get_backend("flash_attn")
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        get_backend("nope")


@pytest.mark.parametrize(
    "name,make,match",
    [
        ("triton", lambda: qkv(D=48), "head dim 48 not supported"),
        ("triton", lambda: qkv(dtype=torch.bfloat16), "dtype torch.bfloat16 not supported on cpu"),
        ("triton_fp8", lambda: qkv(D=64, dtype=torch.float16), "device type 'cpu' not supported"),
        ("sdpa", lambda: (torch.randn(1, 17, 2, 16), torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 8)),
         "shapes do not match"),
        ("triton", lambda: (torch.randn(1, 17, 32), torch.randn(1, 17, 32), torch.randn(1, 17, 32)), "must be 4-D"),
    ],
)
def test_check_names_the_violated_constraint(name, make, match):
    q, k, v = make()
    with pytest.raises(ValueError, match=match):
        get_backend(name).check(q, k, v)


def test_check_mask_constraints():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"mask must be bool \(B, Lk\)"):
        get_backend("sdpa").check(q, k, v, torch.ones(1, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        get_backend("sdpa").check(q, k, v, torch.ones(1, 17))


# (q, k, v, prologue, message): prologues every backend must refuse, whether it fuses the prologue or applies it first.
BAD_PROLOGUES = {
    "q_weight only": (lambda: (*qkv(), Prologue(q_weight=torch.rand(16) + 0.5)),
                      "give both q_weight and k_weight"),
    "k_weight only": (lambda: (*qkv(), Prologue(k_weight=torch.rand(16) + 0.5)),
                      "give both q_weight and k_weight"),
    "cos without sin": (lambda: (*qkv(), Prologue(cos=torch.randn(17, 16))), "give both cos and sin"),
    "short cos": (lambda: (*qkv(), Prologue(cos=torch.randn(16, 16), sin=torch.randn(16, 16))),
                  r"cos/sin must be \(17, 16\), got \(16, 16\)"),
    "rope with Lq != Lk": (lambda: (*qkv(L=17)[:1], *qkv(L=9)[1:], Prologue(cos=torch.randn(17, 16),
                                                                              sin=torch.randn(17, 16))),
                           "rotary embedding needs Lq == Lk"),
    "k_mode typo": (lambda: (*qkv(), Prologue(cos=torch.randn(17, 16), sin=torch.randn(17, 16), k_mode="inlin")),
                    "k_mode must be 'inline' or 'prepass', got 'inlin'"),
    "3 weight rows": (lambda: (*qkv(), Prologue(q_weight=torch.rand(3, 16), k_weight=torch.rand(3, 16))),
                      r"q_weight must be \(D,\) or \(2, D\) with D = 16, got \(3, 16\)"),
}


@interp
@pytest.mark.parametrize("case", list(BAD_PROLOGUES))
def test_every_backend_rejects_a_bad_prologue_with_the_same_message(case):
    make, match = BAD_PROLOGUES[case]
    q, k, v, p = make()
    messages = set()
    for name in (n for n in available_backends() if "cpu" in get_backend(n).dtypes):
        with pytest.raises(ValueError, match=match) as err:
            get_backend(name)(q, k, v, prologue=p)
        messages.add(str(err.value))
    assert len(messages) == 1, messages


def test_sdpa_zeroes_only_rows_without_keys():
    """The reference must not turn an overflow into finite values: Inf in V stays what plain SDPA gives; only
    rows whose keys are all masked (NaN in SDPA) become 0, like the Triton kernels' (B = 2, batch 1 all masked)."""
    q, k, v = qkv(B=2)
    v[:, 3, 0, 0] = float("inf")
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[1] = False
    out = get_backend("sdpa")(q, k, v, mask=mask)
    plain = torch.nn.functional.scaled_dot_product_attention(*(x[:1].transpose(1, 2) for x in (q, k, v)))
    torch.testing.assert_close(out[:1], plain.transpose(1, 2), equal_nan=True)
    assert torch.isinf(out[0, :, 0, 0]).all()
    assert torch.all(out[1] == 0)


def test_key_padding_mask_error_names_the_shape_given():
    from ditserve.kernels.processors import key_padding_mask

    with pytest.raises(ValueError, match=r"who: .* got \(1, 1, 1, 7\)$"):
        key_padding_mask(torch.ones(1, 1, 1, 7, dtype=torch.bool), 2, 7, "who")


def test_triton_on_cpu_without_interpreter_says_so(monkeypatch):
    monkeypatch.setattr(A, "INTERPRET", False)  # as imported without TRITON_INTERPRET=1 (conftest sets it)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        get_backend("triton").check(*qkv())


@interp
def test_triton_backend_equals_sdpa_with_mask_and_prologue():
    B, L, H, D = 2, 113, 2, 16
    q, k, v = qkv(B, L, H, D)
    mask = torch.rand(B, L) > 0.3
    mask[:, 0] = True
    p = Prologue(q_weight=torch.rand(2, D) + 0.5, k_weight=torch.rand(2, D) + 0.5, norm_split=7,
                 cos=torch.randn(L, D), sin=torch.randn(L, D))
    ref = get_backend("sdpa")(q, k, v, mask=mask, prologue=p)
    out = get_backend("triton")(q, k, v, mask=mask, prologue=p)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


# ------------------------------------------------------------------------------------ FLUX processor
def tiny_flux():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    with torch.no_grad():  # some parameters are zero-initialised: make every one matter
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model.eval()


def flux_inputs(B=1, side=8, txt=7):
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side * 1.0), torch.arange(side * 1.0),
                                     indexing="ij"), -1).reshape(-1, 3)
    return dict(hidden_states=torch.randn(B, side * side, 4), encoder_hidden_states=torch.randn(B, txt, 8),
                pooled_projections=torch.randn(B, 8), timestep=torch.tensor([0.5] * B), img_ids=ids,
                txt_ids=torch.zeros(txt, 3), return_dict=False)


@interp
@pytest.mark.parametrize("k_mode", ["prepass", "inline"])
def test_flux_processor_parity_with_diffusers(k_mode):
    from ditserve.kernels.flux_processor import DitserveFluxAttnProcessor, set_attention_backend

    model = tiny_flux()
    inputs = flux_inputs()
    with torch.no_grad():
        ref = model(**inputs)[0]
        assert set_attention_backend(model, "triton", k_mode=k_mode) == 4  # 2 double + 2 single blocks
        assert all(isinstance(m.processor, DitserveFluxAttnProcessor)
                   for m in model.modules() if hasattr(m, "processor"))
        out = model(**inputs)[0]
        set_attention_backend(model, "diffusers")
        again = model(**inputs)[0]
    assert torch.equal(again, ref)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4


def test_flux_processor_sdpa_backend_parity():
    from ditserve.kernels.flux_processor import set_attention_backend

    model = tiny_flux()
    inputs = flux_inputs(B=2)
    with torch.no_grad():
        ref = model(**inputs)[0]
        set_attention_backend(model, "sdpa")
        out = model(**inputs)[0]
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_set_attention_backend_rejects_unknown_name():
    from ditserve.kernels.flux_processor import set_attention_backend

    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend(tiny_flux(), "nope")
