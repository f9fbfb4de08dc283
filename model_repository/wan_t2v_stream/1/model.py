from ditserve.streaming import TritonStreamModel

TritonPythonModel = TritonStreamModel
