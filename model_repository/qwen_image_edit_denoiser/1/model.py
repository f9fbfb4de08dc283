from ditserve.qwen_image.denoiser import QwenImageEditDenoiser
from ditserve.triton_model import triton_model

TritonPythonModel = triton_model(QwenImageEditDenoiser)
