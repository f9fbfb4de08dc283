from ditserve.flux.text_encoder import FluxTextEncoder
from ditserve.triton_model import triton_model

TritonPythonModel = triton_model(FluxTextEncoder)
