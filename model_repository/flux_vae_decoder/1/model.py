from ditserve.flux.vae import FluxVaeDecoder
from ditserve.triton_model import triton_model

TritonPythonModel = triton_model(FluxVaeDecoder)
