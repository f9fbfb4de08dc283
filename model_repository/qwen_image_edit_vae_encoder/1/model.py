from ditserve.qwen_image.vae import QwenImageVaeEncoder
from ditserve.triton_model import triton_model

TritonPythonModel = triton_model(QwenImageVaeEncoder)
