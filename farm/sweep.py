"""Work whose message was lost, found in the database and queued again.

The database says what every accepted job still needs; the broker only carries the
messages that ask for it. A message can be lost while the row says the work is due:
a broker without persistence restarted, a process died between committing a
transition and sending the next message (the fan-in winner of the last chunk), or a
send failed after the commit (a webhook event recorded but not queued). Every stage
is idempotent with a deterministic task id, so queueing one again is always safe;
the only question is when. The sweep answers: when no message waits in any farm
queue (a job behind a long queue is waiting, not lost) and the job has shown no sign
of life for FARM_STALL_SECONDS: its row unchanged, no chunk started or finished, none
still running within the visibility timeout (the broker redelivers those). It runs
from beat every FARM_SWEEP_SECONDS, from the embedded runtime's supervisor, and on
demand with `farm sweep`. Each run ends with the retention pass (farm/retention.py):
outputs past FARM_RETENTION_DAYS, intermediates publish left, store deletions pending.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from farm import batches, pipeline, queries, retention
from farm.context import Context
from farm.db import Job, utcnow
from farm.pipeline import Stage

log = logging.getLogger("farm.sweep")


@dataclass(frozen=True)
class Stalled:
    """A job's current stage and its unfinished members, ready to be queued again."""

    job_id: str
    stage: Stage
    items: list[tuple[int, ...]]
    bulk: bool = False


def stage_of(job: Job, segments: list, chunks: list) -> Stalled:
    """What an active job waits for, by its state: the unfinished members of that stage."""
    stage = pipeline.stage_in(job.state)
    items = pipeline.unfinished(stage, segments, chunks)
    stage = pipeline.for_renderer(stage, job.renderer)
    return Stalled(job.id, stage, items, batches.is_bulk_priority(job.priority))


def resume(ctx: Context, work: Stalled) -> None:
    """Queue a stage of a job again: once, or once per unfinished member. What the
    sweep found stalled, or what `farm retry` reopened."""
    for args in work.items or ([()] if work.stage.members is None else []):
        ctx.dispatch.enqueue(work.stage, work.job_id, *args, bulk=work.bulk)


def run(ctx: Context) -> int:
    """Queue again what is found stalled (beat, the embedded supervisor, `farm
    sweep`). Returns how many jobs were resumed."""
    # While messages wait in a queue the farm is busy, not stuck: a job behind a long
    # queue shows no sign of life either. Lost work is found once the queues drain.
    stalled = [] if ctx.dispatch.waiting() else stalled_jobs(ctx)
    for work in stalled:
        log.warning("job %s stalled in %s; queued again", work.job_id, work.stage.name)
        resume(ctx, work)
    for delivery_id, attempt in stalled_deliveries(ctx):
        ctx.dispatch.deliver(delivery_id, attempt)
    # A completed batch whose report task was lost is reported now.
    for batch_id in batches.unreported(ctx):
        ctx.dispatch.report_batch(batch_id)
    # Retention (farm/retention.py): old outputs, intermediates publish left, store
    # deletions an outage left pending; bounded per run.
    retention.sweep(ctx)
    return len(stalled)


def stalled_jobs(ctx: Context, now: datetime | None = None) -> list[Stalled]:
    """Active jobs with no sign of life for FARM_STALL_SECONDS. Each is touched, so the
    next sweep waits a whole stall period again before queueing it once more."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=ctx.settings.stall_seconds)
    # A chunk still running is the broker's: it redelivers an unacknowledged message
    # after the visibility timeout, so only a chunk running longer than that is lost.
    running_since = now - timedelta(seconds=ctx.settings.visibility_timeout)
    found = []
    with ctx.session() as s:
        for job in queries.stalled_jobs(s, cutoff, running_since):
            found.append(
                stage_of(job, queries.get_segments(s, job.id), queries.get_chunks(s, job.id))
            )
            queries.touch_job(s, job.id, now)
    return found


def stalled_deliveries(ctx: Context, now: datetime | None = None) -> list[tuple[str, int]]:
    """Pending webhook deliveries whose next attempt is overdue by a stall period (or
    that were never queued): (delivery id, next attempt number), touched like jobs."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=ctx.settings.stall_seconds)
    with ctx.session() as s:
        found = [(d.id, d.attempts + 1) for d in queries.stalled_deliveries(s, cutoff)]
        for delivery_id, _ in found:
            queries.touch_delivery(s, delivery_id, now)
    return found
