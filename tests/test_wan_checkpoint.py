"""The built-in Wan checkpoints: deterministic, resolved through the hook, loadable by WanPipeline."""

from __future__ import annotations

import json
import subprocess
import sys

from test_qwen_image_checkpoint import digests

from ditserve.checkpoints import BUILTIN_MODELS, resolve_model_path
from ditserve.wan import checkpoint as wan_ckpt


def test_resolve_through_the_hook_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DITSERVE_CACHE", str(tmp_path))
    for name in wan_ckpt.BUILTIN_NAMES:
        path = resolve_model_path(name)
        assert path == wan_ckpt.builtin_dir(name) and path.is_relative_to(tmp_path)
        assert resolve_model_path(name) == path  # cache hit
        assert name not in BUILTIN_MODELS  # FLUX's list is unchanged
    one = json.loads((wan_ckpt.builtin_dir("tiny-wan-t2v") / "model_index.json").read_text())
    two = json.loads((wan_ckpt.builtin_dir("tiny-wan2.2-t2v") / "model_index.json").read_text())
    assert one["_class_name"] == two["_class_name"] == "WanPipeline"
    assert one["boundary_ratio"] is None and one["transformer_2"] == [None, None]
    assert two["boundary_ratio"] == 0.875 and two["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    assert one["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    i2v, i2v_22, ti2v = (json.loads((wan_ckpt.builtin_dir(name) / "model_index.json").read_text())
                         for name in ("tiny-wan-i2v", "tiny-wan2.2-i2v", "tiny-wan2.2-ti2v"))
    assert i2v["_class_name"] == i2v_22["_class_name"] == "WanImageToVideoPipeline"
    assert i2v["image_encoder"] == ["transformers", "CLIPVisionModel"] and i2v["boundary_ratio"] is None
    assert i2v_22["image_encoder"] == [None, None] and i2v_22["boundary_ratio"] == 0.9
    # Diffusers' TI2V-5B checkpoint is a WanPipeline with expand_timesteps, loaded by both pipelines.
    assert ti2v["_class_name"] == "WanPipeline" and ti2v["expand_timesteps"] is True
    vae = json.loads((wan_ckpt.builtin_dir("tiny-wan2.2-ti2v") / "vae" / "config.json").read_text())
    assert (vae["z_dim"], vae["scale_factor_spatial"], vae["patch_size"]) == (48, 16, 2)
    # The two experts have their own weights (else the two-expert parity test could not fail).
    experts = digests(wan_ckpt.builtin_dir("tiny-wan2.2-t2v"))
    assert experts["transformer/diffusion_pytorch_model.safetensors"] != experts["transformer_2/diffusion_pytorch_model.safetensors"]


def test_fresh_process_rebuilds_byte_identical(tmp_path):
    code = "import sys; from ditserve.wan.checkpoint import build_checkpoint; build_checkpoint('tiny-wan2.2-t2v', sys.argv[1])"
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True, capture_output=True)
    first, second = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert first == second and any(k.endswith(".safetensors") for k in first)


def test_tokenizer_is_umt5_shaped():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("tiny-wan-t2v") / "tokenizer")
    ids = tokenizer("a red fox").input_ids
    assert ids[-1] == tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 0
    assert ids != tokenizer("a blue fox").input_ids
    assert tokenizer.model_max_length == wan_ckpt.MAX_SEQUENCE_LENGTH
