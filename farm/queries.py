"""Every query in one place. Each function takes a Session the caller owns and commits.

Fan-in rule (chunks and segments alike): a worker marks its own row done in one
committed statement, then counts. The last of N concurrent finishers always sees
N done, and the guarded job transition lets exactly one of them move the job on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from farm import states
from farm.db import Avatar, Chunk, Job, Segment, utcnow
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
    rows = session.scalars(select(Job).where(Job.id.startswith(prefix)).limit(2)).all()
    if len(rows) != 1:
        raise NotFound(f"no job {prefix!r}" if not rows else f"job id {prefix!r} is ambiguous")
    return rows[0]


def list_jobs(session: Session, limit: int = 20, state: str | None = None) -> Sequence[Job]:
    query = select(Job).order_by(Job.created_at.desc()).limit(limit)
    if state:
        query = query.where(Job.state == state)
    return session.scalars(query).all()


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


def record_timing(session: Session, job_id: str, stage: str, seconds: float) -> None:
    job = get_job(session, job_id)
    job.timings = {**(job.timings or {}), stage: round(seconds, 3)}


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
