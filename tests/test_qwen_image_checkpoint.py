"""The built-in tiny-qwen-image checkpoint: deterministic, loadable by diffusers, template-aware tokenizer."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from ditserve.checkpoints import BUILTIN_MODELS, resolve_model_path
from ditserve.qwen_image import checkpoint as qwen_ckpt


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_resolves_through_the_hook_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DITSERVE_CACHE", str(tmp_path))
    path = resolve_model_path("tiny-qwen-image")
    assert path == qwen_ckpt.builtin_dir("tiny-qwen-image") and path.is_relative_to(tmp_path)
    assert (path / "model_index.json").read_text().count("QwenImagePipeline") == 1
    assert resolve_model_path("tiny-qwen-image") == path  # cache hit
    assert "tiny-qwen-image" not in BUILTIN_MODELS  # FLUX's list is unchanged


def test_fresh_process_rebuilds_byte_identical(tmp_path):
    """A fresh process writes the bytes that this one (after other tests: other RNG and torch
    state) writes; one subprocess, not two, saves an interpreter importing torch and diffusers."""
    code = "import sys; from ditserve.qwen_image.checkpoint import build_checkpoint; build_checkpoint(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "a")], check=True, capture_output=True)
    qwen_ckpt.build_checkpoint(tmp_path / "b")
    first, second = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert first == second and any(k.endswith(".safetensors") for k in first)


def test_tokenizer_matches_the_pipeline_template():
    tokenizer = qwen_ckpt.build_tokenizer()
    prefix = qwen_ckpt.PROMPT_TEMPLATE.split("{}")[0]
    assert len(tokenizer(prefix).input_ids) == qwen_ckpt.PROMPT_TEMPLATE_DROP == 34
    for token in qwen_ckpt.SPECIAL_TOKENS:
        assert tokenizer(token).input_ids == [tokenizer.convert_tokens_to_ids(token)]
    # Prompt words are single tokens; different prompts give different ids.
    assert len(tokenizer(" red fox").input_ids) == 2
    assert tokenizer("a red fox").input_ids != tokenizer("a blue fox").input_ids


def test_pipeline_template_constants_are_diffusers():
    from diffusers import QwenImagePipeline

    source = Path(sys.modules[QwenImagePipeline.__module__].__file__).read_text()
    assert repr(qwen_ckpt.PROMPT_TEMPLATE).strip("'") in source.replace('"', "'")
    assert f"prompt_template_encode_start_idx = {qwen_ckpt.PROMPT_TEMPLATE_DROP}" in source


def test_full_size_preset_is_qwen_image_on_the_meta_device():
    """The qwen-image preset's models, instantiated without memory: the published parameter counts, and
    the whole pipeline's bf16 weights fit the GPU host's 64 GiB disk with room to spare."""
    import torch

    _, parts, models = qwen_ckpt.pipeline_parts("qwen-image")
    with torch.device("meta"):
        built = {name: make() for name, make in models.items()}
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in built.items()}
    assert counts == {
        "transformer": 20_430_401_088,  # Qwen-Image's MMDiT ("20B")
        "text_encoder": 8_292_166_656,  # Qwen2.5-VL-7B-Instruct, vision tower and lm_head included
        "vae": 126_892_531,  # AutoencoderKLQwenImage
    }
    assert sum(p.numel() for p in built["text_encoder"].model.visual.parameters()) == 676_550_144
    assert built["text_encoder"].config.text_config.vocab_size == 152064  # the tokenizer is the tiny one
    assert sum(counts.values()) * 2 / 2**30 < 54  # GiB of bf16 weights
    assert dict(parts["scheduler"].config)["shift_terminal"] == 0.02
