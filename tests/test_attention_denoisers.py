"""Issue 5 for Qwen-Image and Wan: their denoisers on our attention backends (CPU, fp32, Triton's interpreter).

* The processors (ditserve.kernels.qwen_processor, wan_processor) on tiny transformers equal diffusers' own:
  Qwen-Image's joint attention with a padded text mask and Edit's two image grids, Wan 2.1 I2V's blocks
  (self-attention with RoPE; cross-attention over text and the image context); odd token counts.
* The pipelines with attention_backend "triton" give the pixels of "sdpa" (diffusers' processors, which the
  parity tests hold to the diffusers pipelines): Qwen-Image and Qwen-Image-Edit with two prompts of different
  lengths in one batch (the text mask), Wan T2V and Wan 2.1 I2V (CLIP context) at 80x80x1 (25 video tokens).
  Interpreted kernels cost ~0.3 s a launch here, so the shapes and step counts are the smallest that keep
  masks and odd lengths.
* The denoisers hand the chosen backend to their sequence-parallel processors (ring numerics on the triton
  backend: test_parallel_wan); Wan's auto picks our kernel for Ring attention on CUDA.
* Bad backends, dtypes and layouts fail at load with a ConfigError naming the parameter.
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flux_reference import CPU_FP32, make_row, pixel_diff
from test_parallel_qwen_image import _inputs as qwen_inputs
from test_parallel_qwen_image import _tiny_qwen
from test_parallel_wan import _inputs as wan_inputs
from test_parallel_wan import _tiny_wan

from ditserve.denoising import GroupedDenoiser
from ditserve.kernels import attention as A
from ditserve.pipeline import LocalPipeline
from ditserve.stage import ConfigError, RequestError, Runtime

TOL = 1e-5

interp = pytest.mark.skipif(not A.INTERPRET, reason="the triton backend on CPU needs Triton's interpreter "
                                                    "(TRITON_INTERPRET=1 before triton is first imported)")


# ------------------------------------------------------------------------------------------- processors
def _compare(model, inputs: dict, set_backend) -> dict[str, torch.Tensor]:
    """The model's output with diffusers' processors and with ours on each backend (diffusers' restored after)."""
    with torch.inference_mode():
        outputs = {"diffusers": model(**inputs, return_dict=False)[0]}
        for name in ("sdpa", "triton"):
            set_backend(model, name)
            outputs[name] = model(**inputs, return_dict=False)[0]
        set_backend(model, "diffusers")
        assert torch.equal(model(**inputs, return_dict=False)[0], outputs["diffusers"])
    for name in ("sdpa", "triton"):
        err = (outputs[name] - outputs["diffusers"]).abs().max().item()
        assert err < TOL, f"{name}: max abs err {err}"
    return outputs


@interp
def test_qwen_processor_equals_diffusers_with_the_text_mask():
    from ditserve.kernels.qwen_processor import DitserveQwenAttnProcessor, set_attention_backend

    model = _tiny_qwen()
    # Texts of 6 and 3 real tokens (row 1's key mask pads 3), Edit's two image grids: 6 + 4 + 15 = 25 tokens.
    inputs = qwen_inputs((6, 3), [(2, 2), (3, 5)])
    outputs = _compare(model, inputs, set_attention_backend)
    # The mask reaches the kernel: treating the padding as real text changes row 1 only.
    assert set_attention_backend(model, "triton") == 2  # one attention per block
    assert isinstance(model.transformer_blocks[1].attn.processor, DitserveQwenAttnProcessor)
    with torch.inference_mode():
        unmasked = model(**{**inputs, "encoder_hidden_states_mask": None}, return_dict=False)[0]
    assert torch.allclose(unmasked[0], outputs["triton"][0], atol=TOL)
    assert (unmasked[1] - outputs["triton"][1]).abs().max() > 1e-3


@interp
def test_wan_processor_equals_diffusers():
    """Wan 2.1 I2V's blocks: self-attention with RoPE over 3 x 3 x 5 = 45 video tokens; cross-attention over
    512 text tokens plus 17 image-context tokens, which diffusers' processor splits off the front."""
    from ditserve.kernels.wan_processor import set_attention_backend

    model = _tiny_wan(image_dim=8, added_kv_proj_dim=32)
    _compare(model, wan_inputs((3, 6, 10), text_len=512, image_tokens=17), set_attention_backend)
    assert set_attention_backend(model, "triton") == 4  # attn1 and attn2 of 2 blocks


def test_processors_refuse_what_diffusers_refuses():
    from ditserve.kernels.processors import norm_weight
    from ditserve.kernels.qwen_processor import DitserveQwenAttnProcessor

    attn, x = _tiny_qwen().transformer_blocks[0].attn, torch.randn(1, 4, 32)
    processor = DitserveQwenAttnProcessor("sdpa")
    with pytest.raises(ValueError, match="needs encoder_hidden_states"):
        processor(attn, x)
    with pytest.raises(ValueError, match="not an attention_mask"):
        processor(attn, x, x, attention_mask=torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="the attention mask must be bool"):
        processor(attn, x, x, encoder_hidden_states_mask=torch.ones(1, 4))
    # Wan's QK norm spans the heads: a per-head prologue refuses it rather than computing something else.
    with pytest.raises(ValueError, match=r"QK norm over \(32,\) features, not per head \(16\)"):
        norm_weight(_tiny_wan().blocks[0].attn1.norm_q, 16, x, "test")


# ---------------------------------------------------------------------------------------- pipelines
def with_denoiser_options(pipeline: LocalPipeline, options) -> LocalPipeline:
    """The pipeline with its denoiser rebuilt on `options`; the other stages are shared, not reloaded."""
    other = copy.copy(pipeline)
    other.stages = [(model, type(stage)(stage.runtime, options) if isinstance(stage, GroupedDenoiser) else stage)
                    for model, stage in pipeline.stages]
    return other


def assert_same_pixels(pipeline: LocalPipeline, rows: list[dict], options, output: str) -> list[dict]:
    sdpa = pipeline(rows)
    triton = with_denoiser_options(pipeline, options)(rows)
    for ours, ref in zip(triton, sdpa):
        assert not isinstance(ref, RequestError) and not isinstance(ours, RequestError), (ref, ours)
        assert ref[output].std() > 5, "flat output: the test could not tell backends apart"
        diff = pixel_diff(ours[output], ref[output])
        assert diff <= 1, f"triton differs from sdpa by {diff}/255"
    return sdpa


@interp
@pytest.mark.parametrize("edit", [False, True], ids=["t2i", "edit"])
def test_qwen_image_triton_gives_the_sdpa_pixels_with_padded_text(edit):
    from ditserve.qwen_image import QWEN_IMAGE_EDIT, QWEN_IMAGE_T2I
    from ditserve.qwen_image.denoiser import QwenDenoiserOptions
    from ditserve.qwen_image.request import EditRequestOptions

    scalars = dict(HEIGHT=80, WIDTH=80, NUM_INFERENCE_STEPS=2)  # 5 x 5 = 25 image tokens
    rows = [make_row("a red kite", SEED=3, **scalars),
            make_row("a green field in the morning light with a small house", SEED=4, **scalars)]
    if edit:
        from test_qwen_image_edit_parity import encoded

        image, _ = encoded(64, 64, seed=1)  # at a 64 * 64 condition area: 16 more image tokens
        rows = [{**row, "INPUT_IMAGE": np.array([image], dtype=object)} for row in rows]
        spec, model, options = QWEN_IMAGE_EDIT, "tiny-qwen-image-edit", {
            "qwen_image_edit_request": EditRequestOptions(condition_area=64 * 64)}
    else:
        spec, model, options = QWEN_IMAGE_T2I, "tiny-qwen-image", {}
    pipeline = LocalPipeline(spec, Runtime(model_path=model, **CPU_FP32), options)
    sdpa = assert_same_pixels(pipeline, rows, QwenDenoiserOptions(attention_backend="triton"), "IMAGE")
    lengths = [int(result["PROMPT_EMBEDS_MASK"].sum()) for result in sdpa]
    assert lengths[0] < lengths[1], f"the prompts must pad one text in the batch: real tokens {lengths}"


@interp
@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v-clip"])
def test_wan_triton_gives_the_sdpa_frames(i2v):
    from ditserve.wan import WAN_I2V, WAN_T2V
    from ditserve.wan.denoiser import WanDenoiserOptions

    # 1 latent frame x 5 x 5 = 25 video tokens (a masked tail tile); guidance: a conditional and an
    # unconditional row in each forward.
    row = make_row("a paper boat on a lake", "blurry", HEIGHT=80, WIDTH=80, NUM_FRAMES=1, NUM_INFERENCE_STEPS=1, SEED=2,
                   GUIDANCE_SCALE=4.0)
    if i2v:
        from test_wan_i2v_parity import IMAGES

        spec, model, row = WAN_I2V, "tiny-wan-i2v", {**row, "IMAGE": np.array([IMAGES["png"]], dtype=object)}
    else:
        spec, model = WAN_T2V, "tiny-wan-t2v"
    pipeline = LocalPipeline(spec, Runtime(model_path=model, **CPU_FP32))
    assert_same_pixels(pipeline, [row], WanDenoiserOptions(attention_backend="triton"), "FRAMES")


# ------------------------------------------------------------------------------- sequence parallelism
# The ring and Ulysses numerics on the triton backend: test_parallel_wan (ring 2 on gloo ranks). Here: the
# denoisers hand their chosen backend to their sequence-parallel processors (what the group's attach calls).
ONE_RANK_MESH = SimpleNamespace(layout=SimpleNamespace(ulysses_degree=1), ulysses_chunks=1)


@interp
def test_sequence_parallel_processors_get_the_chosen_backend():
    from ditserve.parallel.qwen_image import QwenSequenceParallelProcessor
    from ditserve.parallel.wan import WanSequenceParallelProcessor

    qwen = _load("tiny-qwen-image", CPU_FP32, attention_backend="triton")
    qwen.use_sequence_parallel(ONE_RANK_MESH)
    processor = qwen.transformer.transformer_blocks[0].attn.processor
    assert isinstance(processor, QwenSequenceParallelProcessor) and processor.backend.backend == "triton"
    wan = _load("tiny-wan-t2v", CPU_FP32, attention_backend="triton")
    wan.use_sequence_parallel(ONE_RANK_MESH)
    block = wan.transformer.blocks[0]
    assert isinstance(block.attn1.processor, WanSequenceParallelProcessor)
    assert block.attn1.processor.backend.backend == "triton"
    assert block.attn2.processor.backend.name == "triton"  # cross-attention stays local: the installed processor


def test_wan_auto_picks_our_kernel_for_ring_attention_on_cuda():
    """Ring blocks must return their log-sum-exp: on CUDA torch's only such kernel is the memory-efficient
    one, our kernel is 2.7x faster at Wan's size. The layout is CUDA's, the choice needs no GPU."""
    from ditserve.parallel.group import ParallelConfig

    denoiser = _load("tiny-wan-t2v", CPU_FP32)
    ring = ParallelConfig(ulysses_degree=1, ring_degree=2, devices=(torch.device("cuda", 0), torch.device("cuda", 1)))
    denoiser.parallel_config = ring
    assert denoiser.auto_attention_backend(128) == "triton"
    denoiser.parallel_config = dataclasses.replace(ring, ring_degree=1, ulysses_degree=2)
    assert denoiser.auto_attention_backend(128) == "sdpa"
    denoiser.parallel_config = dataclasses.replace(ring, devices=(torch.device("cpu"),) * 2)
    assert denoiser.auto_attention_backend(128) == "sdpa"


def test_wan_auto_picks_our_kernel_where_it_runs_as_the_gluon_kernel(monkeypatch):
    """On sm_90 attention() runs the Gluon kernel, 10% faster than SDPA for a Wan 14B step; elsewhere SDPA."""
    from ditserve.kernels import attention_hopper
    from ditserve.parallel.group import ParallelConfig

    denoiser = _load("tiny-wan-t2v", CPU_FP32)
    assert denoiser.auto_attention_backend(128) == "sdpa"
    monkeypatch.setattr(attention_hopper, "runs_on", lambda device: device.type == "cuda")
    assert denoiser.auto_attention_backend(128) == "sdpa"  # this denoiser runs on the CPU
    denoiser.parallel_config = ParallelConfig(ulysses_degree=2, ring_degree=1,
                                              devices=(torch.device("cuda", 0), torch.device("cuda", 1)))
    assert denoiser.auto_attention_backend(128) == "triton"


# ------------------------------------------------------------------------------------------ at load
def _load(model: str, runtime: dict, **options):
    if model.startswith("tiny-qwen"):
        from ditserve.qwen_image.denoiser import QwenDenoiserOptions, QwenImageDenoiser, QwenImageEditDenoiser

        denoiser = QwenImageEditDenoiser if model == "tiny-qwen-image-edit" else QwenImageDenoiser
        return denoiser(Runtime(model_path=model, **runtime), QwenDenoiserOptions(**options))
    from ditserve.wan.denoiser import WanDenoiser, WanDenoiserOptions, WanImageDenoiser

    denoiser = WanImageDenoiser if model == "tiny-wan-i2v" else WanDenoiser
    return denoiser(Runtime(model_path=model, **runtime), WanDenoiserOptions(**options))


BF16_CPU = dict(device=torch.device("cpu"), dtype=torch.bfloat16)


@pytest.mark.parametrize("model, runtime, options, message", [
    ("tiny-qwen-image", BF16_CPU, dict(attention_backend="triton"),
     r"parameter attention_backend: triton: dtype torch.bfloat16 not supported on cpu"),
    ("tiny-wan-t2v", CPU_FP32, dict(attention_backend="triton_fp8"),
     r"parameter attention_backend: triton_fp8: device type 'cpu' not supported"),
    ("tiny-wan-i2v", CPU_FP32, dict(attention_backend="cudnn"), r"parameter attention_backend: cudnn needs a CUDA device"),
    ("tiny-qwen-image-edit", CPU_FP32, dict(attention_backend="nope"),
     r"parameter attention_backend: unknown attention backend 'nope'"),
    ("tiny-wan-t2v", CPU_FP32, dict(sp_degree=2, ring_degree=2, attention_backend="triton_fp8"),
     r"parameter ring_degree: ring attention merges partial results by their log-sum-exp"),
], ids=["qwen-bf16-cpu", "wan-fp8-cpu", "wan-i2v-cudnn-cpu", "qwen-edit-unknown", "wan-ring-fp8"])
def test_bad_backends_fail_at_load_naming_the_parameter(model, runtime, options, message):
    with pytest.raises(ConfigError, match=message):
        _load(model, runtime, **options)


def test_a_backend_without_key_masks_is_refused_where_the_model_masks_keys(monkeypatch):
    """flash_attn (not installed here) takes no key-padding mask: Qwen-Image's padded text needs one, and so
    does every model under sequence parallelism (shard padding). A CPU stand-in with its constraints:"""
    from ditserve.kernels import registry

    sdpa = registry.get_backend("sdpa")
    monkeypatch.setitem(registry._BACKENDS, "no_mask", registry.Backend(
        "no_mask", sdpa.fn, {"cpu": frozenset({torch.float32})}, frozenset({16}), supports_mask=False))
    message = "parameter attention_backend: no_mask: key-padding masks are not supported"
    with pytest.raises(ConfigError, match=message):
        _load("tiny-qwen-image", CPU_FP32, attention_backend="no_mask")
    with pytest.raises(ConfigError, match=message):
        _load("tiny-wan-t2v", CPU_FP32, attention_backend="no_mask", sp_degree=2)
    denoiser = _load("tiny-wan-t2v", CPU_FP32, attention_backend="no_mask")  # one process: Wan masks no keys
    assert denoiser.transformer.blocks[0].attn1.processor.backend.name == "no_mask"


def test_auto_resolves_at_load_to_sdpa_on_cpu():
    """Rank 0 resolves "auto" into its options, which the workers are built from."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    denoiser = _load("tiny-wan-t2v", CPU_FP32)
    assert denoiser.attention_name == "sdpa" and denoiser.options.attention_backend == "sdpa"
    assert isinstance(denoiser.transformer.blocks[0].attn1.processor, WanAttnProcessor)  # diffusers' own


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("model", ["qwen-image", "wan-i2v"])
def test_processors_in_bf16_on_cuda_match_diffusers(model):
    """The bf16 numerics the interpreter cannot check (its bf16 dot is wrong): our processors on the triton
    backend against diffusers' on the same bf16 model, relative L2 error within issue 5's 1e-2."""
    from ditserve.kernels import qwen_processor, wan_processor

    if model == "qwen-image":
        transformer, inputs, module = _tiny_qwen(), qwen_inputs((6, 3), [(2, 2), (3, 5)]), qwen_processor
    else:
        transformer = _tiny_wan(image_dim=8, added_kv_proj_dim=32)
        inputs, module = wan_inputs((3, 6, 10), text_len=512, image_tokens=17), wan_processor
    transformer = transformer.to("cuda", torch.bfloat16)
    inputs = {k: (v.to("cuda", torch.bfloat16) if v.is_floating_point() else v.cuda()) if torch.is_tensor(v) else v
              for k, v in inputs.items()}
    with torch.inference_mode():
        ref = transformer(**inputs, return_dict=False)[0].float()
        module.set_attention_backend(transformer, "triton")
        out = transformer(**inputs, return_dict=False)[0].float()
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-2, f"{model}: bf16 relative error {err}"


# The processors on one attention module at head_dim 128 (triton_fp8 takes 64 and 128), bf16 on CUDA, with QK
# norm weights around 1 (test_parallel_prologue._redraw_norms) so that the scores are not flat.
def _qwen_attention(device: str = "cuda") -> tuple[torch.nn.Module, dict]:
    """Block 0's joint attention and one call's inputs: 37 text tokens (row 1's padded after 20, a bool text
    mask), a 15 x 20 image grid (300 tokens), Qwen-Image's own rotary tables."""
    from test_parallel_prologue import _redraw_norms

    model = _tiny_qwen(attention_head_dim=128, axes_dims_rope=(32, 48, 48)).to(device, torch.bfloat16)
    attn, g = model.transformer_blocks[0].attn, torch.Generator().manual_seed(21)
    _redraw_norms(attn, g)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, 20:] = False
    img_shapes = [[(1, 15, 20)]] * 2
    case = dict(hidden_states=torch.randn(2, 300, attn.inner_dim, generator=g),
                encoder_hidden_states=torch.randn(2, 37, attn.inner_dim, generator=g))
    case = {k: v.to(device, torch.bfloat16) for k, v in case.items()}
    case.update(encoder_hidden_states_mask=mask.to(device),
                image_rotary_emb=model.pos_embed(img_shapes, max_txt_seq_len=37, device=torch.device(device)))
    return attn, case


def _wan_attention(which: str, device: str = "cuda") -> tuple[torch.nn.Module, dict]:
    """Block 0's self-attention (attn1, with Wan's rotary tables) or cross-attention (attn2, 17 image-context
    tokens then 512 text tokens, as Wan 2.1 I2V) over a 3 x 10 x 11 latent grid (330 video tokens)."""
    from test_parallel_prologue import _redraw_norms

    model = _tiny_wan(attention_head_dim=128, image_dim=8, added_kv_proj_dim=256).to(device, torch.bfloat16)
    g = torch.Generator().manual_seed(22)
    latents = torch.randn(2, 4, 3, 20, 22, generator=g).to(device, torch.bfloat16)
    hidden = torch.randn(2, 330, 256, generator=g).to(device, torch.bfloat16)
    block = model.blocks[0]
    if which == "self":
        _redraw_norms(block.attn1, g)
        return block.attn1, dict(hidden_states=hidden, rotary_emb=model.rope(latents))
    _redraw_norms(block.attn2, g)
    context = torch.randn(2, 17 + 512, 256, generator=g).to(device, torch.bfloat16)
    return block.attn2, dict(hidden_states=hidden, encoder_hidden_states=context)


def _joined(out) -> torch.Tensor:
    """A processor's output as one fp32 tensor (Qwen-Image's (image, text) pair joined)."""
    return torch.cat([x.float() for x in out], dim=1) if isinstance(out, tuple) else out.float()


@pytest.mark.gpu
def test_qwen_cudnn_with_a_text_mask_matches_sdpa():
    """attention_backend "cudnn" with Qwen-Image's padded text: diffusers' processor (what one GPU runs) and our
    processor on the sdpa backend (what the sequence-parallel processors attend with locally), both under
    torch's SDPA restricted to cuDNN, run (cuDNN takes the key mask) and match our sdpa processor: relative
    L2 error <= 1e-2."""
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ditserve.kernels.qwen_processor import DitserveQwenAttnProcessor

    attn, case = _qwen_attention()
    with torch.inference_mode():
        ref = _joined(DitserveQwenAttnProcessor("sdpa")(attn, **case))
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            outputs = {"diffusers": _joined(QwenDoubleStreamAttnProcessor2_0()(attn, **case)),
                       "ours": _joined(DitserveQwenAttnProcessor("sdpa")(attn, **case))}
    for name, out in outputs.items():
        err = ((out - ref).norm() / ref.norm()).item()
        assert err <= 1e-2, f"{name} processor on cuDNN: bf16 relative error {err}"


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["qwen-image", "wan-self", "wan-cross-i2v"])
def test_processors_on_triton_fp8_match_sdpa(case):
    """Our processors on triton_fp8 (the prologue applied first by our Triton prologue kernel, `_unfused(kernel=True)`,
    then the FP8 kernel) against the same processors on sdpa: cosine similarity >= 0.999 (issue 5's FP8 target).
    Qwen-Image with its text mask; Wan's self-attention with its rotary embedding, and its cross-attention
    (Lq != Lk) over text and image context."""
    from ditserve.kernels.qwen_processor import DitserveQwenAttnProcessor
    from ditserve.kernels.wan_processor import DitserveWanAttnProcessor

    if case == "qwen-image":
        (attn, inputs), processor = _qwen_attention(), DitserveQwenAttnProcessor
    else:
        (attn, inputs), processor = _wan_attention(case.split("-")[1]), DitserveWanAttnProcessor
    with torch.inference_mode():
        ref = _joined(processor("sdpa")(attn, **inputs)).flatten()
        out = _joined(processor("triton_fp8")(attn, **inputs)).flatten()
    cosine = torch.nn.functional.cosine_similarity(out, ref, dim=0).item()
    assert cosine >= 0.999, f"{case}: triton_fp8 cosine similarity {cosine}"
