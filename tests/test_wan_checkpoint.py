"""The built-in Wan checkpoints: deterministic, resolved through the hook, loadable by WanPipeline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
    """As test_qwen_image_checkpoint's: a fresh process against this one."""
    code = "import sys; from ditserve.wan.checkpoint import build_checkpoint; build_checkpoint('tiny-wan2.2-t2v', sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "a")], check=True, capture_output=True)
    wan_ckpt.build_checkpoint("tiny-wan2.2-t2v", tmp_path / "b")
    first, second = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert first == second and any(k.endswith(".safetensors") for k in first)


def test_tokenizer_is_umt5_shaped():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("tiny-wan-t2v") / "tokenizer")
    ids = tokenizer("a red fox").input_ids
    assert ids[-1] == tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 0
    assert ids != tokenizer("a blue fox").input_ids
    assert tokenizer.model_max_length == wan_ckpt.MAX_SEQUENCE_LENGTH


def test_full_size_presets_are_wan21_on_the_meta_device():
    """wan2.1-t2v-14b and -1.3b, instantiated without memory: the published sizes; the text encoder and
    VAE are the same (so the 1.3B can hard-link them from the 14B); UniPC with flow_shift 3.0 (480P)."""
    import torch

    from ditserve.checkpoints import _config_key

    counts, keys = {}, {}
    for name in ("wan2.1-t2v-14b", "wan2.1-t2v-1.3b"):
        _, parts, models = wan_ckpt.pipeline_parts(name)
        with torch.device("meta"):
            built = {component: make() for component, make in models.items()}
        counts[name] = {component: sum(p.numel() for p in m.parameters()) for component, m in built.items()}
        keys[name] = {component: _config_key(m) for component, m in built.items()}
        assert dict(parts["scheduler"].config)["flow_shift"] == 3.0 and parts["boundary_ratio"] is None
    assert counts["wan2.1-t2v-14b"] == {
        "transformer": 14_288_491_584,  # Wan2.1-T2V-14B
        "text_encoder": 5_680_910_336,  # UMT5-XXL encoder
        "vae": 126_892_531,  # Wan 2.1 VAE
    }
    assert counts["wan2.1-t2v-1.3b"]["transformer"] == 1_418_996_800  # Wan2.1-T2V-1.3B
    for shared in ("text_encoder", "vae"):
        assert keys["wan2.1-t2v-14b"][shared] == keys["wan2.1-t2v-1.3b"][shared]
    assert keys["wan2.1-t2v-14b"]["transformer"] != keys["wan2.1-t2v-1.3b"]["transformer"]


def test_cli_links_shared_components_and_writes_config_only_ones(tmp_path, monkeypatch):
    """The full-size presets' build path with tiny presets: --link-from hard-links the components built
    the same way (a Wan 2.1 checkpoint gives a Wan 2.2 one its encoder, VAE and first expert) and the
    result equals a plain build; another seed links nothing; --weights leaves the others config only;
    a checkpoint too large for the disk is refused before anything is written."""
    import shutil
    import types

    from ditserve import checkpoints

    def build(preset, out, *extra):
        assert checkpoints.main(["build", "--preset", preset, "--out", str(tmp_path / out), *extra]) == 0
        return tmp_path / out

    one = build("tiny-wan-t2v", "one")
    two = build("tiny-wan2.2-t2v", "two", "--link-from", str(one))
    inode = lambda path: next(path.glob("*.safetensors")).stat().st_ino  # noqa: E731
    for component in ("text_encoder", "vae", "transformer"):
        assert inode(two / component) == inode(one / component)
    assert inode(two / "transformer_2") != inode(one / "transformer")
    plain = build("tiny-wan2.2-t2v", "plain")
    assert digests(two) == digests(plain)

    other_seed = build("tiny-wan2.2-t2v", "seed1", "--seed", "1", "--link-from", str(one))
    assert inode(other_seed / "vae") != inode(one / "vae")

    partial = build("tiny-wan-t2v", "partial", "--weights", "transformer")
    assert sorted(p.name for p in (partial / "text_encoder").iterdir()) == ["config.json"]
    stamp = checkpoints.read_build_stamp(partial)
    assert {name: entry["weights"] for name, entry in stamp["components"].items()} == {
        "text_encoder": False, "vae": False, "transformer": True}
    assert json.loads((partial / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKLWan"]

    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1000))
    with pytest.raises(ValueError, match="GiB of weights, only 0.0 GiB free"):
        build("tiny-wan-t2v", "full-disk")
    assert not (tmp_path / "full-disk").exists()
