from ditserve.wan.text_encoder import WanTextEncoder
from ditserve.triton_model import triton_model

TritonPythonModel = triton_model(WanTextEncoder)
