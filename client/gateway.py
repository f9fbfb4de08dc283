"""``ditserve openai``: an OpenAI-compatible HTTP gateway (Starlette + uvicorn) in front of Triton.

Routes: ``POST /v1/images/generations`` (flux_t2i), ``POST /v1/images/edits`` (qwen_image_edit,
multipart as the SDK sends it), ``POST|GET /v1/videos``, ``GET|DELETE /v1/videos/{id}`` and
``GET /v1/videos/{id}/content`` (wan_t2v, or wan_i2v with an ``input_reference`` image, as background
jobs: ``ditserve.client.video_jobs``),
``GET /v1/models``.

Requests are mapped and checked by the same table as the Python client and CLI
(``ditserve.client.pipelines``); errors use OpenAI's JSON shape
``{"error": {"message", "type", "param", "code"}}`` so that OpenAI SDKs raise their usual
exceptions (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, ...).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hmac
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from tritonclient.utils import InferenceServerException

from ditserve.client.download import download, is_url
from ditserve.client.pipelines import PIPELINES, Pipeline, from_text, utf8
from ditserve.client.triton import AsyncClient, ModelNotLoaded, TritonTimeout, TritonUnavailable
from ditserve.client.video_jobs import MAX_VIDEO_JOBS, JobError, JobsFull, VideoJob, VideoJobs
from ditserve.images import ImageLimits
from ditserve.stage import RequestError
from ditserve.wan.limits import DEFAULT_FPS, DEFAULT_FRAMES, DEFAULT_HEIGHT, DEFAULT_WIDTH

# A generation request is a prompt (at most 20,000 characters) and a few numbers.
MAX_BODY_BYTES = 256 * 1024
# An edit request: one image at the server's byte limit, and the fields of a generation request.
MAX_IMAGE_BYTES = ImageLimits().max_bytes
MAX_UPLOAD_BYTES = MAX_IMAGE_BYTES + MAX_BODY_BYTES
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# OpenAI image options this gateway has no setting for: the values it honours as it is (absent or null
# always is: the SDK sends only the fields it is given); any other value is a 400, not a silent no-op.
FIXED_OPTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "background": (("auto", "opaque"), "the images are opaque"),
    "quality": (("auto", "standard"), "quality is set by num_inference_steps"),
    "style": ((), "a DALL-E 3 option"),
    "moderation": (("low",), "the gateway filters no content"),
    "input_fidelity": (("low",), "Qwen-Image-Edit has no fidelity setting"),
}
# About the caller (OpenAI's abuse monitoring), not the image: ignored.
METADATA_FIELDS = ("user", "safety_identifier")
# InferenceServerException.status() of Triton's "bad input" answer, over HTTP and over gRPC.
CLIENT_ERROR_STATUSES = ("400", "StatusCode.INVALID_ARGUMENT")
IMAGE_FIELDS = ("image", "image[]")  # the SDK names one file "image", a list "image[]"
REFERENCE_FIELD = "input_reference"  # videos.create's image: the first frame


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> Response:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        # ASCII with escapes (JSONResponse writes UTF-8): a field name echoed from the request may hold a lone
        # surrogate (JSON's "\ud800"), which has no UTF-8.
        return Response(json.dumps({"error": body}, separators=(",", ":")), status_code=self.status,
                        media_type="application/json")


Handler = Callable[[Request], Awaitable[Response]]


def create_app(triton_url: str, protocol: str = "grpc", api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, allow_image_urls: bool = False,
               max_video_jobs: int = MAX_VIDEO_JOBS, triton_timeout_s: float = 600.0) -> Starlette:
    triton: dict[str, AsyncClient] = {}
    videos = VideoJobs(max_video_jobs)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        # tritonclient's aio clients belong to the event loop that creates them.
        triton["client"] = AsyncClient(triton_url, protocol=protocol, timeout_s=triton_timeout_s)
        yield
        await videos.close()
        await triton["client"].close()

    def endpoint(handler: Handler) -> Handler:
        """API key check and the mapping of every failure to an OpenAI error response."""

        @functools.wraps(handler)
        async def wrapped(request: Request) -> Response:
            try:
                if api_key is not None:
                    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
                    if not hmac.compare_digest(given.encode(), api_key.encode()):
                        raise ApiError(401, "missing or incorrect API key (Authorization: Bearer KEY)",
                                       code="invalid_api_key")
                return await handler(request)
            except ApiError as error:
                return error.response()
            except RequestError as error:
                return ApiError(400, str(error), param=error.field).response()
            except ModelNotLoaded as error:
                return ApiError(404, str(error), param="model", code="model_not_found").response()
            except TritonUnavailable as error:
                return ApiError(503, str(error), code="triton_unavailable", type="server_error").response()
            except TritonTimeout as error:
                return ApiError(504, _timed_out(error), code="timeout", type="server_error").response()

        return wrapped

    async def run(kind: str, model: str, fields: dict[str, Any], **options):
        """One Triton request; the server's own checks (e.g. the checkpoint's size multiple) name a
        tensor, answered as a 400 about the OpenAI field."""
        pipeline = PIPELINES[kind]
        _only_table_fields(pipeline, fields)
        try:
            return await triton["client"].run(kind, model, **options, **fields)
        except InferenceServerException as error:
            field = pipeline.field_of(error.message())
            # The stages answer bad input as the client's error (HTTP 400, gRPC INVALID_ARGUMENT); a gRPC stream
            # carries no code, so a message naming an input counts as bad input too.
            if field is None and error.status() not in CLIENT_ERROR_STATUSES:
                raise ApiError(500, f"Triton: {error.message()}", type="server_error") from error
            raise ApiError(400, f"{field}: {error.message()}" if field else error.message(), param=field) from error

    async def images(kind: str, body: dict[str, Any]) -> JSONResponse:
        """generations and edits alike, once their bodies are read: OpenAI's options, then the table's fields."""
        pipeline = PIPELINES[kind]
        response_format = _text_option(body, "response_format") or "b64_json"
        if response_format != "b64_json":
            raise ApiError(400, f"response_format {response_format!r} is not supported; use b64_json "
                                "(this gateway keeps no images to link to)", param="response_format")
        output_format = _text_option(body, "output_format") or "png"
        if output_format not in OUTPUT_FORMATS:
            raise ApiError(400, f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}",
                           param="output_format")
        quality = body.pop("output_compression", None)
        if isinstance(quality, str) and quality.isdigit():  # a multipart form field
            quality = int(quality)
        if quality is not None and (isinstance(quality, bool) or not isinstance(quality, int) or not 0 <= quality <= 100):
            raise ApiError(400, f"output_compression must be an integer in [0, 100], got {quality!r}",
                           param="output_compression")
        if quality is not None and output_format == "png":  # the server's PNGs are sent as they are
            raise ApiError(400, "output_compression: applies to jpeg and webp only, not png",
                           param="output_compression")
        model = _text_option(body, "model") or pipeline.model
        _fixed_options(body)
        for name in METADATA_FIELDS:
            body.pop(name, None)
        if body.get("size") == "auto":  # OpenAI's default: the model's own size
            body.pop("size")
        result = await run(kind, model, body)
        encoded = await asyncio.to_thread(_encode, result.png, OUTPUT_FORMATS[output_format], quality)
        width, height = result.pixels.shape[2], result.pixels.shape[1]
        return JSONResponse({
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(data).decode()} for data in encoded],
            "output_format": output_format,
            "size": f"{width}x{height}",
        })

    async def generations(request: Request) -> JSONResponse:
        return await images("generate", await _json_body(request, max_body_bytes))

    async def edits(request: Request) -> JSONResponse:
        pipeline = PIPELINES["edit"]
        form = await _form(request, MAX_UPLOAD_BYTES, max_body_bytes, files_field="image")
        if "mask" in form:
            raise ApiError(400, "mask: Qwen-Image-Edit takes no mask; say in the prompt what to change", param="mask")
        uploads = [(name, value) for name in IMAGE_FIELDS for value in form.pop(name, [])]
        body = {name: _text_field(pipeline, name, values) for name, values in form.items()}
        if uploads:
            body["image"] = [await _image_bytes(name, value, allow_image_urls) for name, value in uploads]
        return await images("edit", body)

    async def create_video(request: Request) -> JSONResponse:
        pipeline = PIPELINES["video"]
        # The SDK sends multipart/form-data; raw HTTP callers may send JSON.
        if request.headers.get("content-type", "").startswith("application/json"):
            body = await _json_body(request, max_body_bytes)
            references = [body.pop(REFERENCE_FIELD)] if body.get(REFERENCE_FIELD) is not None else []
        else:
            form = await _form(request, MAX_UPLOAD_BYTES, max_body_bytes, files_field=REFERENCE_FIELD)
            references = form.pop(REFERENCE_FIELD, [])
            body = {name: _text_field(pipeline, name, values) for name, values in form.items()}
        body = {name: value for name, value in body.items() if value is not None}
        if "image" in body:  # the table's name for it; OpenAI's is input_reference
            raise ApiError(400, f"image: send the first frame as {REFERENCE_FIELD}", param="image")
        if references:  # OpenAI's reference image: the first frame, image-to-video
            if len(references) != 1:
                raise ApiError(400, f"{REFERENCE_FIELD}: expected 1 image, got {len(references)}", param=REFERENCE_FIELD)
            body["image"] = [await _image_bytes(REFERENCE_FIELD, references[0], allow_image_urls)]
        model = _text_option(body, "model") or pipeline.model_for(body)
        seconds = body.pop("seconds", None)
        _only_table_fields(pipeline, body, also=("model", "seconds", REFERENCE_FIELD))
        if seconds is not None:
            if "num_frames" in body:
                raise ApiError(400, "seconds: give seconds or num_frames, not both", param="seconds")
            fps = body.get("fps", DEFAULT_FPS)
            pipeline.fields["fps"].tensors("fps", fps)  # checked first: the frame count is computed from it
            body["num_frames"] = _seconds(seconds) * fps + 1
        # Checked now, so that a bad field is a 400 here and not a failed job later; in a thread, as
        # AsyncClient.run does: checking the reference image decodes it (up to 4096x4096).
        try:
            await asyncio.to_thread(pipeline.tensors, body)
        except RequestError as error:
            if error.field == "image":
                raise RequestError(REFERENCE_FIELD, str(error).removeprefix("image: ")) from None
            if error.field == "num_frames" and seconds is not None:
                raise RequestError("seconds", f"{seconds} s at {fps} fps is {body['num_frames']} frames; {error}") from None
            raise
        if not await triton["client"].is_model_ready(model):
            raise ModelNotLoaded(model, triton_url)
        frames, fps = body.get("num_frames", DEFAULT_FRAMES), body.get("fps", DEFAULT_FPS)
        job = VideoJob(model=model, prompt=body["prompt"], size=body.get("size", f"{DEFAULT_WIDTH}x{DEFAULT_HEIGHT}"),
                       seconds=f"{(frames - 1) / fps:g}")

        async def render() -> bytes:
            try:
                streamed = {"progress": job.on_progress} if await triton["client"].streams(model) else {}
                return (await run("video", model, body, outputs=("VIDEO",), **streamed)).mp4
            except ApiError as error:
                raise JobError(error.code or error.type, error.message) from error
            except RequestError as error:  # the client's own checks of the model (ditserve.client.triton)
                raise JobError("invalid_request_error", str(error)) from error
            except (TritonUnavailable, ModelNotLoaded) as error:
                raise JobError("triton_unavailable", str(error)) from error
            except TritonTimeout as error:
                raise JobError("timeout", _timed_out(error)) from error

        try:
            videos.start(job, render)
        except JobsFull as error:
            raise ApiError(429, str(error), code="too_many_video_jobs") from error
        return JSONResponse(job.json())

    def video_job(request: Request) -> VideoJob:
        video_id = request.path_params["video_id"]
        job = videos.get(video_id)
        if job is None:
            raise ApiError(404, f"no video {video_id!r} (finished videos are kept until deleted or replaced; "
                                f"at most {videos.limit})", param="video_id", code="not_found")
        return job

    async def list_videos(request: Request) -> JSONResponse:
        jobs = videos.newest_first()
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order: must be asc or desc, got {order!r}", param="order")
        if order == "asc":
            jobs.reverse()
        after = request.query_params.get("after")
        if after is not None:
            ids = [job.id for job in jobs]
            jobs = jobs[ids.index(after) + 1:] if after in ids else []
        limit = request.query_params.get("limit", "20")
        if not limit.isdigit():
            raise ApiError(400, f"limit: must be a non-negative integer, got {limit!r}", param="limit")
        data = [job.json() for job in jobs[:int(limit)]]
        return JSONResponse({"object": "list", "data": data, "has_more": len(jobs) > len(data),
                             "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})

    async def retrieve_video(request: Request) -> JSONResponse:
        return JSONResponse(video_job(request).json())

    async def delete_video(request: Request) -> JSONResponse:
        job = video_job(request)
        videos.delete(job.id)
        return JSONResponse({"id": job.id, "object": "video.deleted", "deleted": True})

    async def video_content(request: Request) -> Response:
        job = video_job(request)
        variant = request.query_params.get("variant", "video")
        if variant != "video":
            raise ApiError(400, f"variant {variant!r} is not available; only video (the MP4)", param="variant")
        if job.mp4 is None:
            raise ApiError(409, f"video {job.id} is {job.status}; its content exists once it is completed",
                           param="video_id", code="video_not_ready")
        return Response(job.mp4, media_type="video/mp4",
                        headers={"Content-Disposition": f'attachment; filename="{job.id}.mp4"'})

    async def models(_request: Request) -> JSONResponse:
        names = await triton["client"].loaded_ensembles()
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "ditserve"} for name in names]
        return JSONResponse({"object": "list", "data": data})

    async def http_error(_request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        return ApiError(error.status_code, error.detail, code="not_found" if error.status_code == 404 else None).response()

    routes = [
        Route("/v1/images/generations", endpoint(generations), methods=["POST"]),
        Route("/v1/images/edits", endpoint(edits), methods=["POST"]),
        Route("/v1/videos", endpoint(create_video), methods=["POST"]),
        Route("/v1/videos", endpoint(list_videos), methods=["GET"]),
        Route("/v1/videos/{video_id}", endpoint(retrieve_video), methods=["GET"]),
        Route("/v1/videos/{video_id}", endpoint(delete_video), methods=["DELETE"]),
        Route("/v1/videos/{video_id}/content", endpoint(video_content), methods=["GET"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})


def _only_table_fields(pipeline: Pipeline, fields: dict[str, Any], also: tuple[str, ...] = ()) -> None:
    # Only OpenAI names here: ensemble tensor names would skip the client-side checks.
    unknown = sorted(set(fields) - set(pipeline.fields))
    if unknown:
        raise RequestError(unknown[0], f"unknown field; known: {', '.join((*also, *pipeline.fields))}")


def _limited(request: Request, limit: int) -> Request:
    """The request, with a body that answers 413 past ``limit`` bytes: from Content-Length when
    there is one, and counted as it streams in (chunked bodies have none)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}", code="body_too_large")
    received = 0

    async def receive():
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
        return message

    return Request(request.scope, receive)


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, read no further than ``limit`` bytes."""
    try:
        body = json.loads(await _limited(request, limit).body())
    except ValueError as error:
        raise ApiError(400, f"request body is not valid JSON: {error}") from error
    except RecursionError:  # [[[[...: the decoder recurses once per level
        raise ApiError(400, "request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


async def _form(request: Request, limit: int, max_field_bytes: int,
                files_field: str) -> dict[str, list[str | UploadFile]]:
    """A form body, read no further than ``limit`` bytes: field name -> its values. Multipart as
    OpenAI's SDKs send it; urlencoded too, for requests without files (an image by URL).
    ``files_field``: the route's file field, named by the error about too many files."""
    if not request.headers.get("content-type", "").startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise ApiError(400, "request body must be multipart/form-data, as OpenAI's SDKs send it")
    try:
        form = await _limited(request, limit).form(max_files=len(IMAGE_FIELDS) + 1, max_part_size=max_field_bytes)
    except HTTPException as error:  # Starlette's parser limits; a text field too large is not named by it
        param = files_field if error.detail.startswith("Too many files") else None
        raise ApiError(error.status_code, f"{param}: {error.detail}" if param else error.detail, param=param) from error
    fields: dict[str, list[str | UploadFile]] = {}
    for name, value in form.multi_items():
        fields.setdefault(name, []).append(value)
    return fields


def _text_field(pipeline: Pipeline, name: str, values: list[str | UploadFile]) -> Any:
    """One form field's value: text, typed by the table's converter where the field is the table's."""
    if len(values) != 1 or not isinstance(values[0], str):
        raise ApiError(400, f"{name}: expected one text value", param=name)
    converter = pipeline.fields.get(name)
    return values[0] if converter is None else from_text(converter, name, values[0])


async def _image_bytes(name: str, value: Any, allow_urls: bool) -> bytes:
    """An uploaded image file's bytes; an http(s) URL's only where the gateway allows URLs."""
    if isinstance(value, str):
        if not is_url(value):
            raise ApiError(400, f"{name}: expected an image file upload", param=name)
        if not allow_urls:
            raise ApiError(400, f"{name}: this gateway does not download image URLs (it runs without "
                                "--allow-image-urls); upload the file instead", param=name)
        return await asyncio.to_thread(download, value, name)
    if not isinstance(value, UploadFile):  # a JSON body's value can be anything
        raise ApiError(400, f"{name}: expected an image file upload or an http(s) URL, got {type(value).__name__}",
                       param=name)
    data = await value.read(MAX_IMAGE_BYTES + 1)
    if len(data) > MAX_IMAGE_BYTES:
        raise ApiError(413, f"{name}: {value.filename or 'the file'} is larger than {MAX_IMAGE_BYTES} bytes, the limit",
                       param=name, code="image_too_large")
    return data


def _text_option(body: dict[str, Any], name: str) -> str | None:
    """An OpenAI option that is no table field, taken out of ``body``: a string, None when absent or null."""
    value = body.pop(name, None)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"{name}: must be a string, got {type(value).__name__}", param=name)
    utf8(name, value)  # a model name goes to Triton as UTF-8
    return value


def _fixed_options(body: dict[str, Any]) -> None:
    """Takes ``FIXED_OPTIONS`` out of ``body``, refusing a value this gateway would not honour."""
    for name, (honoured, why) in FIXED_OPTIONS.items():
        value = body.pop(name, None)
        if value is not None and value not in honoured:
            allowed = f"allowed: {', '.join(honoured)}" if honoured else "leave it out"
            raise ApiError(400, f"{name}: {value!r} is not supported here ({why}); {allowed}", param=name)


def _timed_out(error: TritonTimeout) -> str:
    return f"{error}; longer requests need a larger ditserve openai --triton-timeout"


def _seconds(value: Any) -> int:
    # OpenAI's durations (4, 8, 12) are multiples of 4, so seconds x fps + 1 is always 4k+1 frames.
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, f"seconds: must be a positive whole number of seconds, got {value!r}", param="seconds")
    return value


def _encode(pngs: list[bytes], image_format: str, quality: int | None) -> list[bytes]:
    if image_format == "PNG":
        return pngs
    encoded = []
    for png in pngs:
        out = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").save(out, image_format, quality=100 if quality is None else quality)
        encoded.append(out.getvalue())
    return encoded


def serve(triton_url: str, protocol: str, host: str, port: int, api_key: str | None, allow_image_urls: bool = False,
          max_video_jobs: int = MAX_VIDEO_JOBS, triton_timeout_s: float = 600.0) -> int:
    import uvicorn

    print(f"ditserve openai: forwarding to Triton at {triton_url} over {protocol}; "
          f"OpenAI base URL http://{host}:{port}/v1", flush=True)
    app = create_app(triton_url, protocol, api_key, allow_image_urls=allow_image_urls, max_video_jobs=max_video_jobs,
                     triton_timeout_s=triton_timeout_s)
    uvicorn.run(app, host=host, port=port, log_level="info")
    return 0
