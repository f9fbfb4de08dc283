"""wan_i2v: the Wan image-to-video stage list (model_repository/wan_i2v is its ensemble).

wan_t2v's stages where the logic is the same (prompt encoding, VAE decoding, post-processing) and their
image-to-video subclasses where it is not: the request check also decodes and resizes IMAGE, the image
encoder makes the condition latents and the CLIP context, the denoiser takes them.
"""

from ditserve.pipeline import PipelineSpec, StageSpec
from ditserve.wan.denoiser import WanImageDenoiser
from ditserve.wan.image_encoder import WanImageEncoder
from ditserve.wan.postprocess import VideoPostprocess
from ditserve.wan.request import WanImageRequestCheck
from ditserve.wan.text_encoder import WanTextEncoder
from ditserve.wan.vae import WanVaeDecoder

WAN_I2V = PipelineSpec(
    "wan_i2v",
    (
        StageSpec("wan_i2v_request", WanImageRequestCheck),
        StageSpec("wan_i2v_text_encoder", WanTextEncoder),
        StageSpec("wan_i2v_image_encoder", WanImageEncoder),
        StageSpec("wan_i2v_denoiser", WanImageDenoiser),
        StageSpec("wan_i2v_vae_decoder", WanVaeDecoder),
        StageSpec("wan_postprocess", VideoPostprocess),  # the same stage: one shared Triton model
    ),
)
