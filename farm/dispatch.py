"""The dispatch port: everything the library may ask of a queue.

The library never talks to Celery itself: it asks `ctx.dispatch` to run a stage of a
job, send a webhook attempt, report a batch, revoke a job's tasks. The entry points
wire an implementation into the Context: the Celery one (workers/dispatch.py) in the
CLI, the embedded supervisor and the workers; `InMemoryDispatcher` (below) where no
broker is wanted, as procrastinate ships an in-memory connector. Nothing else under
farm/ imports workers/ or celery (tests/unit/test_layering.py).

The lane travels with the message: a bulk (batch) job's stages run on the bulk queues
and each stage queues the next on the lane it came on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from farm.errors import NotFound, RetryableError
from farm.health import WorkerReport
from farm.pipeline import Stage, task_id, task_ids

NOTIFY_TASK = "farm.notify"
BATCH_COMPLETED_TASK = "farm.batch_completed"
REGISTER_AVATAR_TASK = "farm.register_avatar"
SWEEP_TASK = "farm.sweep"
NIGHTLY_TASK = "farm.nightly"


class Dispatcher(Protocol):
    def enqueue(self, stage: Stage, job_id: str, *args: int, bulk: bool = False) -> None:
        """Queue one stage of a job; a member stage's first argument is its index."""

    def deliver(self, delivery_id: str, attempt: int, countdown: float | None = None) -> None:
        """Queue one webhook attempt."""

    def report_batch(self, batch_id: str) -> None:
        """Queue the report of a completed batch and its batch.completed event."""

    def sweep(self) -> None:
        """Queue one look for work whose message was lost (farm/sweep.py)."""

    def revoke(self, job_id: str, segments: int, chunks: int) -> None:
        """Queued tasks of a cancelled job never start."""

    def register_avatar(
        self, name: str, source_key: str, timeout: float, renderer: str | None = None
    ) -> str:
        """Have a worker register an avatar from a stored photo for a renderer (None:
        the configured one); its artifact key."""

    def waiting(self) -> int:
        """Messages waiting in farm's queues, every lane and priority counted."""

    def workers(self) -> set[str]:
        """The names of the workers that answer now."""

    def worker_health(self, timeout: float) -> list[WorkerReport]:
        """Every worker that answers within `timeout`, with its health (farm/health.py)."""

    def resume_worker(self, name: str, timeout: float) -> tuple[str, list[str]]:
        """Put a worker that left rotation back: its full name, the queues it takes again."""


@dataclass(frozen=True)
class Message:
    task: str
    args: tuple[Any, ...]
    bulk: bool = False
    id: str | None = None
    countdown: float | None = None
    queue: str = "cpu"


class InMemoryDispatcher:
    """Messages kept in a list, in order, for a test or an in-process driver to take
    (tests/pipeline.py runs them through workers/stages.py); revoked ids are kept
    apart, as a broker's revoke list is. `run`, when set, answers
    the one call that waits for a worker's result (avatar registration)."""

    def __init__(self, run: Callable[[Message], Any] | None = None) -> None:
        self.messages: list[Message] = []
        self.revoked: set[str] = set()
        self.run = run

    def enqueue(self, stage: Stage, job_id: str, *args: int, bulk: bool = False) -> None:
        idx = args[0] if stage.members else None
        message = Message(stage.task, (job_id, *args), bulk, task_id(job_id, stage, idx))
        self._put(replace(message, queue=stage.queue))

    def deliver(self, delivery_id: str, attempt: int, countdown: float | None = None) -> None:
        self._put(Message(NOTIFY_TASK, (delivery_id, attempt), countdown=countdown))

    def report_batch(self, batch_id: str) -> None:
        self._put(Message(BATCH_COMPLETED_TASK, (batch_id,)))

    def sweep(self) -> None:
        self._put(Message(SWEEP_TASK, ()))

    def revoke(self, job_id: str, segments: int, chunks: int) -> None:
        self.revoked.update(task_ids(job_id, segments, chunks))

    def register_avatar(
        self, name: str, source_key: str, timeout: float, renderer: str | None = None
    ) -> str:
        if self.run is None:
            raise RetryableError(f"no worker registered {name!r}: nothing runs these messages")
        return str(self.run(Message(REGISTER_AVATAR_TASK, (name, source_key, renderer))))

    def waiting(self) -> int:
        return len(self.messages)

    def workers(self) -> set[str]:
        return set()

    def worker_health(self, timeout: float) -> list[WorkerReport]:
        return []

    def resume_worker(self, name: str, timeout: float) -> tuple[str, list[str]]:
        raise NotFound(f"no worker named {name!r}: nothing runs these messages")

    def tasks(self) -> list[str]:
        """The task names queued, in order (for assertions)."""
        return [m.task for m in self.messages]

    def _put(self, message: Message) -> None:
        self.messages.append(message)
