"""qwen_image_edit: the Qwen-Image-Edit stage list (model_repository/qwen_image_edit is its ensemble).

Qwen-Image's stages where the logic is the same (VAE decoding, post-processing) and their Edit
subclasses where it is not: the request check also decodes and resizes INPUT_IMAGE, the text encoder
sees the image, the denoiser takes the image latents that the VAE encoder makes.

These are ``QwenImageEditPipeline``'s semantics. Qwen-Image-Edit-2509 and -2511 checkpoints name
``QwenImageEditPlusPipeline`` (diffusers 0.42.1): up to several input images, a "Picture N:" prompt
template, the image seen by Qwen2.5-VL at about 384x384 pixels and by the VAE at about 1024x1024. That
pipeline is not implemented here, and the denoiser refuses such a checkpoint at load. The 2511
transformer's config (``zero_cond_t``) runs in this denoiser, sequence-parallel included, as the
transformer handles it (tests put it into the tiny Edit checkpoint).
"""

from ditserve.pipeline import PipelineSpec, StageSpec
from ditserve.postprocess import Postprocess
from ditserve.qwen_image.denoiser import QwenImageEditDenoiser
from ditserve.qwen_image.request import QwenImageEditRequestCheck
from ditserve.qwen_image.text_encoder import QwenImageEditTextEncoder
from ditserve.qwen_image.vae import QwenImageVaeDecoder, QwenImageVaeEncoder

QWEN_IMAGE_EDIT = PipelineSpec(
    "qwen_image_edit",
    (
        StageSpec("qwen_image_edit_request", QwenImageEditRequestCheck),
        StageSpec("qwen_image_edit_text_encoder", QwenImageEditTextEncoder),
        StageSpec("qwen_image_edit_vae_encoder", QwenImageVaeEncoder),
        StageSpec("qwen_image_edit_denoiser", QwenImageEditDenoiser),
        StageSpec("qwen_image_edit_vae_decoder", QwenImageVaeDecoder),
        StageSpec("flux_postprocess", Postprocess),  # the same stage: one shared Triton model
    ),
)
