from ditserve.wan.request import WanImageRequestCheck
from ditserve.triton_model import triton_model

TritonPythonModel = triton_model(WanImageRequestCheck)
