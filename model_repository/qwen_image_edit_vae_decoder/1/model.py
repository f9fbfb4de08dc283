from ditserve.qwen_image.vae import QwenImageVaeDecoder
from ditserve.triton_model import triton_model

TritonPythonModel = triton_model(QwenImageVaeDecoder)
