from ditserve.wan.vae import WanVaeDecoder
from ditserve.triton_model import triton_model

TritonPythonModel = triton_model(WanVaeDecoder)
