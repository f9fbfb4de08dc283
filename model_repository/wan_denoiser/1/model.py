from ditserve.wan.denoiser import WanDenoiser
from ditserve.triton_model import triton_model

TritonPythonModel = triton_model(WanDenoiser)
