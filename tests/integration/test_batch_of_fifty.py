"""The issue's acceptance run: a manifest of 50 scripts submitted as a batch through
the CLI finishes with every job accounted for, a signed webhook per job and one for
the batch, each received and verified by a real HTTP server on loopback.

Real Redis, Postgres, TTS (espeak, for speed), ffmpeg and `farm worker` processes;
the `null` renderer, because this test is about scheduling and delivery, not pixels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from farm import migrate
from farm.webhooks import new_secret
from tests.conftest import need_service
from tests.services import Workers, fresh_redis_db, redis_up
from tests.webhook_receiver import Receiver

N = 50


def test_fifty_scripts_one_batch_every_job_and_webhook_accounted_for(
    postgres_url: str, tmp_path: Path
) -> None:
    need_service(redis_up(), "Redis at 127.0.0.1:6379")
    manifest = tmp_path / "scripts"
    manifest.mkdir()
    for i in range(N):
        (manifest / f"script-{i:02d}.txt").write_text(f"This is script number {i}.")
    secret = new_secret()
    migrate.upgrade(postgres_url)
    with Receiver(secret) as receiver:
        env = {
            **os.environ,
            "FARM_HOME": str(tmp_path / "home"),
            "FARM_BROKER_URL": fresh_redis_db(14),
            "FARM_DATABASE_URL": postgres_url,
            "FARM_RENDERER": "null",
            "FARM_WEBHOOK_SECRET": secret,
            "FARM_WEBHOOK_ALLOWLIST": "127.0.0.1",
        }
        env.pop("FARM_STORE_URL", None)
        workers = Workers(env, tmp_path)
        workers.start("cpu", "cpu", concurrency=2)
        workers.start("render", "render")

        def farm(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "farm", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )

        try:
            workers.wait_ready()
            submit = (
                "batch",
                "submit",
                str(manifest),
                "--name",
                "fifty",
                "--voice",
                "espeak",
                "--size",
                "64",
                "--chunk-frames",
                "50",
                "--webhook",
                receiver.url,
            )
            for attempt in ("first", "again: creates nothing new"):
                submitted = farm(*submit)
                assert submitted.returncode == 0, (attempt, submitted.stderr)
            status = farm("batch", "status", "fifty", "--wait")
            assert status.returncode == 0, status.stderr
            receiver.wait_for(N + 1, timeout=300)
        finally:
            workers.stop()
            fresh_redis_db(14)

    assert all(r.payload is not None for r in receiver.received), "a signature failed"
    payloads = [r.payload for r in receiver.received if r.payload]
    jobs_done = {p["data"]["job_id"] for p in payloads if p["type"] == "job.succeeded"}
    batch_events = [p for p in payloads if p["type"] == "batch.completed"]
    assert len(jobs_done) == N and len(batch_events) == 1
    assert len({r.headers["webhook-id"] for r in receiver.received}) == N + 1  # no duplicates
    assert batch_events[0]["data"]["counts"] == {"succeeded": N}

    report = subprocess.run(
        [sys.executable, "-m", "farm", "batch", "report", "fifty", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    rows = json.loads(report.stdout)
    rows = rows["jobs"] if isinstance(rows, dict) else rows
    assert len(rows) == N  # the second submission created no duplicates
    assert {r["job_id"] for r in rows} == jobs_done
    assert all(r["state"] == "succeeded" for r in rows)
