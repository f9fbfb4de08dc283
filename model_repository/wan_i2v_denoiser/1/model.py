from ditserve.wan.denoiser import WanImageDenoiser
from ditserve.triton_model import triton_model

TritonPythonModel = triton_model(WanImageDenoiser)
