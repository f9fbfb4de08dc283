"""Input images named by an http(s) URL, downloaded with a size and a time limit.

The CLI downloads ``--image URL`` itself (the server takes image bytes only); the gateway does it
only when started with ``--allow-image-urls``, since a URL in a request makes the gateway fetch
whatever the caller names, including addresses only the gateway can reach.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from ditserve.images import ImageLimits
from ditserve.stage import RequestError

# The server's own byte limit: a larger download could only be refused after it.
MAX_DOWNLOAD_BYTES = ImageLimits().max_bytes
DOWNLOAD_TIMEOUT_S = 30.0


def is_url(source: str) -> bool:
    """Whether ``source`` is meant as an http(s) URL, well-formed or not: by its scheme alone, so that
    a malformed one (``http://[::1/x``, which urlsplit refuses) is ``download``'s error naming the
    field, not a missing file."""
    return source.lstrip().partition(":")[0].lower() in ("http", "https")


def download(url: str, field: str, *, max_bytes: int = MAX_DOWNLOAD_BYTES, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    """The body of ``url``, or a ``RequestError`` naming ``field``. ``timeout_s`` bounds the whole
    download (httpx's timeouts bound each read only, so a server trickling bytes would not end)."""
    deadline = time.monotonic() + timeout_s
    chunks, size = [], 0
    try:
        with httpx.stream("GET", url, timeout=timeout_s, follow_redirects=True) as response:
            if response.status_code != 200:
                raise RequestError(field, f"cannot download {url}: HTTP {response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise RequestError(field, f"{url} is {declared} bytes; the limit is {max_bytes}")
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise RequestError(field, f"{url} is more than {max_bytes} bytes, the limit")
                if time.monotonic() > deadline:
                    raise RequestError(field, f"downloading {url} took more than {timeout_s:g} s")
                chunks.append(chunk)
    except httpx.InvalidURL as error:  # not an httpx.HTTPError
        raise RequestError(field, f"{url!r} is not a valid URL: {error}") from None
    except httpx.TimeoutException:
        raise RequestError(field, f"downloading {url} took more than {timeout_s:g} s") from None
    except httpx.HTTPError as error:
        raise RequestError(field, f"cannot download {url}: {error}") from None
    return b"".join(chunks)


def read_image(source: str, field: str, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    """An image file's bytes, from a path or an http(s) URL."""
    return download(source, field, timeout_s=timeout_s) if is_url(source) else Path(source).read_bytes()
