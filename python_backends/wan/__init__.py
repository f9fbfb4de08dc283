"""Wan text-to-video (UMT5 prompt encoder, WanTransformer3DModel, one or two experts, Wan VAE, MP4)."""


def __getattr__(name: str):
    # The stage list imports torch, diffusers and transformers; import it only when asked for.
    if name == "WAN_T2V":
        from ditserve.wan.t2v import WAN_T2V

        return WAN_T2V
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
