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
demand with `farm sweep`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from farm import queries, states
from farm.context import Context
from farm.db import Job, utcnow


@dataclass(frozen=True)
class Stalled:
    """A job's current stage and its unfinished members, ready to be queued again."""

    job_id: str
    stage: str  # prepare | tts | plan | render | mux | publish
    items: list[tuple[int, ...]]


def stage_of(job: Job, segments: list, chunks: list) -> Stalled:
    """What an active job waits for, by its state: the unfinished members of that stage."""
    if job.state in (states.QUEUED, states.PREPARING):
        return Stalled(job.id, "prepare", [])
    if job.state == states.SPEAKING:
        return Stalled(job.id, "tts", [(seg.idx,) for seg in segments if seg.state != "done"])
    if job.state == states.RENDERING:
        items = [(c.idx, c.start_frame, c.stop_frame) for c in chunks if c.state != "done"]
        return Stalled(job.id, "render", items)
    stage = {states.PLANNING: "plan", states.MUXING: "mux", states.PUBLISHING: "publish"}
    return Stalled(job.id, stage[job.state], [])


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
