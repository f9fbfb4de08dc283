from ditserve.qwen_image.text_encoder import QwenImageEditTextEncoder
from ditserve.triton_model import triton_model

TritonPythonModel = triton_model(QwenImageEditTextEncoder)
