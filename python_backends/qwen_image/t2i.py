"""qwen_image_t2i: the Qwen-Image text-to-image stage list (model_repository/qwen_image_t2i is its ensemble)."""

from ditserve.pipeline import PipelineSpec, StageSpec
from ditserve.postprocess import Postprocess
from ditserve.qwen_image.denoiser import QwenImageDenoiser
from ditserve.qwen_image.request import QwenImageRequestCheck
from ditserve.qwen_image.text_encoder import QwenImageTextEncoder
from ditserve.qwen_image.vae import QwenImageVaeDecoder

QWEN_IMAGE_T2I = PipelineSpec(
    "qwen_image_t2i",
    (
        StageSpec("qwen_image_request", QwenImageRequestCheck),
        StageSpec("qwen_image_text_encoder", QwenImageTextEncoder),
        StageSpec("qwen_image_denoiser", QwenImageDenoiser),
        StageSpec("qwen_image_vae_decoder", QwenImageVaeDecoder),
        StageSpec("flux_postprocess", Postprocess),  # the same stage: one shared Triton model
    ),
)
