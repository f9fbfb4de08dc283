from ditserve.qwen_image.request import QwenImageRequestCheck
from ditserve.triton_model import triton_model

TritonPythonModel = triton_model(QwenImageRequestCheck)
