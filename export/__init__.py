"""ONNX and TensorRT export of pipeline stages (`ditserve.export`).

Nothing is exported yet: every stage runs on the Python backend, and no issue has asked for an export so far.
TensorRT engines cannot be built or run on the machines this project is developed on (no GPU
there, and TensorRT's engines are built for the GPU that runs them), only ONNX could be checked.
"""
