"""ONNX and TensorRT export of pipeline stages (`ditserve.export`).

Nothing is exported yet: see the open issues. TensorRT engines cannot be built or run on
the machines this project is developed on (shared/ENVIRONMENT.md), only ONNX can be checked.
"""
