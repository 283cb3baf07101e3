"""Tables (SQLAlchemy 2 declarative) and the one place engines are made.

The database is the record of truth for jobs; Celery only carries IDs.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Timezone-aware datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime}


class Avatar(Base):
    __tablename__ = "avatars"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    renderer: Mapped[str] = mapped_column(String(32))
    artifact_key: Mapped[str] = mapped_column(String(512))
    source_key: Mapped[str] = mapped_column(String(512))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # webhooks (migration 0002): the default target of this avatar's jobs
    webhook_url: Mapped[str | None] = mapped_column(String(2048))


class Voice(Base):
    """A registered TTS voice (migration 0007, farm/voices.py): a Piper model's files in
    the store and what was read from them at `farm voice add`, or an espeak-ng language
    (no files). The built-in joe and espeak have no row. `digest` (SHA-256 of model and
    config) names a Piper voice's content: workers cache it by that, so one removed and
    added again with other files is reloaded."""

    __tablename__ = "voices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(32), unique=True)  # as jobs.voice holds it
    kind: Mapped[str] = mapped_column(String(16))  # piper | espeak
    language: Mapped[str] = mapped_column(String(32))  # the espeak-ng voice of its phonemes
    model_key: Mapped[str | None] = mapped_column(String(512))  # piper only
    config_key: Mapped[str | None] = mapped_column(String(512))
    digest: Mapped[str | None] = mapped_column(String(64))
    sample_rate: Mapped[int] = mapped_column(Integer)
    model_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    avatar: Mapped[str] = mapped_column(String(64))
    renderer: Mapped[str] = mapped_column(String(32))
    voice: Mapped[str] = mapped_column(String(32))
    script: Mapped[str] = mapped_column(Text)
    fps: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    chunk_frames: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer, default=5)
    idempotency_key: Mapped[str | None] = mapped_column(String(128), unique=True)
    segments_total: Mapped[int] = mapped_column(Integer, default=0)
    chunks_total: Mapped[int] = mapped_column(Integer, default=0)
    frame_count: Mapped[int] = mapped_column(Integer, default=0)
    audio_seconds: Mapped[float | None] = mapped_column(Float)
    output_key: Mapped[str | None] = mapped_column(String(512))
    error: Mapped[str | None] = mapped_column(Text)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # webhooks (migration 0002): resolved at submit (--webhook, avatar, FARM_WEBHOOK_URL)
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    # batches (migration 0003): the batch, the manifest row ("line 3", "intro.txt") and
    # where the video is published (None: jobs/{id}/final.mp4)
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id"), index=True)
    batch_row: Mapped[str | None] = mapped_column(String(256))
    target_key: Mapped[str | None] = mapped_column(String(512))
    # audio-only jobs (migration 0004): the normalised input WAV in the store (None: a
    # script job) and the words speech recognition heard in it (for `farm status`)
    audio_key: Mapped[str | None] = mapped_column(String(512))
    transcript: Mapped[str | None] = mapped_column(Text)
    # renderer options (migration 0005): what `submit` asked of the backend, e.g.
    # {"steps": 10, "emotion": 3} for Ditto; None: the backend's defaults
    options: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # delivery options (migration 0006): {"captions": "off"|"file"|"burn", "poster_at":
    # seconds or None}; None: a job from before captions, posters and previews
    delivery: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # retention (migration 0008): bytes the job holds in the store, measured at publish
    # (and after its intermediates went); when retention removed its outputs
    bytes_stored: Mapped[int | None] = mapped_column(BigInteger)
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Batch(Base):
    """A named set of jobs from one manifest (or one night's inbox). `state` goes
    running -> completed by a guarded UPDATE when its last job ends, and back to
    running if a resubmission adds rows; `reported_at` marks the report and the
    batch.completed event of that completion as done."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    state: Mapped[str] = mapped_column(String(16), default="running")
    source: Mapped[str | None] = mapped_column(Text)
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    # rows refused at the last submission (--skip-invalid): [{row, line, reason}]
    invalid: Mapped[list[Any]] = mapped_column(JSON, default=list)
    report_key: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    reported_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Segment(Base):
    __tablename__ = "segments"
    __table_args__ = (UniqueConstraint("job_id", "idx"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    idx: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    pause_after_ms: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    seconds: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class Chunk(Base):
    __tablename__ = "chunks"
    __table_args__ = (UniqueConstraint("job_id", "idx"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    idx: Mapped[int] = mapped_column(Integer)
    start_frame: Mapped[int] = mapped_column(Integer)
    stop_frame: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    worker: Mapped[str | None] = mapped_column(String(128))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    render_seconds: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # usage (migration 0008): the render path the chunk ran on: cpu | cuda | tensorrt
    device: Mapped[str | None] = mapped_column(String(16))


# --- webhooks (migration 0002) -------------------------------------------------


class WebhookEndpoint(Base):
    """A target URL that answered 410 Gone: no further attempts go to it."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    url: Mapped[str] = mapped_column(String(2048), unique=True)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookDelivery(Base):
    """One event for one URL. Its id is the `webhook-id` header, the same on every
    attempt, so receivers can drop duplicates. The body is stored as sent."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    batch_id: Mapped[str | None] = mapped_column(String(32), index=True)
    event_type: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(String(2048))
    payload: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WebhookAttempt(Base):
    """One HTTP attempt of a delivery: its status code or the error."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True
    )
    attempt: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


# --- retention and deletion (migration 0008, farm/retention.py) ---------------


class Deletion(Base):
    """The audit record of one deletion: what went (a job, an avatar, a job's outputs or
    intermediates), when, by which command, and how many store objects and bytes. The
    counts grow as pending store deletions complete; `pending` is how many are left."""

    __tablename__ = "deletions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # job | avatar | outputs | intermediates
    subject: Mapped[str] = mapped_column(String(64), index=True)  # job id or avatar name
    command: Mapped[str] = mapped_column(String(64))  # "farm jobs delete", "retention", ...
    rows: Mapped[int] = mapped_column(Integer, default=0)
    objects: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    pending: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class PendingDeletion(Base):
    """A store prefix still to delete. Written in the same transaction that removes the
    rows, so an outage of the store loses nothing: the sweep retries until it is gone."""

    __tablename__ = "pending_deletions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    deletion_id: Mapped[int | None] = mapped_column(
        ForeignKey("deletions.id", ondelete="SET NULL"), index=True
    )
    prefix: Mapped[str] = mapped_column(String(512))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


# What a database outage or restart raises: the server refused or dropped the connection
# (Postgres stopped, restarting, or in crash recovery), or SQLite stayed locked. Work
# that hits one is retried later; it says nothing about the job itself.
OUTAGE_ERRORS: tuple[type[Exception], ...] = (sa_exc.OperationalError, sa_exc.InterfaceError)

# Seconds to wait for a connection to a database server before counting it as down
# (a host that drops packets would otherwise hold a worker for the OS's TCP timeout).
CONNECT_TIMEOUT = 10


def make_engine(url: str) -> Engine:
    """One engine per process, made at start-up (never at import)."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # pre_ping: a pooled connection that a server restart closed is replaced on checkout
    # instead of failing the first query after the restart.
    connect_args = {}
    if url.startswith("postgresql") and "connect_timeout=" not in url:  # the URL's wins
        connect_args["connect_timeout"] = CONNECT_TIMEOUT
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the CLI read progress while worker processes write.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
