"""Qwen-Image text-to-image and Qwen-Image-Edit (Qwen2.5-VL prompt encoder, QwenImageTransformer2DModel, Qwen-Image VAE)."""


def __getattr__(name: str):
    # The stage lists import torch, diffusers and transformers; import them only when asked for.
    if name == "QWEN_IMAGE_T2I":
        from ditserve.qwen_image.t2i import QWEN_IMAGE_T2I

        return QWEN_IMAGE_T2I
    if name == "QWEN_IMAGE_EDIT":
        from ditserve.qwen_image.edit import QWEN_IMAGE_EDIT

        return QWEN_IMAGE_EDIT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
