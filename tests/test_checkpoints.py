"""Tests of ditserve.checkpoints: built-in tiny FLUX checkpoints, model-path specs, full-size presets.

CPU only and quick: the tiny pipelines build in about a second (most of the time is importing
diffusers/transformers); full-size presets are only instantiated on the meta device.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ditserve import checkpoints as ckpt


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("ditserve-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DITSERVE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def tiny(cache) -> Path:
    return ckpt.resolve_model_path("tiny")


@pytest.fixture(scope="module")
def tiny_schnell(cache) -> Path:
    return ckpt.resolve_model_path("tiny-schnell")


@pytest.fixture(scope="module")
def tiny_pipe(tiny):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny)  # exactly how a real checkpoint is loaded
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompt: str, seed: int, **kwargs) -> np.ndarray:
    out = pipe(
        prompt,
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **kwargs,
    )
    return out.images[0]


# --------------------------------------------------------------------------------------------------
# Built-ins and the cache
# --------------------------------------------------------------------------------------------------


def test_builtin_is_built_in_the_cache_once(cache, tiny):
    assert tiny == cache / "checkpoints" / f"tiny-{ckpt.get_preset('tiny').version_tag()}"
    assert tiny.name.startswith("tiny-v")
    assert tiny == ckpt.builtin_checkpoint_dir("tiny")
    index = json.loads((tiny / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    for sub in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        assert list((tiny / sub).glob("*.safetensors")), sub
        assert not list((tiny / sub).glob("*.bin")), sub
    assert not list(cache.glob("checkpoints/.*tmp-*")), "temporary build directories left behind"

    stamp = (tiny / "model_index.json").stat().st_mtime_ns
    assert ckpt.resolve_model_path("tiny") == tiny  # second call: cache hit, no rebuild
    assert (tiny / "model_index.json").stat().st_mtime_ns == stamp


def test_fresh_process_rebuilds_byte_identical(tiny, tmp_path):
    """A new process building `tiny` into another cache writes exactly the same bytes."""
    other_cache = tmp_path / "other-cache"
    env = {**os.environ, "DITSERVE_CACHE": str(other_cache)}
    proc = subprocess.run(
        [sys.executable, "-m", "ditserve.checkpoints", "resolve", "tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    theirs_path = Path(proc.stdout.strip().splitlines()[-1])
    assert theirs_path == other_cache / "checkpoints" / tiny.name
    assert not list(other_cache.glob("checkpoints/.*tmp-*"))

    ours, theirs = _tree(tiny), _tree(theirs_path)
    assert ours.keys() == theirs.keys()
    assert any(name.endswith(".safetensors") for name in ours)
    assert [name for name in ours if ours[name] != theirs[name]] == []


def _racing_builder(final: str, log: str, barrier, results) -> None:
    """Child process: all children start together; the writer is slow so that they overlap."""

    def write(tmp: Path) -> None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)
        (tmp / "model_index.json").write_text("{}")

    barrier.wait()
    results.put(str(ckpt._build_atomically(Path(final), write)))


def test_concurrent_processes_build_once(tmp_path):
    """The fcntl lock + rename protocol (what Triton instances starting together rely on), with a
    stand-in writer so that the children need no torch work (forked children stay cheap)."""
    ctx = multiprocessing.get_context("fork")
    final, log = tmp_path / "checkpoints" / "x-v1", tmp_path / "builds.log"
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_racing_builder, args=(str(final), str(log), barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert {results.get(timeout=5) for _ in procs} == {str(final)}
    assert len(log.read_text().splitlines()) == 1, "built more than once"
    assert sorted(p.name for p in final.parent.iterdir()) == [".x-v1.lock", "x-v1"]

    def crash(tmp: Path) -> None:
        (tmp / "half-written").write_text("")
        raise RuntimeError("builder died")

    other = tmp_path / "checkpoints" / "y-v1"
    with pytest.raises(RuntimeError):
        ckpt._build_atomically(other, crash)
    assert not other.exists() and not list(other.parent.glob(".y-v1.tmp-*"))
    (other.parent / ".y-v1.tmp-stale").mkdir()  # as if a builder was killed mid-build
    assert ckpt._build_atomically(other, lambda tmp: (tmp / "model_index.json").write_text("{}")) == other
    assert not list(other.parent.glob(".y-v1.tmp-*"))


def test_cli_build_other_seed_changes_weights_only(tiny, tmp_path, capsys):
    out = tmp_path / "seed1"
    assert ckpt.main(["build", "--preset", "tiny", "--out", str(out), "--seed", "1"]) == 0
    assert str(out) in capsys.readouterr().out
    ours, seed1 = _tree(tiny), _tree(out)
    assert ours.keys() == seed1.keys()
    differ = {name for name in ours if ours[name] != seed1[name]}
    assert differ == {name for name in ours if name.endswith(".safetensors")}

    with pytest.raises(ValueError, match="already exists"):
        ckpt.build_checkpoint("tiny", out)

    assert ckpt.main(["resolve", "tiny"]) == 0
    assert capsys.readouterr().out.strip() == str(tiny)
    assert ckpt.main(["resolve", str(tmp_path / "nope")]) == 2


# --------------------------------------------------------------------------------------------------
# The tiny pipeline
# --------------------------------------------------------------------------------------------------


def test_tiny_pipeline_generates_images_that_depend_on_prompt_and_seed(tiny_pipe):
    cat = _generate(tiny_pipe, "a photo of a cat", seed=0)
    assert cat.shape == (64, 64, 3)
    assert np.isfinite(cat).all()
    assert cat.std() > 0.05, "image is (nearly) flat"

    assert np.array_equal(cat, _generate(tiny_pipe, "a photo of a cat", seed=0))
    other_prompt = _generate(tiny_pipe, "a red house at sunset", seed=0)
    other_seed = _generate(tiny_pipe, "a photo of a cat", seed=1)
    assert np.abs(cat - other_prompt).mean() > 0.005
    assert np.abs(cat - other_seed).mean() > 0.05
    as_uint8 = lambda im: (im * 255).round().astype(np.uint8)  # noqa: E731
    assert not np.array_equal(as_uint8(cat), as_uint8(other_prompt))


def test_tiny_configs_follow_flux_layout(tiny, tiny_pipe):
    pipe = tiny_pipe
    assert pipe.vae_scale_factor == 8
    assert pipe.vae.config.latent_channels == 16
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
    assert not pipe.vae.config.use_quant_conv and not pipe.vae.config.use_post_quant_conv
    t = pipe.transformer.config
    assert t.guidance_embeds is True
    assert sum(t.axes_dims_rope) == t.attention_head_dim
    assert t.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert t.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    s = pipe.scheduler.config
    assert (s.shift, s.use_dynamic_shifting, s.base_shift, s.max_shift) == (3.0, True, 0.5, 1.15)
    assert (s.base_image_seq_len, s.max_image_seq_len) == (256, 4096)
    # No parameter was left at the libraries' (partly zero) default init.
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        for pname, p in getattr(pipe, name).named_parameters():
            assert p.abs().max() > 0, f"{name}.{pname} is all zeros"


def test_tokenizers_fit_the_models_and_separate_prompts(tiny_pipe):
    pipe = tiny_pipe
    clip, t5 = pipe.tokenizer, pipe.tokenizer_2
    assert clip.model_max_length == 77 and t5.model_max_length == 512
    assert len(clip) <= pipe.text_encoder.config.vocab_size
    assert len(t5) <= pipe.text_encoder_2.config.vocab_size
    assert (t5.pad_token, t5.pad_token_id, t5.eos_token) == ("<pad>", 0, "</s>")
    assert (clip.bos_token, clip.eos_token) == ("<|startoftext|>", "<|endoftext|>")
    assert pipe.text_encoder.config.eos_token_id == clip.eos_token_id

    prompts = ["a photo of a cat", "a photo of a dog", "A watercolor castle, 8k!", "zebra xylophone quux"]
    for tok in (clip, t5):
        ids = [tuple(tok(p).input_ids) for p in prompts]
        assert len(set(ids)) == len(prompts)
        assert max(max(i) for i in ids) < len(tok)
    assert clip("a cat").input_ids[0] == clip.bos_token_id and clip("a cat").input_ids[-1] == clip.eos_token_id
    assert t5("a cat").input_ids[-1] == t5.eos_token_id
    # Whole words are single tokens (learned merges / word pieces), unknown words still encode.
    assert len(clip("photograph").input_ids) == 3 and len(t5("photograph").input_ids) == 2
    assert len(clip("zebra").input_ids) > 3 and len(t5("zebra").input_ids) > 2


def test_tiny_schnell_has_no_guidance_embedding(tiny, tiny_schnell):
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from safetensors import safe_open

    assert tiny_schnell != tiny and tiny_schnell.name.startswith("tiny-schnell-v")
    config = json.loads((tiny_schnell / "transformer" / "config.json").read_text())
    assert config["guidance_embeds"] is False
    assert json.loads((tiny / "transformer" / "config.json").read_text())["guidance_embeds"] is True

    def keys(root):
        (path,) = (root / "transformer").glob("*.safetensors")
        with safe_open(path, "pt") as f:
            return set(f.keys())

    assert any("guidance_embedder" in k for k in keys(tiny))
    assert not any("guidance_embedder" in k for k in keys(tiny_schnell))
    assert FluxTransformer2DModel.from_pretrained(tiny_schnell / "transformer").config.guidance_embeds is False

    pipe = FluxPipeline.from_pretrained(tiny_schnell)
    pipe.set_progress_bar_config(disable=True)
    assert (pipe.scheduler.config.shift, pipe.scheduler.config.use_dynamic_shifting) == (1.0, False)
    image = _generate(pipe, "a cat", seed=0, guidance_scale=0.0, max_sequence_length=256)
    assert image.shape == (64, 64, 3) and image.std() > 0.05


# --------------------------------------------------------------------------------------------------
# Model-path specs
# --------------------------------------------------------------------------------------------------


def test_directory_spec_resolves_to_itself(tiny):
    assert ckpt.resolve_model_path(str(tiny)) == tiny
    assert ckpt.resolve_model_path(tiny) == tiny


def test_bad_paths_give_clear_errors(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match="does not exist") as e:
        ckpt.resolve_model_path(str(missing))
    assert str(missing) in str(e.value) and "tiny" in str(e.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="model_index.json") as e:
        ckpt.resolve_model_path(str(empty))
    assert str(empty) in str(e.value)

    a_file = tmp_path / "weights.safetensors"
    a_file.write_bytes(b"")
    with pytest.raises(ValueError, match="not a directory") as e:
        ckpt.resolve_model_path(str(a_file))
    assert str(a_file) in str(e.value)

    with pytest.raises(ValueError, match="--preset flux.1-dev"):
        ckpt.resolve_model_path("flux.1-dev")  # full size is never built implicitly
    with pytest.raises(ValueError, match="empty model path"):
        ckpt.resolve_model_path("")
    with pytest.raises(ValueError, match="unknown checkpoint preset"):
        ckpt.get_preset("flux.2")


def test_a_hub_repository_id_resolves_to_its_snapshot_in_the_local_cache(tiny, tmp_path, monkeypatch):
    """As diffusers' from_pretrained finds "org/name" offline: models--org--name/snapshots/<ref's commit>/."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--someone--tiny-flux"
    snapshot = repo / "snapshots" / ("a1" * 20)
    shutil.copytree(tiny, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a1" * 20)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert ckpt.resolve_model_path("someone/tiny-flux") == snapshot
    with pytest.raises(ValueError, match=r"local cache only, where it is not: download it first "
                                         r"\(hf download someone/other\)"):
        ckpt.resolve_model_path("someone/other")


def partial_copy(tiny: Path, tmp_path: Path, change) -> str:
    copy = tmp_path / "partial"
    shutil.copytree(tiny, copy)
    change(copy)
    return str(copy)


@pytest.mark.parametrize("case,message", [
    ("no-vae-folder", r"has no folder vae/ for its component 'vae' \(an incomplete download\?\)"),
    ("truncated-weights", r"cannot load component 'vae' from .*/vae: .*"),
    ("no-config-key", r"vae/config.json has no 'latent_channels'"),
    ("variant-only", r"the folder holds variant weights"),
])
def test_an_incomplete_checkpoint_is_a_config_error_naming_the_component(tiny, tmp_path, case, message):
    """Each as the library's own error named neither the component nor the file, or blamed the network."""
    from ditserve.loading import Checkpoint
    from ditserve.stage import ConfigError

    def change(copy: Path) -> None:
        vae = copy / "vae"
        weights = vae / "diffusion_pytorch_model.safetensors"
        if case == "no-vae-folder":
            shutil.rmtree(vae)
        elif case == "truncated-weights":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif case == "no-config-key":
            config = json.loads((vae / "config.json").read_text())
            del config["latent_channels"]
            (vae / "config.json").write_text(json.dumps(config))
        else:
            weights.rename(vae / "diffusion_pytorch_model.fp16.safetensors")

    checkpoint = Checkpoint(partial_copy(tiny, tmp_path, change))
    with pytest.raises(ConfigError, match=message):
        if case == "no-config-key":
            checkpoint.config("vae")["latent_channels"]
        else:
            checkpoint.load("vae")


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------


def _param_counts(preset: str) -> dict[str, int]:
    components = ckpt.build_pipeline_components(preset, device="meta", dtype="bfloat16")
    counts = {}
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        params = list(components[name].parameters())
        assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in params)
        counts[name] = sum(p.numel() for p in params)
    return counts


def test_full_size_parameter_counts_on_meta_device():
    dev = _param_counts("flux.1-dev")
    assert dev == {
        "transformer": 11_901_408_320,  # FLUX.1-dev
        "text_encoder_2": 4_762_310_656,  # T5 v1.1 XXL encoder
        "text_encoder": 123_060_480,  # CLIP-L text
        "vae": 83_819_683,  # FLUX AE
    }
    schnell = _param_counts("flux.1-schnell")
    assert 11.85e9 < schnell["transformer"] < dev["transformer"]  # no guidance embedder
    schnell.pop("transformer"), dev.pop("transformer")
    assert schnell == dev


def test_presets_are_data_sharing_one_builder():
    assert set(ckpt.PRESETS) == {"tiny", "tiny-schnell", "flux.1-dev", "flux.1-schnell"}
    assert set(ckpt.BUILTIN_MODELS) == {"tiny", "tiny-schnell"}
    dev, schnell = ckpt.get_preset("flux.1-dev"), ckpt.get_preset("flux.1-schnell")
    assert dev.arch is schnell.arch
    assert dev.configs()["transformer"]["guidance_embeds"] and not schnell.configs()["transformer"]["guidance_embeds"]
    assert dev.configs()["text_encoder_2"]["feed_forward_proj"] == "gated-gelu"
    tags = {p.version_tag() for p in ckpt.PRESETS.values()}
    assert len(tags) == len(ckpt.PRESETS)
    assert ckpt.get_preset("tiny").version_tag(seed=1) != ckpt.get_preset("tiny").version_tag()
    with pytest.raises(TypeError):  # the table is read-only; configs() hands out copies
        ckpt.TINY_ARCH.transformer["num_layers"] = 2
