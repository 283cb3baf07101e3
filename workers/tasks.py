"""Thin Celery tasks: IDs in, one call of a stage (workers/stages.py) or a library
function, which queues what comes next through the Context's dispatcher.

The task graph (farm/pipeline.py): prepare -> tts x S -> plan -> render x N -> mux ->
publish. Task ids are derived from (job, stage, index), so `farm cancel` can revoke
them; a bulk job's messages carry `bulk=True` and each stage passes it on.
"""

from __future__ import annotations

import logging
import random
from functools import cache
from typing import Any

from celery import Task
from celery.exceptions import Reject
from kombu.exceptions import OperationalError

from farm import batches
from farm.context import Context
from farm.db import OUTAGE_ERRORS
from farm.dispatch import (
    BATCH_COMPLETED_TASK,
    NIGHTLY_TASK,
    NOTIFY_TASK,
    REGISTER_AVATAR_TASK,
    SWEEP_TASK,
)
from farm.errors import BrokerUnavailable, Cancelled, PermanentError, RetryableError
from farm.pipeline import MUX, PLAN, PREPARE, PUBLISH, RENDER, TTS
from workers import health
from workers.app import app, settings
from workers.dispatch import CeleryDispatcher

log = logging.getLogger("farm.tasks")


@cache
def context() -> Context:
    """Made on first use in the worker's child process, after the fork."""
    return Context(settings, CeleryDispatcher(app, settings))


# An outage (farm.db.OUTAGE_ERRORS: Postgres restarting, a dropped connection; or a
# RetryableError: the store failing) is not the job's fault: the task is retried with
# FARM_OUTAGE_RETRIES of its own patience (waits of 1, 2, 4 ... s up to
# FARM_OUTAGE_MAX_DELAY, jittered so a fleet does not return in step), about 10 minutes
# by default, before the job fails. Every stage is a guarded transition, so a task that
# dies half-way (rolled back, or committed just before the connection went) does the
# right thing when it runs again. The retry count is Celery's, shared with render's
# retries of renderer errors (FARM_TASK_MAX_RETRIES).
OUTAGES: tuple[type[Exception], ...] = (RetryableError, *OUTAGE_ERRORS)
# The broker stayed away longer than a worker's publish retry (workers/app.py) while a
# task queued the next step: what the task committed stands, only that message is lost,
# and the sweep (farm/sweep.py) queues the step again.
BROKER_DOWN: tuple[type[Exception], ...] = (BrokerUnavailable, OperationalError)


def outage_delay(retries: int) -> float:
    return min(2.0**retries, settings.outage_max_delay) * random.uniform(0.5, 1.0)


class FarmTask(Task):
    """Retries outages with backoff; anything else fails the job, once."""

    fails_job = True  # False for tasks whose first argument is not a job id

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Cancelled as exc:
            log.info("%s stopped: %s", self.name, exc)
            return None
        except OUTAGES as exc:
            raise self.retry(
                exc=exc,
                countdown=outage_delay(self.request.retries),
                max_retries=settings.outage_retries,
            ) from exc

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        if not self.fails_job or not args:
            return
        if isinstance(exc, BROKER_DOWN):
            log.error(
                "%s: job %s left to the sweep: broker unavailable: %s", self.name, args[0], exc
            )
            return
        from workers import stages

        try:
            stages.failed(context(), self.name, tuple(args), exc)
        except OUTAGE_ERRORS as db_exc:
            # Failing the job needs the database too: it stays in its stage, and the
            # error is in this worker's log.
            log.error(
                "%s: could not fail job %s, database unavailable: %s", self.name, args[0], db_exc
            )


def _stage(task: str, *args: Any, **kwargs: Any) -> Any:
    from workers import stages  # the ML stack is imported by workers only when used

    return stages.RUN[task](context(), *args, **kwargs)


@app.task(name=PREPARE.task, base=FarmTask)
def prepare(job_id: str, bulk: bool = False) -> int:
    return _stage(PREPARE.task, job_id, bulk=bulk)


@app.task(name=TTS.task, base=FarmTask)
def tts(job_id: str, idx: int, bulk: bool = False) -> float:
    return _stage(TTS.task, job_id, idx, bulk=bulk)


@app.task(name=PLAN.task, base=FarmTask)
def plan(job_id: str, bulk: bool = False) -> int:
    return _stage(PLAN.task, job_id, bulk=bulk)


# A renderer error may be transient (GPU memory, a driver hiccup): retried
# FARM_TASK_MAX_RETRIES times, then the chunk and the job fail. Permanent errors and
# cancels are not retried; outages are retried by FarmTask, with their own patience;
# a broker outage (mux could not be queued) is left to the sweep: a retry would find
# the chunk done. A failure that is the worker's (farm/health.py) goes first to another
# worker that can take it, without spending a retry (`failed_on`, `requeued`), and
# counts toward taking this worker out of rotation (workers/health.py).
@app.task(
    name=RENDER.task,
    base=FarmTask,
    bind=True,
    Request="workers.health:RenderRequest",
    autoretry_for=(Exception,),
    dont_autoretry_for=(PermanentError, Cancelled, Reject, *BROKER_DOWN, *OUTAGES),
    max_retries=settings.task_max_retries,
    retry_backoff=1,
)
def render(
    self: Task,
    job_id: str,
    idx: int,
    start: int = 0,
    stop: int = 0,
    bulk: bool = False,
    failed_on: list[str] | None = None,
    requeued: int = 0,
) -> bool:
    health.hand_back_if_out()
    worker = self.request.hostname or "?"
    try:
        last = _stage(RENDER.task, job_id, idx, start, stop, bulk=bulk, worker=worker)
    except Exception as exc:
        elsewhere = health.requeue_elsewhere(self, exc)
        if elsewhere is not None:
            raise elsewhere from exc
        raise
    health.succeeded()
    return last


@app.task(name=MUX.task, base=FarmTask)
def mux(job_id: str, bulk: bool = False) -> None:
    _stage(MUX.task, job_id, bulk=bulk)


@app.task(name=PUBLISH.task, base=FarmTask)
def publish(job_id: str, bulk: bool = False) -> bool:
    return _stage(PUBLISH.task, job_id, bulk=bulk)


@app.task(name=BATCH_COMPLETED_TASK, base=FarmTask, fails_job=False)
def batch_completed(batch_id: str) -> str | None:
    """The report of a completed batch into the store, and its batch.completed event."""
    done = batches.complete(context(), batch_id)
    return done.report_key if done else None


@app.task(name=NIGHTLY_TASK, base=FarmTask, fails_job=False)
def nightly() -> int:
    """Beat's nightly firing: submit the inbox's new scripts as tonight's batch."""
    from farm import nightly as run

    return len(run.run(context()).created)


@app.task(name=SWEEP_TASK, base=FarmTask, fails_job=False)
def sweep() -> int:
    """Beat's periodic look for work whose message was lost (farm/sweep.py)."""
    from farm import sweep as lost

    return lost.run(context())


# max_retries=None: the webhook retry schedule (FARM_WEBHOOK_RETRY_SCHEDULE) ends it.
@app.task(name=NOTIFY_TASK, base=FarmTask, bind=True, fails_job=False, max_retries=None)
def notify(self: Task, delivery_id: str, attempt: int = 1) -> str:
    """One signed webhook attempt; a failed one is retried after the scheduled delay."""
    from farm import webhooks

    outcome = webhooks.attempt_delivery(context(), delivery_id, attempt, self.request.retries)
    if outcome.retry_in is not None:
        raise self.retry(args=(delivery_id, attempt + 1), countdown=outcome.retry_in)
    return outcome.state


@app.task(name=REGISTER_AVATAR_TASK, base=FarmTask, fails_job=False, ignore_result=False)
def register_avatar(name: str, source_key: str | None, renderer: str | None = None) -> str:
    from workers import avatars

    key, _ = avatars.register_avatar(context(), name, source_key, renderer)
    return key
