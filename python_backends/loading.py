"""Loading components of a diffusers-format checkpoint directory.

A diffusers checkpoint is a folder with ``model_index.json`` naming, for each component
(``transformer``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``, ...), the library
and class that saved it, and one sub-folder per component. Stages load only the components
they use, with the class the checkpoint names, exactly as ``DiffusionPipeline`` would.

Whatever fails while reading a component (its folder or config missing, as after an incomplete
download; a truncated weight file; an unreadable tokenizer) is a ``ConfigError`` at load naming the
component, its folder and the cause: the libraries' own messages name neither (a truncated
safetensors file says only "incomplete metadata"), or point elsewhere (a missing folder reads as
"couldn't connect to https://huggingface.co").
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ditserve.checkpoints import resolve_model_path
from ditserve.stage import ConfigError, Runtime


class ComponentConfig(dict):
    """A component's config.json: a key it lacks is a ConfigError naming the file, not a KeyError."""

    def __init__(self, values: dict[str, Any], path: Path):
        super().__init__(values)
        self.path = path

    def __missing__(self, key: str) -> Any:
        raise ConfigError(f"model_path: {self.path} has no {key!r}")


class Checkpoint:
    def __init__(self, model_path: str):
        self.path: Path = resolve_model_path(model_path)
        with open(self.path / "model_index.json") as f:
            self.index: dict[str, Any] = json.load(f)
        self.pipeline_class: str = self.index.get("_class_name", "")

    def folder(self, component: str) -> Path:
        """A component's folder, which must exist."""
        folder = self.path / component
        if not folder.is_dir():
            raise ConfigError(f"model_path: {self.path} has no folder {component}/ for its component {component!r} "
                              "(an incomplete download?)")
        return folder

    def config(self, component: str, file: str = "config.json") -> ComponentConfig:
        """A component's saved config as plain JSON. Request stages read geometry this way rather than
        through the component class's load_config, so they never import diffusers (about 5 s of CPU
        per model load, paid by every server start)."""
        path = self.folder(component) / file
        with self.reading(component, path):
            with open(path) as f:
                return ComponentConfig(json.load(f), path)

    def component_class(self, name: str) -> type:
        entry = self.index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            raise ConfigError(f"model_path: {self.path} has no component {name!r} in model_index.json")
        library, class_name = entry
        return getattr(importlib.import_module(library), class_name)

    def load(self, name: str, runtime: Runtime | None = None) -> Any:
        """Load one component; modules go to the runtime's device and dtype, in eval mode."""
        cls = self.component_class(name)
        folder = self.folder(name)
        with self.reading(name, folder):
            if runtime is None or not issubclass(cls, torch.nn.Module):  # tokenizers, schedulers
                return cls.from_pretrained(folder)
            module = cls.from_pretrained(folder, dtype=runtime.dtype)
            return module.to(runtime.device).eval().requires_grad_(False)

    @contextlib.contextmanager
    def reading(self, component: str, path: Path) -> Iterator[None]:
        """Any exception while reading ``path`` of ``component`` as a ConfigError naming both."""
        try:
            yield
        except ConfigError:
            raise
        except Exception as error:  # noqa: BLE001 - every library's failure, named where it happened
            hint = ""
            if path.is_dir() and any(".fp16." in p.name or ".bf16." in p.name for p in path.iterdir()):
                hint = ("; the folder holds variant weights (*.fp16.* / *.bf16.*): ditserve reads the default "
                        "file names, so save or rename them without the variant")
            raise ConfigError(f"model_path: cannot load component {component!r} from {path}: "
                              f"{type(error).__name__}: {error}{hint}") from error
