"""A denoiser's worker group: sequence and CFG parallelism inside one Triton model instance.

Triton gives a model instance one process. A parallel denoiser makes that process rank 0 of a
process group and starts one worker process for every further rank (one per extra GPU; on CPU,
gloo ranks, which the tests use). Every rank loads the same stage (checkpoint and options) and
runs the same denoising loop on the same requests; the collectives inside the transformer
(sequence shards) and between the CFG branches keep the ranks in step, and rank 0 returns the
result.

Processes and channels
* Workers are fresh interpreters (``python -m ditserve.parallel.worker``: spawn, not fork; a fork
  of Triton's stub would copy its CUDA and IPC state). A worker's GPU is fixed through
  ``CUDA_VISIBLE_DEVICES`` before it starts, so it cannot touch another rank's GPU.
* Commands reach each worker over its stdin pipe: pickled requests, tensors on the CPU. An idle
  worker waits on the pipe rather than in a collective, so an idle server never runs into a
  collective timeout, and a worker reads EOF and exits when rank 0 goes away; a watchdog thread
  in the worker covers one that is inside a collective at that moment.
* The transformer's tensors go over NCCL (GPU) or gloo (CPU); start-up rendezvous over a TCPStore
  that rank 0 hosts and polls, so a worker that dies while loading fails the model load at once.

Failure
A worker that dies (crash, out of memory, killed) breaks the group. A gloo collective on rank 0
then fails at once ("connection closed by peer"); for NCCL a monitor thread sees the exit and
aborts the communicators, so rank 0 does not wait for the collective timeout. The requests in
flight fail with ``WorkerGroupError`` naming the rank and its exit status; rank 0 kills the other
workers and destroys the process group, and the next request starts a fresh group.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from ditserve.stage import ConfigError

from .usp import SPMesh, build_mesh


class WorkerGroupError(RuntimeError):
    """The worker group failed; the requests in flight fail, the next request restarts the group."""


@dataclasses.dataclass(frozen=True)
class ParallelOptions:
    """The model parameters of a parallel denoiser (config.pbtxt ``parameters``).

    World size: ``sp_degree`` ranks per CFG branch, times 2 with ``cfg_parallel``.
    """

    sp_degree: int = 1
    ulysses_degree: int = 0  # 0: sp_degree / ring_degree
    ring_degree: int = 0  # 0: sp_degree / ulysses_degree (1 when both are 0: Ulysses only)
    # Ulysses' heads a rank attends with, in this many groups whose exchanges overlap the attention
    # (ulysses.ulysses_attention); must divide them. 0: ulysses.auto_chunks (bit-identical to one exchange,
    # on CPU and over NCCL on 2 GPUs; 2 only inside CUDA graphs, where it was faster: perf/RESULTS.md).
    ulysses_chunks: int = 0
    cfg_parallel: bool = False
    # GPU of each rank, in rank order ("2,3"); rank 0 is the Triton model's own process. Default:
    # consecutive GPUs from the model instance's device.
    gpus: str = ""
    # Start-up (workers load the checkpoint) and collective timeout.
    parallel_timeout_s: float = 600.0


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    ulysses_degree: int = 1
    ring_degree: int = 1
    cfg_parallel: bool = False
    devices: tuple[torch.device, ...] = ()  # one per rank
    timeout_s: float = 600.0
    ulysses_chunks: int = 0

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def world_size(self) -> int:
        return self.sp_degree * (2 if self.cfg_parallel else 1)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def backend(self) -> str:
        return "nccl" if self.devices[0].type == "cuda" else "gloo"

    def cfg_branch(self, rank: int) -> int:
        """0: the rank computes the conditional prediction, 1: the unconditional one."""
        return rank // self.sp_degree

    @classmethod
    def from_options(cls, options: ParallelOptions, device: torch.device) -> ParallelConfig:
        """Resolve and validate the parameters at load; ConfigError names the parameter."""
        sp, u, r = options.sp_degree, options.ulysses_degree, options.ring_degree
        if sp < 1 or u < 0 or r < 0:
            raise ConfigError(f"parameters sp_degree (>= 1), ulysses_degree, ring_degree (>= 0): got {sp}, {u}, {r}")
        if u == 0 and r == 0:
            u, r = sp, 1
        elif u == 0 or r == 0:
            given, name = (r, "ring_degree") if u == 0 else (u, "ulysses_degree")
            if sp % given:
                raise ConfigError(f"parameter {name}: {given} does not divide sp_degree {sp}")
            u, r = (sp // r, r) if u == 0 else (u, sp // u)
        elif u * r != sp:
            raise ConfigError(f"parameters ulysses_degree * ring_degree must equal sp_degree {sp}, got {u} * {r}")
        if options.ulysses_chunks < 0:
            raise ConfigError(f"parameter ulysses_chunks: must be >= 0 (0: auto), got {options.ulysses_chunks}")
        if options.ulysses_chunks and u == 1:
            raise ConfigError(f"parameter ulysses_chunks: {options.ulysses_chunks} given, but only Ulysses exchanges "
                              f"come in chunks and ulysses_degree is 1")
        if not math.isfinite(options.parallel_timeout_s) or options.parallel_timeout_s <= 0:
            raise ConfigError(f"parameter parallel_timeout_s: must be a finite number > 0, got {options.parallel_timeout_s}")
        world = sp * (2 if options.cfg_parallel else 1)
        if world == 1 and options.gpus.strip():
            # One rank runs on the model instance's own device: a GPU list here would be ignored.
            raise ConfigError(f"parameter gpus: set to {options.gpus!r}, but it names the GPUs of a parallel group and "
                              f"this model has none (sp_degree 1, cfg_parallel off); its GPU is the instance's")
        devices = _devices(options.gpus, device, world)
        return cls(u, r, options.cfg_parallel, devices, options.parallel_timeout_s, options.ulysses_chunks)


def _devices(gpus: str, device: torch.device, world: int) -> tuple[torch.device, ...]:
    if device.type != "cuda":
        if gpus.strip():
            raise ConfigError(f"parameter gpus: set to {gpus!r} but the model runs on {device}")
        return (torch.device("cpu"),) * world
    count = torch.cuda.device_count()
    if gpus.strip():
        try:
            indices = [int(g) for g in gpus.split(",")]
        except ValueError:
            raise ConfigError(f"parameter gpus: expected comma-separated GPU indices, got {gpus!r}") from None
        if len(indices) != world:
            raise ConfigError(f"parameter gpus: names {len(indices)} GPUs, the group has {world} ranks")
        if len(set(indices)) != world or not all(0 <= i < count for i in indices):
            raise ConfigError(f"parameter gpus: {gpus!r} must be {world} distinct indices below {count} (GPUs torch sees)")
    else:
        first = device.index if device.index is not None else torch.cuda.current_device()
        indices = list(range(first, first + world))
        if indices[-1] >= count:
            raise ConfigError(f"parallel group of {world} ranks needs GPUs {indices[0]}..{indices[-1]}, torch sees {count}; "
                              f"set parameter gpus")
    return tuple(torch.device("cuda", i) for i in indices)


# --- one rank's view ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParallelContext:
    config: ParallelConfig
    rank: int
    mesh: Optional[SPMesh]  # this rank's sequence-parallel mesh; None when sp_degree is 1
    pair: Optional[dist.ProcessGroup]  # this rank and its partner in the other CFG branch

    def branches(self, positive: Callable[[], torch.Tensor], negative: Optional[Callable[[], torch.Tensor]],
                 like: torch.Tensor, negative_like: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(positive(), negative() or None). With CFG parallelism each CFG branch computes its own
        prediction and the partners exchange them; ``like``/``negative_like`` give the shapes.

        A batch without true CFG leaves the unconditional ranks idle for that batch (they only
        receive the prediction), which keeps every rank's latents identical without a second path.
        """
        if self.pair is None:
            return positive(), (negative() if negative is not None else None)
        sp = self.config.sp_degree
        partners = (self.rank % sp, self.rank % sp + sp)
        # Each branch computes its own prediction before either exchange is issued: a broadcast
        # queued first would hold the unconditional branch's compute behind the conditional one
        # (measured: CFG parallel 2 at 275 ms/step against 291 ms on one GPU, FLUX 1024x1024, H200).
        if self.config.cfg_branch(self.rank) == 0:
            out = positive().contiguous()
            negative_out = torch.empty_like(negative_like) if negative is not None else None
        else:
            out = torch.empty_like(like)
            negative_out = negative().contiguous() if negative is not None else None
        dist.broadcast(out, src=partners[0], group=self.pair)
        if negative_out is not None:
            dist.broadcast(negative_out, src=partners[1], group=self.pair)
        return out, negative_out


def connect(config: ParallelConfig, rank: int, store: dist.Store) -> ParallelContext:
    """Join the process group and build this rank's groups; every rank calls it."""
    if config.backend == "nccl":
        torch.cuda.set_device(config.devices[rank] if rank == 0 else torch.device("cuda", 0))
    dist.init_process_group(config.backend, store=store, rank=rank, world_size=config.world_size,
                            timeout=datetime.timedelta(seconds=config.timeout_s))
    sp = config.sp_degree
    meshes = []
    if sp > 1:  # new_group is collective: every rank builds every group, in the same order
        meshes = [build_mesh(config.ulysses_degree, config.ring_degree, first_rank=b * sp,
                             ulysses_chunks=config.ulysses_chunks)
                  for b in range(2 if config.cfg_parallel else 1)]
    pair = None
    if config.cfg_parallel:
        pairs = [dist.new_group([i, i + sp]) for i in range(sp)]
        pair = pairs[rank % sp]
    mesh = next((m for m in meshes if m is not None), None)
    return ParallelContext(config, rank, mesh, pair)


def to_device(obj: Any, device: torch.device) -> Any:
    """obj with every tensor in it (dataclass fields, lists, tuples, dicts) moved to device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


# --- rank 0: the group -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its stage and join; pickled onto its stdin."""

    stage: str  # "module:Class"
    runtime: Any  # ditserve.stage.Runtime, device set for the worker
    options: Any
    config: ParallelConfig
    rank: int
    store_port: int
    parent_pid: int


def _python() -> str:
    """The interpreter for workers: Triton's stub embeds Python, so its sys.executable may not be one."""
    name = Path(sys.executable).name if sys.executable else ""
    if name.startswith("python"):
        return sys.executable
    return str(Path(sys.prefix) / "bin" / "python3")


def _worker_env(device: torch.device) -> dict[str, str]:
    env = dict(os.environ)
    if device.type == "cuda":
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[device.index] if visible else str(device.index)
    return env


def _exit_message(rank: int, proc: subprocess.Popen) -> str:
    return f"parallel worker rank {rank} (pid {proc.pid}) exited with status {proc.returncode}"


class WorkerGroup:
    """Rank 0's handle on the workers of a parallel stage.

    ``stage`` provides ``attach(ParallelContext)`` (install the model's parallel hooks) and
    ``denoise(requests)``; ``run`` broadcasts the requests and runs them on rank 0 too.
    """

    def __init__(self, stage: Any, config: ParallelConfig):
        self.stage = stage
        self.config = config
        self.procs: list[subprocess.Popen] = []
        self.failure: Optional[str] = None  # set by the monitor when a worker exits unexpectedly
        self._generation = 0  # bumped by stop(): monitors of an earlier group stay silent
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return bool(self.procs) and self.failure is None

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self) -> None:
        if dist.is_initialized():
            raise WorkerGroupError("this process already belongs to a process group: one parallel stage per process")
        config = self.config
        if config.backend == "nccl":
            # The Triton model process must survive a broken group: abort the communicators and
            # raise, instead of NCCL's default of tearing the whole process down.
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "2"
        timeout = datetime.timedelta(seconds=config.timeout_s)
        store = dist.TCPStore("127.0.0.1", 0, config.world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        runtime = self.stage.runtime
        cls = type(self.stage)
        self.failure = None
        for rank in range(1, config.world_size):
            device = config.devices[rank]
            worker_runtime = dataclasses.replace(runtime, device=torch.device("cuda", 0) if device.type == "cuda" else device)
            spec = WorkerSpec(f"{cls.__module__}:{cls.__qualname__}", worker_runtime, self.stage.options, config, rank,
                              store.port, os.getpid())
            proc = subprocess.Popen([_python(), "-m", "ditserve.parallel.worker"], stdin=subprocess.PIPE,
                                    env=_worker_env(device))
            self.procs.append(proc)
            pickle.dump(spec, proc.stdin)
            proc.stdin.flush()
        try:
            self._wait_keys(store, "up")
            context = connect(config, 0, store)
            self.stage.attach(context)
            self._wait_keys(store, "ready")
        except BaseException:
            self.stop()
            raise
        for rank, proc in enumerate(self.procs, start=1):
            threading.Thread(target=self._monitor, args=(rank, proc, self._generation), daemon=True,
                             name=f"ditserve-worker-{rank}").start()

    def _wait_keys(self, store: dist.Store, what: str) -> None:
        """Wait until every worker has set ``{what}/{rank}``, failing as soon as one exits."""
        deadline = time.monotonic() + self.config.timeout_s
        for rank, proc in enumerate(self.procs, start=1):
            while not store.check([f"{what}/{rank}"]):
                time.sleep(0.1)
                if proc.poll() is not None:
                    raise WorkerGroupError(f"parallel worker rank {rank} exited with status {proc.returncode} while "
                                           f"starting (its log is in the server log)")
                if time.monotonic() > deadline:
                    raise WorkerGroupError(f"parallel worker rank {rank} did not start within "
                                           f"parallel_timeout_s={self.config.timeout_s}")

    def _monitor(self, rank: int, proc: subprocess.Popen, generation: int) -> None:
        proc.wait()
        with self._lock:
            if generation != self._generation or self.failure is not None:
                return
            self.failure = _exit_message(rank, proc)
        if self.config.backend == "nccl":
            # Unblock rank 0's collectives now instead of after the collective timeout.
            from torch.distributed.distributed_c10d import _abort_process_group

            _abort_process_group()

    def run(self, requests: Sequence[Any]) -> list[torch.Tensor]:
        """Denoise requests on every rank; rank 0's result. Restarts a broken group first."""
        if not self.running:
            self.stop()
            self.start()
        try:
            message = pickle.dumps(to_device(list(requests), torch.device("cpu")))
            for proc in self.procs:
                proc.stdin.write(message)
                proc.stdin.flush()
            result = self.stage.denoise(requests)
            if self.config.backend == "nccl":
                torch.cuda.synchronize(self.config.devices[0])  # collectives have finished, or were aborted
        except Exception as exc:
            # A worker's exit is the cause when it comes first; rank 0's own error may still be the
            # request's fault that every rank met (the workers' tracebacks are only in the server log).
            own = f"{type(exc).__name__}: {exc}"
            worker = self.failure or self._exited_worker()
            reason = f"{worker} (rank 0: {own})" if worker else own
            self.stop()
            raise WorkerGroupError(f"{reason}; this request failed, the group restarts for the next one") from exc
        if self.failure is not None:  # an aborted NCCL collective leaves garbage, not an exception
            reason = self.failure
            self.stop()
            raise WorkerGroupError(f"{reason}; this request failed, the group restarts for the next one")
        return result

    def _exited_worker(self, wait_s: float = 1.0) -> Optional[str]:
        """Which worker exited, if one did. A collective fails as soon as a peer's sockets close,
        which can be before its exit is recorded: poll for up to wait_s (instead of relying on the
        monitor thread being scheduled in time on a busy machine)."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, proc in enumerate(self.procs, start=1):
                if proc.poll() is not None:
                    return _exit_message(rank, proc)
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop the workers (EOF, then SIGTERM, then SIGKILL) and leave the process group."""
        with self._lock:
            self._generation += 1
        for proc in self.procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in self.procs:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.send_signal(sig)
            deadline = time.monotonic() + grace_s
        for proc in self.procs:
            proc.wait()
        self.procs = []
        # Detach first: it drops CUDA graphs that captured the group's collectives, and NCCL's
        # communicator teardown waits until such graphs are gone (it hung there, 2 H200, 2026-11-26).
        self.stage.attach(None)
        if dist.is_initialized():
            dist.destroy_process_group()
