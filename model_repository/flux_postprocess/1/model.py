from ditserve.postprocess import Postprocess
from ditserve.triton_model import triton_model

TritonPythonModel = triton_model(Postprocess)
