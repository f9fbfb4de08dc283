from ditserve.qwen_image.request import QwenImageEditRequestCheck
from ditserve.triton_model import triton_model

TritonPythonModel = triton_model(QwenImageEditRequestCheck)
