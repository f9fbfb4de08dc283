"""Per-step denoising progress, from a denoiser to the ``<pipeline>_stream`` model that streams it.

Why a side channel and not Triton responses: the bundled tritonserver (2.51) treats an ensemble
with a decoupled step as decoupled itself, and then refuses it over HTTP ("HTTP end point doesn't
support models with decoupled transaction policy") and over gRPC's ModelInfer (checked on this
server). So the denoisers stay one-response models, the plain ensembles are untouched, and a
denoiser sends progress over a Unix socket named by the request parameter ``progress``, which only
the stream models (``ditserve.streaming``) send. A request parameter and not an optional input:
Triton's dynamic batcher does not batch requests whose sets of inputs differ, so a streamed request
would never share the denoiser's batch with plain ones (checked: 3 executions for 3 requests,
against 2 for plain ones alone).

The parameter's value is ``ditserve-progress/<32 hex digits>``, an abstract Unix stream socket (Linux;
all models of one tritonserver share its host and network namespace) on which the stream model
listens for one request. For each chunk of rows it denoises, a denoiser (rank 0 of a parallel group)
connects once per socket, writes one line per step, ``<done> <total> <row>[,<row>...]`` (the rows'
positions in their request), and closes the connection before it answers, so a listener has every
line once the denoiser's response has arrived. Writes never block: a listener that is gone or does
not read loses its progress; the batch is never delayed by it.

Standard library only: the stream models import this module and must start without torch.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import NamedTuple

PARAMETER = "progress"  # the request parameter the denoisers read
PREFIX = "ditserve-progress/"
_NAME = re.compile(rf"{re.escape(PREFIX)}[0-9a-f]{{32}}")
_LINE = re.compile(rb"(\d{1,4}) (\d{1,4}) (\d{1,4}(?:,\d{1,4})*)")
# Streamed requests whose denoiser chunks may connect before the listener accepts them.
BACKLOG = 64
# After the denoiser's response, how long to wait for the end of its progress connections: they are
# closed before it answers, so this bounds only a stray local process that connected and stays open.
DRAIN_TIMEOUT_S = 10.0

# (rows of the streamed request, steps done, total steps)
OnStep = Callable[[list[int], int, int], None]


class Target(NamedTuple):
    """Where one row's progress goes: a listener's socket name and the row of its request."""

    name: str
    row: int

    @classmethod
    def parse(cls, value: object, row: int) -> Target:
        if not isinstance(value, str) or _NAME.fullmatch(value) is None:
            raise ValueError(f"must be {PREFIX}<32 hex digits> (sent by the stream models), got {str(value)[:80]!r}")
        return cls(value, row)


def _address(name: str) -> bytes:
    return b"\0" + name.encode()  # a leading NUL: Linux's abstract namespace, no file to clean up


class Reporter:
    """The denoiser's side, for the rows of one chunk: ``reporter(done, total)`` after each step."""

    def __init__(self, targets: Sequence[Target]):
        rows: dict[str, list[int]] = defaultdict(list)
        for target in targets:
            rows[target.name].append(target.row)
        self._channels: list[tuple[socket.socket, str]] = []
        for name, of_name in rows.items():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(_address(name))
            except OSError:  # no listener (the stream ended) or its backlog is full: no progress for it
                sock.close()
                continue
            self._channels.append((sock, ",".join(map(str, sorted(of_name)))))

    def __call__(self, done: int, total: int) -> None:
        for channel in list(self._channels):
            sock, rows = channel
            line = f"{done} {total} {rows}\n".encode()
            try:
                sent = sock.send(line)
            except OSError:
                sent = 0
            if sent != len(line):  # gone, or its buffer is full: stop writing rather than wait or garble
                sock.close()
                self._channels.remove(channel)

    def close(self) -> None:
        for sock, _ in self._channels:
            sock.close()
        self._channels = []


class Listener:
    """The stream model's side, for one request, inside its asyncio loop::

        async with Listener(on_step) as listener:
            response = await the denoiser's request, with parameter progress=listener.name
        # on exit every line the denoiser wrote has reached on_step, in order
    """

    def __init__(self, on_step: OnStep):
        self.name = PREFIX + secrets.token_hex(16)
        self._on_step = on_step
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.setblocking(False)
        self._sock.bind(_address(self.name))
        self._sock.listen(BACKLOG)
        self._readers: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> Listener:
        self._loop = asyncio.get_running_loop()
        # A reader callback, not an accept task: cancelling a task could drop a connection it had just accepted.
        self._loop.add_reader(self._sock.fileno(), self._accept)
        return self

    async def __aexit__(self, *exc) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._accept()  # connections still in the backlog
        try:
            await asyncio.wait_for(asyncio.gather(*self._readers), DRAIN_TIMEOUT_S)
        except asyncio.TimeoutError:
            pass  # wait_for cancelled the readers
        finally:
            self._sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            self._readers.append(self._loop.create_task(self._read(conn)))

    async def _read(self, conn: socket.socket) -> None:
        pending = b""
        with conn:
            while chunk := await self._loop.sock_recv(conn, 4096):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    match = _LINE.fullmatch(line)
                    if match is None:  # not a denoiser: stop listening to this connection
                        return
                    self._on_step([int(r) for r in match[3].split(b",")], int(match[1]), int(match[2]))
