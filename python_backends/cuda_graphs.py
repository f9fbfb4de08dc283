"""Replay a denoiser's transformer call as a CUDA graph, one graph per input signature.

Why: once a step is split over GPUs it becomes host-bound. A FLUX.1-dev step at 1024x1024 stays at
~94 ms on 2 and on 4 GPUs (perf/RESULTS.md, issue 7) while the GPU work per rank halves: the
host issues ~20,000 aten calls per eager forward, plus the sequence-parallel collectives. A graph
issues the whole forward, collectives included (NCCL kernels are capturable), in one launch.

How: the first ``warmup`` calls of a signature run eagerly (they tune the Triton attention kernel
for the sequence length and create the NCCL communicators, neither of which may happen during
capture); the next call captures the call on static input buffers and replays it; later calls copy
their inputs into the buffers and replay. Every rank of a sequence-parallel group makes the same
calls with the same shapes, so all ranks capture at the same step and their graphs' collectives
match. Each graph keeps its own memory pool (graphs of different signatures may replay in any
order); at most ``max_graphs`` signatures are kept, least recently used dropped. The eager-call counts of
signatures not captured yet are bounded too (``max_pending``, least recently seen dropped): Qwen-Image's
texts are not padded to one length, so a long-running server sees ever new signatures.

The callable must be free of host synchronisation and of data-dependent control flow (the graph
replays the capture's kernels whatever the inputs' values), take keyword arguments and return one
tensor. Tensor (or None) arguments are copied into the graph's buffers; any other argument must be
hashable and is part of the signature, as it is (a graph per value): what the capture baked in from
it, e.g. Qwen-Image's ``img_shapes`` (rotary positions), must never be replayed for another value.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

Signature = tuple


def signature(inputs: dict[str, Any]) -> Signature:
    """Tensors by shape, dtype and device; None and other (hashable) values as they are."""
    return tuple((name, (tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else x)
                 for name, x in sorted(inputs.items()))


class _Graph:
    def __init__(self, fn: Callable[..., torch.Tensor], inputs: dict[str, Any]):
        self.static = {k: (x.clone() if isinstance(x, torch.Tensor) else x) for k, x in inputs.items()}
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads of the process (e.g. the worker group's monitor) may use CUDA.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.output = fn(**self.static)

    def __call__(self, inputs: dict[str, Any]) -> torch.Tensor:
        for name, x in inputs.items():
            if isinstance(x, torch.Tensor):
                self.static[name].copy_(x)
        self.graph.replay()
        # A copy: the next replay overwrites the static output, and callers keep predictions across
        # calls (the conditional one while the unconditional one runs).
        return self.output.clone()


class GraphedCall:
    def __init__(self, fn: Callable[..., torch.Tensor], *, warmup: int = 2, max_graphs: int = 4,
                 max_pending: int = 64):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the eager calls tune kernels before capture), got {warmup}")
        self.fn = fn
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.max_pending = max_pending
        self.graphs: OrderedDict[Signature, _Graph] = OrderedDict()
        self.eager_calls: OrderedDict[Signature, int] = OrderedDict()

    def __call__(self, **inputs: Any) -> torch.Tensor:
        key = signature(inputs)
        graph = self.graphs.get(key)
        if graph is not None:
            self.graphs.move_to_end(key)
            return graph(inputs)
        seen = self.eager_calls.pop(key, 0)
        if seen < self.warmup:
            self.eager_calls[key] = seen + 1  # (re)inserted last: the most recently seen
            if len(self.eager_calls) > self.max_pending:
                self.eager_calls.popitem(last=False)
            return self.fn(**inputs)
        if len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        torch.cuda.synchronize()
        graph = self.graphs[key] = _Graph(self.fn, inputs)
        return graph(inputs)

    def clear(self) -> None:
        """Drop every graph (they are destroyed here, not later by the garbage collector): before the
        process group they captured collectives of is torn down, which waits for them."""
        if self.graphs:
            torch.cuda.synchronize()
        self.graphs.clear()
        self.eager_calls.clear()
