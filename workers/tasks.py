"""Thin Celery tasks: IDs in, one library call, the next step enqueued.

The task graph (DESIGN.md): prepare -> tts x S -> plan -> render x N -> mux -> publish.
Fan-in is counted in the database (farm.jobs.segment_finished / chunk_finished),
not with a chord, so a failed or re-delivered member cannot wedge the job.
Task ids are derived from (job, stage, index), so `farm cancel` can revoke them.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from celery import Task

from farm import batches, jobs
from farm.context import Context
from farm.errors import Cancelled, PermanentError, RetryableError
from workers.app import app, bulk_queue, settings

log = logging.getLogger("farm.tasks")


@cache
def context() -> Context:
    """Made on first use in the worker's child process, after the fork."""
    return Context(settings)


def task_id(job_id: str, stage: str, idx: int | None = None) -> str:
    return f"{job_id}-{stage}" if idx is None else f"{job_id}-{stage}-{idx}"


class FarmTask(Task):
    """Retries transient errors with backoff; anything else fails the job, once."""

    autoretry_for = (RetryableError,)
    retry_backoff = True
    retry_backoff_max = 300
    retry_jitter = True
    max_retries = settings.task_max_retries
    fails_job = True  # False for tasks whose first argument is not a job id

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Cancelled as exc:
            log.info("%s stopped: %s", self.name, exc)
            return None

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        job_id = args[0] if args else kwargs.get("job_id")
        if not self.fails_job or not job_id:
            return
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
    app.send_task(
        name, args=(job_id, *args), task_id=task_id(job_id, stage, idx), priority=priority, **lane
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


# A renderer error may be transient (GPU memory, a driver hiccup): retried like an
# outage, then the chunk and the job fail. Permanent errors and cancels are not retried.
@app.task(
    name="farm.render",
    base=FarmTask,
    bind=True,
    autoretry_for=(Exception,),
    dont_autoretry_for=(PermanentError, Cancelled),
    retry_backoff=1,
)
def render(self: Task, job_id: str, idx: int, start: int = 0, stop: int = 0) -> bool:
    from models import stages

    last = stages.render(context(), job_id, idx, worker=self.request.hostname or "?")
    if last:
        enqueue("farm.mux", job_id, bulk=_bulk(job_id))
    return last


def resume(job_id: str, stage: str, items: list[tuple[int, ...]]) -> None:
    """Queue what `farm retry` reopened: the unfinished members of one stage."""
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

    ctx = context()
    result = run.run(ctx, enqueue_bulk_job)
    # A completion whose report task was lost (a broker hiccup) is reported now.
    for batch_id in batches.unreported(ctx):
        app.send_task("farm.batch_completed", args=(batch_id,))
    return len(result.created)


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
