"""Thin Celery tasks: IDs in, one library call, the next step enqueued.

The task graph (DESIGN.md): prepare -> tts x S -> plan -> render x N -> mux -> publish.
Fan-in is counted in the database (farm.jobs.segment_finished / chunk_finished),
not with a chord, so a failed or re-delivered member cannot wedge the job.
Task ids are derived from (job, stage, index), so `farm cancel` can revoke them.
"""

from __future__ import annotations

import logging
import random
from functools import cache
from typing import Any

from celery import Task
from kombu.exceptions import OperationalError as BrokerUnavailable

from farm import batches, jobs
from farm.context import Context
from farm.db import OUTAGE_ERRORS
from farm.errors import Cancelled, PermanentError, RetryableError
from workers.app import BULK_QUEUES, app, bulk_queue, settings

log = logging.getLogger("farm.tasks")


@cache
def context() -> Context:
    """Made on first use in the worker's child process, after the fork."""
    return Context(settings)


def task_id(job_id: str, stage: str, idx: int | None = None) -> str:
    return f"{job_id}-{stage}" if idx is None else f"{job_id}-{stage}-{idx}"


# An outage (farm.db.OUTAGE_ERRORS: Postgres restarting, a dropped connection; or a
# RetryableError: the store failing, a broker hiccup) is not the job's fault: the task
# is retried with FARM_OUTAGE_RETRIES of its own patience (waits of 1, 2, 4 ... s up to
# FARM_OUTAGE_MAX_DELAY, jittered so a fleet does not return in step), about 10 minutes
# by default, before the job fails. Every stage is a guarded transition, so a task that
# dies half-way (rolled back, or committed just before the connection went) does the
# right thing when it runs again. The retry count is Celery's, shared with render's
# retries of renderer errors (FARM_TASK_MAX_RETRIES).
OUTAGES: tuple[type[Exception], ...] = (RetryableError, *OUTAGE_ERRORS)


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
        job_id = args[0] if args else kwargs.get("job_id")
        if not self.fails_job or not job_id:
            return
        if isinstance(exc, BrokerUnavailable):
            # The broker stayed away longer than a worker's publish retry (workers/app.py)
            # while this task queued the next step. What the task committed stands; only
            # that message is lost, and the sweep (farm/sweep.py) queues the step again.
            log.error(
                "%s: job %s left to the sweep: broker unavailable: %s", self.name, job_id, exc
            )
            return
        try:
            self._fail_job(exc, job_id, args)
        except OUTAGE_ERRORS as db_exc:
            # Failing the job needs the database too: it stays in its stage, and the
            # error is in this worker's log.
            log.error(
                "%s: could not fail job %s, database unavailable: %s", self.name, job_id, db_exc
            )

    def _fail_job(self, exc: BaseException, job_id: str, args: Any) -> None:
        stage = self.name.removeprefix("farm.")
        reason = str(exc) if isinstance(exc, PermanentError) else f"{type(exc).__name__}: {exc}"
        ctx = context()
        if stage == "render" and len(args) > 1:
            from farm import queries

            with ctx.session() as s:
                queries.fail_chunk(s, job_id, args[1], reason)
            reason = f"chunk {args[1]}: {reason}"
        jobs.fail(ctx, job_id, f"{stage}: {reason}")
        job_ended(ctx, job_id)


def enqueue(
    name: str,
    job_id: str,
    *args: Any,
    idx: int | None = None,
    priority: int | None = None,
    bulk: bool = False,
) -> None:
    """Queue a stage of a job. `bulk` sends it to the bulk lane (cpu_bulk, render_bulk),
    which workers take from only when the interactive queues are empty."""
    stage = name.removeprefix("farm.")
    lane = {"queue": bulk_queue(name)} if bulk else {}  # else: the routes in workers/app.py
    # ignore_result: outside a worker (the CLI), send_task would otherwise subscribe to a
    # result that no task stores, and fail on that first when the broker is down.
    app.send_task(
        name,
        args=(job_id, *args),
        task_id=task_id(job_id, stage, idx),
        priority=priority,
        ignore_result=True,
        **lane,
    )


def enqueue_bulk_job(job_id: str) -> None:
    """The first task of a batch job, on the bulk lane."""
    enqueue("farm.prepare", job_id, bulk=True)


def _bulk(job_id: str) -> bool:
    # The lane follows the job: every next stage of a batch job stays on the bulk lane.
    return batches.is_bulk(context(), job_id)


def job_ended(ctx: Context, job_id: str) -> None:
    """After a job reached a final state: the last job of a batch completes the batch
    (once, a guarded transition) and queues its report and batch.completed event."""
    batch_id = batches.job_finished(ctx, job_id)
    if batch_id is not None:
        app.send_task("farm.batch_completed", args=(batch_id,))


@app.task(name="farm.prepare", base=FarmTask)
def prepare(job_id: str) -> int:
    n = jobs.prepare(context(), job_id)
    bulk = n > 0 and _bulk(job_id)
    for idx in range(n):
        enqueue("farm.tts", job_id, idx, idx=idx, bulk=bulk)
    return n


@app.task(name="farm.tts", base=FarmTask)
def tts(job_id: str, idx: int) -> float:
    from models import stages

    ctx = context()
    if not jobs.is_active(ctx, job_id):
        return 0.0
    seconds = stages.speak(ctx, job_id, idx)
    if jobs.segment_finished(ctx, job_id, idx, seconds):
        enqueue("farm.plan", job_id, bulk=_bulk(job_id))
    return seconds


@app.task(name="farm.plan", base=FarmTask)
def plan(job_id: str) -> int:
    from models import stages

    ranges = stages.plan(context(), job_id)
    bulk = bool(ranges) and _bulk(job_id)
    for idx, (start, stop) in enumerate(ranges):
        # The frame range rides along so Flower shows what each render task is.
        enqueue("farm.render", job_id, idx, start, stop, idx=idx, bulk=bulk)
    return len(ranges)


# A renderer error may be transient (GPU memory, a driver hiccup): retried
# FARM_TASK_MAX_RETRIES times, then the chunk and the job fail. Permanent errors and
# cancels are not retried; outages are retried by FarmTask, with their own patience;
# a broker outage (mux could not be queued) is left to the sweep: a retry would find
# the chunk done.
@app.task(
    name="farm.render",
    base=FarmTask,
    bind=True,
    autoretry_for=(Exception,),
    dont_autoretry_for=(PermanentError, Cancelled, BrokerUnavailable, *OUTAGES),
    max_retries=settings.task_max_retries,
    retry_backoff=1,
)
def render(self: Task, job_id: str, idx: int, start: int = 0, stop: int = 0) -> bool:
    from models import stages

    last = stages.render(context(), job_id, idx, worker=self.request.hostname or "?")
    if last:
        enqueue("farm.mux", job_id, bulk=_bulk(job_id))
    return last


def resume(job_id: str, stage: str, items: list[tuple[int, ...]]) -> None:
    """Queue the unfinished members of one stage: what `farm retry` reopened, or what
    the sweep found stalled."""
    bulk = _bulk(job_id)
    if stage == "render":
        for idx, start, stop in items:
            enqueue("farm.render", job_id, idx, start, stop, idx=idx, bulk=bulk)
    elif stage == "tts":
        for (idx,) in items:
            enqueue("farm.tts", job_id, idx, idx=idx, bulk=bulk)
    else:
        enqueue(f"farm.{stage}", job_id, bulk=bulk)


@app.task(name="farm.mux", base=FarmTask)
def mux(job_id: str) -> None:
    jobs.mux(context(), job_id)
    enqueue("farm.publish", job_id, bulk=_bulk(job_id))


@app.task(name="farm.publish", base=FarmTask)
def publish(job_id: str) -> bool:
    done = jobs.publish(context(), job_id)  # also queues the job.succeeded webhook
    job_ended(context(), job_id)  # every time: a redelivered publish may be the one
    return done


@app.task(name="farm.batch_completed", base=FarmTask, fails_job=False)
def batch_completed(batch_id: str) -> str | None:
    """The report of a completed batch into the store, and its batch.completed event."""
    done = batches.complete(context(), batch_id)
    return done.report_key if done else None


@app.task(name="farm.nightly", base=FarmTask, fails_job=False)
def nightly() -> int:
    """Beat's nightly firing: submit the inbox's new scripts as tonight's batch."""
    from farm import nightly as run

    return len(run.run(context(), enqueue_bulk_job).created)


@app.task(name="farm.sweep", base=FarmTask, fails_job=False)
def sweep() -> int:
    """Beat's periodic look for work whose message was lost."""
    return sweep_and_queue(context())


def messages_waiting() -> int:
    """Messages queued on farm's queues, every priority counted; on any broker."""
    total = 0
    with app.connection_for_read() as conn:
        for name in BULK_QUEUES.keys() | BULK_QUEUES.values():
            channel = conn.channel()
            try:
                total += channel.queue_declare(name, passive=True).message_count
            except conn.channel_errors:
                pass  # never declared: empty
            finally:
                channel.close()
    return total


def sweep_and_queue(ctx: Context) -> int:
    """Queue again what the sweep finds stalled (farm/sweep.py); also `farm sweep`.
    Returns how many jobs were resumed."""
    from farm import sweep as found
    from farm import webhooks

    # While messages wait in a queue the farm is busy, not stuck: a job behind a long
    # queue shows no sign of life either. Lost work is found once the queues drain.
    stalled = [] if messages_waiting() else found.stalled_jobs(ctx)
    for work in stalled:
        log.warning("job %s stalled in %s; queued again", work.job_id, work.stage)
        resume(work.job_id, work.stage, work.items)
    for delivery_id, attempt in found.stalled_deliveries(ctx):
        webhooks.send_task(delivery_id, attempt)
    # A completed batch whose report task was lost is reported now.
    for batch_id in batches.unreported(ctx):
        app.send_task("farm.batch_completed", args=(batch_id,))
    return len(stalled)


# max_retries=None: the webhook retry schedule (FARM_WEBHOOK_RETRY_SCHEDULE) ends it.
@app.task(name="farm.notify", base=FarmTask, bind=True, fails_job=False, max_retries=None)
def notify(self: Task, delivery_id: str, attempt: int = 1) -> str:
    """One signed webhook attempt; a failed one is retried after the scheduled delay."""
    from farm import webhooks

    outcome = webhooks.attempt_delivery(context(), delivery_id, attempt, self.request.retries)
    if outcome.retry_in is not None:
        raise self.retry(args=(delivery_id, attempt + 1), countdown=outcome.retry_in)
    return outcome.state


@app.task(name="farm.register_avatar", base=FarmTask, fails_job=False, ignore_result=False)
def register_avatar(name: str, source_key: str | None) -> str:
    from models import stages

    key, _ = stages.register_avatar(context(), name, source_key)
    return key


def revoke_job(job_id: str, segments: int, chunks: int) -> None:
    """Queued tasks of a cancelled job never start; running ones see the flag."""
    ids = [
        task_id(job_id, "prepare"),
        task_id(job_id, "plan"),
        task_id(job_id, "mux"),
        task_id(job_id, "publish"),
    ]
    ids += [task_id(job_id, "tts", i) for i in range(segments)]
    ids += [task_id(job_id, "render", i) for i in range(chunks)]
    app.control.revoke(ids)
