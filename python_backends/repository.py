"""Model-repository overlays: ``ditserve serve --set flux_denoiser.sp_degree=2``.

Triton reads model parameters from each model's config.pbtxt. Rather than editing the checked-in
repository to turn on, say, sequence parallelism, ``overlay`` copies the repository (configs and
the two-line model.py files: kilobytes) and rewrites the named parameters in the copy.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from pathlib import Path


def parse_setting(text: str) -> tuple[str, str, str]:
    """'MODEL.PARAM=VALUE' -> (model, param, value)."""
    match = re.fullmatch(r"([\w-]+)\.(\w+)=(.*)", text.strip())
    if not match:
        raise ValueError(f"--set {text!r}: expected MODEL.PARAMETER=VALUE, e.g. flux_denoiser.sp_degree=2")
    return match.group(1), match.group(2), match.group(3)


def set_parameter(config: str, key: str, value: str) -> str:
    """config.pbtxt text with parameter ``key`` set to the string ``value`` (added if absent)."""
    line = f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
    pattern = re.compile(r'^parameters:\s*\{\s*key:\s*"' + re.escape(key) + r'"\s*value:\s*\{\s*string_value:\s*"[^"]*"\s*\}\s*\}\s*$',
                         re.MULTILINE)
    if pattern.search(config):
        return pattern.sub(line.replace("\\", "\\\\"), config, count=1)
    return config.rstrip("\n") + "\n" + line + "\n"


def overlay(source: Path, settings: Iterable[str], dest: Path) -> Path:
    """Copy repository ``source`` to ``dest`` with ``settings`` ('MODEL.PARAM=VALUE') applied."""
    parsed = [parse_setting(s) for s in settings]
    for model, _, value in parsed:
        if not (source / model / "config.pbtxt").is_file():
            raise ValueError(f"--set: no model {model!r} in {source}")
        if '"' in value or "\n" in value:
            raise ValueError(f"--set {model}: values cannot contain quotes or newlines, got {value!r}")
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__"), symlinks=True)
    for model, key, value in parsed:
        config = dest / model / "config.pbtxt"
        config.write_text(set_parameter(config.read_text(), key, value))
    return dest
