from ditserve.wan.image_encoder import WanImageEncoder
from ditserve.triton_model import triton_model

TritonPythonModel = triton_model(WanImageEncoder)
