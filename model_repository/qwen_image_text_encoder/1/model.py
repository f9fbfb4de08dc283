from ditserve.qwen_image.text_encoder import QwenImageTextEncoder
from ditserve.triton_model import triton_model

TritonPythonModel = triton_model(QwenImageTextEncoder)
