"""Loading components of a diffusers-format checkpoint directory.

A diffusers checkpoint is a folder with ``model_index.json`` naming, for each component
(``transformer``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``, ...), the library
and class that saved it, and one sub-folder per component. Stages load only the components
they use, with the class the checkpoint names, exactly as ``DiffusionPipeline`` would.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch

from ditserve.checkpoints import resolve_model_path
from ditserve.stage import ConfigError, Runtime


class Checkpoint:
    def __init__(self, model_path: str):
        self.path: Path = resolve_model_path(model_path)
        with open(self.path / "model_index.json") as f:
            self.index: dict[str, Any] = json.load(f)
        self.pipeline_class: str = self.index.get("_class_name", "")

    def config(self, component: str, file: str = "config.json") -> dict[str, Any]:
        """A component's saved config as plain JSON. Request stages read geometry this way rather than
        through the component class's load_config, so they never import diffusers (about 5 s of CPU
        per model load, paid by every server start)."""
        with open(self.path / component / file) as f:
            return json.load(f)

    def component_class(self, name: str) -> type:
        entry = self.index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            raise ConfigError(f"model_path: {self.path} has no component {name!r} in model_index.json")
        library, class_name = entry
        return getattr(importlib.import_module(library), class_name)

    def load(self, name: str, runtime: Runtime | None = None) -> Any:
        """Load one component; modules go to the runtime's device and dtype, in eval mode."""
        cls = self.component_class(name)
        folder = self.path / name
        if runtime is None or not issubclass(cls, torch.nn.Module):  # tokenizers, schedulers
            return cls.from_pretrained(folder)
        module = cls.from_pretrained(folder, dtype=runtime.dtype)
        return module.to(runtime.device).eval().requires_grad_(False)
