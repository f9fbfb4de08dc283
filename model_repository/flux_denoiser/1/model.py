from ditserve.flux.denoiser import FluxDenoiser
from ditserve.triton_model import triton_model

TritonPythonModel = triton_model(FluxDenoiser)
