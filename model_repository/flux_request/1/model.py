from ditserve.flux.request import FluxRequestCheck
from ditserve.triton_model import triton_model

TritonPythonModel = triton_model(FluxRequestCheck)
