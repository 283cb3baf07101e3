"""Issue 6, item 8: 1,000 short jobs submitted at once. Every job ends (succeeded), the
database and the artifact store agree, each job sends one webhook, and `farm jobs`
keeps answering while the farm is loaded.

A scheduling test, not a rendering one: the `null` renderer does no work, jobs are
one short espeak sentence at 64x64 in one chunk. Everything else is real: Redis,
Postgres, the local store, ffmpeg and `farm worker` processes; jobs go in through
the library path of `farm submit` (farm.load), from a few threads at once."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import sqlalchemy as sa

from farm import load, migrate
from farm.config import Settings
from farm.context import Context
from farm.webhooks import new_secret
from tests.conftest import need_service
from tests.probe import probe
from tests.services import Workers, fresh_redis_db, redis_up
from tests.webhook_receiver import Receiver

N = 1000
CLI_BOUND_SECONDS = 15.0  # liveness under load on a shared 2-core machine, not a speed aim


def test_thousand_jobs_at_once_all_end_and_the_records_agree(
    postgres_url: str, tmp_path: Path
) -> None:
    need_service(redis_up(), "Redis at 127.0.0.1:6379")
    from workers.dispatch import CeleryDispatcher

    migrate.upgrade(postgres_url)
    secret = new_secret()
    home = tmp_path / "home"
    with Receiver(secret) as receiver:
        env = {
            **os.environ,
            "FARM_HOME": str(home),
            "FARM_BROKER_URL": fresh_redis_db(6),
            "FARM_DATABASE_URL": postgres_url,
            "FARM_RENDERER": "null",
            "FARM_WEBHOOK_SECRET": secret,
            "FARM_WEBHOOK_ALLOWLIST": "127.0.0.1",
        }
        env.pop("FARM_STORE_URL", None)
        settings = Settings.from_env(env)
        ctx = Context(settings, CeleryDispatcher.for_settings(settings))
        workers = Workers(env, tmp_path)
        workers.start("cpu", "cpu", concurrency=3)
        workers.start("render", "render", concurrency=1)
        try:
            workers.wait_ready()
            pids = {name: p.pid for name, p in workers.procs.items()}
            result = load.run(ctx, N, workers=pids, webhook=receiver.url)
            receiver.wait_for(N, timeout=300)
            # A worker records an attempt's answer just after the receiver has it:
            # stop the workers only once every delivery has left 'pending'.
            _wait_until_settled(postgres_url, timeout=60)
        finally:
            workers.stop()
            fresh_redis_db(6)
    print("\nload figures:", json.dumps(result.figures(), indent=1))

    # Every job ended, and well: failures would be counted here, not raised.
    assert (result.succeeded, result.failed, result.cancelled) == (N, 0, 0)
    assert result.peak_queue_depth >= N // 2, "the jobs were not queued at once"

    # `farm jobs` answered every time it was run during the load.
    assert len(result.cli_runs) >= 3, result.cli_runs
    assert all(r.returncode == 0 for r in result.cli_runs), result.cli_runs
    assert max(r.seconds for r in result.cli_runs) < CLI_BOUND_SECONDS, result.cli_runs

    engine = sa.create_engine(postgres_url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT id, state, output_key, frame_count, timings FROM jobs")
        ).all()
        open_members = conn.execute(
            sa.text(
                "SELECT (SELECT count(*) FROM chunks WHERE state <> 'done'),"
                " (SELECT count(*) FROM segments WHERE state <> 'done'),"
                " (SELECT count(*) FROM chunks), (SELECT count(*) FROM segments)"
            )
        ).one()
        deliveries = conn.execute(
            sa.text(
                "SELECT job_id, count(*), min(event_type), min(state), sum(attempts)"
                " FROM webhook_deliveries GROUP BY job_id"
            )
        ).all()
        attempts = conn.execute(sa.text("SELECT count(*) FROM webhook_attempts")).scalar()
    engine.dispose()

    # The database agrees with the store, both ways.
    ids = {r.id for r in rows}
    assert ids == set(result.job_ids) and len(rows) == N
    assert all(r.state == "succeeded" for r in rows)
    artifacts = home / "artifacts"
    assert all((artifacts / r.output_key).is_file() for r in rows), "a published MP4 is missing"
    job_dirs = {p.name for p in (artifacts / "jobs").iterdir()}
    assert job_dirs == ids, f"store dirs without a row: {sorted(job_dirs - ids)[:5]}"
    # No member of any job left unfinished: one segment and one chunk each, all done.
    assert tuple(open_members) == (0, 0, N, N)
    # Timings were recorded once per stage (a redelivered stage would overwrite them,
    # a lost one leave a gap).
    assert all(set(r.timings) == {"plan", "mux", "total"} for r in rows)

    # The published videos are real: a sample decoded independently of farm.
    for r in random.Random(8).sample(rows, 5):
        p = probe(artifacts / r.output_key)
        assert (p.video_codec, p.width, p.height) == ("h264", 64, 64)
        assert p.frame_count == r.frame_count > 0
        assert p.audio_codec == "aac" and p.audio_seconds > 0.5

    # One job.succeeded webhook per job: one delivery row, one attempt, one request.
    assert len(deliveries) == N and {d.job_id for d in deliveries} == ids
    assert {(d[1], d[2], d[3], d[4]) for d in deliveries} == {(1, "job.succeeded", "delivered", 1)}
    assert attempts == N
    assert len(receiver.received) == N
    assert len({r.headers["webhook-id"] for r in receiver.received}) == N
    assert {r.payload["data"]["job_id"] for r in receiver.received if r.payload} == ids


def _wait_until_settled(url: str, timeout: float) -> None:
    engine = sa.create_engine(url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                pending = conn.execute(
                    sa.text("SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'")
                ).scalar()
            if pending == 0:
                return
            time.sleep(0.2)
    finally:
        engine.dispose()


def test_queue_depth_counts_every_queue_and_priority_list(tmp_path: Path) -> None:
    """kombu keeps a Redis list per priority step of each queue: all are counted."""
    need_service(redis_up(), "Redis at 127.0.0.1:6379")
    from workers.app import make_app

    settings = Settings(home=tmp_path, broker_url=fresh_redis_db(6))
    app = make_app(settings)
    depth = load.queue_depth_reader(settings)
    try:
        assert depth() == 0
        for priority in (0, 5, 9):
            app.send_task("farm.prepare", args=("0" * 32,), priority=priority)
        app.send_task("farm.render", args=("0" * 32, 0), queue="render_bulk", priority=3)
        assert depth() == 4
    finally:
        fresh_redis_db(6)
