"""The built-in ``tiny-qwen-image`` and ``tiny-qwen-image-edit`` checkpoints: Qwen-Image and
Qwen-Image-Edit at toy size, random weights, diffusers format.

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

``tiny-qwen-image-edit`` has the same components (same weights: same seeds and configs) saved as a
``QwenImageEditPipeline``, a tokenizer that also knows the Edit template's words (its system prefix
is 64 tokens, ``prompt_template_encode_start_idx``, as with the real tokenizer, so the kept hidden
states start at the image tokens), and the processor's image handling under ``processor/``: a
``Qwen2VLImageProcessor`` with the vision tower's patch geometry and at most 64 merged image tokens
(the real one allows 16384), plus the tokenizer files, as in Qwen/Qwen-Image-Edit's ``processor/``.
``Qwen2VLProcessor`` itself cannot be constructed without torchvision in transformers 5.24 (its
class check of the video processor fails), so the folder is written from its parts and
``model_index.json`` names ``Qwen2VLProcessor`` as the real checkpoint does.

The full-size ``qwen-image`` preset (``FULL``: Qwen-Image's real architecture, random weights, for GPU
benchmarks) goes through the same builder (``ditserve.checkpoints.save_by_component``: one model at a
time, built on the target device in the target dtype) and is built only explicitly, by
``python -m ditserve.checkpoints build --preset qwen-image ...``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from ditserve.checkpoints import (
    _WORDS,
    _bytes_to_unicode,
    _learn_bpe_merges,
    build_by_component,
    builtin_path,
    check_vocab_size,
    content_tag,
)

#: Bump when the build recipe changes the files.
FORMAT_VERSION = 1

#: QwenImagePipeline's text template and the number of its leading tokens it drops.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PROMPT_TEMPLATE_DROP = 34

#: QwenImageEditPipeline's: the image placeholder is expanded by the processor and kept.
EDIT_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
EDIT_PROMPT_TEMPLATE_DROP = 64
IMAGE_PAD = "<|image_pad|>"

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
# The Edit template's other words and its punctuation pieces (" (", "),", "'s" are one token each
# in Qwen's tokenizer: with them the system prefix is the real tokenizer's 64 tokens).
_EDIT_TEMPLATE_WORDS = tuple(
    """key features input then explain how user text instruction should alter or modify Generate a new
    that meets requirements while maintaining consistency with original where appropriate ( ), 's""".split()
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


@dataclasses.dataclass(frozen=True)
class Builtin:
    """What a built-in adds to the shared components: the pipeline class that saves (and loads) it,
    its template, and for the Edit pipelines the processor's image-processor config."""

    pipeline: str
    template: str
    template_drop: int
    template_words: tuple[str, ...]
    image_processor: Mapping[str, Any] | None = None


# Qwen2VLImageProcessor kwargs: the vision tower's patch geometry; 56x56 to 224x224 pixels (4 to 64
# merged tokens) instead of the real 3136 to 12845056, so the tiny text encoder stays cheap.
_IMAGE_PROCESSOR = MappingProxyType(
    dict(
        size={"shortest_edge": 56 * 56, "longest_edge": 224 * 224},
        patch_size=_VISION["patch_size"],
        temporal_patch_size=_VISION["temporal_patch_size"],
        merge_size=_VISION["spatial_merge_size"],
    )
)

BUILTINS: Mapping[str, Builtin] = MappingProxyType(
    {
        "tiny-qwen-image": Builtin("QwenImagePipeline", PROMPT_TEMPLATE, PROMPT_TEMPLATE_DROP, _TEMPLATE_WORDS),
        "tiny-qwen-image-edit": Builtin(
            "QwenImageEditPipeline",
            EDIT_PROMPT_TEMPLATE,
            EDIT_PROMPT_TEMPLATE_DROP,
            _TEMPLATE_WORDS + _EDIT_TEMPLATE_WORDS,
            _IMAGE_PROCESSOR,
        ),
    }
)
BUILTIN_NAMES = tuple(BUILTINS)

#: Qwen/Qwen-Image's architecture, for GPU benchmarks with random weights: the 20.4B
#: QwenImageTransformer2DModel, Qwen2.5-VL-7B-Instruct (8.3B, its vision tower included) as text
#: encoder, AutoencoderKLQwenImage and the scheduler of the real checkpoint's config files.
#: The tokenizer stays the built-ins' (the real 151k-token BPE vocabulary cannot be built here): the
#: vocabulary size, so the embedding, is the real 152064, and prompts of prompt-like words come out
#: about as many tokens as with the real tokenizer.
FULL = MappingProxyType(
    {
        "transformer": dict(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=60,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=3584,
            guidance_embeds=False,
            axes_dims_rope=(16, 56, 56),
        ),
        # latents_mean / latents_std: AutoencoderKLQwenImage's defaults are Qwen-Image's.
        "vae": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                    temperal_downsample=[False, True, True], dropout=0.0),
        "scheduler": TINY["scheduler"],
        "text_encoder": {
            "text_config": dict(
                vocab_size=152064,
                hidden_size=3584,
                intermediate_size=18944,
                num_hidden_layers=28,
                num_attention_heads=28,
                num_key_value_heads=4,
                max_position_embeddings=128000,
                rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                tie_word_embeddings=False,
            ),
            "vision_config": dict(
                depth=32,
                hidden_size=1280,
                intermediate_size=3420,
                num_heads=16,
                out_hidden_size=3584,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=112,
                fullatt_block_indexes=[7, 15, 23, 31],
                hidden_act="silu",
                in_channels=3,
                tokens_per_second=2,
            ),
        },
    }
)

#: Everything ``build_checkpoint`` builds: the built-ins, and ``qwen-image`` (full size, never built
#: implicitly: ``python -m ditserve.checkpoints build --preset qwen-image --out DIR --dtype bfloat16
#: --device cuda``, about 54 GiB).
PRESETS: Mapping[str, tuple[Builtin, Mapping[str, Any]]] = MappingProxyType(
    {**{name: (builtin, TINY) for name, builtin in BUILTINS.items()}, "qwen-image": (BUILTINS["tiny-qwen-image"], FULL)}
)


def version_tag(seed: int = 0, name: str = "tiny-qwen-image") -> str:
    return content_tag(
        FORMAT_VERSION,
        {"configs": TINY, "seed": seed, "words": _WORDS, "special": SPECIAL_TOKENS, "builtin": vars(BUILTINS[name])},
    )


# --- tokenizer ---------------------------------------------------------------------------------


def build_tokenizer(template_words: tuple[str, ...] = _TEMPLATE_WORDS):
    """A Qwen2 byte-level BPE tokenizer: the 256 byte symbols, merges for prompt and template words
    with and without the leading-space marker ``Ġ``, then the chat and vision special tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    alphabet = _bytes_to_unicode()
    vocab: dict[str, int] = {c: i for i, c in enumerate(alphabet)}
    words = [*dict.fromkeys((*_WORDS, *template_words))]
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


def template_prefix(builtin: Builtin) -> str:
    """The part of the template that the pipeline drops: up to the user turn (the image placeholder,
    expanded to many tokens by the processor, comes after it)."""
    head = builtin.template.split("{}")[0]
    return head[: head.index("<|im_start|>user\n") + len("<|im_start|>user\n")]


def pipeline_parts(name: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(pipeline class name, its non-model arguments, model name -> constructor) of preset ``name``."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    builtin, configs = PRESETS[name]
    tokenizer = build_tokenizer(builtin.template_words)
    prefix_tokens = len(tokenizer(template_prefix(builtin)).input_ids)
    if prefix_tokens != builtin.template_drop:
        raise AssertionError(f"template prefix is {prefix_tokens} tokens, {builtin.pipeline} drops {builtin.template_drop}")
    check_vocab_size(tokenizer, configs["text_encoder"]["text_config"]["vocab_size"], "text_encoder")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_config = {
        **configs["text_encoder"]["text_config"],
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=dict(configs["text_encoder"]["vision_config"]),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    models = {  # built in this order: the seeds follow it
        "text_encoder": lambda: Qwen2_5_VLForConditionalGeneration(config),
        "transformer": lambda: QwenImageTransformer2DModel(**configs["transformer"]),
        "vae": lambda: AutoencoderKLQwenImage(**configs["vae"]),
    }
    parts: dict[str, Any] = {
        "scheduler": FlowMatchEulerDiscreteScheduler(**configs["scheduler"]),
        "tokenizer": tokenizer,
        **({"processor": None} if builtin.image_processor is not None else {}),  # written by build_checkpoint
    }
    return builtin.pipeline, parts, models


def builtin_dir(name: str) -> Path:
    if name not in BUILTIN_NAMES:
        raise ValueError(f"{name!r} is not a Qwen-Image built-in ({', '.join(BUILTIN_NAMES)})")
    return builtin_path(name, version_tag(name=name))


def _processor_writer(builtin: Builtin):
    """``finish`` of ``build_by_component`` for the Edit built-ins: ``processor/`` as
    ``Qwen2VLProcessor.save_pretrained`` lays it out (the image processor's preprocessor_config.json,
    which the video processor falls back to, and the tokenizer files), named in model_index.json."""

    def write(tmp: Path, parts: Mapping[str, Any]) -> None:
        from transformers import Qwen2VLImageProcessor

        Qwen2VLImageProcessor(**builtin.image_processor).save_pretrained(tmp / "processor")
        parts["tokenizer"].save_pretrained(tmp / "processor")
        index_file = tmp / "model_index.json"
        index = json.loads(index_file.read_text())
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    return write


def build_checkpoint(
    out_dir: str | os.PathLike,
    seed: int = 0,
    name: str = "tiny-qwen-image",
    **build: Any,
) -> Path:
    """Build preset ``name`` into ``out_dir`` (``ditserve.checkpoints.build_by_component``: atomically; a
    complete one there is returned; ``build`` as there)."""
    builtin = PRESETS[name][0]
    finish = _processor_writer(builtin) if builtin.image_processor is not None else None
    return build_by_component(name, out_dir, lambda: pipeline_parts(name), seed=seed, finish=finish, **build)


def ensure_builtin(name: str) -> Path:
    """Hook for ``ditserve.checkpoints.resolve_model_path``: the built directory of ``name``."""
    return build_checkpoint(builtin_dir(name), name=name)
