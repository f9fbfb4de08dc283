"""Reading Triton model configurations, without torch.

Imported by the stage adapter and by the streaming models (``ditserve.streaming``), which run in
their own Triton stub processes and must not pay for importing torch (seconds and hundreds of MB per
process) just to read a configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad model parameter or configuration, found while the model loads."""


def config_parameters(config: dict[str, Any]) -> dict[str, str]:
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


def read_config(repository: str | Path, model: str) -> dict[str, Any]:
    """``<repository>/<model>/config.pbtxt`` as a dict, with the field names of the protobuf (as
    Triton's ``model_config`` JSON has them; int64 values such as dims are strings)."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    path = Path(repository) / model / "config.pbtxt"
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read the configuration of model {model}: {error}") from None
    message = text_format.Parse(text, model_config_pb2.ModelConfig())
    return json_format.MessageToDict(message, preserving_proto_field_name=True)
