from ditserve.qwen_image.denoiser import QwenImageDenoiser
from ditserve.triton_model import triton_model

TritonPythonModel = triton_model(QwenImageDenoiser)
