"""OpenAI-style request fields -> ensemble input tensors, per pipeline, in one table.

The client, the CLI (its options are generated from these rows) and the OpenAI gateway all
read ``PIPELINES``; a new pipeline or field is one row here (or a route of a row: video with an
image goes to wan_i2v). Limits come from the serving
code itself (``ditserve.flux.limits``, ``ditserve.wan.limits``, ``ditserve.images``, the edit
request stage's image count) so that a request the client accepts is one the server accepts,
except for checks that depend on the loaded checkpoint (the size multiple comes from its VAE,
the 4k+1 frame count from its temporal factor), which only the server can make.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Union

from ditserve.flux.limits import MAX_GUIDANCE, MAX_IMAGES, MAX_PROMPT_CHARS, MAX_SEED, MAX_SIZE, MAX_STEPS, MIN_SIZE
from ditserve.images import ImageLimits, decode_image
from ditserve.qwen_image.request import MAX_INPUT_IMAGES
from ditserve.stage import RequestError
from ditserve.wan.limits import MAX_FPS, MAX_FRAMES

# One ensemble input: (Triton data type, values). Values are one row of the request; the
# batch dimension is added by the client.
Tensor = tuple[str, list]


def utf8(field: str, text: str) -> bytes:
    """``text`` as the UTF-8 the server reads; JSON's "\\ud800" escape makes a str with a lone
    surrogate, which has none."""
    try:
        return text.encode()
    except UnicodeEncodeError as error:
        raise RequestError(field, f"is not valid Unicode text: {error.reason} at character {error.start}") from None


@dataclasses.dataclass(frozen=True)
class Text:
    tensor: str
    required: bool = False
    max_chars: int = MAX_PROMPT_CHARS
    help: str = ""

    def tensors(self, field: str, value: Any) -> dict[str, Tensor]:
        if not isinstance(value, str):
            raise RequestError(field, f"must be a string, got {type(value).__name__}")
        if len(value) > self.max_chars:
            raise RequestError(field, f"must be at most {self.max_chars} characters, got {len(value)}")
        if self.required and not value.strip():
            raise RequestError(field, "must not be empty")
        return {self.tensor: ("BYTES", [utf8(field, value)])}

    def datatypes(self) -> dict[str, str]:
        return {self.tensor: "BYTES"}


@dataclasses.dataclass(frozen=True)
class Int:
    tensor: str
    lo: int
    # None: the pipeline's own request stage owns the upper limit (it has no constant to import yet).
    hi: int | None = None
    datatype: str = "INT32"
    help: str = ""

    def tensors(self, field: str, value: Any) -> dict[str, Tensor]:
        # bool is an int in Python, but `"n": true` is a client bug, not 1.
        if isinstance(value, bool) or not isinstance(value, int) or value < self.lo or (self.hi is not None and value > self.hi):
            limit = f"[{self.lo}, {self.hi}]" if self.hi is not None else f">= {self.lo}"
            raise RequestError(field, f"must be an integer {limit}, got {value!r}")
        return {self.tensor: (self.datatype, [value])}

    def datatypes(self) -> dict[str, str]:
        return {self.tensor: self.datatype}


@dataclasses.dataclass(frozen=True)
class Float:
    tensor: str
    lo: float
    hi: float
    help: str = ""

    def tensors(self, field: str, value: Any) -> dict[str, Tensor]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and self.lo <= value <= self.hi
        ):
            raise RequestError(field, f"must be a finite number in [{self.lo}, {self.hi}], got {value!r}")
        return {self.tensor: ("FP32", [float(value)])}

    def datatypes(self) -> dict[str, str]:
        return {self.tensor: "FP32"}


@dataclasses.dataclass(frozen=True)
class Size:
    """OpenAI's "WxH" string, sent as two tensors."""

    width: str
    height: str
    lo: int = MIN_SIZE
    hi: int = MAX_SIZE
    help: str = ""

    def tensors(self, field: str, value: Any) -> dict[str, Tensor]:
        match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", value) if isinstance(value, str) else None
        if match is None:
            raise RequestError(field, f"must be WIDTHxHEIGHT, e.g. 1024x768, got {value!r}")
        width, height = int(match[1]), int(match[2])
        if not (self.lo <= width <= self.hi and self.lo <= height <= self.hi):
            raise RequestError(field, f"width and height must be in [{self.lo}, {self.hi}], got {value}")
        return {self.width: ("INT32", [width]), self.height: ("INT32", [height])}

    def datatypes(self) -> dict[str, str]:
        return {self.width: "INT32", self.height: "INT32"}


@dataclasses.dataclass(frozen=True)
class Images:
    """Encoded input images (PNG, JPEG, WebP), one tensor element each.

    Each is checked here as the server will check it (``ditserve.images.decode_image``: bytes,
    then pixels from the header before any decoding, then a full decode), so that an image the
    server would refuse is refused before it is uploaded, with this field's name.
    """

    tensor: str
    max_images: int
    limits: ImageLimits = ImageLimits()
    help: str = ""

    def tensors(self, field: str, value: Any) -> dict[str, Tensor]:
        if isinstance(value, (bytes, str)) or not isinstance(value, Sequence):
            raise RequestError(field, f"must be a list of encoded images, got {type(value).__name__}")
        if not 1 <= len(value) <= self.max_images:
            expected = "1 image" if self.max_images == 1 else f"1 to {self.max_images} images"
            raise RequestError(field, f"expected {expected}, got {len(value)}")
        for data in value:
            if not isinstance(data, bytes):
                raise RequestError(field, f"must be encoded image bytes, got {type(data).__name__}")
            decode_image(data, field, self.limits)
        return {self.tensor: ("BYTES", list(value))}

    def datatypes(self) -> dict[str, str]:
        return {self.tensor: "BYTES"}


Converter = Union[Text, Int, Float, Size, Images]

# The Python type of each converter's values where they arrive as text (command-line options,
# multipart form fields); str for the others.
VALUE_TYPES: dict[type, type] = {Int: int, Float: float}


def from_text(converter: Converter, field: str, text: str) -> Any:
    """A field's value written as text -> the value its converter checks."""
    value_type = VALUE_TYPES.get(type(converter), str)
    try:
        return value_type(text)
    except ValueError:
        raise RequestError(field, f"must be {'an integer' if value_type is int else 'a number'}, got {text!r}") from None


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """One kind of request (generate, edit, video) and the ensemble that serves it; ``routes`` names
    the ensemble that serves the request instead when it has a given field (video with an image:
    image-to-video)."""

    model: str
    fields: Mapping[str, Converter]
    outputs: tuple[str, ...]
    routes: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def model_for(self, fields: Mapping[str, Any]) -> str:
        """The ensemble for these OpenAI-named fields (None = not sent)."""
        return next((model for field, model in self.routes.items() if fields.get(field) is not None), self.model)

    def datatypes(self) -> dict[str, str]:
        """Ensemble input name -> Triton data type."""
        return {t: d for converter in self.fields.values() for t, d in converter.datatypes().items()}

    def tensors(self, fields: Mapping[str, Any]) -> dict[str, Tensor]:
        """Validate OpenAI-named fields (None = the server's default) into ensemble tensors."""
        fields = {name: value for name, value in fields.items() if value is not None}
        datatypes = self.datatypes()
        unknown = sorted(set(fields) - set(self.fields) - set(datatypes))
        if unknown:
            raise RequestError(unknown[0], f"unknown field for {self.model}; known: {', '.join(self.fields)}")
        if set(fields) & set(datatypes):
            return self._unchecked(fields, datatypes)
        tensors: dict[str, Tensor] = {}
        for name, converter in self.fields.items():
            if name in fields:
                tensors |= converter.tensors(name, fields[name])
            elif getattr(converter, "required", False):
                raise RequestError(name, "is required")
        return tensors

    def _unchecked(self, fields: Mapping[str, Any], datatypes: Mapping[str, str]) -> dict[str, Tensor]:
        # A request written with ensemble input names (HEIGHT=72, ...) goes out as written, the
        # way Triton's own clients send it: that is how tests reach the server's validation.
        tensors: dict[str, Tensor] = {}
        for name, value in fields.items():
            names = list(self.fields[name].datatypes()) if name in self.fields else [name]
            if len(names) != 1:
                raise RequestError(name, f"cannot be mixed with ensemble input names; send {' and '.join(names)}")
            tensors[names[0]] = (datatypes[names[0]], [utf8(name, value) if isinstance(value, str) else value])
        return tensors

    def field_of(self, message: str) -> str | None:
        """The OpenAI field a server-side error message is about ("HEIGHT: must be ..." -> size)."""
        for name, converter in self.fields.items():
            if any(re.search(rf"\b{tensor}\b", message) for tensor in converter.datatypes()):
                return name
        return None


_IMAGE_FIELDS: dict[str, Converter] = {
    "prompt": Text("PROMPT", required=True, help="what to draw"),
    "negative_prompt": Text("NEGATIVE_PROMPT", help="what to avoid (true CFG, with --true-cfg-scale > 1)"),
    "n": Int("NUM_IMAGES", 1, MAX_IMAGES, help="images per request"),
    "size": Size("WIDTH", "HEIGHT", help="WIDTHxHEIGHT, multiples of 16"),
    "seed": Int("SEED", 0, MAX_SEED, datatype="INT64", help="random seed (default: drawn by the server)"),
    "num_inference_steps": Int("NUM_INFERENCE_STEPS", 1, MAX_STEPS, help="denoising steps"),
    "guidance_scale": Float("GUIDANCE_SCALE", 0.0, MAX_GUIDANCE, help="distilled guidance (FLUX.1-dev)"),
    "true_cfg_scale": Float("TRUE_CFG_SCALE", 0.0, MAX_GUIDANCE, help="classifier-free guidance with the negative prompt"),
}

PIPELINES: dict[str, Pipeline] = {
    "generate": Pipeline("flux_t2i", _IMAGE_FIELDS, outputs=("PNG", "IMAGE")),
    "edit": Pipeline(
        "qwen_image_edit",
        _IMAGE_FIELDS
        | {
            "size": Size("WIDTH", "HEIGHT", help="WIDTHxHEIGHT, multiples of 16 (default: the input image's aspect ratio)"),
            "image": Images("INPUT_IMAGE", MAX_INPUT_IMAGES, help="input image: a file or an http(s) URL"),
        },
        outputs=("PNG", "IMAGE"),
    ),
    "video": Pipeline(
        "wan_t2v",
        {name: _IMAGE_FIELDS[name] for name in ("prompt", "size", "seed", "num_inference_steps")}
        | {
            "negative_prompt": Text("NEGATIVE_PROMPT", help="what to avoid (with --guidance-scale > 1)"),
            "guidance_scale": Float("GUIDANCE_SCALE", 0.0, MAX_GUIDANCE, help="classifier-free guidance (on above 1)"),
            "guidance_scale_2": Float("GUIDANCE_SCALE_2", 0.0, MAX_GUIDANCE,
                                      help="Wan 2.2 A14B: the low-noise expert's guidance (default: guidance_scale)"),
            "num_frames": Int("NUM_FRAMES", 1, MAX_FRAMES, help="frames to generate: 4k+1 (1, 5, 9, ..., 81)"),
            "fps": Int("FPS", 1, MAX_FPS, help="frames per second of the MP4"),
            "image": Images("IMAGE", 1, help="first frame: image-to-video (wan_i2v), a file or an http(s) URL"),
        },
        # FRAMES: the decoded uint8 frames, for callers that want pixels without an MP4 decoder.
        outputs=("VIDEO", "FRAMES"),
        routes={"image": "wan_i2v"},
    ),
}
