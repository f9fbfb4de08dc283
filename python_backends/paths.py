"""Filesystem locations of the ditserve repository.

The package is installed editable (``pip install -e .``) from the repository, so the
repository root is found by walking up from this file to the folder holding
``pyproject.toml`` and ``model_repository/``. ``DITSERVE_REPO_ROOT`` overrides it (e.g.
for a non-editable install inside a container, where the model repository lives
elsewhere), and ``DITSERVE_MODEL_REPOSITORY`` overrides the model repository itself.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "repo_root",
    "model_repository",
    "cache_dir",
    "out_dir",
]


def _looks_like_root(path: Path) -> bool:
    return (path / "pyproject.toml").is_file() and (path / "model_repository").is_dir()


def repo_root() -> Path:
    """Root of the ditserve checkout.

    Raises ``FileNotFoundError`` when the package is not installed from a checkout and
    ``DITSERVE_REPO_ROOT`` is not set.
    """
    env = os.environ.get("DITSERVE_REPO_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parent
    for candidate in (here, *here.parents):
        if _looks_like_root(candidate):
            return candidate
    raise FileNotFoundError(
        "cannot locate the ditserve repository root from "
        f"{here}; set DITSERVE_REPO_ROOT or pass --model-repository explicitly"
    )


def model_repository() -> Path:
    """Default Triton model repository (``<repo>/model_repository``)."""
    env = os.environ.get("DITSERVE_MODEL_REPOSITORY")
    if env:
        return Path(env).resolve()
    return repo_root() / "model_repository"


def cache_dir() -> Path:
    """Scratch/cache folder for downloaded tools (``<repo>/.cache``, git-ignored)."""
    env = os.environ.get("DITSERVE_CACHE_DIR")
    if env:
        path = Path(env)
    else:
        try:
            path = repo_root() / ".cache"
        except FileNotFoundError:
            path = Path.home() / ".cache" / "ditserve"
    path.mkdir(parents=True, exist_ok=True)
    return path


def out_dir() -> Path:
    """Default output folder for generated images (``<repo>/out``, git-ignored)."""
    return repo_root() / "out"
