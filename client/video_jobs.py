"""The gateway's video jobs (OpenAI's Videos API): created by ``POST /v1/videos``, rendered in the
background against Triton, kept in memory with their MP4 until deleted or replaced.

At most ``limit`` jobs are kept (``MAX_VIDEO_JOBS``): a new job replaces the oldest finished one
(completed or failed, its MP4 goes with it), and is refused (429) while every kept job is still
queued or running, so a burst of requests cannot grow the gateway's memory without bound.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

MAX_VIDEO_JOBS = 32

Status = Literal["queued", "in_progress", "completed", "failed"]


class JobError(Exception):
    """Why a job failed, in OpenAI's video error shape (``code``, ``message``)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclasses.dataclass(eq=False)
class VideoJob:
    model: str
    prompt: str
    size: str  # WIDTHxHEIGHT
    seconds: str  # (frames - 1) / fps: the clip's duration as OpenAI counts it
    id: str = dataclasses.field(default_factory=lambda: f"video_{secrets.token_hex(12)}")
    created_at: int = dataclasses.field(default_factory=lambda: int(time.time()))
    status: Status = "queued"
    completed_at: int | None = None
    error: JobError | None = None
    mp4: bytes | None = None
    task: asyncio.Task | None = None
    # Percent of the denoising steps done, while the job runs: reported when the gateway streams the
    # request (gRPC, the stream model loaded), else 0 until the job ends.
    progress: int = 0

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed")

    def on_progress(self, progress) -> None:  # a ditserve.client.Progress
        # At most 99 until completed: decoding and encoding the video follow the last step.
        self.progress = min(99, 100 * progress.step // max(progress.total, 1))

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "video",
            "model": self.model,
            "status": self.status,
            "progress": 100 if self.finished else self.progress,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "expires_at": None,  # kept until deleted or replaced (see MAX_VIDEO_JOBS)
            "prompt": self.prompt,
            "seconds": self.seconds,
            "size": self.size,
            "remixed_from_video_id": None,
            "error": None if self.error is None else {"code": self.error.code, "message": self.error.message},
        }


class JobsFull(Exception):
    pass


class VideoJobs:
    def __init__(self, limit: int = MAX_VIDEO_JOBS):
        self.limit = limit
        self._jobs: dict[str, VideoJob] = {}  # in creation order

    def start(self, job: VideoJob, render: Callable[[], Awaitable[bytes]]) -> None:
        """Keep ``job`` and run ``render`` (which returns the MP4 or raises ``JobError``) for it."""
        if len(self._jobs) >= self.limit:
            oldest_finished = next((j for j in self._jobs.values() if j.finished), None)
            if oldest_finished is None:
                raise JobsFull(f"{self.limit} video jobs are queued or running; retry when one has finished")
            del self._jobs[oldest_finished.id]
        self._jobs[job.id] = job
        job.task = asyncio.create_task(self._run(job, render))

    @staticmethod
    async def _run(job: VideoJob, render: Callable[[], Awaitable[bytes]]) -> None:
        job.status = "in_progress"
        try:
            job.mp4 = await render()
            job.status = "completed"
        except JobError as error:
            job.error, job.status = error, "failed"
        except Exception as error:  # noqa: BLE001 - a job must end failed, never stay in_progress
            job.error, job.status = JobError("internal_error", f"{type(error).__name__}: {error}"), "failed"
        job.completed_at = int(time.time())

    def get(self, video_id: str) -> VideoJob | None:
        return self._jobs.get(video_id)

    def delete(self, video_id: str) -> VideoJob | None:
        job = self._jobs.pop(video_id, None)
        if job is not None and job.task is not None:
            job.task.cancel()  # a running request is abandoned; Triton finishes it unread
        return job

    def newest_first(self) -> list[VideoJob]:
        return list(reversed(self._jobs.values()))

    async def close(self) -> None:
        tasks = [job.task for job in self._jobs.values() if job.task is not None and not job.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
