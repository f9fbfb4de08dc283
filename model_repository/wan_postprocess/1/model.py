from ditserve.wan.postprocess import VideoPostprocess
from ditserve.triton_model import triton_model

TritonPythonModel = triton_model(VideoPostprocess)
