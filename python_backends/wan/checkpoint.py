"""The built-in Wan text-to-video checkpoints: Wan at toy size, random weights, diffusers format.

Built like the other built-ins (``ditserve.checkpoints``): deterministically, on first use, under
``$DITSERVE_CACHE/checkpoints/<name>-<tag>``, atomically under a lock, then loaded with
``WanPipeline.from_pretrained(path)`` like a real checkpoint (``OTHER_BUILTINS`` resolves the names).

* ``tiny-wan-t2v``    -- Wan 2.1 T2V style: one ``WanTransformer3DModel`` (2 layers, 2 heads x 16).
* ``tiny-wan2.2-t2v`` -- Wan 2.2 A14B style: two experts, ``transformer`` for the high-noise steps and
  ``transformer_2`` for the rest, switching at ``boundary_ratio`` (0.875, as A14B T2V).

Both have a tiny ``UMT5EncoderModel`` (2 layers of width 32) with the FLUX built-ins' T5-layout
Unigram tokenizer (UMT5's own layout: ``<pad>`` 0, ``</s>`` 1), ``AutoencoderKLWan`` (temporal
factor 4, spatial factor 8, 16 latent channels) and ``UniPCMultistepScheduler`` with Wan's flow
settings (``flow_prediction``, flow sigmas, ``flow_shift`` 3.0), the scheduler WanPipeline's
examples and the Wan diffusers checkpoints use.

The full-size ``wan2.1-t2v-14b`` and ``wan2.1-t2v-1.3b`` presets (``FULL_PRESETS``, random weights, for
GPU benchmarks) go through the same builder (``ditserve.checkpoints.save_by_component``) and are built
only explicitly, by ``python -m ditserve.checkpoints build --preset ...``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ditserve.checkpoints import _WORDS, _build_atomically, build_t5_tokenizer, cache_root, save_by_component

logger = logging.getLogger(__name__)

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

PRESETS: MappingProxyType[str, MappingProxyType] = MappingProxyType(
    {
        "tiny-wan-t2v": MappingProxyType({**_COMMON, "transformers": ("transformer",), "boundary_ratio": None}),
        "tiny-wan2.2-t2v": MappingProxyType(
            {**_COMMON, "transformers": ("transformer", "transformer_2"), "boundary_ratio": 0.875}
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
    payload = json.dumps(
        {"preset": PRESETS[name], "transformer": _TRANSFORMER, "seed": seed, "words": _WORDS},
        sort_keys=True,
        default=dict,
    )
    return f"v{FORMAT_VERSION}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


def pipeline_parts(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(WanPipeline's non-model arguments, model name -> constructor) of preset ``name``."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    configs = preset(name)
    tokenizer = build_t5_tokenizer(MAX_SEQUENCE_LENGTH)
    if len(tokenizer) > configs["text_encoder"]["vocab_size"]:
        vocab_size = configs["text_encoder"]["vocab_size"]
        raise AssertionError(f"tokenizer has {len(tokenizer)} tokens > vocab_size {vocab_size}")
    transformer = configs.get("transformer", _TRANSFORMER)
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
    return parts, models


def builtin_dir(name: str) -> Path:
    if name not in PRESETS:
        raise ValueError(f"{name!r} is not a Wan built-in ({', '.join(BUILTIN_NAMES)})")
    return cache_root() / "checkpoints" / f"{name}-{version_tag(name)}"


def build_checkpoint(name: str, out_dir: str | os.PathLike, seed: int = 0, **build: Any) -> Path:
    """Build preset ``name`` into ``out_dir`` (atomically; a complete one there is returned).

    ``build``: ``device``, ``dtype``, ``max_shard_size``, ``weights``, ``link_from`` of
    ``ditserve.checkpoints.save_by_component`` (default: on the CPU in float32, as the built-ins)."""

    def write(tmp: Path) -> None:
        from diffusers import WanPipeline

        t0 = time.perf_counter()
        save_by_component(tmp, WanPipeline, *pipeline_parts(name), seed=seed, **build)
        logger.info("built %s in %.1fs", name, time.perf_counter() - t0)

    return _build_atomically(Path(out_dir).expanduser().absolute(), write)


def ensure_builtin(name: str) -> Path:
    """Hook for ``ditserve.checkpoints.resolve_model_path``: the built directory of ``name``."""
    return build_checkpoint(name, builtin_dir(name))
