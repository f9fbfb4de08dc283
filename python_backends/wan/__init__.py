"""Wan text-to-video and image-to-video (UMT5 prompt encoder, CLIP image encoder, WanTransformer3DModel,
one or two experts, Wan VAE, MP4)."""

import importlib

_PIPELINES = {"WAN_T2V": "ditserve.wan.t2v", "WAN_I2V": "ditserve.wan.i2v"}


def __getattr__(name: str):
    # The stage lists import torch, diffusers and transformers; import them only when asked for.
    if name in _PIPELINES:
        return getattr(importlib.import_module(_PIPELINES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
