"""The dispatch port (farm/dispatch.py) on Celery: the one place that sends farm's
messages. The entry points wire it into their Context: the CLI and the embedded
supervisor with `CeleryDispatcher(make_app(settings))`, workers with the app they run.

A broker that cannot be reached becomes farm.errors.BrokerUnavailable, one line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError

from farm.config import Settings
from farm.dispatch import (
    BATCH_COMPLETED_TASK,
    NOTIFY_TASK,
    REGISTER_AVATAR_TASK,
    SWEEP_TASK,
)
from farm.errors import BrokerUnavailable, FarmError, InvalidInput, RetryableError
from farm.health import WorkerReport
from farm.pipeline import Stage, task_id, task_ids
from workers.app import BULK_QUEUES


@contextmanager
def _broker() -> Iterator[None]:
    try:
        yield
    except OperationalError as exc:
        raise BrokerUnavailable(f"the broker is unavailable: {exc}") from exc


class CeleryDispatcher:
    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app, self.settings = app, settings

    @classmethod
    def for_settings(cls, settings: Settings) -> CeleryDispatcher:
        """An app of its own on the configured broker (the CLI, the supervisor)."""
        from workers.app import make_app

        return cls(make_app(settings), settings)

    def enqueue(self, stage: Stage, job_id: str, *args: int, bulk: bool = False) -> None:
        idx = args[0] if stage.members else None
        # The stage's queue (farm/pipeline.py), or its bulk lane (cpu_bulk,
        # render_bulk), which workers take from only when the interactive queues are
        # empty.
        # ignore_result: outside a worker (the CLI) send_task would otherwise subscribe
        # to a result no task stores, and fail on that first when the broker is down.
        with _broker():
            self.app.send_task(
                stage.task,
                args=(job_id, *args),
                kwargs={"bulk": True} if bulk else {},
                task_id=task_id(job_id, stage, idx),
                ignore_result=True,
                queue=BULK_QUEUES[stage.queue] if bulk else stage.queue,
            )

    def deliver(self, delivery_id: str, attempt: int, countdown: float | None = None) -> None:
        with _broker():
            self.app.send_task(NOTIFY_TASK, args=(delivery_id, attempt), countdown=countdown)

    def report_batch(self, batch_id: str) -> None:
        with _broker():
            self.app.send_task(BATCH_COMPLETED_TASK, args=(batch_id,))

    def sweep(self) -> None:
        with _broker():
            self.app.send_task(SWEEP_TASK, expires=float(self.settings.sweep_seconds))

    def revoke(self, job_id: str, segments: int, chunks: int) -> None:
        with _broker():
            self.app.control.revoke(task_ids(job_id, segments, chunks))

    def register_avatar(
        self, name: str, source_key: str, timeout: float, renderer: str | None = None
    ) -> str:
        # The renderer travels only when named, so a worker of an earlier version
        # (whose task takes two arguments) still registers for the default renderer.
        args = (name, source_key) if renderer is None else (name, source_key, renderer)
        with _broker():
            result = self.app.send_task(REGISTER_AVATAR_TASK, args=args)
        try:
            return str(result.get(timeout=timeout, propagate=True))
        except FarmError:
            raise
        except Exception as exc:
            if type(exc).__name__ == "TimeoutError":
                raise RetryableError(
                    f"no worker registered {name!r} within {timeout:.0f} s"
                ) from exc
            raise InvalidInput(f"avatar {name!r} was not added: {exc}") from exc

    def waiting(self) -> int:
        total = 0
        with _broker(), self.app.connection_for_read() as conn:
            for name in BULK_QUEUES.keys() | BULK_QUEUES.values():
                channel = conn.channel()
                try:
                    total += channel.queue_declare(name, passive=True).message_count
                except conn.channel_errors:
                    pass  # never declared: empty
                finally:
                    channel.close()
        return total

    def workers(self) -> set[str]:
        with _broker():
            replies: list[dict[str, Any]] = self.app.control.ping(timeout=1.0) or []
        return {name for reply in replies for name in reply}

    def worker_health(self, timeout: float) -> list[WorkerReport]:
        from workers import health

        with _broker():
            return health.survey(self.app, timeout)

    def resume_worker(self, name: str, timeout: float) -> tuple[str, list[str]]:
        from workers import health

        with _broker():
            return health.resume(self.app, name, timeout)
