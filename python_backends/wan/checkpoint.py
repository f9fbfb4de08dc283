"""The built-in Wan checkpoints: Wan at toy size, random weights, diffusers format.

Built like the other built-ins (``ditserve.checkpoints``): deterministically, on first use, under
``$DITSERVE_CACHE/checkpoints/<name>-<tag>``, atomically under a lock, then loaded with
``WanPipeline.from_pretrained(path)`` like a real checkpoint (``OTHER_BUILTINS`` resolves the names).

* ``tiny-wan-t2v``    -- Wan 2.1 T2V style: one ``WanTransformer3DModel`` (2 layers, 2 heads x 16).
* ``tiny-wan2.2-t2v`` -- Wan 2.2 A14B style: two experts, ``transformer`` for the high-noise steps and
  ``transformer_2`` for the rest, switching at ``boundary_ratio`` (0.875, as A14B T2V).
* ``tiny-wan-i2v``    -- Wan 2.1 I2V style (``WanImageToVideoPipeline``): the transformer takes the noise
  latents with the 4 mask and 16 condition channels (36 in) and a CLIP image context (``image_dim``,
  ``added_kv_proj_dim``); a tiny ``CLIPVisionModel`` (2 layers of width 32, 32x32 pixels in 8x8 patches:
  17 tokens) with its ``CLIPImageProcessor`` (OpenAI CLIP's normalisation, bicubic resize to 32, crop).
* ``tiny-wan2.2-i2v`` -- Wan 2.2 I2V A14B style: two 36-channel experts without image context or CLIP,
  ``boundary_ratio`` 0.9 (as A14B I2V).
* ``tiny-wan2.2-ti2v`` -- Wan 2.2 TI2V-5B style (``WanPipeline`` with ``expand_timesteps``, served by both
  wan_t2v and wan_i2v as diffusers' TI2V checkpoint is): the Wan 2.2 VAE (48 latent channels, residual
  blocks, 2x2 pixel patches: spatial factor 16) and a 48-channel transformer, ``flow_shift`` 5.0.

All have a tiny ``UMT5EncoderModel`` (2 layers of width 32) with the FLUX built-ins' T5-layout
Unigram tokenizer (UMT5's own layout: ``<pad>`` 0, ``</s>`` 1), ``AutoencoderKLWan`` (temporal
factor 4, spatial factor 8, 16 latent channels) and ``UniPCMultistepScheduler`` with Wan's flow
settings (``flow_prediction``, flow sigmas, ``flow_shift`` 3.0), the scheduler WanPipeline's
examples and the Wan diffusers checkpoints use.

The full-size ``wan2.1-t2v-14b`` and ``wan2.1-t2v-1.3b`` presets (``FULL_PRESETS``, random weights, for
GPU benchmarks) go through the same builder (``ditserve.checkpoints.save_by_component``) and are built
only explicitly, by ``python -m ditserve.checkpoints build --preset ...``.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ditserve.checkpoints import (
    _WORDS,
    build_by_component,
    build_t5_tokenizer,
    builtin_path,
    check_vocab_size,
    content_tag,
)

#: Bump when the build recipe changes the files.
FORMAT_VERSION = 1

#: WanPipeline's default max_sequence_length: the tokenizer pads every prompt to it.
MAX_SEQUENCE_LENGTH = 512

_TRANSFORMER = MappingProxyType(
    dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=32,  # = text encoder d_model
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )
)

_COMMON = MappingProxyType(
    {
        "text_encoder": dict(  # UMT5Config; umt5-xxl's bucket settings
            vocab_size=1024,  # >= len(tokenizer), checked at build time
            d_model=32,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
            layer_norm_epsilon=1e-6,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),
        "vae": dict(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False, True, True],  # temporal factor 4, spatial 8
            scale_factor_temporal=4,
            scale_factor_spatial=8,
        ),
        "scheduler": dict(
            num_train_timesteps=1000,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=3.0,
            solver_order=2,
            final_sigmas_type="zero",
        ),
    }
)

# The image-to-video presets: WanImageToVideoPipeline, optional parts of the transformer config
# ("transformer", applied over _TRANSFORMER) and of the VAE config, CLIP where Wan 2.1 I2V has it.
_I2V_TRANSFORMER = MappingProxyType(dict(in_channels=36))  # noise 16 + mask 4 (temporal factor) + condition 16
_CLIP_VISION = MappingProxyType(
    dict(  # CLIPVisionConfig: ViT-H/14's layout at toy size; hidden_size is the transformer's image_dim
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
        hidden_act="gelu",
    )
)
_CLIP_PROCESSOR = MappingProxyType(
    dict(  # CLIPImageProcessor as saved with Wan2.1-I2V (OpenAI CLIP's), at the vision model's 32 pixels
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        resample=3,  # bicubic
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
)
_WAN22_VAE = MappingProxyType(
    dict(  # the Wan 2.2 VAE (TI2V-5B) at toy size: 48 latent channels, 2x2 pixel patches, residual blocks
        base_dim=8,
        decoder_base_dim=8,
        z_dim=48,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_temporal=4,
        scale_factor_spatial=16,
        # Not 0 and 1: the normalisation is part of what the parity tests check.
        latents_mean=[round((i % 7 - 3) / 10, 2) for i in range(48)],
        latents_std=[round(1 + (i % 5) / 4, 2) for i in range(48)],
    )
)

PRESETS: MappingProxyType[str, MappingProxyType] = MappingProxyType(
    {
        "tiny-wan-t2v": MappingProxyType({**_COMMON, "transformers": ("transformer",), "boundary_ratio": None}),
        "tiny-wan2.2-t2v": MappingProxyType(
            {**_COMMON, "transformers": ("transformer", "transformer_2"), "boundary_ratio": 0.875}
        ),
        "tiny-wan-i2v": MappingProxyType(
            {
                **_COMMON,
                "pipeline": "WanImageToVideoPipeline",
                "transformers": ("transformer",),
                "boundary_ratio": None,
                "transformer": MappingProxyType({**_I2V_TRANSFORMER, "image_dim": 32, "added_kv_proj_dim": 32}),
                "image_encoder": _CLIP_VISION,
                "image_processor": _CLIP_PROCESSOR,
            }
        ),
        "tiny-wan2.2-i2v": MappingProxyType(
            {
                **_COMMON,
                "pipeline": "WanImageToVideoPipeline",
                "transformers": ("transformer", "transformer_2"),
                "boundary_ratio": 0.9,
                "transformer": _I2V_TRANSFORMER,
            }
        ),
        "tiny-wan2.2-ti2v": MappingProxyType(
            {
                **_COMMON,
                "vae": _WAN22_VAE,
                "scheduler": MappingProxyType({**_COMMON["scheduler"], "flow_shift": 5.0}),
                "transformers": ("transformer",),
                "boundary_ratio": None,
                "expand_timesteps": True,
                "transformer": MappingProxyType(dict(in_channels=48, out_channels=48)),
            }
        ),
    }
)
BUILTIN_NAMES = tuple(PRESETS)

# Wan 2.1 T2V at full size, for GPU benchmarks with random weights (never built implicitly:
# ``python -m ditserve.checkpoints build --preset wan2.1-t2v-14b --out DIR --dtype bfloat16 --device cuda``).
# Both sizes share the UMT5-XXL text encoder (5.7B) and the Wan 2.1 VAE: build the 1.3B with
# ``--link-from <the 14B's DIR>`` to hard-link them. The scheduler is the checkpoints' UniPC with
# flow_shift 3.0, the value diffusers' WanPipeline docs give for 480P (5.0 for 720P). The tokenizer is
# the built-ins' (every prompt is padded to 512 tokens, so the sequence lengths are the real ones).
_WAN21 = MappingProxyType(
    {
        "text_encoder": {**_COMMON["text_encoder"], "vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240,
                         "num_layers": 24, "num_heads": 64},
        # latents_mean / latents_std: AutoencoderKLWan's defaults are Wan 2.1's.
        "vae": {**_COMMON["vae"], "base_dim": 96, "num_res_blocks": 2},
        "scheduler": _COMMON["scheduler"],
        "transformers": ("transformer",),
        "boundary_ratio": None,
    }
)
_WAN21_TRANSFORMER = {**_TRANSFORMER, "freq_dim": 256, "text_dim": 4096, "attention_head_dim": 128,
                      "rope_max_seq_len": 1024}
FULL_PRESETS: MappingProxyType[str, MappingProxyType] = MappingProxyType(
    {
        "wan2.1-t2v-14b": MappingProxyType(
            {**_WAN21, "transformer": {**_WAN21_TRANSFORMER, "num_attention_heads": 40, "ffn_dim": 13824,
                                       "num_layers": 40}}
        ),
        "wan2.1-t2v-1.3b": MappingProxyType(
            {**_WAN21, "transformer": {**_WAN21_TRANSFORMER, "num_attention_heads": 12, "ffn_dim": 8960,
                                       "num_layers": 30}}
        ),
    }
)


def preset(name: str) -> MappingProxyType:
    """A built-in's or a full-size preset's configs (the built-ins use the tiny ``_TRANSFORMER``)."""
    found = PRESETS.get(name) or FULL_PRESETS.get(name)
    if found is None:
        raise ValueError(f"unknown Wan preset {name!r}; known: {', '.join([*PRESETS, *FULL_PRESETS])}")
    return found


def version_tag(name: str, seed: int = 0) -> str:
    return content_tag(FORMAT_VERSION, {"preset": PRESETS[name], "transformer": _TRANSFORMER, "seed": seed, "words": _WORDS})


def pipeline_parts(name: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(pipeline class name, its non-model arguments, model name -> constructor) of preset ``name``."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    configs = preset(name)
    tokenizer = build_t5_tokenizer(MAX_SEQUENCE_LENGTH)
    check_vocab_size(tokenizer, configs["text_encoder"]["vocab_size"], "text_encoder")
    # The built-ins override a few keys of the tiny transformer; the full presets give all of them.
    transformer = {**_TRANSFORMER, **configs.get("transformer", {})}
    models = {  # built in this order: the seeds follow it; the weights also depend on the component name
        "text_encoder": lambda: UMT5EncoderModel(UMT5Config(**configs["text_encoder"])),
        "vae": lambda: AutoencoderKLWan(**configs["vae"]),
        **{expert: lambda: WanTransformer3DModel(**transformer) for expert in configs["transformers"]},
    }
    parts: dict[str, Any] = {
        "scheduler": UniPCMultistepScheduler(**configs["scheduler"]),
        "tokenizer": tokenizer,
        "boundary_ratio": configs["boundary_ratio"],
    }
    if "expand_timesteps" in configs:
        parts["expand_timesteps"] = configs["expand_timesteps"]
    if "image_encoder" in configs:
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        models["image_encoder"] = lambda: CLIPVisionModel(CLIPVisionConfig(**configs["image_encoder"]))
        parts["image_processor"] = CLIPImageProcessor(**configs["image_processor"])
    return configs.get("pipeline", "WanPipeline"), parts, models


def builtin_dir(name: str) -> Path:
    if name not in PRESETS:
        raise ValueError(f"{name!r} is not a Wan built-in ({', '.join(BUILTIN_NAMES)})")
    return builtin_path(name, version_tag(name))


def build_checkpoint(name: str, out_dir: str | os.PathLike, seed: int = 0, **build: Any) -> Path:
    """Build preset ``name`` into ``out_dir`` (``ditserve.checkpoints.build_by_component``: atomically; a
    complete one there is returned; ``build`` as there)."""
    return build_by_component(name, out_dir, lambda: pipeline_parts(name), seed=seed, **build)


def ensure_builtin(name: str) -> Path:
    """Hook for ``ditserve.checkpoints.resolve_model_path``: the built directory of ``name``."""
    return build_checkpoint(name, builtin_dir(name))
