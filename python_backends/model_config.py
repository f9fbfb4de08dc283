"""Reading Triton model configurations, without torch.

Imported by the stage adapter and by the streaming models (``ditserve.streaming``), which run in
their own Triton stub processes and must not pay for importing torch (seconds and hundreds of MB per
process) just to read a configuration.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad model parameter or configuration, found while the model loads."""


#: The config.pbtxt parameters that Triton's Python backend itself reads, for every model.
PYTHON_BACKEND_PARAMETERS = ("FORCE_CPU_ONLY_INPUT_TENSORS", "EXECUTION_ENV_PATH")


def config_parameters(config: dict[str, Any]) -> dict[str, str]:
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


def check_parameter_names(model: str, params: Mapping[str, str], known: Iterable[str]) -> None:
    """ConfigError unless every parameter is one the model reads (``known``) or the Python backend's own: a
    mistyped name (``sp_degre``) would otherwise leave its parameter at the default without a word."""
    valid = {*known, *PYTHON_BACKEND_PARAMETERS}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise ConfigError(f"{model}: config.pbtxt parameter{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))} not read by this model; its parameters are: "
                          f"{', '.join(sorted(valid))}")


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
