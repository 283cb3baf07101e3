"""The sweep for lost work (farm/sweep.py).

On SQLite and Postgres: which rows count as stalled, what is queued for them, and
that a swept row waits a whole stall period before it is queued again. With real
workers, Redis and Postgres: the broker loses every queued message of a job in the
middle of it (FLUSHDB, as a Redis without persistence does on restart), and a real
beat process's sweep brings the job to the end with nobody typing anything. The null
renderer draws the frames: this is about scheduling.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from datetime import timedelta

import redis
import sqlalchemy as sa
from sqlalchemy import update

from farm import jobs, queries, states, sweep
from farm.context import Context
from farm.db import Chunk, Job, WebhookDelivery, utcnow
from tests.probe import probe
from tests.services import (
    Workers,
    farm_argv,
    submit_script,
)

STALL = 600


def _ctx(db_ctx: Context) -> Context:
    return Context(dataclasses.replace(db_ctx.settings, stall_seconds=STALL), db_ctx.dispatch)


def _job(ctx: Context, state: str, idle: float, chunks: int = 0) -> str:
    job_id = jobs.submit(ctx, jobs.JobRequest("One. Two.", "demo", "espeak", 25, (64, 64), 10))
    then = utcnow() - timedelta(seconds=idle)
    with ctx.session() as s:
        if chunks:
            queries.insert_chunks(s, job_id, [(i * 10, i * 10 + 10) for i in range(chunks)])
            s.execute(
                update(Chunk).where(Chunk.job_id == job_id, Chunk.idx == 0).values(state="done")
            )
        s.execute(update(Job).where(Job.id == job_id).values(state=state, updated_at=then))
    return job_id


def test_only_active_jobs_idle_for_a_stall_period_are_swept(db_ctx):
    ctx = _ctx(db_ctx)
    rendering = _job(ctx, states.RENDERING, STALL + 60, chunks=3)
    muxing = _job(ctx, states.MUXING, STALL + 60)
    queued = _job(ctx, states.QUEUED, STALL + 60)
    _job(ctx, states.RENDERING, STALL - 60, chunks=2)  # not idle long enough
    _job(ctx, states.SUCCEEDED, STALL * 10)  # final: never
    _job(ctx, states.CANCELLED, STALL * 10)
    busy = _job(ctx, states.RENDERING, STALL + 60, chunks=2)  # its chunk just started
    long = _job(ctx, states.RENDERING, STALL + 60, chunks=2)  # a long chunk still running
    with ctx.session() as s:
        s.execute(
            update(Chunk).where(Chunk.job_id == busy, Chunk.idx == 1).values(started_at=utcnow())
        )
        s.execute(
            update(Chunk)
            .where(Chunk.job_id == long, Chunk.idx == 1)
            .values(state="running", started_at=utcnow() - timedelta(seconds=STALL * 2))
        )

    found = {w.job_id: w for w in sweep.stalled_jobs(ctx)}
    assert set(found) == {rendering, muxing, queued}
    # Only the unfinished members of the stage the job is in are queued again.
    assert found[rendering].stage.name == "render"
    assert found[rendering].items == [(1, 10, 20), (2, 20, 30)]
    assert (found[muxing].stage.name, found[muxing].items) == ("mux", [])
    assert found[queued].stage.name == "prepare"
    # Swept rows were touched: the next sweep leaves them alone for a stall period...
    assert sweep.stalled_jobs(ctx) == []
    # ...and takes them again after one.
    later = utcnow() + timedelta(seconds=STALL + 1)
    assert {w.job_id for w in sweep.stalled_jobs(ctx, now=later)} >= {rendering, muxing}


def test_overdue_webhook_deliveries_are_swept_and_scheduled_ones_are_not(db_ctx):
    ctx = _ctx(db_ctx)
    old = utcnow() - timedelta(seconds=STALL + 60)
    rows = {
        "never-queued": dict(state="pending", attempts=0, next_attempt_at=None),
        "retry-lost": dict(state="pending", attempts=2, next_attempt_at=old),
        "retry-later": dict(
            state="pending", attempts=3, next_attempt_at=utcnow() + timedelta(hours=2)
        ),
        "delivered": dict(state="delivered", attempts=1, next_attempt_at=None),
    }
    with ctx.session() as s:
        for delivery_id, values in rows.items():
            s.add(
                WebhookDelivery(
                    id=delivery_id,
                    event_type="job.succeeded",
                    url="https://example.invalid/hook",
                    payload="{}",
                    created_at=old,
                    updated_at=old,
                    **values,
                )
            )
    found = sweep.stalled_deliveries(ctx)
    assert sorted(found) == [("never-queued", 1), ("retry-lost", 3)]  # the next attempt
    assert sweep.stalled_deliveries(ctx) == []  # touched


# --- for real: the broker loses a job's messages --------------------------------------------


# farm_env (tests/conftest.py): its Redis database and settings.
REDIS_DB = 5
FARM_ENV = {"FARM_SWEEP_SECONDS": "2", "FARM_STALL_SECONDS": "4"}


def _state(env: dict[str, str], job_id: str) -> str:
    out = subprocess.run(
        farm_argv("status", job_id), env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_job_whose_messages_the_broker_lost_finishes_by_the_sweep(farm_env, tmp_path):
    env = farm_env
    workers = Workers(env, tmp_path)
    workers.start("cpu", "cpu", concurrency=1)  # no render worker yet: chunks stay queued
    beat = None
    try:
        workers.wait_ready()
        submit = submit_script(
            env, b"The broker forgets this job. The sweep remembers it.", "--chunk-frames", "10"
        )
        out, err = submit.communicate(timeout=120)
        assert submit.returncode == 0, err.decode()
        job_id = out.decode().strip()
        deadline = time.monotonic() + 120
        while "rendering" not in _state(env, job_id):
            assert time.monotonic() < deadline, _state(env, job_id)
            time.sleep(0.5)

        # Queued render messages mean waiting, not lost: nothing is queued twice.
        swept = subprocess.run(
            farm_argv("sweep", "--stall-seconds", "0"), env=env, capture_output=True, timeout=60
        )
        assert swept.returncode == 0 and swept.stdout.startswith(b"0 stalled"), swept
        broker = redis.Redis.from_url(env["FARM_BROKER_URL"])
        assert broker.dbsize() > 0  # the render messages are there...
        broker.flushdb()  # ...and now they are gone, as after a restart without persistence
        workers.start("render", "render")
        workers.wait_ready()
        time.sleep(6)
        assert "rendering" in _state(env, job_id)  # nothing would ever move it

        log = open(tmp_path / "beat.log", "wb")  # noqa: SIM115 - closed with the process
        beat = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.app",
                "beat",
                "-s",
                str(tmp_path / "beat-schedule"),
                "--loglevel",
                "INFO",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while "succeeded" not in (shown := _state(env, job_id)):
            assert "failed" not in shown, shown
            assert time.monotonic() < deadline, f"not finished by the sweep: {shown}"
            time.sleep(1)
    finally:
        if beat is not None:
            beat.terminate()
            beat.wait(timeout=30)
        workers.stop()

    video_path = tmp_path / "out.mp4"
    fetch = subprocess.run(
        farm_argv("fetch", job_id, str(video_path)), env=env, capture_output=True, timeout=60
    )
    assert fetch.returncode == 0, fetch.stderr.decode()
    engine = sa.create_engine(env["FARM_DATABASE_URL"])
    with engine.connect() as conn:
        planned = conn.execute(
            sa.text("SELECT frame_count FROM jobs WHERE id = :j"), {"j": job_id}
        ).scalar()
    engine.dispose()
    video = probe(video_path)
    assert video.video_codec == "h264" and video.frame_count == planned > 0
