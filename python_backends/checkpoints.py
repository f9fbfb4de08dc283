"""Random-weight FLUX.1 checkpoints in diffusers format, built deterministically, and model-path specs.

A model-path spec is either a directory holding a diffusers pipeline (``model_index.json`` plus one
sub-folder per component) or the name of a built-in checkpoint:

* ``tiny``          -- a tiny FLUX.1-dev-style pipeline (guidance embedding on), random weights.
* ``tiny-schnell``  -- the same without guidance embedding (FLUX.1-schnell style).

Built-ins are created on first use under ``$DITSERVE_CACHE/checkpoints/<name>-<tag>`` (the cache
defaults to ``~/.cache/ditserve``) and are then loaded exactly like a real checkpoint, i.e. with
``FluxPipeline.from_pretrained(path)``. ``<tag>`` is ``v<FORMAT_VERSION>-<hash of the preset>``, so
changing a preset or the build recipe gives a new directory instead of a stale hit. Several Triton
model instances (separate processes) may resolve the same built-in at once: the build runs under an
``fcntl`` lock into a temporary sibling directory that is renamed into place when complete, so a
directory that exists under its final name is always complete.

The full-size presets ``flux.1-dev`` and ``flux.1-schnell`` have the real architectures (about 12B
transformer parameters) with random weights, for GPU benchmarks. They go through the same builder;
build them on the GPU with the CLI::

    python -m ditserve.checkpoints build --preset flux.1-dev --out DIR --dtype bfloat16 --device cuda [--seed 0]
    python -m ditserve.checkpoints resolve tiny     # prints the directory (building it if needed)
    python -m ditserve.checkpoints list

The Qwen-Image and Wan checkpoints (built-ins ``OTHER_BUILTINS`` and full-size ``OTHER_PRESETS``:
``qwen-image``, ``wan2.1-t2v-14b``, ``wan2.1-t2v-1.3b``) are built by their own modules through
``save_by_component``, one model at a time, so only the largest model must fit the device::

    python -m ditserve.checkpoints build --preset qwen-image --out DIR --dtype bfloat16 --device cuda
    python -m ditserve.checkpoints build --preset wan2.1-t2v-1.3b --out DIR2 --dtype bfloat16 --device cuda --link-from DIR_14B

Determinism: the same preset, seed, dtype and device give byte-identical safetensors files, across
processes. Every parameter is overwritten from a generator seeded per component (see
``reinit_parameters``), so the library's own init (some of which is zero, e.g. FLUX's final
adaLN/projection) plays no part and the pipeline's output depends on both the prompt and the seed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Collection, Iterator, Mapping

logger = logging.getLogger(__name__)

#: Bump when the build recipe changes in a way that changes the files (invalidates cached built-ins).
FORMAT_VERSION = 1

#: Built-in names that :func:`resolve_model_path` builds on demand (small enough for any CPU).
BUILTIN_MODELS = ("tiny", "tiny-schnell")

CACHE_ENV = "DITSERVE_CACHE"
DEFAULT_CACHE = "~/.cache/ditserve"

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512


# --------------------------------------------------------------------------------------------------
# Presets: data only. An architecture (sizes of every component) times a variant (dev / schnell).
# Field names are those of the diffusers / transformers config classes, as in FLUX.1's config files.
# --------------------------------------------------------------------------------------------------


def _frozen(**kwargs: Any) -> Mapping[str, Any]:
    return MappingProxyType(dict(kwargs))


@dataclass(frozen=True, eq=False)
class FluxArch:
    """Sizes of every component; ``guidance_embeds`` and the scheduler come from the variant."""

    transformer: Mapping[str, Any]  # FluxTransformer2DModel kwargs
    text_encoder: Mapping[str, Any]  # CLIPTextConfig kwargs (CLIPTextModel)
    text_encoder_2: Mapping[str, Any]  # T5Config kwargs (T5EncoderModel)
    vae: Mapping[str, Any]  # AutoencoderKL kwargs


@dataclass(frozen=True, eq=False)
class FluxVariant:
    guidance_embeds: bool
    scheduler: Mapping[str, Any]  # FlowMatchEulerDiscreteScheduler kwargs


@dataclass(frozen=True, eq=False)
class FluxPreset:
    name: str
    arch: FluxArch
    variant: FluxVariant
    description: str = ""

    def configs(self) -> dict[str, dict[str, Any]]:
        """Plain-dict configs of every component, as passed to the constructors."""
        return {
            "transformer": {**self.arch.transformer, "guidance_embeds": self.variant.guidance_embeds},
            "text_encoder": dict(self.arch.text_encoder),
            "text_encoder_2": dict(self.arch.text_encoder_2),
            "vae": dict(self.arch.vae),
            "scheduler": dict(self.variant.scheduler),
        }

    def version_tag(self, seed: int = 0) -> str:
        """``v<FORMAT_VERSION>-<10 hex digits of the configs, seed and tokenizer recipe>``."""
        return content_tag(FORMAT_VERSION, {"configs": self.configs(), "seed": seed, "tokenizer_words": _WORDS})


def content_tag(format_version: int, payload: Mapping[str, Any]) -> str:
    """``v<format_version>-<10 hex digits of the sha256 of payload as sorted JSON>``: the suffix of a
    built-in's cache directory, so that a change to what ``payload`` holds (configs, seed, tokenizer
    recipe) gives a new directory instead of a stale hit. Mappings (``MappingProxyType``, a
    dataclass's ``vars``) serialise as dicts."""
    text = json.dumps(payload, sort_keys=True, default=dict)
    return f"v{format_version}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


_VAE_BLOCKS = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,  # 4 blocks: vae_scale_factor 2**3 = 8, as FLUX
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=16,
    act_fn="silu",
    mid_block_add_attention=True,
    force_upcast=True,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

_CLIP_COMMON = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, max_position_embeddings=CLIP_MAX_LENGTH)

_T5_COMMON = dict(
    feed_forward_proj="gated-gelu",  # T5 v1.1: gated GELU ("gelu_new"), as FLUX's T5-XXL encoder
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)

TINY_ARCH = FluxArch(
    transformer=_frozen(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # = text_encoder_2 d_model
        pooled_projection_dim=32,  # = text_encoder hidden_size
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    ),
    text_encoder=_frozen(
        vocab_size=2048,  # >= len(tiny CLIP tokenizer), checked at build time
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
        **_CLIP_COMMON,
    ),
    text_encoder_2=_frozen(
        vocab_size=1024,  # >= len(T5 tokenizer), checked at build time
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        **_T5_COMMON,
    ),
    vae=_frozen(
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
        **_VAE_BLOCKS,
    ),
)

FULL_ARCH = FluxArch(  # FLUX.1-dev / FLUX.1-schnell
    transformer=_frozen(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        axes_dims_rope=(16, 56, 56),
    ),
    text_encoder=_frozen(  # CLIP ViT-L/14 text tower
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        projection_dim=768,
        **_CLIP_COMMON,
    ),
    text_encoder_2=_frozen(  # T5 v1.1 XXL encoder
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        **_T5_COMMON,
    ),
    vae=_frozen(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=1024,
        **_VAE_BLOCKS,
    ),
)

_FLOW_MATCH = dict(
    num_train_timesteps=1000, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
)

DEV = FluxVariant(  # FLUX.1-dev: guidance-distilled, resolution-dependent timestep shift
    guidance_embeds=True,
    scheduler=_frozen(shift=3.0, use_dynamic_shifting=True, **_FLOW_MATCH),
)
SCHNELL = FluxVariant(  # FLUX.1-schnell: no guidance embedding, fixed shift 1.0 (its scheduler_config.json)
    guidance_embeds=False,
    scheduler=_frozen(shift=1.0, use_dynamic_shifting=False, **_FLOW_MATCH),
)

PRESETS: Mapping[str, FluxPreset] = MappingProxyType(
    {
        p.name: p
        for p in (
            FluxPreset("tiny", TINY_ARCH, DEV, "tiny FLUX.1-dev-style pipeline (guidance embedding), CPU-sized"),
            FluxPreset("tiny-schnell", TINY_ARCH, SCHNELL, "tiny FLUX.1-schnell-style pipeline, CPU-sized"),
            FluxPreset("flux.1-dev", FULL_ARCH, DEV, "FLUX.1-dev architecture (~12B transformer), random weights"),
            FluxPreset("flux.1-schnell", FULL_ARCH, SCHNELL, "FLUX.1-schnell architecture, random weights"),
        )
    }
)


def get_preset(name: str) -> FluxPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown checkpoint preset {name!r}; known presets: {', '.join(PRESETS)}") from None


# --------------------------------------------------------------------------------------------------
# Tokenizers, built locally and deterministically (no hub downloads).
# The full-size presets reuse these same tokenizers: the real CLIP-L / T5 vocabularies cannot be
# downloaded here. Every id they produce is far below the real vocab sizes (49408 / 32128), so the
# full-size embedding tables accept them; only the text -> id mapping differs from the real models.
# --------------------------------------------------------------------------------------------------

# A fixed word list (prompt-like English). Changing it changes every built-in's version tag.
_WORDS = tuple(
    """
    a an the of in on at with and or to from by for under over above below behind near into
    is are was be this that it its his her their my your our one two three four five many some
    photo photograph picture image painting drawing illustration render sketch portrait landscape
    cat cats dog dogs bird birds horse fish lion tiger bear fox wolf rabbit owl cow sheep dragon
    man woman men women boy girl child children person people astronaut robot knight wizard king queen
    house houses castle city street road bridge tower tree trees forest flower flowers garden field
    mountain mountains river lake sea ocean beach island desert snow rain cloud clouds sky sun moon
    star stars night day morning evening sunset sunrise light shadow fire water ice stone wood metal
    glass gold silver red orange yellow green blue purple pink white black gray grey brown dark bright
    colorful big small large tiny tall old new young beautiful cute happy sad futuristic ancient modern
    detailed highly realistic photorealistic cinematic dramatic soft sharp high quality resolution style
    art artwork digital oil watercolor anime cartoon studio lighting background foreground close view
    wide angle lens camera shot focus bokeh depth hdr 4k 8k masterpiece trending sitting standing
    running flying walking holding wearing looking playing reading eating sleeping smiling hat sign
    says hello world table chair window door room car cars train boat ship plane space planet galaxy
    """.split()
)


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: the 256 byte values as printable characters, in id order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def _learn_bpe_merges(words, end_of_word: str = "") -> list[tuple[str, str]]:
    """Plain BPE on ``words`` (each counted once; ``end_of_word`` appended to the last symbol, as
    CLIP's ``</w>``) until every word is one symbol. Ties go to the lexicographically smallest
    pair, so the result is fixed."""
    seqs = [[*w[:-1], w[-1] + end_of_word] for w in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for s in seqs:
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for i, s in enumerate(seqs):
            out, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == best:
                    out.append(joined)
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            seqs[i] = out


def build_clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH):
    """Byte-level BPE tokenizer in CLIP's layout: 256 byte symbols, the same with ``</w>``, the merge
    results, then ``<|startoftext|>`` and ``<|endoftext|>`` (also pad and unk, as in FLUX's CLIP)."""
    from transformers import CLIPTokenizer

    alphabet = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for sym in [*alphabet, *(c + "</w>" for c in alphabet)]:
        vocab[sym] = len(vocab)
    merges = _learn_bpe_merges(_WORDS, end_of_word="</w>")
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def build_t5_tokenizer(model_max_length: int = T5_MAX_LENGTH):
    """Unigram (SentencePiece-style) tokenizer in T5's layout: ``<pad>``=0, ``</s>``=1, ``<unk>``=2,
    then whole words with the ``▁`` word-start marker, bare words (for word continuations), and
    single characters with and without ``▁`` so any ASCII text is covered."""
    from transformers import T5TokenizerFast  # in transformers 5 this is the tokenizers-backed T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    seen = {p for p, _ in pieces}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    words = tuple(dict.fromkeys(_WORDS))
    for rank, w in enumerate(words):  # earlier words slightly more likely: a fixed, total order
        add("▁" + w, -6.0 - rank * 1e-3)
    for rank, w in enumerate(words):
        add(w, -8.0 - rank * 1e-3)
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()[]{}-_/\\&%$#@*+=<>|~`^"
    for c in chars:
        add("▁" + c, -11.0)
    for c in chars:
        add(c, -12.0)
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------

_DTYPES = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16",
}


def _as_dtype(dtype: Any):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, _DTYPES[str(dtype).lower()])
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of float32, bfloat16, float16") from None


@contextlib.contextmanager
def _default_dtype(dtype) -> Iterator[None]:
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def reinit_parameters(module, seed: int, component: str) -> None:
    """Overwrite every parameter from a generator seeded by (seed, component), on the parameters'
    own device (fast on a GPU): LeCun-normal weights (std 1/sqrt(fan_in): 0.01-0.02 at full size,
    0.06-0.18 at tiny size, which keeps activations O(1) through the stack instead of vanishing in
    the tiny models or blowing up in the big ones), biases N(0, 0.02), normalisation scales
    N(1, 0.02). Nothing stays zero (FLUX zero-inits its output adaLN/projection), so outputs depend
    on prompt and seed. Changing this recipe changes the files: bump FORMAT_VERSION."""
    import torch

    params = list(module.parameters())
    if not params or params[0].device.type == "meta":
        return
    gen = torch.Generator(device=params[0].device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(component.encode())) % (2**63))
    seen: set[int] = set()
    with torch.no_grad():
        for sub in module.modules():  # fixed order; tied parameters are filled once
            is_norm = "norm" in type(sub).__name__.lower()  # also Qwen-Image's and Wan's RMS_norm
            for pname, p in sub.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                # The Qwen-Image and Wan VAEs name their RMS-norm scales `gamma`, shaped (C, 1, 1[, 1]).
                if pname == "gamma" or (is_norm and pname == "weight" and p.ndim == 1):
                    p.normal_(1.0, 0.02, generator=gen)
                elif p.ndim >= 2:
                    p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
                else:
                    p.normal_(0.0, 0.02, generator=gen)


def check_vocab_size(tokenizer, vocab_size: int, component: str) -> None:
    """Every id of the locally built ``tokenizer`` must index the embedding of model ``component``."""
    if len(tokenizer) > vocab_size:
        raise AssertionError(f"{component}: tokenizer has {len(tokenizer)} tokens > model vocab_size {vocab_size}")


def build_pipeline_components(
    preset: str | FluxPreset, *, device: Any = "cpu", dtype: Any = "float32", seed: int = 0
) -> dict[str, Any]:
    """Instantiate every FluxPipeline component of ``preset`` directly on ``device`` in ``dtype``,
    seeded. With ``device="meta"`` nothing is allocated (used to check full-size parameter counts)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    preset = get_preset(preset) if isinstance(preset, str) else preset
    dtype = _as_dtype(dtype)
    cfg = preset.configs()
    tokenizer = build_clip_tokenizer(cfg["text_encoder"]["max_position_embeddings"])
    tokenizer_2 = build_t5_tokenizer()
    for tok, key in ((tokenizer, "text_encoder"), (tokenizer_2, "text_encoder_2")):
        check_vocab_size(tok, cfg[key]["vocab_size"], key)
    # CLIP pools at the first <|endoftext|>: give the model our tokenizer's special ids.
    clip_ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )

    constructors: dict[str, Callable[[], Any]] = {
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"], **clip_ids)),
        "text_encoder_2": lambda: T5EncoderModel(T5Config(**cfg["text_encoder_2"])),
        "transformer": lambda: FluxTransformer2DModel(**cfg["transformer"]),
        "vae": lambda: AutoencoderKL(**cfg["vae"]),
    }
    components: dict[str, Any] = {
        "scheduler": FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
    }
    for index, (name, make) in enumerate(constructors.items()):
        torch.manual_seed(seed * 1_000_003 + index)
        with torch.device(device), _default_dtype(dtype):
            model = make()
        reinit_parameters(model, seed, name)
        components[name] = model.eval().requires_grad_(False)
    return components


def build_checkpoint(
    preset: str | FluxPreset,
    out_dir: str | os.PathLike,
    *,
    device: Any = "cpu",
    dtype: Any = "float32",
    seed: int = 0,
    max_shard_size: str = "10GB",
    exist_ok: bool = False,
) -> Path:
    """Build ``preset`` with ``FluxPipeline(...).save_pretrained(out_dir, safe_serialization=True)``.

    ``out_dir`` must not exist or be empty (with ``exist_ok``, a complete checkpoint already there is
    returned as is). The files are written to a temporary sibling, under a lock, and renamed into
    place when complete. Returns the absolute ``out_dir``."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    out = Path(out_dir).expanduser().absolute()
    if exist_ok and (out / "model_index.json").is_file():
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"checkpoint output {str(out)!r} already exists and is not an empty directory")

    def write(tmp: Path) -> None:
        from diffusers import FluxPipeline

        logger.info("building checkpoint %r (seed %d, %s, %s) into %s", preset.name, seed, dtype, device, out)
        t0 = time.perf_counter()
        pipe = FluxPipeline(**build_pipeline_components(preset, device=device, dtype=dtype, seed=seed))
        pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        logger.info("built checkpoint %r in %.1fs", preset.name, time.perf_counter() - t0)

    return _build_atomically(out, write)


def _make_readable(root: Path) -> None:
    """mkdtemp and some writers create owner-only files; a cache may be shared with a server user."""
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, 0o755)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)


def _build_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` under an exclusive fcntl lock next to ``final`` and rename ``tmp`` to
    ``final``. Concurrent callers (other processes) wait for the lock and then find ``final`` built."""
    if (final / "model_index.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.parent / f".{final.name}.lock"
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if (final / "model_index.json").is_file():  # built by another process while we waited
                return final
            # Builders only run while holding this lock: any temp dir left over is from a crash.
            for stale in final.parent.glob(f".{final.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():
                if final.is_dir() and not any(final.iterdir()):
                    final.rmdir()
                else:
                    raise ValueError(f"{str(final)!r} exists but is not a complete checkpoint (no model_index.json)")
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
            try:
                build(tmp)
                _make_readable(tmp)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return final


# --------------------------------------------------------------------------------------------------
# Pipelines written one model component at a time (the Qwen-Image and Wan checkpoints, tiny and full size)
# --------------------------------------------------------------------------------------------------

#: Written next to model_index.json by ``save_by_component``: how each component's weights were made,
#: so that another build can hard-link identical components (``link_from``) and a bench can tell a
#: checkpoint with config-only components (``weights``) from a complete one.
BUILD_STAMP = "ditserve_build.json"


def _config_key(model) -> str:
    """sha256 of a model's class and config: equal keys, seed and dtype give equal weights."""
    config = model.config
    # transformers configs serialise themselves; diffusers models serialise their config
    text = config.to_json_string() if hasattr(config, "to_json_string") else model.to_json_string()
    return hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}\n{text}".encode()).hexdigest()


def _save_config(model, folder: Path) -> None:
    """A component's config.json alone (no weights)."""
    if hasattr(model, "save_config"):  # diffusers ModelMixin
        model.save_config(folder)
    else:  # transformers PreTrainedModel
        model.config.save_pretrained(folder)


def read_build_stamp(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``BUILD_STAMP`` of a checkpoint written by ``save_by_component``, or None."""
    stamp = Path(path) / BUILD_STAMP
    return json.loads(stamp.read_text()) if stamp.is_file() else None


def _link_tree(source: Path, dest: Path) -> None:
    """Hard-link every file of ``source`` into ``dest`` (symlinks across filesystems)."""
    dest.mkdir(parents=True, exist_ok=True)
    for file in sorted(source.iterdir()):
        try:
            os.link(file, dest / file.name)
        except OSError:
            os.symlink(file.resolve(), dest / file.name)


def save_by_component(
    out: Path,
    pipeline_class: type,
    parts: Mapping[str, Any],
    models: Mapping[str, Callable[[], Any]],
    *,
    device: Any = "cpu",
    dtype: Any = "float32",
    seed: int = 0,
    max_shard_size: str = "10GB",
    weights: Collection[str] | None = None,
    link_from: str | os.PathLike | None = None,
) -> None:
    """Write a diffusers pipeline into the existing empty directory ``out`` one model at a time.

    ``models`` (name -> constructor, in build order) are built directly on ``device`` in ``dtype``
    (no fp32 copy of a full-size model), seeded by ``(seed, index)`` and ``reinit_parameters(seed,
    name)``, saved as safetensors shards of ``max_shard_size`` and freed before the next, so the
    largest one alone must fit the device. ``parts`` are the pipeline's other constructor arguments
    (scheduler, tokenizer, None for an absent optional component, plain config values); they are
    saved as the pipeline saves them, and model_index.json is the pipeline's own.

    ``weights``: the models to write weights for (default all); the others get their config.json
    only (enough for stages that read a component's config), so such a checkpoint is not loadable
    as a whole. ``link_from``: a checkpoint written by this function; each of its components with
    the same class, config, seed, dtype and device type is hard-linked instead of built (the Wan
    1.3B preset next to the 14B: same text encoder and VAE). A directory without a build stamp, or
    a missing one, links nothing. Before writing, the weights' size is checked against the free
    space under ``out``."""
    import torch

    dtype = _as_dtype(dtype)
    device = torch.device(device)
    identity = {"seed": seed, "dtype": str(dtype).removeprefix("torch."), "device_type": device.type}
    # Each model on the meta device first (no memory): its size, its config key, model_index.json.
    metas = {}
    for name, make in models.items():
        with torch.device("meta"), _default_dtype(dtype):
            metas[name] = make()
    keys = {name: _config_key(model) for name, model in metas.items()}
    with_weights = [name for name in models if weights is None or name in weights]
    unknown = set(weights or ()) - set(models)
    if unknown:
        raise ValueError(f"weights: no model component {', '.join(sorted(unknown))}; components: {', '.join(models)}")

    linked: dict[str, Path] = {}
    source = read_build_stamp(link_from) if link_from is not None else None
    if link_from is not None and source is None:
        logger.info("link_from %s: no %s there, building every component", link_from, BUILD_STAMP)
    elif source is not None and {k: source.get(k) for k in identity} != identity:
        logger.info("link_from %s: built with %s, not %s: building every component", link_from,
                    {k: source.get(k) for k in identity}, identity)
    elif source is not None:
        for name in with_weights:
            entry = source["components"].get(name, {})
            if entry.get("weights") and entry.get("config_sha256") == keys[name]:
                linked[name] = Path(link_from) / name

    def size(model) -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters())

    needed = sum(size(metas[name]) for name in with_weights if name not in linked)
    free = shutil.disk_usage(out).free
    logger.info("writing %.1f GiB of weights (%s; %s linked), %.1f GiB free under %s", needed / 2**30,
                ", ".join(f"{n} {size(metas[n]) / 2**30:.1f} GiB" for n in with_weights), ", ".join(linked) or "none",
                free / 2**30, out.parent)
    if needed > free:
        raise ValueError(f"the checkpoint needs {needed / 2**30:.1f} GiB of weights, only {free / 2**30:.1f} GiB free "
                         f"under {out.parent}")

    for name, part in parts.items():
        if hasattr(part, "save_pretrained"):  # scheduler, tokenizer; the pipeline saves them the same way
            part.save_pretrained(out / name)
    components = {}
    for index, (name, make) in enumerate(models.items()):
        t0 = time.perf_counter()
        if name in linked:
            _link_tree(linked[name], out / name)
            how = f"linked from {linked[name]}"
        elif name in with_weights:
            torch.manual_seed(seed * 1_000_003 + index)
            with torch.device(device), _default_dtype(dtype):
                model = make()
            reinit_parameters(model, seed, name)
            model.save_pretrained(out / name, max_shard_size=max_shard_size)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            how = f"built on {device} and written"
        else:
            _save_config(metas[name], out / name)
            how = "config only"
        components[name] = {"config_sha256": keys[name], "weights": name in with_weights}
        logger.info("%s: %s in %.1fs", name, how, time.perf_counter() - t0)
    pipeline_class(**parts, **metas).save_config(out)  # model_index.json, as save_pretrained ends
    (out / BUILD_STAMP).write_text(json.dumps({**identity, "components": components}, indent=2, sort_keys=True) + "\n")


def build_by_component(
    name: str,
    out_dir: str | os.PathLike,
    pipeline_parts: Callable[[], tuple[str, dict[str, Any], dict[str, Callable[[], Any]]]],
    *,
    seed: int = 0,
    finish: Callable[[Path, Mapping[str, Any]], None] | None = None,
    **build: Any,
) -> Path:
    """Build checkpoint ``name`` into ``out_dir`` with ``save_by_component``, atomically under a lock
    (``_build_atomically``: a complete checkpoint already there is returned as is).

    ``pipeline_parts()``, called only when there is something to build: the diffusers pipeline class
    name, its non-model arguments and its model constructors. ``finish(tmp, arguments)`` writes what
    the pipeline does not save itself. ``build``: ``device``, ``dtype``, ``max_shard_size``,
    ``weights``, ``link_from`` of ``save_by_component`` (default: on the CPU in float32, as the
    built-ins)."""

    def write(tmp: Path) -> None:
        import diffusers

        t0 = time.perf_counter()
        pipeline, arguments, models = pipeline_parts()
        save_by_component(tmp, getattr(diffusers, pipeline), arguments, models, seed=seed, **build)
        if finish is not None:
            finish(tmp, arguments)
        logger.info("built %s in %.1fs", name, time.perf_counter() - t0)

    return _build_atomically(Path(out_dir).expanduser().absolute(), write)


# --------------------------------------------------------------------------------------------------
# Model-path specs
# --------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """``$DITSERVE_CACHE`` (default ``~/.cache/ditserve``)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser().absolute()


def builtin_path(name: str, tag: str) -> Path:
    """Where a built-in of any family lives in the cache: ``checkpoints/<name>-<tag>``."""
    return cache_root() / "checkpoints" / f"{name}-{tag}"


def builtin_checkpoint_dir(name: str) -> Path:
    """Where built-in ``name`` lives (whether or not it is built yet)."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"{name!r} is not a built-in model; built-ins: {', '.join(BUILTIN_MODELS)}")
    return builtin_path(name, get_preset(name).version_tag())


def ensure_builtin(name: str) -> Path:
    """Build built-in ``name`` into the cache unless it is already there; return its directory."""
    return build_checkpoint(name, builtin_checkpoint_dir(name), exist_ok=True)


# Built-ins of other model families, each built by its own module's ``ensure_builtin(name)``
# (imported only when the name is asked for). Not in BUILTIN_MODELS, which lists the FLUX presets.
OTHER_BUILTINS: Mapping[str, str] = MappingProxyType(
    {
        "tiny-qwen-image": "ditserve.qwen_image.checkpoint",
        "tiny-qwen-image-edit": "ditserve.qwen_image.checkpoint",
        "tiny-wan-t2v": "ditserve.wan.checkpoint",
        "tiny-wan2.2-t2v": "ditserve.wan.checkpoint",
        "tiny-wan-i2v": "ditserve.wan.checkpoint",
        "tiny-wan2.2-i2v": "ditserve.wan.checkpoint",
        "tiny-wan2.2-ti2v": "ditserve.wan.checkpoint",
    }
)


# Full-size presets of other model families (random weights, for GPU benchmarks): built only
# explicitly, by the CLI's ``build``, through the named module's ``build_checkpoint``.
OTHER_PRESETS: Mapping[str, str] = MappingProxyType(
    {
        "qwen-image": "ditserve.qwen_image.checkpoint",
        "wan2.1-t2v-14b": "ditserve.wan.checkpoint",
        "wan2.1-t2v-1.3b": "ditserve.wan.checkpoint",
    }
)


def _other_builtin(name: str) -> Path:
    import importlib

    return importlib.import_module(OTHER_BUILTINS[name]).ensure_builtin(name)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name


def _hub_snapshot(repo_id: str) -> Path | None:
    """The snapshot of a Hub repository in the local Hugging Face cache (HF_HUB_CACHE), or None. Nothing is
    downloaded: every stage model resolves the path in its own process when it loads, so a download there
    would run once per model, tens of GB each, inside Triton's model-load timeout."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """Resolve a model-path spec to a diffusers pipeline directory (absolute).

    ``spec`` is a built-in name (``tiny``, ``tiny-schnell``; built into the cache on first use), a
    directory containing ``model_index.json``, or a Hugging Face Hub repository id (``org/name``) whose
    snapshot is in the local Hugging Face cache, as diffusers' ``from_pretrained`` finds it offline.
    Built-in names win over a same-named relative directory; write ``./tiny`` to mean the directory.
    Raises ValueError naming the path otherwise.
    """
    text = os.fspath(spec).strip() if spec is not None else ""
    if not text:
        raise ValueError(f"empty model path; give a pipeline directory or one of: {', '.join(BUILTIN_MODELS)}")
    if text in BUILTIN_MODELS:
        return ensure_builtin(text)
    if text in OTHER_BUILTINS:
        return _other_builtin(text)
    path = Path(text).expanduser()
    if not path.exists() and HUB_ID.fullmatch(text):
        path = _hub_snapshot(text) or path
    if not path.exists():
        hint = ""
        if text in PRESETS or text in OTHER_PRESETS:
            hint = f"; full-size presets are built explicitly: python -m ditserve.checkpoints build --preset {text}"
            hint += " --out DIR --dtype bfloat16 --device cuda"
        elif HUB_ID.fullmatch(text):
            hint = (f"; as a Hugging Face repository id it is looked up in the local cache only, where it is not: "
                    f"download it first (hf download {text})")
        raise ValueError(
            f"model path {str(path)!r} does not exist and is not a built-in model ({', '.join(BUILTIN_MODELS)}){hint}"
        )
    if not path.is_dir():
        raise ValueError(f"model path {str(path)!r} is not a directory (expected a diffusers pipeline directory)")
    if not (path / "model_index.json").is_file():
        raise ValueError(f"model path {str(path)!r} is not a diffusers pipeline directory: it has no model_index.json")
    return path.absolute()


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ditserve.checkpoints", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a preset into a new directory")
    b.add_argument("--preset", required=True, choices=[*PRESETS, *OTHER_BUILTINS, *OTHER_PRESETS])
    b.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    b.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    b.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--max-shard-size", default="10GB", help="safetensors shard size (default 10GB)")
    # Qwen-Image and Wan presets (written one component at a time by save_by_component):
    b.add_argument("--link-from", default=None, metavar="DIR",
                   help="hard-link the components that DIR (built by this command) has with the same config, "
                        "seed, dtype and device type instead of building them; builds all if DIR has none")
    b.add_argument("--weights", default=None, metavar="NAMES",
                   help="comma-separated model components to write weights for (default all); "
                        "the others get their config only")
    r = sub.add_parser("resolve", help="print the directory of a model-path spec (builds built-ins)")
    r.add_argument("spec")
    sub.add_parser("list", help="list presets")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.command == "build":
        t0 = time.perf_counter()
        common = dict(device=args.device, dtype=args.dtype, seed=args.seed, max_shard_size=args.max_shard_size)
        if args.preset in PRESETS:
            if args.link_from or args.weights:
                parser.error(f"--link-from and --weights are for {', '.join([*OTHER_BUILTINS, *OTHER_PRESETS])}")
            out = build_checkpoint(args.preset, args.out, **common)
        else:
            import importlib

            module = importlib.import_module({**OTHER_BUILTINS, **OTHER_PRESETS}[args.preset])
            weights = None if args.weights is None else [w.strip() for w in args.weights.split(",") if w.strip()]
            out = module.build_checkpoint(name=args.preset, out_dir=args.out, weights=weights,
                                          link_from=args.link_from, **common)
        print(f"{out}  ({args.preset}, {args.dtype}, seed {args.seed}, {time.perf_counter() - t0:.1f}s)")
    elif args.command == "resolve":
        try:
            print(resolve_model_path(args.spec))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        for name, p in PRESETS.items():
            where = f"  -> {builtin_checkpoint_dir(name)}" if name in BUILTIN_MODELS else ""
            print(f"{name:16s} {p.description}{where}")
        for name, module in {**OTHER_BUILTINS, **OTHER_PRESETS}.items():
            print(f"{name:16s} {'built-in' if name in OTHER_BUILTINS else 'full size, random weights'} ({module})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
