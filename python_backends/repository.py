"""Model-repository overlays: ``ditserve serve --set flux_denoiser.sp_degree=2``.

Triton reads model parameters from each model's config.pbtxt. Rather than editing the checked-in
repository to turn on, say, sequence parallelism, ``overlay`` copies the repository (configs and
the two-line model.py files: kilobytes) and rewrites the named parameters in the copy. Only parameters
that the model's config.pbtxt declares can be set: every parameter a model reads is declared in the
shipped configs, so any other name is a typo that would otherwise be ignored.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from ditserve.model_config import config_parameters, read_config


def parse_setting(text: str) -> tuple[str, str, str]:
    """'MODEL.PARAM=VALUE' -> (model, param, value)."""
    match = re.fullmatch(r"([\w-]+)\.(\w+)=(.*)", text.strip(), re.DOTALL)
    if not match:
        raise ValueError(f"--set {text!r}: expected MODEL.PARAMETER=VALUE, e.g. flux_denoiser.sp_degree=2")
    return match.group(1), match.group(2), match.group(3)


def quote(value: str) -> str:
    """``value`` as a protobuf text-format string literal, which Triton and ``text_format`` read back as
    exactly ``value``: backslashes and quotes escaped (``C:\\models`` written raw would be read as an escape
    sequence, or be none), and control characters as octal escapes; other characters stay as UTF-8."""
    escaped = []
    for char in value:
        if char in '\\"':
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\{ord(char):03o}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def set_parameter(config: str, key: str, value: str) -> str:
    """config.pbtxt text with its parameter ``key`` set to the string ``value``; ValueError when no line
    ``parameters: { key: "KEY" value: { string_value: "..." } }`` declares it."""
    line = f'parameters: {{ key: "{key}" value: {{ string_value: {quote(value)} }} }}'
    pattern = re.compile(r'^parameters:\s*\{\s*key:\s*"' + re.escape(key)
                         + r'"\s*value:\s*\{\s*string_value:\s*"(?:[^"\\\n]|\\.)*"\s*\}\s*\}\s*$', re.MULTILINE)
    if not pattern.search(config):
        raise ValueError(f"--set: parameter {key!r} is not declared on one line of the form "
                         f"'parameters: {{ key: \"{key}\" value: {{ string_value: \"...\" }} }}', which --set rewrites")
    return pattern.sub(lambda _match: line, config, count=1)


def overlay(source: Path, settings: Iterable[str], dest: Path) -> Path:
    """Copy repository ``source`` to ``dest`` with ``settings`` ('MODEL.PARAM=VALUE') applied."""
    parsed = [parse_setting(s) for s in settings]
    configs: dict[str, str] = {}  # model -> its config.pbtxt with the settings applied: all checked before the copy
    for model, key, value in parsed:
        if not (source / model / "config.pbtxt").is_file():
            raise ValueError(f"--set: no model {model!r} in {source}")
        declared = config_parameters(read_config(source, model))
        if key not in declared:
            raise ValueError(f"--set {model}.{key}: {model}'s config.pbtxt declares no parameter {key!r}; it declares: "
                             f"{', '.join(sorted(declared)) or 'none'}")
        configs[model] = set_parameter(configs.get(model) or (source / model / "config.pbtxt").read_text(), key, value)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__"), symlinks=True)
    for model, text in configs.items():
        (dest / model / "config.pbtxt").write_text(text)
    return dest
