"""Clients for ditserve's Triton ensembles (``ditserve.client``)."""

from ditserve.client.triton import Client, GenerateResult

__all__ = ["Client", "GenerateResult"]
