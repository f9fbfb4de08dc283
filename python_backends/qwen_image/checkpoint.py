"""The built-in ``tiny-qwen-image`` checkpoint: Qwen-Image at toy size, random weights, diffusers format.

Built like the FLUX built-ins (``ditserve.checkpoints``): deterministically, on first use, under
``$DITSERVE_CACHE/checkpoints/<name>-<tag>``, atomically under a lock, and then loaded with
``QwenImagePipeline.from_pretrained(path)`` like a real checkpoint. ``ditserve.checkpoints``
resolves the name through its ``OTHER_BUILTINS`` hook, which imports this module.

Components: a tiny ``Qwen2_5_VLForConditionalGeneration`` (2 text layers of width 32, a one-block
vision tower so the same encoder serves Qwen-Image-Edit later), a Qwen2-style byte-level BPE
tokenizer built locally with the chat-template special tokens, ``QwenImageTransformer2DModel``
(2 layers, 2 heads x 16), ``AutoencoderKLQwenImage`` (spatial factor 8, 16 latent channels) and
``FlowMatchEulerDiscreteScheduler`` with Qwen-Image's own config (dynamic shift up to 0.9,
``shift_terminal`` 0.02).

The tokenizer's word list includes the words of ``QwenImagePipeline``'s prompt template, so the
template prefix that the pipeline drops (``prompt_template_encode_start_idx`` = 34 tokens in the
real Qwen tokenizer) is exactly 34 tokens here too: the kept hidden states are those of the
user's prompt, as with the real model (checked at build time).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import zlib
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ditserve.checkpoints import (
    _WORDS,
    _build_atomically,
    _bytes_to_unicode,
    _default_dtype,
    _learn_bpe_merges,
    cache_root,
)

logger = logging.getLogger(__name__)

#: Bump when the build recipe changes the files.
FORMAT_VERSION = 1
BUILTIN_NAMES = ("tiny-qwen-image",)

#: QwenImagePipeline's text template and the number of its leading tokens it drops.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PROMPT_TEMPLATE_DROP = 34

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

_TEMPLATE_WORDS = tuple(
    """system user assistant Describe describe image by detailing color shape size texture quantity text
    spatial relationships objects background the of and""".split()
)

_TEXT = MappingProxyType(
    dict(
        vocab_size=1536,  # >= len(tokenizer), checked at build time
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},  # head_dim/2
    )
)
_VISION = MappingProxyType(
    dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=32,  # = text hidden size
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[0],
    )
)

TINY = MappingProxyType(
    {
        "transformer": dict(
            patch_size=2,
            in_channels=64,  # 16 latent channels packed 2x2
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # = text encoder hidden size
            guidance_embeds=False,
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        ),
        "vae": dict(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False, True, True],  # 3 entries: spatial factor 2**3 = 8
        ),
        "scheduler": dict(  # Qwen/Qwen-Image scheduler/scheduler_config.json
            base_image_seq_len=256,
            base_shift=0.5,
            invert_sigmas=False,
            max_image_seq_len=8192,
            max_shift=0.9,
            num_train_timesteps=1000,
            shift=1.0,
            shift_terminal=0.02,
            stochastic_sampling=False,
            time_shift_type="exponential",
            use_beta_sigmas=False,
            use_dynamic_shifting=True,
            use_exponential_sigmas=False,
            use_karras_sigmas=False,
        ),
        "text_encoder": {"text_config": dict(_TEXT), "vision_config": dict(_VISION)},
    }
)


def version_tag(seed: int = 0) -> str:
    payload = json.dumps(
        {"configs": TINY, "seed": seed, "words": _WORDS, "template_words": _TEMPLATE_WORDS, "special": SPECIAL_TOKENS},
        sort_keys=True,
        default=dict,
    )
    return f"v{FORMAT_VERSION}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


# --- tokenizer ---------------------------------------------------------------------------------


def build_tokenizer():
    """A Qwen2 byte-level BPE tokenizer: the 256 byte symbols, merges for prompt words with and
    without the leading-space marker ``Ġ``, then the chat and vision special tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    alphabet = _bytes_to_unicode()
    vocab: dict[str, int] = {c: i for i, c in enumerate(alphabet)}
    words = [*dict.fromkeys((*_WORDS, *_TEMPLATE_WORDS))]
    merges = _learn_bpe_merges([w for word in words for w in (word, "Ġ" + word)])  # byte-level: no end-of-word marker
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for special in SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=list(merges),
        model_max_length=32768,
        padding_side="right",
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


# --- model -------------------------------------------------------------------------------------


def _reinit_parameters(module, seed: int, component: str) -> None:
    """``ditserve.checkpoints._reinit_parameters`` with one difference: Qwen-Image's VAE names its
    RMS-norm scales ``gamma``, which must start near 1 (not 0) for the image to carry signal."""
    import torch

    params = list(module.parameters())
    gen = torch.Generator(device=params[0].device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(component.encode())) % (2**63))
    seen: set[int] = set()
    with torch.no_grad():
        for sub in module.modules():
            is_norm = "norm" in type(sub).__name__.lower()
            for pname, p in sub.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if pname == "gamma" or (is_norm and pname == "weight" and p.ndim == 1):
                    p.normal_(1.0, 0.02, generator=gen)  # gamma: (C, 1, 1[, 1]) in the VAE
                elif p.ndim >= 2:
                    p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
                else:
                    p.normal_(0.0, 0.02, generator=gen)


def build_components(seed: int = 0) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tokenizer()
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    prefix_tokens = len(tokenizer(prefix).input_ids)
    if prefix_tokens != PROMPT_TEMPLATE_DROP:
        raise AssertionError(f"template prefix is {prefix_tokens} tokens, QwenImagePipeline drops {PROMPT_TEMPLATE_DROP}")
    if len(tokenizer) > _TEXT["vocab_size"]:
        raise AssertionError(f"tokenizer has {len(tokenizer)} tokens > vocab_size {_TEXT['vocab_size']}")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_config = {
        **TINY["text_encoder"]["text_config"],
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=dict(TINY["text_encoder"]["vision_config"]),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    constructors = {
        "text_encoder": lambda: Qwen2_5_VLForConditionalGeneration(config),
        "transformer": lambda: QwenImageTransformer2DModel(**TINY["transformer"]),
        "vae": lambda: AutoencoderKLQwenImage(**TINY["vae"]),
    }
    components: dict[str, Any] = {
        "scheduler": FlowMatchEulerDiscreteScheduler(**TINY["scheduler"]),
        "tokenizer": tokenizer,
    }
    for index, (name, make) in enumerate(constructors.items()):
        torch.manual_seed(seed * 1_000_003 + index)
        with torch.device("cpu"), _default_dtype(torch.float32):
            model = make()
        _reinit_parameters(model, seed, name)
        components[name] = model.eval().requires_grad_(False)
    return components


def builtin_dir(name: str) -> Path:
    if name not in BUILTIN_NAMES:
        raise ValueError(f"{name!r} is not a Qwen-Image built-in ({', '.join(BUILTIN_NAMES)})")
    return cache_root() / "checkpoints" / f"{name}-{version_tag()}"


def build_checkpoint(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny pipeline into ``out_dir`` (atomically; a complete one there is returned)."""

    def write(tmp: Path) -> None:
        from diffusers import QwenImagePipeline

        t0 = time.perf_counter()
        QwenImagePipeline(**build_components(seed)).save_pretrained(tmp, safe_serialization=True)
        logger.info("built tiny-qwen-image in %.1fs", time.perf_counter() - t0)

    return _build_atomically(Path(out_dir).expanduser().absolute(), write)


def ensure_builtin(name: str) -> Path:
    """Hook for ``ditserve.checkpoints.resolve_model_path``: the built directory of ``name``."""
    return build_checkpoint(builtin_dir(name))
