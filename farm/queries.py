"""Every query in one place. Each function takes a Session the caller owns and commits.

Fan-in rule (chunks and segments alike): a worker marks its own row done in one
committed statement, then counts. The last of N concurrent finishers always sees
N done, and the guarded job transition lets exactly one of them move the job on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, exists, func, select, update
from sqlalchemy.orm import Session

from farm import states
from farm.db import (
    Avatar,
    Batch,
    Chunk,
    Deletion,
    Job,
    PendingDeletion,
    Segment,
    Voice,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    utcnow,
)
from farm.errors import NotFound

# --- jobs -------------------------------------------------------------------


def insert_job(session: Session, **values: Any) -> Job:
    job = Job(state=states.QUEUED, timings={}, **values)
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return job


def find_job_by_prefix(session: Session, prefix: str) -> Job:
    """Jobs may be named by a unique prefix of their id, as with git commits."""
    return _by_prefix(session, Job, prefix, "job")


def _by_prefix(session: Session, model: Any, prefix: str, what: str) -> Any:
    # autoescape: '%' and '_' in what a user typed are characters, not wildcards.
    match = model.id.startswith(prefix, autoescape=True)
    rows = session.scalars(select(model).where(match).limit(2)).all()
    if len(rows) != 1:
        raise NotFound(
            f"no {what} {prefix!r}" if not rows else f"{what} id {prefix!r} is ambiguous"
        )
    return rows[0]


def list_jobs(session: Session, limit: int = 20, state: str | None = None) -> Sequence[Job]:
    query = select(Job).order_by(Job.created_at.desc()).limit(limit)
    if state:
        query = query.where(Job.state == state)
    return session.scalars(query).all()


def job_by_idempotency_key(session: Session, key: str) -> str | None:
    """The id of the job made with this idempotency key, if any."""
    return session.scalar(select(Job.id).where(Job.idempotency_key == key))


def ended_jobs(session: Session, job_ids: Sequence[str]) -> Sequence[Job]:
    """Those of the jobs that reached a final state."""
    found: list[Job] = []
    for i in range(0, len(job_ids), 500):  # keep IN lists short on every backend
        part = job_ids[i : i + 500]
        query = select(Job).where(Job.id.in_(part), Job.state.in_(states.FINAL))
        found.extend(session.scalars(query))
    return found


def job_state(session: Session, job_id: str) -> str:
    state = session.scalar(select(Job.state).where(Job.id == job_id))
    if state is None:
        raise NotFound(f"no job {job_id!r}")
    return state


def transition(session: Session, job_id: str, target: str, **values: Any) -> bool:
    """Move a job to `target` if its current state allows it. True if this call moved it."""
    values["updated_at"] = utcnow()
    if target in states.FINAL:
        values["finished_at"] = values["updated_at"]
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(states.predecessors(target)))
        .values(state=target, **values)
    )
    return result.rowcount == 1


def reopen_job(session: Session, job_id: str, target: str) -> bool:
    """The one way out of `failed`: `farm retry` puts the job back in a stage."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == states.FAILED)
        .values(state=target, error=None, finished_at=None, updated_at=utcnow())
    )
    return result.rowcount == 1


def reset_failed_chunks(session: Session, job_id: str) -> None:
    session.execute(
        update(Chunk)
        .where(Chunk.job_id == job_id, Chunk.state.in_(("failed", "running", "cancelled")))
        .values(state="pending", error=None)
    )


def record_timing(session: Session, job_id: str, stage: str, seconds: float) -> None:
    job = get_job(session, job_id)
    job.timings = {**(job.timings or {}), stage: round(seconds, 3)}


def set_transcript(session: Session, job_id: str, transcript: str) -> None:
    set_job_fields(session, job_id, transcript=transcript)


def set_job_fields(session: Session, job_id: str, **values: Any) -> None:
    """What a stage learnt about its job (segment and chunk totals, the planned size)."""
    session.execute(update(Job).where(Job.id == job_id).values(**values))


def job_state_counts(session: Session, job_ids: Sequence[str]) -> dict[str, int]:
    """How many of these jobs are in each state (farm/load.py watches a run with it)."""
    counts: dict[str, int] = {}
    for i in range(0, len(job_ids), 500):  # keep IN lists short on every backend
        rows = session.execute(
            select(Job.state, func.count())
            .where(Job.id.in_(job_ids[i : i + 500]))
            .group_by(Job.state)
        ).all()
        for state, n in rows:
            counts[state] = counts.get(state, 0) + n
    return counts


def count_active_jobs(session: Session) -> int:
    return session.scalar(select(func.count()).where(Job.state.in_(states.ACTIVE))) or 0


# --- segments ---------------------------------------------------------------


def insert_segments(session: Session, job_id: str, parts: Iterable[tuple[str, int]]) -> int:
    """Idempotent: a re-delivered prepare finds the rows already there."""
    existing = session.scalar(select(func.count()).where(Segment.job_id == job_id)) or 0
    if existing:
        return existing
    rows = [
        Segment(job_id=job_id, idx=i, text=t, pause_after_ms=p) for i, (t, p) in enumerate(parts)
    ]
    session.add_all(rows)
    return len(rows)


def get_segments(session: Session, job_id: str) -> Sequence[Segment]:
    return session.scalars(
        select(Segment).where(Segment.job_id == job_id).order_by(Segment.idx)
    ).all()


def get_segment(session: Session, job_id: str, idx: int) -> Segment:
    seg = session.scalar(select(Segment).where(Segment.job_id == job_id, Segment.idx == idx))
    if seg is None:
        raise NotFound(f"no segment {idx} in job {job_id}")
    return seg


def finish_segment(session: Session, job_id: str, idx: int, seconds: float) -> bool:
    result = session.execute(
        update(Segment)
        .where(Segment.job_id == job_id, Segment.idx == idx, Segment.state != "done")
        .values(state="done", seconds=seconds)
    )
    return result.rowcount == 1


def count_done_segments(session: Session, job_id: str) -> int:
    return (
        session.scalar(
            select(func.count()).where(Segment.job_id == job_id, Segment.state == "done")
        )
        or 0
    )


# --- chunks -----------------------------------------------------------------


def insert_chunks(session: Session, job_id: str, ranges: Iterable[tuple[int, int]]) -> int:
    existing = session.scalar(select(func.count()).where(Chunk.job_id == job_id)) or 0
    if existing:
        return existing
    rows = [
        Chunk(job_id=job_id, idx=i, start_frame=a, stop_frame=b) for i, (a, b) in enumerate(ranges)
    ]
    session.add_all(rows)
    return len(rows)


def get_chunk(session: Session, job_id: str, idx: int) -> Chunk:
    chunk = session.scalar(select(Chunk).where(Chunk.job_id == job_id, Chunk.idx == idx))
    if chunk is None:
        raise NotFound(f"no chunk {idx} in job {job_id}")
    return chunk


def get_chunks(session: Session, job_id: str) -> Sequence[Chunk]:
    return session.scalars(select(Chunk).where(Chunk.job_id == job_id).order_by(Chunk.idx)).all()


def start_chunk(session: Session, job_id: str, idx: int, worker: str) -> bool:
    """Claim a chunk for rendering. A chunk left 'running' by a dead worker may be
    claimed again (its task was redelivered); a 'done' one may not."""
    result = session.execute(
        update(Chunk)
        .where(
            Chunk.job_id == job_id,
            Chunk.idx == idx,
            Chunk.state.in_(("pending", "running", "failed")),
        )
        .values(
            state="running",
            worker=worker,
            attempts=Chunk.attempts + 1,
            started_at=utcnow(),
            error=None,
        )
    )
    return result.rowcount == 1


def finish_chunk(session: Session, job_id: str, idx: int, render_seconds: float) -> bool:
    result = session.execute(
        update(Chunk)
        .where(Chunk.job_id == job_id, Chunk.idx == idx, Chunk.state != "done")
        .values(state="done", render_seconds=render_seconds, finished_at=utcnow())
    )
    return result.rowcount == 1


def fail_chunk(session: Session, job_id: str, idx: int, error: str) -> None:
    session.execute(
        update(Chunk)
        .where(Chunk.job_id == job_id, Chunk.idx == idx, Chunk.state != "done")
        .values(state="failed", error=error, finished_at=utcnow())
    )


def stop_chunk(session: Session, job_id: str, idx: int) -> None:
    """A chunk that stopped because its job was cancelled."""
    session.execute(
        update(Chunk)
        .where(Chunk.job_id == job_id, Chunk.idx == idx, Chunk.state == "running")
        .values(state="cancelled", finished_at=utcnow())
    )


def count_done_chunks(session: Session, job_id: str) -> int:
    return (
        session.scalar(select(func.count()).where(Chunk.job_id == job_id, Chunk.state == "done"))
        or 0
    )


@dataclass(frozen=True)
class Progress:
    state: str
    segments_done: int
    segments_total: int
    chunks_done: int
    chunks_total: int

    @property
    def fraction(self) -> float:
        return states.progress(self.state, self.chunks_done, self.chunks_total)


def progress(session: Session, job_id: str) -> Progress:
    job = get_job(session, job_id)
    return Progress(
        state=job.state,
        segments_done=count_done_segments(session, job_id),
        segments_total=job.segments_total,
        chunks_done=count_done_chunks(session, job_id),
        chunks_total=job.chunks_total,
    )


def chunks_done_by_job(session: Session, job_ids: Sequence[str]) -> dict[str, int]:
    """Done chunks per job, for a listing: one query, not two per row."""
    rows = session.execute(
        select(Chunk.job_id, func.count())
        .where(Chunk.job_id.in_(job_ids), Chunk.state == "done")
        .group_by(Chunk.job_id)
    )
    return {job_id: n for job_id, n in rows}


# --- avatars ----------------------------------------------------------------


def get_avatar(session: Session, name: str) -> Avatar | None:
    return session.scalar(select(Avatar).where(Avatar.name == name))


def list_avatars(session: Session) -> Sequence[Avatar]:
    return session.scalars(select(Avatar).order_by(Avatar.name)).all()


def upsert_avatar(session: Session, **values: Any) -> Avatar:
    avatar = get_avatar(session, values["name"])
    if avatar is None:
        avatar = Avatar(**values)
        session.add(avatar)
    else:
        for key, value in values.items():
            setattr(avatar, key, value)
    session.flush()
    return avatar


# --- voices (farm/voices.py, workers/voices.py; issue 17 item 1) -----------


def get_voice(session: Session, name: str) -> Voice | None:
    return session.scalar(select(Voice).where(Voice.name == name))


def list_voices(session: Session) -> Sequence[Voice]:
    return session.scalars(select(Voice).order_by(Voice.name)).all()


def insert_voice(session: Session, **values: Any) -> Voice:
    """A new voice row, flushed: a name taken meanwhile raises IntegrityError here,
    before the caller writes its files."""
    voice = Voice(**values)
    session.add(voice)
    session.flush()
    return voice


def delete_voice(session: Session, name: str) -> bool:
    return bool(session.execute(delete(Voice).where(Voice.name == name)).rowcount)


def active_jobs_with_voice(session: Session, name: str, limit: int = 5) -> list[str]:
    """Ids of queued or running jobs that speak with voice `name` (a few)."""
    return list(session.scalars(_active_job_ids(Job.voice == name).limit(limit)))


def _active_job_ids(where: Any) -> Any:
    """The ids of the jobs matching `where` that have not ended, oldest first (a select)."""
    return select(Job.id).where(where, Job.state.in_(states.ACTIVE)).order_by(Job.created_at)


# --- webhooks (farm/webhooks.py) ---------------------------------------------


def set_avatar_webhook(session: Session, name: str, url: str | None) -> None:
    result = session.execute(update(Avatar).where(Avatar.name == name).values(webhook_url=url))
    if result.rowcount != 1:
        raise NotFound(f"unknown avatar {name!r}")


def insert_delivery(session: Session, **values: Any) -> WebhookDelivery:
    now = utcnow()
    delivery = WebhookDelivery(
        state="pending", attempts=0, created_at=now, updated_at=now, next_attempt_at=now, **values
    )
    session.add(delivery)
    session.flush()
    return delivery


def get_delivery(session: Session, delivery_id: str) -> WebhookDelivery:
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None:
        raise NotFound(f"no webhook delivery {delivery_id!r}")
    return delivery


def find_delivery_by_prefix(session: Session, prefix: str) -> WebhookDelivery:
    return _by_prefix(session, WebhookDelivery, prefix, "webhook delivery")


def list_deliveries(
    session: Session, job_id: str | None = None, batch_id: str | None = None
) -> Sequence[WebhookDelivery]:
    query = select(WebhookDelivery).order_by(WebhookDelivery.created_at, WebhookDelivery.id)
    if job_id is not None:
        query = query.where(WebhookDelivery.job_id == job_id)
    if batch_id is not None:
        query = query.where(WebhookDelivery.batch_id == batch_id)
    return session.scalars(query).all()


def list_attempts(session: Session, delivery_ids: Sequence[str]) -> Sequence[WebhookAttempt]:
    if not delivery_ids:
        return []
    return session.scalars(
        select(WebhookAttempt)
        .where(WebhookAttempt.delivery_id.in_(delivery_ids))
        .order_by(WebhookAttempt.delivery_id, WebhookAttempt.attempt, WebhookAttempt.id)
    ).all()


def claim_attempt(session: Session, delivery_id: str, attempt: int) -> bool:
    """Take attempt number `attempt` of a pending delivery; False if another
    message (a duplicate, or a redelivery) took it first."""
    result = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.state == "pending",
            WebhookDelivery.attempts == attempt - 1,
        )
        .values(attempts=attempt, updated_at=utcnow())
    )
    return result.rowcount == 1


def insert_attempt(session: Session, delivery_id: str, attempt: int) -> int:
    row = WebhookAttempt(delivery_id=delivery_id, attempt=attempt, started_at=utcnow())
    session.add(row)
    session.flush()
    return row.id


def unfinished_attempt(session: Session, delivery_id: str, attempt: int) -> int | None:
    """The id of attempt `attempt` if it was claimed but never finished (its worker died)."""
    return session.scalar(
        select(WebhookAttempt.id)
        .join(WebhookDelivery, WebhookDelivery.id == WebhookAttempt.delivery_id)
        .where(
            WebhookAttempt.delivery_id == delivery_id,
            WebhookAttempt.attempt == attempt,
            WebhookAttempt.finished_at.is_(None),
            WebhookDelivery.attempts == attempt,
        )
        .limit(1)
    )


def finish_attempt(
    session: Session,
    attempt_id: int,
    status: int | None,
    error: str | None,
    next_attempt_at: datetime | None,
) -> None:
    session.execute(
        update(WebhookAttempt)
        .where(WebhookAttempt.id == attempt_id)
        .values(
            status_code=status,
            error=error,
            finished_at=utcnow(),
            next_attempt_at=next_attempt_at,
        )
    )


def finish_delivery(
    session: Session,
    delivery_id: str,
    state: str,
    status: int | None = None,
    error: str | None = None,
    next_attempt_at: datetime | None = None,
) -> None:
    """Record an attempt's result; `pending` means a retry is scheduled."""
    now = utcnow()
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id)
        .values(
            state=state,
            last_status=status,
            last_error=error,
            next_attempt_at=next_attempt_at,
            updated_at=now,
            finished_at=None if state == "pending" else now,
        )
    )


def note_delivery_error(session: Session, delivery_id: str, error: str) -> None:
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id)
        .values(last_error=error, updated_at=utcnow())
    )


def reopen_delivery(session: Session, delivery_id: str) -> None:
    now = utcnow()
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id)
        .values(state="pending", finished_at=None, next_attempt_at=now, updated_at=now)
    )


def disabled_endpoint(session: Session, url: str) -> WebhookEndpoint | None:
    return session.scalar(
        select(WebhookEndpoint).where(
            WebhookEndpoint.url == url, WebhookEndpoint.disabled_at.is_not(None)
        )
    )


def disable_endpoint(session: Session, url: str, reason: str) -> None:
    endpoint = session.scalar(select(WebhookEndpoint).where(WebhookEndpoint.url == url))
    if endpoint is None:
        endpoint = WebhookEndpoint(url=url, created_at=utcnow())
        session.add(endpoint)
    if endpoint.disabled_at is None:
        endpoint.disabled_at = utcnow()
        endpoint.disabled_reason = reason
    session.flush()


def enable_endpoint(session: Session, url: str) -> bool:
    result = session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.url == url, WebhookEndpoint.disabled_at.is_not(None))
        .values(disabled_at=None, disabled_reason=None)
    )
    return result.rowcount == 1


# --- batches (farm/batches.py) ----------------------------------------------


def insert_batch(session: Session, **values: Any) -> Batch:
    batch = Batch(**values)
    session.add(batch)
    session.flush()
    return batch


def get_batch(session: Session, batch_id: str) -> Batch:
    batch = session.get(Batch, batch_id)
    if batch is None:
        raise NotFound(f"no batch {batch_id!r}")
    return batch


def get_batch_by_name(session: Session, name: str) -> Batch | None:
    return session.scalar(select(Batch).where(Batch.name == name))


def find_batch(session: Session, name: str) -> Batch:
    batch = get_batch_by_name(session, name)
    if batch is None:
        raise NotFound(f"no batch named {name!r}")
    return batch


def existing_idempotency_keys(session: Session, keys: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for i in range(0, len(keys), 500):  # keep IN lists short on every backend
        part = keys[i : i + 500]
        found.update(
            session.scalars(select(Job.idempotency_key).where(Job.idempotency_key.in_(part)))
        )
    return found


def batch_targets(session: Session, batch_id: str) -> dict[str, str | None]:
    """target key -> idempotency key of the batch's jobs."""
    rows = session.execute(
        select(Job.target_key, Job.idempotency_key).where(Job.batch_id == batch_id)
    ).all()
    return {t: k for t, k in rows if t is not None}


def reopen_batch(session: Session, batch_id: str, invalid: list[dict[str, Any]]) -> None:
    """New rows join the batch: it is running again until they end. Being an UPDATE
    of the batch row, it also takes that row's lock until the caller commits, so a
    finisher checking for completion waits and then sees the new jobs."""
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id)
        .values(
            state="running",
            invalid=invalid,
            updated_at=utcnow(),
            completed_at=None,
            reported_at=None,
        )
    )


def set_batch_invalid(session: Session, batch_id: str, invalid: list[dict[str, Any]]) -> None:
    session.execute(update(Batch).where(Batch.id == batch_id).values(invalid=invalid))


def lock_batch(session: Session, batch_id: str) -> None:
    """Row lock on Postgres (a no-op on SQLite, where writers are serialised anyway)."""
    session.execute(select(Batch.id).where(Batch.id == batch_id).with_for_update())


def complete_batch(session: Session, batch_id: str, active: Iterable[str]) -> bool:
    """running -> completed when no job of the batch is active: one statement, so the
    count and the move are one step. True for exactly one caller per completion."""
    now = utcnow()
    busy = exists().where(Job.batch_id == batch_id, Job.state.in_(tuple(active)))
    result = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.state == "running", ~busy)
        .values(state="completed", completed_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def mark_batch_reported(session: Session, batch_id: str, report_key: str) -> bool:
    """The report of this completion is written: True for the one caller that marks it."""
    result = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.state == "completed", Batch.reported_at.is_(None))
        .values(report_key=report_key, reported_at=utcnow())
    )
    return result.rowcount == 1


def unreported_batches(session: Session) -> Sequence[str]:
    return session.scalars(
        select(Batch.id).where(Batch.state == "completed", Batch.reported_at.is_(None))
    ).all()


def delete_batch_if_empty(session: Session, batch_id: str) -> bool:
    result = session.execute(
        delete(Batch).where(Batch.id == batch_id, ~exists().where(Job.batch_id == batch_id))
    )
    return result.rowcount == 1


def delete_jobs(session: Session, job_ids: Sequence[str]) -> None:
    session.execute(delete(Job).where(Job.id.in_(job_ids)))


def job_batch_id(session: Session, job_id: str) -> str | None:
    return session.scalar(select(Job.batch_id).where(Job.id == job_id))


def job_target_key(session: Session, job_id: str) -> str | None:
    return session.scalar(select(Job.target_key).where(Job.id == job_id))


def batch_jobs(session: Session, batch_id: str) -> Sequence[Job]:
    return session.scalars(
        select(Job).where(Job.batch_id == batch_id).order_by(Job.created_at, Job.batch_row)
    ).all()


def batch_job_progress(session: Session, batch_id: str) -> list[tuple[str, int, int]]:
    """(state, chunks done, chunks total) of every job of the batch, in one query."""
    done = (
        select(Chunk.job_id, func.count().label("n"))
        .where(Chunk.state == "done")
        .group_by(Chunk.job_id)
        .subquery()
    )
    rows = session.execute(
        select(Job.state, func.coalesce(done.c.n, 0), Job.chunks_total)
        .outerjoin(done, done.c.job_id == Job.id)
        .where(Job.batch_id == batch_id)
    ).all()
    return [(state, int(n), int(total)) for state, n, total in rows]


# --- the sweep (farm/sweep.py) -----------------------------------------------


def stalled_jobs(session: Session, cutoff: datetime, running_since: datetime) -> Sequence[Job]:
    """Active jobs with no sign of life since `cutoff`: the row unchanged, and no chunk
    started or finished since (a long render updates its chunk rows, not the job), nor
    one running since `running_since` (the broker redelivers those itself)."""
    alive_chunk = exists().where(
        Chunk.job_id == Job.id,
        (Chunk.started_at >= cutoff)
        | (Chunk.finished_at >= cutoff)
        | ((Chunk.state == "running") & (Chunk.started_at >= running_since)),
    )
    return session.scalars(
        select(Job)
        .where(Job.state.in_(states.ACTIVE), Job.updated_at < cutoff, ~alive_chunk)
        .order_by(Job.created_at)
    ).all()


def touch_job(session: Session, job_id: str, when: datetime) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(updated_at=when))


def stalled_deliveries(session: Session, cutoff: datetime) -> Sequence[WebhookDelivery]:
    """Pending deliveries untouched since `cutoff` whose next attempt (if one was
    scheduled) was due before it: their message is gone."""
    return session.scalars(
        select(WebhookDelivery)
        .where(
            WebhookDelivery.state == "pending",
            WebhookDelivery.updated_at < cutoff,
            WebhookDelivery.next_attempt_at.is_(None) | (WebhookDelivery.next_attempt_at < cutoff),
        )
        .order_by(WebhookDelivery.created_at)
    ).all()


def touch_delivery(session: Session, delivery_id: str, when: datetime) -> None:
    session.execute(
        update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(updated_at=when)
    )


# --- retention, deletion and usage (farm/retention.py, farm/usage.py) --------


def active_jobs_of_avatar(session: Session, name: str) -> Sequence[str]:
    """Ids of the jobs of avatar `name` that have not ended, oldest first."""
    return session.scalars(_active_job_ids(Job.avatar == name)).all()


def delete_job_rows(session: Session, job_id: str) -> int:
    """A job's rows and every row that belongs to it (webhook attempts and deliveries,
    chunks, segments): explicitly, not by trusting ON DELETE CASCADE. How many went; 0
    when the job row was gone already (a concurrent delete committed first)."""
    deliveries = select(WebhookDelivery.id).where(WebhookDelivery.job_id == job_id)
    n = 0
    for statement in (
        delete(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(deliveries)),
        delete(WebhookDelivery).where(WebhookDelivery.job_id == job_id),
        delete(Chunk).where(Chunk.job_id == job_id),
        delete(Segment).where(Segment.job_id == job_id),
    ):
        n += session.execute(statement.execution_options(synchronize_session=False)).rowcount
    gone = session.execute(
        delete(Job).where(Job.id == job_id).execution_options(synchronize_session=False)
    )
    return n + 1 if gone.rowcount == 1 else 0


def delete_avatar_row(session: Session, name: str) -> int:
    return session.execute(delete(Avatar).where(Avatar.name == name)).rowcount


def record_deletion(
    session: Session,
    kind: str,
    subject: str,
    command: str,
    rows: int,
    prefixes: Sequence[str],
    objects: int = 0,
    size: int = 0,
) -> int:
    """The audit row of a deletion and one pending store deletion per prefix, in the
    caller's transaction (the one that removes the rows); `objects`, `size`: what was
    already deleted from the store. Returns the audit row's id."""
    now = utcnow()
    row = Deletion(
        kind=kind,
        subject=subject,
        command=command,
        rows=rows,
        objects=objects,
        bytes=size,
        pending=len(prefixes),
        created_at=now,
        finished_at=None if prefixes else now,
    )
    session.add(row)
    session.flush()
    session.add_all(
        PendingDeletion(deletion_id=row.id, prefix=p, attempts=0, created_at=now, updated_at=now)
        for p in prefixes
    )
    return row.id


def pending_deletions(
    session: Session, limit: int, deletion_id: int | None = None
) -> Sequence[PendingDeletion]:
    query = select(PendingDeletion).order_by(PendingDeletion.updated_at, PendingDeletion.id)
    if deletion_id is not None:
        query = query.where(PendingDeletion.deletion_id == deletion_id)
    return session.scalars(query.limit(limit)).all()


def finish_pending_deletion(session: Session, pending_id: int, objects: int, size: int) -> bool:
    """The store deletion is done: drop its row and count it on its audit row. False if
    another sweep finished it first (then nothing is counted twice)."""
    deletion_id = session.scalar(
        select(PendingDeletion.deletion_id).where(PendingDeletion.id == pending_id)
    )
    gone = session.execute(delete(PendingDeletion).where(PendingDeletion.id == pending_id))
    if gone.rowcount != 1:
        return False
    if deletion_id is not None:
        session.execute(
            update(Deletion)
            .where(Deletion.id == deletion_id)
            .values(
                objects=Deletion.objects + objects,
                bytes=Deletion.bytes + size,
                pending=Deletion.pending - 1,
            )
        )
        session.execute(
            update(Deletion)
            .where(Deletion.id == deletion_id, Deletion.pending <= 0)
            .values(finished_at=utcnow())
        )
    return True


def note_pending_deletion_error(session: Session, pending_id: int, error: str) -> None:
    session.execute(
        update(PendingDeletion)
        .where(PendingDeletion.id == pending_id)
        .values(attempts=PendingDeletion.attempts + 1, last_error=error[:2000], updated_at=utcnow())
    )


def get_deletion(session: Session, deletion_id: int) -> Deletion:
    row = session.get(Deletion, deletion_id)
    if row is None:
        raise NotFound(f"no deletion {deletion_id}")
    return row


def last_deletion(session: Session, kind: str, subject_prefix: str) -> Deletion | None:
    """The latest deletion of a job (by a unique id prefix) or an avatar (by name), if
    any; None for a prefix of several deleted jobs."""
    match = (
        Deletion.subject.startswith(subject_prefix, autoescape=True)
        if kind == "job"
        else Deletion.subject == subject_prefix
    )
    subjects = session.scalars(
        select(Deletion.subject).where(Deletion.kind == kind, match).distinct().limit(2)
    ).all()
    if len(subjects) != 1:
        return None
    return session.scalar(
        select(Deletion)
        .where(Deletion.kind == kind, match)
        .order_by(Deletion.created_at.desc(), Deletion.id.desc())
        .limit(1)
    )


def expirable_jobs(session: Session, cutoff: datetime, limit: int) -> Sequence[Job]:
    """Ended jobs that finished before `cutoff` and whose outputs are still kept."""
    return session.scalars(
        select(Job)
        .where(
            Job.state.in_(states.FINAL),
            Job.finished_at < cutoff,
            Job.expired_at.is_(None),
        )
        .order_by(Job.finished_at)
        .limit(limit)
    ).all()


def mark_expired(session: Session, job_id: str, when: datetime) -> bool:
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.expired_at.is_(None))
        .values(expired_at=when, bytes_stored=0, output_key=None)
    )
    return result.rowcount == 1


def unmeasured_jobs(session: Session, limit: int) -> Sequence[Job]:
    """Succeeded jobs whose stored bytes were never measured: publish did not get that
    far (or the job is older than migration 0008). The sweep tidies and measures them."""
    return session.scalars(
        select(Job)
        .where(
            Job.state == states.SUCCEEDED,
            Job.bytes_stored.is_(None),
            Job.expired_at.is_(None),
        )
        .order_by(Job.finished_at)
        .limit(limit)
    ).all()


def set_bytes_stored(session: Session, job_id: str, size: int) -> None:
    session.execute(
        update(Job).where(Job.id == job_id, Job.expired_at.is_(None)).values(bytes_stored=size)
    )


def set_chunk_device(session: Session, job_id: str, idx: int, device: str) -> None:
    session.execute(
        update(Chunk).where(Chunk.job_id == job_id, Chunk.idx == idx).values(device=device[:16])
    )


USAGE_GROUPS = ("day", "avatar", "batch", "worker")


def _usage_key(session: Session, by: str | None) -> Any:
    if by == "day":  # the UTC day: Postgres's date() of a timestamptz is the session's zone
        postgres = session.get_bind().dialect.name == "postgresql"
        return func.date(func.timezone("UTC", Job.created_at) if postgres else Job.created_at)
    if by == "avatar":
        return Job.avatar
    if by == "batch":
        return func.coalesce(Batch.name, "-")
    return None


def usage_jobs(
    session: Session, since: datetime | None, by: str | None
) -> list[tuple[str, str, int, float, int]]:
    """(group, state, jobs, audio seconds, bytes stored) of the jobs created since
    `since`, grouped by `by` (day, avatar, batch; None: one group, "all")."""
    key = _usage_key(session, by)
    group = key if key is not None else func.min("all")
    query = select(
        group,
        Job.state,
        func.count(),
        func.coalesce(func.sum(Job.audio_seconds), 0.0),
        func.coalesce(func.sum(Job.bytes_stored), 0),
    ).group_by(*((key,) if key is not None else ()), Job.state)
    if by == "batch":
        query = query.outerjoin(Batch, Batch.id == Job.batch_id)
    if since is not None:
        query = query.where(Job.created_at >= since)
    rows = session.execute(query).all()
    return [(str(g), st, int(n), float(a), int(b)) for g, st, n, a, b in rows]


def usage_chunks(
    session: Session, since: datetime | None, by: str | None
) -> list[tuple[str, str, int, float]]:
    """(group, device, frames rendered, render seconds) of the done chunks of the jobs
    created since `since`; `by` as usage_jobs, or worker. Chunks from before migration
    0008 have the device "unknown"."""
    key = Chunk.worker if by == "worker" else _usage_key(session, by)
    group = key if key is not None else func.min("all")
    device = func.coalesce(Chunk.device, "unknown")
    query = (
        select(
            group,
            device,
            func.coalesce(func.sum(Chunk.stop_frame - Chunk.start_frame), 0),
            func.coalesce(func.sum(Chunk.render_seconds), 0.0),
        )
        .join(Job, Job.id == Chunk.job_id)
        .where(Chunk.state == "done")
        .group_by(*((key,) if key is not None else ()), device)
    )
    if by == "batch":
        query = query.outerjoin(Batch, Batch.id == Job.batch_id)
    if since is not None:
        query = query.where(Job.created_at >= since)
    rows = session.execute(query).all()
    return [("-" if g is None else str(g), d, int(f), float(s)) for g, d, f, s in rows]


def job_ids_of_avatar(session: Session, name: str) -> Sequence[str]:
    return session.scalars(select(Job.id).where(Job.avatar == name).order_by(Job.created_at)).all()
