"""``ditserve openai``: an OpenAI-compatible HTTP gateway (Starlette + uvicorn) in front of Triton.

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
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from tritonclient.utils import InferenceServerException

from ditserve.client.pipelines import PIPELINES
from ditserve.client.triton import AsyncClient, ModelNotLoaded, TritonUnavailable
from ditserve.stage import RequestError

# A generation request is a prompt (at most 20,000 characters) and a few numbers.
MAX_BODY_BYTES = 256 * 1024
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# OpenAI fields that change nothing here: accepted, so that SDK defaults do not fail.
IGNORED_FIELDS = ("quality", "style", "user", "background", "moderation")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


Handler = Callable[[Request], Awaitable[JSONResponse]]


def create_app(triton_url: str, protocol: str = "grpc", api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    triton: dict[str, AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        # tritonclient's aio clients belong to the event loop that creates them.
        triton["client"] = AsyncClient(triton_url, protocol=protocol)
        yield
        await triton["client"].close()

    def endpoint(handler: Handler) -> Handler:
        """API key check and the mapping of every failure to an OpenAI error response."""

        @functools.wraps(handler)
        async def wrapped(request: Request) -> JSONResponse:
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

        return wrapped

    async def generations(request: Request) -> JSONResponse:
        body = await _json_body(request, max_body_bytes)
        pipeline = PIPELINES["generate"]
        response_format = body.pop("response_format", None) or "b64_json"
        if response_format != "b64_json":
            raise ApiError(400, f"response_format {response_format!r} is not supported; use b64_json "
                                "(this gateway keeps no images to link to)", param="response_format")
        output_format = body.pop("output_format", None) or "png"
        if output_format not in OUTPUT_FORMATS:
            raise ApiError(400, f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}",
                           param="output_format")
        quality = body.pop("output_compression", None)
        if quality is not None and (isinstance(quality, bool) or not isinstance(quality, int) or not 0 <= quality <= 100):
            raise ApiError(400, f"output_compression must be an integer in [0, 100], got {quality!r}",
                           param="output_compression")
        model = body.pop("model", None) or pipeline.model
        for name in IGNORED_FIELDS:
            body.pop(name, None)
        if body.get("size") == "auto":  # OpenAI's default: the model's own size
            body.pop("size")
        # Only OpenAI names here: ensemble tensor names would skip the client-side checks.
        unknown = sorted(set(body) - set(pipeline.fields))
        if unknown:
            raise RequestError(unknown[0], f"unknown field; known: {', '.join(pipeline.fields)}")
        try:
            result = await triton["client"].run("generate", model, **body)
        except InferenceServerException as error:
            # The server's own checks (e.g. the checkpoint's size multiple) name a tensor.
            field = pipeline.field_of(error.message())
            if field is None:
                raise ApiError(500, f"Triton: {error.message()}", type="server_error") from error
            raise ApiError(400, f"{field}: {error.message()}", param=field) from error
        images = await asyncio.to_thread(_encode, result.png, OUTPUT_FORMATS[output_format], quality)
        width, height = result.pixels.shape[2], result.pixels.shape[1]
        return JSONResponse({
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(data).decode()} for data in images],
            "output_format": output_format,
            "size": f"{width}x{height}",
        })

    async def models(_request: Request) -> JSONResponse:
        names = await triton["client"].loaded_ensembles()
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "ditserve"} for name in names]
        return JSONResponse({"object": "list", "data": data})

    def pending(kind: str) -> Handler:
        """Routes of pipelines the repository does not have yet: 404 while their ensemble is
        not loaded (it is nowhere yet), 501 if a server has one, until this gateway serves it."""

        async def handler(_request: Request) -> JSONResponse:
            model = PIPELINES[kind].model
            if not await triton["client"].is_model_ready(model):
                raise ModelNotLoaded(model, triton_url)
            raise ApiError(501, f"{model} is loaded, but this gateway does not serve {kind} requests yet",
                           code="not_implemented", type="server_error")

        return handler

    async def http_error(_request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, HTTPException)
        return ApiError(error.status_code, error.detail, code="not_found" if error.status_code == 404 else None).response()

    routes = [
        Route("/v1/images/generations", endpoint(generations), methods=["POST"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/images/edits", endpoint(pending("edit")), methods=["POST"]),
        Route("/v1/videos", endpoint(pending("video")), methods=["POST", "GET"]),
        Route("/v1/videos/{video_id}", endpoint(pending("video")), methods=["GET", "DELETE"]),
        Route("/v1/videos/{video_id}/content", endpoint(pending("video")), methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, read no further than ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():  # chunked bodies have no Content-Length
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except ValueError as error:
        raise ApiError(400, f"request body is not valid JSON: {error}") from error
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _encode(pngs: list[bytes], image_format: str, quality: int | None) -> list[bytes]:
    if image_format == "PNG":
        return pngs
    encoded = []
    for png in pngs:
        out = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").save(out, image_format, quality=100 if quality is None else quality)
        encoded.append(out.getvalue())
    return encoded


def serve(triton_url: str, protocol: str, host: str, port: int, api_key: str | None) -> int:
    import uvicorn

    print(f"ditserve openai: forwarding to Triton at {triton_url} over {protocol}; "
          f"OpenAI base URL http://{host}:{port}/v1", flush=True)
    uvicorn.run(create_app(triton_url, protocol, api_key), host=host, port=port, log_level="info")
    return 0
