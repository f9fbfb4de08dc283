"""What the denoiser stages of every pipeline share: batching rows by schedule, the schedule, and
the parallel worker group.

Rows with the same (height, width, steps) share one timestep schedule and image token count, so
a denoiser runs them as one batched transformer forward per step, in chunks of at most
``options.max_batch_images`` images (a row is never split: its latents come from one seeded draw).

Parallelism (``ditserve.parallel.group``): with ``sp_degree`` > 1 or ``cfg_parallel`` the stage
becomes rank 0 of a worker group; every chunk is sent to all ranks and denoised by all of them.
A model takes part through three hooks: ``check_parallel`` (refuse a layout at load),
``use_sequence_parallel`` (install its sequence-parallel attention on a mesh) and, in its loop,
``branches`` for the two CFG predictions and its own sequence-parallel forward.

Attention (parameter ``attention_backend``, ``TransformerOptions``): one mechanism for every model.
``select_attention`` resolves and checks the name at load, before the weights are read, against the
registry's constraints (``ditserve.kernels.registry``: device, dtype, head dim, key masks) and the
parallel layout (ring attention needs a backend that returns the log-sum-exp); ``install_attention``
then puts the model's ditserve processors on its transformer(s) through the hook
``set_attention_processors``, and the model's loop runs in ``attention_context()``. The
sequence-parallel processors attend locally with ``sp_attention_backend``.

A ``TransformerDenoiser`` implements these hooks for every model from two functions it names,
``install_attention_backend`` (its ``kernels.<model>_processor.set_attention_backend``) and
``install_sequence_parallel`` (its ``parallel.<model>.set_sequence_parallel``), applied to each of its
``experts()``.

Loading (``TransformerDenoiser``): every model's denoiser loads the same way (the attention backend
checked before the weights are read, the checkpoint's ``transformer`` and ``scheduler``, the model's own
components through the hook ``load_components``, the attention processors, the worker group), then, on
CUDA with parameter ``warmup``, denoises the model's warm-up batches (hook ``warmup_batches``) so that no
request pays for what a first call costs. Triton compiles our attention kernel at the first call of each
variant (key mask or not; sequence length a multiple of 16 or not, which Triton specialises on) and
autotunes it at the first call of each power-of-two length bucket (``kernels.attention.tune_length``): at
Qwen-Image's 24 heads of 128 around 4,100 tokens, 9-11 s a variant in a fresh process (16 s the first) and
0.8-1.4 s a tuning (H200, 2026-11-26; with Triton's disk cache from an earlier process, tuning only). CUDA
graphs capture at their third call.

Progress: each model's loop iterates ``self.steps(timesteps)``, which after every step calls
``on_step(done, total)``; ``execute`` sets it, on rank 0, while a chunk holds rows whose request asked
for progress (request parameter ``progress``, sent by the stream models; ``ditserve.progress``), and
leaves it None otherwise: then the loop only counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
from abc import abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, Optional

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # Qwen-Image's is a copy
from diffusers.utils.torch_utils import randn_tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ditserve import progress
from ditserve.cuda_graphs import GraphedCall
from ditserve.kernels.registry import get_backend
from ditserve.loading import Checkpoint
from ditserve.parallel.group import ParallelConfig, ParallelContext, ParallelOptions, WorkerGroup
from ditserve.parallel.ring import RING_BACKENDS
from ditserve.parallel.ulysses import HeadsError, check_heads
from ditserve.parallel.usp import SPMesh
from ditserve.stage import (ConfigError, Outputs, RequestError, Row, Runtime, Stage, StageFailure, check_choice,
                            check_parameter)


@dataclasses.dataclass(frozen=True)
class TransformerOptions(ParallelOptions):
    """The parameters of every denoiser's transformer: its parallel layout and its attention."""

    # "auto": the model's choice (GroupedDenoiser.auto_attention_backend); "sdpa": diffusers' own
    # processors on torch's SDPA dispatch (the reference); "cudnn": the same, SDPA restricted to cuDNN;
    # or a ditserve.kernels.registry backend through the model's ditserve processors: "triton",
    # "triton_fp8", "flash_attn" (when installed).
    attention_backend: str = "auto"
    # Denoise the model's warm-up batches while it loads, on CUDA only (TransformerDenoiser.warm_up): the
    # first 1024x1024 FLUX request after start-up took 19.2 s instead of 4.6 s without (H100, 2026-11-26).
    warmup: bool = True


# The names that keep diffusers' own processors (torch SDPA); the others install ditserve's.
SDPA_BACKENDS = ("sdpa", "cudnn")
# The registry backends whose kernels Triton compiles and autotunes at their first calls
# (ditserve.kernels.attention, attention_fp8: triton.autotune keyed by sequence-length buckets).
AUTOTUNED_BACKENDS = ("triton", "triton_fp8")


def check_attention_backend(name: str, runtime: Runtime, head_dim: int, *, masked: bool) -> None:
    """ValueError when backend `name` cannot run a model of `head_dim` on `runtime` (with key-padding
    masks when `masked`), naming the constraint."""
    if name == "cudnn":
        if runtime.device.type != "cuda":
            raise ValueError("cudnn needs a CUDA device")
        return
    get_backend(name).check_config(runtime.device, runtime.dtype, head_dim, masked=masked)


def attention_fits(name: str, runtime: Runtime, head_dim: int, *, masked: bool = False) -> bool:
    try:
        check_attention_backend(name, runtime, head_dim, masked=masked)
    except ValueError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class DenoiserOptions(TransformerOptions):
    """The image denoisers' parameters (FLUX, Qwen-Image)."""

    # Images per transformer forward. A group of rows larger than this runs in chunks of
    # whole rows; a single row is never split (its latents come from one seeded draw).
    max_batch_images: int = 8
    # Replay the transformer call as a CUDA graph per input signature (ditserve.cuda_graphs): "true",
    # "false", or "auto": on when the step is sequence-parallel on CUDA, which is host-bound without
    # graphs (FLUX, Ulysses 4 on H200s: 131.5 ms a step eager, 47.4 ms with graphs); off otherwise, where
    # they gain nothing (FLUX, 1 GPU: 145.2 vs 145.7 ms) and would only hold memory (perf/RESULTS.md).
    cuda_graphs: str = "auto"

    def __post_init__(self):
        check_parameter("max_batch_images", self.max_batch_images, 1)
        check_choice("cuda_graphs", self.cuda_graphs, ("auto", "true", "false"))

    def graphs_enabled(self, device: torch.device) -> bool:
        if self.cuda_graphs == "auto":
            return device.type == "cuda" and self.sp_degree > 1
        return self.cuda_graphs == "true"


class GroupedDenoiser(Stage):
    """Subclasses parse a row into a request with ``.params`` (``GenerationParams``) and denoise
    a list of requests of one ``group_key`` (by default (height, width, steps)) into latents, one
    tensor each.

    ``rank`` is this process's rank in the parallel group: 0 in the Triton model (which starts the
    workers when the options ask for parallelism), the worker's rank in ``ditserve.parallel.worker``.
    Subclasses call ``start_parallel()`` at the end of ``__init__``, once the model is loaded (the
    models' denoisers through ``TransformerDenoiser``).
    """

    Options = DenoiserOptions
    outputs = ("LATENTS",)
    request_parameters = (progress.PARAMETER,)

    def __init__(self, runtime: Runtime, options: Any = None, *, rank: int = 0):
        super().__init__(runtime, options)
        self.rank = rank
        # Rank 0 resolves the layout (devices included); workers get it from rank 0 with their context.
        self.parallel_config = ParallelConfig.from_options(self.options, runtime.device) if rank == 0 else None
        if rank == 0 and self.parallel_config.enabled:
            self.runtime = dataclasses.replace(runtime, device=self.parallel_config.devices[0])
        self.parallel: Optional[ParallelContext] = None
        self.workers: Optional[WorkerGroup] = None
        # (steps done, total) -> the rows of the chunk being denoised that asked for progress; set
        # by execute (on rank 0 only) while such a chunk runs.
        self.on_step: Optional[Callable[[int, int], None]] = None
        self.attention_name = "sdpa"  # set by select_attention
        self._graphed: list[GraphedCall] = []

    def graphed(self, fn: Callable[..., torch.Tensor], enabled: bool) -> Callable[..., torch.Tensor]:
        """fn, replayed as CUDA graphs when ``enabled`` (a model's ``cuda_graphs`` option; keyword tensor
        inputs, one tensor out, no host synchronisation inside). Call it at load: it checks the device."""
        if not enabled:
            return fn
        if self.runtime.device.type != "cuda":
            raise ConfigError(f"parameter cuda_graphs: needs a CUDA device, the model runs on {self.runtime.device}")
        call = GraphedCall(fn)
        self._graphed.append(call)
        return call

    # --- attention (parameter attention_backend) ------------------------------------------

    # Whether the model's attention takes a key-padding mask (Qwen-Image: text padded to the longest
    # row of a batch). With sequence parallelism every model's does (the shard padding).
    attention_masked = False

    # Whether "auto" means our Triton kernel on CUDA where it fits, else torch's SDPA: set per model from
    # a measured step (perf/RESULTS.md, "Attention backends per denoiser step").
    auto_triton_on_cuda = False

    def auto_attention_backend(self, head_dim: int) -> str:
        """Hook: the backend "auto" stands for here (runtime, and on rank 0 the parallel layout)."""
        if self.auto_triton_on_cuda and self.runtime.device.type == "cuda" and attention_fits(
                "triton", self.runtime, head_dim, masked=self.attention_masked):
            return "triton"
        return "sdpa"

    def set_attention_processors(self, backend: str) -> None:
        """Hook: install the model's ditserve processors, running registry backend ``backend``."""
        raise ConfigError(f"{type(self).__name__}: parameter attention_backend: only {SDPA_BACKENDS} for this model")

    def select_attention(self, head_dim: int) -> None:
        """Resolve and check ``attention_backend`` for a transformer of ``head_dim``; ConfigError names the
        parameter. Subclasses call it at load before reading the weights, then ``install_attention``."""
        name = requested = self.options.attention_backend
        if name == "auto":
            name = self.auto_attention_backend(head_dim)
            # Workers build their stage from rank 0's options: they run what rank 0 chose.
            self.options = dataclasses.replace(self.options, attention_backend=name)
        self.attention_name = name
        config = self.parallel_config
        if config is not None and config.ring_degree > 1 and self.sp_attention_backend not in RING_BACKENDS:
            raise ConfigError(f"parameter ring_degree: ring attention merges partial results by their log-sum-exp, which "
                              f"attention_backend {name!r} does not return; use one of {RING_BACKENDS}")
        masked = self.attention_masked or (config is not None and config.sp_degree > 1)
        try:
            check_attention_backend(name, self.runtime, head_dim, masked=masked)
        except ValueError as exc:
            chosen = f"auto chose {name!r}, which cannot run here: " if requested != name else ""
            raise ConfigError(f"parameter attention_backend: {chosen}{exc}") from None

    def install_attention(self) -> None:
        """Install the model's ditserve processors unless the backend is diffusers' own (SDPA_BACKENDS)."""
        if self.attention_name not in SDPA_BACKENDS:
            self.set_attention_processors(self.attention_name)

    def attention_context(self) -> contextlib.AbstractContextManager:
        """What the denoising loop runs in: with "cudnn", torch's SDPA restricted to cuDNN (611 against
        flash's 327 TFLOP/s at FLUX's 1x24x4608x128 on an H100, perf/RESULTS.md "Baselines"): restricted, not
        preferred, so a shape cuDNN cannot run fails loudly instead of silently running slower."""
        if self.attention_name == "cudnn":
            return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
        return contextlib.nullcontext()

    @property
    def sp_attention_backend(self) -> str:
        """The registry backend of the sequence-parallel processors' local attention. "cudnn" is torch's
        SDPA restricted by attention_context(), which also holds around the Ulysses attention."""
        return "sdpa" if self.attention_name == "cudnn" else self.attention_name

    # --- parallelism ---------------------------------------------------------------------

    def check_parallel(self, config: ParallelConfig) -> None:
        """Hook: raise ConfigError when this model cannot run ``config``."""
        raise ConfigError(f"{type(self).__name__}: parameters sp_degree and cfg_parallel are not supported for this "
                          f"model yet")

    def use_sequence_parallel(self, mesh: SPMesh) -> None:
        """Hook: install the model's sequence-parallel attention on ``mesh``."""

    def start_parallel(self) -> None:
        """On rank 0, start the worker group when the options ask for one (workers join it from
        ditserve.parallel.worker)."""
        config = self.parallel_config
        if config is None or not config.enabled:
            return
        self.check_parallel(config)
        self.workers = WorkerGroup(self, config)
        self.workers.start()

    def attach(self, context: Optional[ParallelContext]) -> None:
        """Called by the group with this rank's context when it (re)starts, with None when it stops."""
        self.parallel = context
        for call in self._graphed:  # captured with the old group's communicators
            call.clear()
        if context is not None and context.mesh is not None:
            self.use_sequence_parallel(context.mesh)

    def branches(self, positive: Callable[[], torch.Tensor], negative: Optional[Callable[[], torch.Tensor]],
                 like: torch.Tensor, negative_like: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The conditional and (when ``negative`` is given) unconditional predictions of one step:
        computed here, or each on its CFG branch of the group (``ParallelContext.branches``)."""
        if self.parallel is not None:
            return self.parallel.branches(positive, negative, like, negative_like)
        return positive(), (negative() if negative is not None else None)

    def dispatch(self, requests: list) -> list[torch.Tensor]:
        """denoise(requests), on every rank of the group when there is one."""
        return self.workers.run(requests) if self.workers is not None else self.denoise(requests)

    def close(self) -> None:
        if self.workers is not None:
            self.workers.stop()
            self.workers = None

    @abstractmethod
    def parse(self, row: Row) -> Any: ...

    @abstractmethod
    def denoise(self, requests: list) -> list[torch.Tensor]: ...

    def group_key(self, request) -> tuple:
        """Requests with equal keys run batched; pipelines whose shapes depend on more (video
        frames, text length) extend it."""
        return (request.params.height, request.params.width, request.params.steps)

    def steps(self, timesteps: Sequence) -> Iterator:
        """The loop's timesteps (``for t in self.steps(scheduler.timesteps)``), reporting each step
        once its body has run."""
        on_step, total = self.on_step, len(timesteps)
        for done, t in enumerate(timesteps, 1):
            yield t
            if on_step is not None:
                on_step(done, total)

    def execute(self, rows: Sequence[Row]) -> list[Outputs | RequestError | StageFailure]:
        results: list[Outputs | RequestError | StageFailure | None] = [None] * len(rows)
        groups: dict[tuple, list[tuple[int, Any]]] = defaultdict(list)
        targets: dict[int, progress.Target] = {}
        for i, row in enumerate(rows):
            try:
                request = self.parse(row)
                target = progress_target(row)
            except RequestError as error:
                results[i] = error
                continue
            if target is not None:
                targets[i] = target
            groups[self.group_key(request)].append((i, request))
        for members in groups.values():
            for chunk in self._chunks(members):
                requests = [request for _, request in chunk]
                listening = [targets[i] for i, _ in chunk if i in targets]
                if listening:
                    self.on_step = reporter = progress.Reporter(listening)
                try:
                    latents = self.dispatch(requests)
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory at one size: the other groups still run
                    traceback.print_exc()
                    failure = StageFailure(exc)
                    for i, _ in chunk:
                        results[i] = failure
                    continue
                finally:
                    if listening:
                        self.on_step = None
                        reporter.close()  # before the response: the listener reads up to this end
                for (i, _), row_latents in zip(chunk, latents):
                    results[i] = {"LATENTS": row_latents}
        return results

    def _chunks(self, members: list[tuple[int, Any]]) -> Iterator[list[tuple[int, Any]]]:
        chunk, images = [], 0
        for member in members:
            if chunk and images + member[1].params.num_images > self.options.max_batch_images:
                yield chunk
                chunk, images = [], 0
            chunk.append(member)
            images += member[1].params.num_images
        if chunk:
            yield chunk


class TransformerDenoiser(GroupedDenoiser):
    """A GroupedDenoiser of a diffusers checkpoint's ``transformer`` (``self.transformer``) and scheduler
    (``self.scheduler_class``, ``self.scheduler_config``), loaded the same way for every model; the model
    adds its own components and geometry in ``load_components`` and its warm-up in ``warmup_batches``."""

    def __init__(self, runtime: Runtime, options: Any = None, *, rank: int = 0):
        super().__init__(runtime, options, rank=rank)
        runtime = self.runtime  # the parallel group may have moved rank 0 to its first GPU
        checkpoint = Checkpoint(runtime.model_path)
        if checkpoint.pipeline_class not in self.pipeline_classes:
            # Same components, other semantics (e.g. Qwen-Image-Edit-2509/-2511's QwenImageEditPlusPipeline):
            # serving it here would not give that pipeline's images.
            raise ConfigError(f"model_path: {checkpoint.path} is a {checkpoint.pipeline_class or '(unnamed)'} "
                              f"checkpoint (model_index.json); {type(self).__name__} gives the images of "
                              f"{' or '.join(self.pipeline_classes)}")
        self.select_attention(checkpoint.config("transformer")["attention_head_dim"])
        self.transformer = checkpoint.load("transformer", runtime)
        self.scheduler_class = checkpoint.component_class("scheduler")
        self.scheduler_config = checkpoint.load("scheduler").config
        self.load_components(checkpoint)
        self.install_attention()
        self.start_parallel()
        # Workers warm up with rank 0: its batches reach every rank through dispatch.
        if self.options.warmup and runtime.device.type == "cuda" and rank == 0 and self.needs_warmup():
            self.warm_up()

    # The diffusers pipelines (model_index.json's _class_name) whose semantics this denoiser reproduces.
    pipeline_classes: ClassVar[tuple[str, ...]]
    # The model's ditserve.kernels.<model>_processor.set_attention_backend(transformer, backend) and
    # ditserve.parallel.<model>.set_sequence_parallel(transformer, mesh, backend), as staticmethods.
    install_attention_backend: ClassVar[Callable[[torch.nn.Module, str], int]]
    install_sequence_parallel: ClassVar[Callable[[torch.nn.Module, SPMesh, str], int]]

    def load_components(self, checkpoint: Checkpoint) -> None:
        """Hook: what the model needs besides the transformer and the scheduler (other experts, geometry),
        and its checks of the checkpoint; before the attention processors are installed."""

    def experts(self) -> list[torch.nn.Module]:
        """Hook: every transformer a step may call (Wan 2.2 A14B: two experts)."""
        return [self.transformer]

    # --- attention and parallelism (hooks of GroupedDenoiser) ------------------------------

    def set_attention_processors(self, backend: str) -> None:
        for transformer in self.experts():
            self.install_attention_backend(transformer, backend)

    def check_parallel(self, config: ParallelConfig) -> None:
        for transformer in self.experts():
            try:
                check_heads(transformer.config.num_attention_heads, config.ulysses_degree, config.ulysses_chunks)
            except HeadsError as exc:
                raise ConfigError(f"parameter {exc.parameter}: {exc}") from None

    def use_sequence_parallel(self, mesh: SPMesh) -> None:
        for transformer in self.experts():
            self.install_sequence_parallel(transformer, mesh, self.sp_attention_backend)

    # --- warm-up (parameter warmup) -------------------------------------------------------------

    def needs_warmup(self) -> bool:
        """Hook: whether a first request would pay for more than the warm-up costs at load. By default yes:
        a step of an image model takes a fraction of a second."""
        return True

    @abstractmethod
    def warmup_batches(self, steps: int) -> list[list]:
        """Hook: the requests to denoise at load, in batches (each a list of requests of one group key,
        within max_batch_images), of ``steps`` steps at the model's default size, typical text lengths and
        guidance: such that they call every attention kernel variant that requests of that size call."""

    def warm_up(self) -> None:
        """Denoise ``warmup_batches`` on every rank of the group; return once the GPU has run them. With
        CUDA graphs, enough steps to capture the step's graph too (eager calls, then capture)."""
        steps = 1 + max((call.warmup for call in self._graphed), default=0)
        for batch in self.warmup_batches(steps):
            for latents in self.dispatch(batch):
                latents.cpu()  # waits for the GPU

    def warmup_tensor(self, *shape: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Seeded normal values (from a generator of its own: the global one is the caller's) for a
        warm-up input, on the runtime's device, in its dtype unless ``dtype`` is given."""
        values = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(0))
        return values.to(self.runtime.device, dtype or self.runtime.dtype)


def progress_target(row: Row) -> Optional[progress.Target]:
    """Where the row's progress goes (its request's ``progress`` parameter), None when nobody listens."""
    parameter = row.get(progress.PARAMETER)
    if parameter is None:
        return None
    try:
        return progress.Target.parse(parameter.value, parameter.row)
    except ValueError as error:
        raise RequestError(progress.PARAMETER, str(error)) from None


def seeded_noise(requests: Sequence, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The starting latents of a batch, (sum of num_images, *shape): each request's ``params.num_images``
    samples from a CPU generator of its own seeded with ``params.seed``, as the diffusers pipelines draw them
    with generator=torch.Generator("cpu").manual_seed(seed): same seed, same image, on any device and
    whatever the request is batched with."""
    return torch.cat([
        randn_tensor((r.params.num_images, *shape), generator=torch.Generator("cpu").manual_seed(r.params.seed),
                     device=device, dtype=dtype)
        for r in requests
    ])


def guide(negative: torch.Tensor, positive: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance ``negative + scale * (positive - negative)`` with one scale a row (``scales``:
    fp32, shaped to broadcast over a row), rounded as the diffusers pipelines round it with a Python float
    scale: the product in fp32, rounded once to the predictions' dtype. A scale tensor in that dtype would
    round the scale itself (bf16 makes 3.7 3.703125 and 7.3 7.3125: 14% and 29% of a random bf16 prediction's
    elements came out otherwise, by up to 0.25 and 0.5)."""
    difference = positive - negative
    return negative + (scales * difference.float()).to(difference.dtype)


def flow_match_scheduler(scheduler_class: type, scheduler_config, steps: int, image_tokens: int, device):
    """A fresh scheduler set as FluxPipeline and QwenImagePipeline set it: linear sigmas from 1 to
    1/steps and the resolution-dependent shift mu (schedulers with flow sigmas make their own)."""
    scheduler = scheduler_class.from_config(scheduler_config)
    config = scheduler.config
    mu = calculate_shift(
        image_tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    if getattr(config, "use_flow_sigmas", False):
        scheduler.set_timesteps(steps, device=device, mu=mu)
    else:
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, mu=mu)
    scheduler.set_begin_index(0)
    return scheduler
