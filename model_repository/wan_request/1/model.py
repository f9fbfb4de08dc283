from ditserve.wan.request import WanRequestCheck
from ditserve.triton_model import triton_model

TritonPythonModel = triton_model(WanRequestCheck)
