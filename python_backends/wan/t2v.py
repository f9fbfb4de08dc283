"""wan_t2v: the Wan text-to-video stage list (model_repository/wan_t2v is its ensemble)."""

from ditserve.pipeline import PipelineSpec, StageSpec
from ditserve.wan.denoiser import WanDenoiser
from ditserve.wan.postprocess import VideoPostprocess
from ditserve.wan.request import WanRequestCheck
from ditserve.wan.text_encoder import WanTextEncoder
from ditserve.wan.vae import WanVaeDecoder

WAN_T2V = PipelineSpec(
    "wan_t2v",
    (
        StageSpec("wan_request", WanRequestCheck),
        StageSpec("wan_text_encoder", WanTextEncoder),
        StageSpec("wan_denoiser", WanDenoiser),
        StageSpec("wan_vae_decoder", WanVaeDecoder),
        StageSpec("wan_postprocess", VideoPostprocess),
    ),
)
