"""Qwen-Image text-to-image (Qwen2.5-VL prompt encoder, QwenImageTransformer2DModel, Qwen-Image VAE)."""


def __getattr__(name: str):
    # The stage list imports torch, diffusers and transformers; import it only when asked for.
    if name == "QWEN_IMAGE_T2I":
        from ditserve.qwen_image.t2i import QWEN_IMAGE_T2I

        return QWEN_IMAGE_T2I
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
