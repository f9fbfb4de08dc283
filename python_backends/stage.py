"""The stage contract shared by every pipeline stage.

A stage is one Triton model of an ensemble (text encoding, denoising, VAE decoding, ...),
written as plain PyTorch so that it can be unit-tested without Triton. The Triton adapter
(`ditserve.triton_model`) turns Triton requests into *rows* and back:

* a row is one batch element of one request: ``{input name: value}`` with the batch
  dimension removed. Numeric inputs are ``torch.Tensor`` (on the stage's device when the
  previous ensemble step left them there), string inputs are ``numpy`` object arrays of
  ``bytes``. Optional inputs that were not sent are absent from the dict. Triton request
  parameters that the stage declares (``request_parameters``) are there too, as
  ``RequestParameter``s, when the request has them;
* ``Stage.execute(rows)`` returns one entry per row: a dict of outputs (batch dimension
  removed), a ``RequestError`` that fails that row's request alone (bad input), or a
  ``StageFailure`` that fails it as an internal error (its batch broke: out of memory, a parallel
  worker lost) while the rows of other batches keep their outputs.

Stages receive every row that Triton's dynamic batcher hands over in one call and decide
themselves how to group them (e.g. the denoiser groups by output size and step count).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np
import torch

from ditserve.model_config import ConfigError

Row = Mapping[str, Any]
Outputs = dict[str, "torch.Tensor | np.ndarray"]


class RequestError(ValueError):
    """Bad input in one request: names the field and the limit it broke."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class StageFailure(RuntimeError):
    """An unexpected exception that broke some rows' batch only: their requests get an internal error
    naming it, and the other rows of the call their outputs."""

    def __init__(self, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.__cause__ = cause  # raised in process (LocalPipeline), it chains to what it stands for


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Where and how a stage runs: checkpoint, device and dtype.

    Each value comes from the model's config.pbtxt parameter of the same name when that is
    non-empty, else from the environment (``DITSERVE_MODEL_PATH``, ``DITSERVE_DEVICE``,
    ``DITSERVE_DTYPE``, set by ``ditserve serve`` or by hand in a stock Triton container),
    else from the default: the built-in ``tiny`` checkpoint, CUDA when present, float32 on
    CPU and bfloat16 on CUDA.
    """

    model_path: str
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], env: Mapping[str, str] = os.environ) -> Runtime:
        def pick(name: str) -> str:
            return params.get(name, "").strip() or env.get(f"DITSERVE_{name.upper()}", "").strip()

        device_name = pick("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(device_name)
        except RuntimeError as exc:
            raise ConfigError(f"device: {device_name!r} is not a torch device ({exc})") from None
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"device: must be cpu or cuda[:N], got {device_name!r}")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError("device: cuda was asked for but torch sees no CUDA device")
            count = torch.cuda.device_count()
            # Here, not at the first tensor moved there: that fails mid-load with CUDA's "invalid device ordinal".
            if device.index is not None and device.index >= count:
                raise ConfigError(f"device: {device_name!r} is not a GPU torch sees: it sees {count} "
                                  f"(cuda:0 to cuda:{count - 1})")
            device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        dtype_name = pick("dtype") or ("bfloat16" if device.type == "cuda" else "float32")
        if dtype_name not in _DTYPES:
            raise ConfigError(f"dtype: must be one of {sorted(_DTYPES)}, got {dtype_name!r}")
        return cls(model_path=pick("model_path") or "tiny", device=device, dtype=_DTYPES[dtype_name])


#: The config.pbtxt parameters that Runtime.from_parameters reads: one per field, of the same name.
RUNTIME_PARAMETERS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(Runtime))


def parse_options(options_type: type, params: Mapping[str, str]):
    """Build a frozen options dataclass from string parameters, validating types once at load."""
    hints = typing.get_type_hints(options_type)
    values = {}
    for field in dataclasses.fields(options_type):
        raw = params.get(field.name, "").strip()
        if not raw:
            continue
        kind = hints[field.name]
        try:
            if kind is bool:
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                values[field.name] = raw.lower() in ("true", "1", "yes")
            else:
                values[field.name] = kind(raw)
        except ValueError:
            raise ConfigError(f"parameter {field.name}: expected {kind.__name__}, got {raw!r}") from None
    try:
        return options_type(**values)
    except ValueError as exc:  # __post_init__ range checks
        raise ConfigError(str(exc)) from None


def check_parameter(name: str, value: int, lo: int, hi: int | None = None) -> None:
    """The range check of an options field, for its dataclass's ``__post_init__``: a ValueError
    naming the config.pbtxt parameter and its range (``parse_options`` makes it a ConfigError)."""
    if value < lo or (hi is not None and value > hi):
        limit = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"parameter {name}: must be {limit}, got {value}")


def check_choice(name: str, value: str, choices: typing.Sequence[str]) -> None:
    """``check_parameter`` for a string option with a fixed set of values."""
    if value not in choices:
        raise ValueError(f"parameter {name}: must be one of {', '.join(choices)}, got {value!r}")


class RequestParameter(typing.NamedTuple):
    """A request parameter (not a tensor) as one row of the request sees it. Parameters, unlike
    optional inputs, do not keep Triton's dynamic batcher from batching requests that have them with
    requests that do not."""

    value: str | int | bool
    row: int  # this row's position in its request: the rows of one request share the value


@dataclasses.dataclass(frozen=True)
class NoOptions:
    pass


class Stage(ABC):
    """One pipeline stage. Subclasses load weights in ``__init__`` and implement ``execute``."""

    Options: ClassVar[type] = NoOptions
    inputs: ClassVar[tuple[str, ...]] = ()  # Triton tensor names; config.pbtxt must match
    outputs: ClassVar[tuple[str, ...]] = ()
    request_parameters: ClassVar[tuple[str, ...]] = ()  # Triton request parameters the rows carry
    # Inputs that must have one value in every row of a request: they set the shape of its outputs, which
    # go back as one tensor per request. The adapter refuses a request whose rows differ before any row runs.
    uniform_fields: ClassVar[tuple[str, ...]] = ()
    # For outputs whose shape follows an input's content (a decoded image's size): that input, which the
    # adapter names when the rows of one request give such an output different shapes.
    sources: ClassVar[Mapping[str, str]] = MappingProxyType({})

    def __init__(self, runtime: Runtime, options: Any = None):
        self.runtime = runtime
        self.options = options if options is not None else self.Options()

    @abstractmethod
    def execute(self, rows: Sequence[Row]) -> list[Outputs | RequestError | StageFailure]:
        """Run every row; return outputs, a ``RequestError`` or a ``StageFailure`` for each, in order."""

    def close(self) -> None:
        """Release what outlives the object's memory (worker processes); the model is unloading."""


def run_by_shape(rows: Sequence[Row], parse: Callable[[Row], Any],
                 run: Callable[[list[Any]], Sequence[Outputs]],
                 key: Callable[[Any], Hashable] = lambda t: tuple(t.shape)) -> list[Outputs | RequestError]:
    """``execute`` for stages that batch rows of one shape: each row is parsed to one value, by
    default a tensor (a RequestError fails that row alone), the values sharing ``key`` go through
    ``run`` together, which returns one output dict per value, in order."""
    results: list[Outputs | RequestError | None] = [None] * len(rows)
    groups: dict[Hashable, list[tuple[int, Any]]] = defaultdict(list)
    for i, row in enumerate(rows):
        try:
            value = parse(row)
        except RequestError as error:
            results[i] = error
            continue
        groups[key(value)].append((i, value))
    for members in groups.values():
        for (i, _), outputs in zip(members, run([value for _, value in members])):
            results[i] = outputs
    return results


def run_together(rows: Sequence[Row], parse: Callable[[Row], Any],
                 run: Callable[[list[Any]], Sequence[Outputs]]) -> list[Outputs | RequestError]:
    """``execute`` for stages that run all the valid rows of a call at once (the text encoders:
    prompts of any length batch together): ``run_by_shape`` with a single group."""
    return run_by_shape(rows, parse, run, key=lambda _: None)


# --- reading fields of a row ------------------------------------------------------------


def _scalar(row: Row, name: str):
    value = row[name]
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise RequestError(name, f"expected one value, got shape {tuple(value.shape)}")
        return value.reshape(()).item()
    array = np.asarray(value)
    if array.size != 1:
        raise RequestError(name, f"expected one value, got shape {array.shape}")
    return array.reshape(()).item()


def int_field(row: Row, name: str, default: int | None, lo: int, hi: int) -> int | None:
    """An integer input within [lo, hi]; ``default`` when the optional input is absent."""
    if name not in row:
        return default
    value = _scalar(row, name)
    if isinstance(value, float) or not lo <= value <= hi:
        raise RequestError(name, f"must be an integer in [{lo}, {hi}], got {value}")
    return int(value)


def float_field(row: Row, name: str, default: float, lo: float, hi: float) -> float:
    """A finite float input within [lo, hi]; ``default`` when absent."""
    if name not in row:
        return default
    value = float(_scalar(row, name))
    if not math.isfinite(value) or not lo <= value <= hi:
        raise RequestError(name, f"must be a finite number in [{lo}, {hi}], got {value}")
    return value


def text_field(row: Row, name: str, *, required: bool, max_chars: int) -> str | None:
    """A UTF-8 string input; required ones must not be empty or blank."""
    if name not in row:
        if required:
            raise RequestError(name, "is required")
        return None
    raw = _scalar(row, name)
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        raise RequestError(name, "must be valid UTF-8") from None
    if len(text) > max_chars:
        raise RequestError(name, f"must be at most {max_chars} characters, got {len(text)}")
    if required and not text.strip():
        raise RequestError(name, "must not be empty")
    return text


def prompt_fields(row: Row, max_chars: int) -> tuple[str, str | None]:
    """PROMPT (required, not blank) and NEGATIVE_PROMPT (None when absent), at most ``max_chars`` each."""
    prompt = text_field(row, "PROMPT", required=True, max_chars=max_chars)
    return prompt, text_field(row, "NEGATIVE_PROMPT", required=False, max_chars=max_chars)


def tensor_field(row: Row, name: str, ndim: int, device: torch.device, dtype: torch.dtype, *,
                 width: int | None = None) -> torch.Tensor:
    """A tensor input of a fixed rank (and last dimension ``width``, where given: e.g. the width of the
    embeddings the checkpoint's transformer takes), moved to the stage's device and dtype."""
    if name not in row:
        raise RequestError(name, "is required")
    value = row[name]
    if value.dim() != ndim:
        raise RequestError(name, f"expected {ndim} dimensions, got shape {tuple(value.shape)}")
    if width is not None and value.shape[-1] != width:
        raise RequestError(name, f"last dimension must be {width} for this checkpoint, got shape {tuple(value.shape)}")
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise RequestError(name, "contains NaN or infinite values")
    return value.to(device=device, dtype=dtype)


# --- writing fields of a row ------------------------------------------------------------

#: The dtypes of the scalar request fields that stages pass on down an ensemble (config.pbtxt types).
SCALAR_FIELD_DTYPES: Mapping[str, torch.dtype] = MappingProxyType({
    "HEIGHT": torch.int32,
    "WIDTH": torch.int32,
    "NUM_FRAMES": torch.int32,
    "NUM_INFERENCE_STEPS": torch.int32,
    "GUIDANCE_SCALE": torch.float32,
    "GUIDANCE_SCALE_2": torch.float32,
    "TRUE_CFG_SCALE": torch.float32,
    "SEED": torch.int64,
    "NUM_IMAGES": torch.int32,
    "FPS": torch.int32,
})


def scalar_outputs(**values: float) -> Outputs:
    """One-element output tensors of scalar request fields, each in its ``SCALAR_FIELD_DTYPES`` dtype."""
    return {name: torch.tensor([value], dtype=SCALAR_FIELD_DTYPES[name]) for name, value in values.items()}
