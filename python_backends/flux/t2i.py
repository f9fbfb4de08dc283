"""flux_t2i: the FLUX.1 text-to-image stage list (model_repository/flux_t2i is its ensemble)."""

from ditserve.flux.denoiser import FluxDenoiser
from ditserve.flux.request import FluxRequestCheck
from ditserve.flux.text_encoder import FluxTextEncoder
from ditserve.flux.vae import FluxVaeDecoder
from ditserve.pipeline import PipelineSpec, StageSpec
from ditserve.postprocess import Postprocess

FLUX_T2I = PipelineSpec(
    "flux_t2i",
    (
        StageSpec("flux_request", FluxRequestCheck),
        StageSpec("flux_text_encoder", FluxTextEncoder),
        StageSpec("flux_denoiser", FluxDenoiser),
        StageSpec("flux_vae_decoder", FluxVaeDecoder),
        StageSpec("flux_postprocess", Postprocess),
    ),
)
