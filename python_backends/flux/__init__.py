"""FLUX.1 text-to-image (FLUX.1-dev with guidance embedding, FLUX.1-schnell without)."""


def __getattr__(name: str):
    # The stage list imports torch, diffusers and transformers (7-10 s); the client and CLI
    # import only ditserve.flux.limits and should not pay for them.
    if name == "FLUX_T2I":
        from ditserve.flux.t2i import FLUX_T2I

        return FLUX_T2I
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
