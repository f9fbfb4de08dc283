"""Pipelines as short declarative stage lists, runnable in-process or as Triton ensembles.

Each pipeline is the ordered list of its stages, each named by its Triton model. Tensors
pass between stages by name, as in the ensemble (``model_repository/<pipeline>``), whose
steps a test checks against this list. ``LocalPipeline`` runs the same stages in one
process: the parity tests compare it with the diffusers reference without a server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from ditserve.stage import Outputs, RequestError, Row, Runtime, Stage, StageFailure


@dataclasses.dataclass(frozen=True)
class StageSpec:
    model: str  # Triton model name in model_repository/
    stage: type[Stage]


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    name: str  # the ensemble's model name
    stages: tuple[StageSpec, ...]


class LocalPipeline:
    def __init__(self, spec: PipelineSpec, runtime: Runtime, options: Mapping[str, Any] | None = None):
        options = options or {}
        self.spec = spec
        self.stages = [(s.model, s.stage(runtime, options.get(s.model))) for s in spec.stages]

    def __call__(self, rows: Sequence[Row]) -> list[Outputs | RequestError]:
        """Run rows through every stage, each stage seeing all rows still alive at once."""
        state: list[dict[str, Any] | RequestError] = [dict(row) for row in rows]
        for _, stage in self.stages:
            alive = [i for i, s in enumerate(state) if not isinstance(s, RequestError)]
            if not alive:
                break
            for i, result in zip(alive, stage.execute([state[i] for i in alive])):
                if isinstance(result, StageFailure):  # no per-request answer in process: the call fails
                    raise result
                state[i] = result if isinstance(result, RequestError) else {**state[i], **result}
        return state
