"""Clients for ditserve's Triton ensembles (``ditserve.client``).

Names are imported on first use (PEP 562): the request table pulls in the serving code's
limits (torch, diffusers), and ``ditserve serve`` imports ``ditserve.client.cli`` only to
build its parser.
"""

import importlib

_EXPORTS = {
    "PIPELINES": "ditserve.client.pipelines",
    "Pipeline": "ditserve.client.pipelines",
    "AsyncClient": "ditserve.client.triton",
    "Client": "ditserve.client.triton",
    "GenerateResult": "ditserve.client.triton",
    "ModelNotLoaded": "ditserve.client.triton",
    "Progress": "ditserve.client.triton",
    "TritonTimeout": "ditserve.client.triton",
    "TritonUnavailable": "ditserve.client.triton",
    "VideoResult": "ditserve.client.triton",
    "RequestError": "ditserve.stage",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
