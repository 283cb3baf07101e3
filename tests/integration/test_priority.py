"""Bulk work runs at a lower priority than interactive jobs: a scheduling test.

Real `farm worker` processes (one cpu worker, two render workers, started as an
operator would: `-Q cpu`, `-Q render`) on Redis and Postgres, with the local store
and the `null` renderer, whose FARM_NULL_FRAME_MS makes every chunk take real time
(a stand-in for GPU time; nothing is rendered). A batch of BULK_JOBS jobs is queued
first, then an interactive job. The issue's figure is a 200-job batch; this one is
smaller so the test stays well under a minute, but the mechanism is the same: the
batch's chunks wait in `render_bulk`, the interactive job's in `render`, and every
render worker drains `render` first (queue_order_strategy "priority", prefetch 1).

What is checked, from the chunks' started_at in the database:
- the batch was far from done when the interactive job started rendering;
- its first chunk started within one bulk chunk's time of being queued (as soon as
  a render worker freed up), not after the batch;
- no bulk chunk started between its first and last chunk (its chunks went first).
"""

from __future__ import annotations

import os
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import need_service
from tests.services import Workers, farm_argv, fresh_redis_db, redis_up

REDIS_DB = 14
BULK_JOBS = 20
CHUNK_FRAMES = 15
FRAME_MS = 20  # 0.3 s of "GPU time" per chunk
SLACK = 1.0  # seconds: dispatch, a database round trip, the store


@pytest.fixture
def farm(postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    need_service(redis_up(), "Redis at 127.0.0.1:6379")
    env = {
        **os.environ,
        "FARM_HOME": str(tmp_path / "home"),
        "FARM_BROKER_URL": fresh_redis_db(REDIS_DB),
        "FARM_DATABASE_URL": postgres_url,
        "FARM_RENDERER": "null",
        "FARM_NULL_FRAME_MS": str(FRAME_MS),
        "FARM_RENDER_THREADS": "1",
    }
    for key in ("FARM_STORE_URL", "FARM_WEBHOOK_URL", "FARM_NIGHTLY_INBOX"):
        env.pop(key, None)
    up = subprocess.run(farm_argv("db", "upgrade"), env=env, capture_output=True)
    assert up.returncode == 0, up.stderr.decode()
    workers = Workers(env, tmp_path)
    try:
        yield env, workers, tmp_path
    finally:
        workers.stop()
        fresh_redis_db(REDIS_DB)  # leave no queued bulk work behind


def _farm(env: dict[str, str], *args: str, stdin: bytes | None = None) -> str:
    proc = subprocess.run(farm_argv(*args), env=env, input=stdin, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def _query(url: str, sql: str, **params: object) -> list[sa.Row]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params).all())
    finally:
        engine.dispose()


def test_an_interactive_job_overtakes_a_queued_batch(farm) -> None:
    env, workers, tmp_path = farm
    url = env["FARM_DATABASE_URL"]
    workers.start("cpu", "cpu", concurrency=2)
    workers.start("render1", "render")
    workers.start("render2", "render")
    workers.wait_ready()

    inbox = tmp_path / "manifest"
    inbox.mkdir()
    for i in range(BULK_JOBS):
        (inbox / f"bulk{i:03d}.txt").write_text(f"Bulk job number {i}, queued for tonight.")
    common = ["--voice", "espeak", "--size", "64", "--chunk-frames", str(CHUNK_FRAMES)]
    out = _farm(env, "batch", "submit", str(inbox), "--name", "bulk", *common)
    assert f"{BULK_JOBS} job(s) submitted" in out

    # Every bulk job planned: its chunks wait in render_bulk.
    deadline = time.monotonic() + 120
    while True:
        planned = _query(url, "SELECT count(*) FROM jobs WHERE priority = 1 AND chunks_total > 0")[
            0
        ][0]
        if planned == BULK_JOBS:
            break
        assert time.monotonic() < deadline, f"only {planned} bulk jobs planned; see {tmp_path}"
        time.sleep(0.2)

    script = b"An interactive job. Someone is waiting for this one, so it goes first."
    job_id = _farm(env, "submit", "-", *common, stdin=script).split()[0]
    queued_at: datetime | None = None  # when its chunks were queued: it entered rendering
    deadline = time.monotonic() + 120
    while True:
        ((state, updated_at),) = _query(
            url, "SELECT state, updated_at FROM jobs WHERE id = :j", j=job_id
        )
        if state == "rendering" and queued_at is None:
            queued_at = updated_at
        if state == "succeeded":
            break
        assert state not in ("failed", "cancelled"), f"job {state}; see {tmp_path}"
        assert time.monotonic() < deadline, f"interactive job still {state}; see {tmp_path}"
        time.sleep(0.05)
    assert queued_at is not None, "never saw the job rendering"

    chunks = _query(
        url,
        "SELECT c.job_id, c.started_at, c.finished_at, j.priority FROM chunks c "
        "JOIN jobs j ON j.id = c.job_id",
    )
    mine = sorted(c.started_at for c in chunks if c.job_id == job_id)
    bulk = [c for c in chunks if c.priority == 1]
    assert len(mine) >= 4, "the interactive job needs a few chunks to show the ordering"
    first, last = mine[0], mine[-1]

    # The batch was far from done: most of its chunks had not started.
    bulk_total = len(bulk)
    waiting = [c for c in bulk if c.started_at is None or c.started_at > last]
    assert len(waiting) >= bulk_total // 3, (len(waiting), bulk_total)

    # As soon as a render worker freed up: within one bulk chunk's time (plus slack).
    bulk_seconds = max(
        (c.finished_at - c.started_at).total_seconds() for c in bulk if c.finished_at
    )
    waited = (first - queued_at).total_seconds()
    assert waited <= bulk_seconds + SLACK, (waited, bulk_seconds)
    late_bulk = [
        c.started_at
        for c in bulk
        if c.started_at is not None
        and (c.started_at - queued_at).total_seconds() > SLACK
        and c.started_at < first
    ]
    assert late_bulk == [], "a bulk chunk started while the interactive one waited"

    # Its chunks went first: no bulk chunk started between its first and last.
    overtaken = [c.started_at for c in bulk if c.started_at and first < c.started_at < last]
    assert overtaken == [], f"{len(overtaken)} bulk chunk(s) started among its chunks"
