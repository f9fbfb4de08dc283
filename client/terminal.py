"""What the CLI shows on stderr while a request runs: a bar counting denoising steps when the server
streams them (gRPC), an elapsed-time spinner when it cannot (HTTP).

On a terminal both redraw one line and erase it if the request fails, so that a failure still ends
with its one-line reason. Elsewhere (a pipe, a log file) the bar writes one line per step and the
spinner writes nothing. Standard library only: ``ditserve serve`` imports the CLI module too.
"""

from __future__ import annotations

import threading
import time
from typing import TextIO

ERASE = "\r\x1b[K"  # carriage return, then clear to the end of the line


class StepBar:
    """``generate: step 3/28 [######......] 1.2 s``, fed with ``update(progress)`` after each step."""

    WIDTH = 24

    def __init__(self, stream: TextIO, label: str, interactive: bool | None = None):
        self.stream, self.label = stream, label
        self.interactive = stream.isatty() if interactive is None else interactive
        self.start = time.monotonic()
        self.drawn = False

    def __enter__(self) -> StepBar:
        self.start = time.monotonic()
        return self

    def update(self, progress) -> None:  # a ditserve.client.Progress
        step, total = progress.step, progress.total
        elapsed = time.monotonic() - self.start
        if self.interactive:
            filled = self.WIDTH * step // max(total, 1)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            self.stream.write(f"{ERASE}{self.label}: step {step}/{total} [{bar}] {elapsed:.1f} s")
        else:
            self.stream.write(f"{self.label}: step {step}/{total} ({elapsed:.1f} s)\n")
        self.stream.flush()
        self.drawn = True

    def __exit__(self, failed, *_) -> None:
        if self.interactive and self.drawn:
            self.stream.write(ERASE if failed else "\n")
            self.stream.flush()


class Spinner:
    """``| generate: 3.2 s (per-step progress needs --protocol grpc)``, redrawn by a thread on a terminal."""

    FRAMES = "|/-\\"
    INTERVAL_S = 0.1

    def __init__(self, stream: TextIO, label: str, note: str, interactive: bool | None = None):
        self.stream, self.label, self.note = stream, label, note
        self.interactive = stream.isatty() if interactive is None else interactive
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True, name="ditserve-spinner")

    def __enter__(self) -> Spinner:
        if self.interactive:
            self._thread.start()
        return self

    def _spin(self) -> None:
        start, frame = time.monotonic(), 0
        while True:
            elapsed = time.monotonic() - start
            self.stream.write(f"{ERASE}{self.FRAMES[frame % len(self.FRAMES)]} {self.label}: {elapsed:.1f} s ({self.note})")
            self.stream.flush()
            frame += 1
            if self._stop.wait(self.INTERVAL_S):
                return

    def __exit__(self, *_) -> None:
        if self.interactive:
            self._stop.set()
            self._thread.join()
            self.stream.write(ERASE)  # the summary follows on stdout
            self.stream.flush()
