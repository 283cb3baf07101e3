"""Faults injected for real: a render worker killed with SIGKILL in the middle of a
chunk. The `null` renderer with a per-frame delay makes chunks long enough to be hit
mid-render (this is about scheduling, not pixels), and its frames encode their index,
so "identical to a clean run" is checked frame by frame on the decoded videos."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import sqlalchemy as sa

from tests.probe import probe
from tests.services import (
    Workers,
    farm_argv,
    running_chunk,
    submit_script,
)

SCRIPT = b"A render worker dies in the middle of this chunk. Another one finishes the job."


# farm_env (tests/conftest.py): its Redis database and settings. A killed worker's
# unacknowledged message comes back after FARM_VISIBILITY_TIMEOUT.
REDIS_DB = 15
FARM_ENV = {"FARM_NULL_FRAME_MS": "40", "FARM_VISIBILITY_TIMEOUT": "8"}


def _submit(env: dict[str, str], out: Path, wait: bool = True) -> subprocess.Popen:
    # Piper speaks a text the same on every run, so the clean and the killed run plan
    # the same frames (espeak-ng's timings move by about a millisecond).
    args = ["--voice", "joe", "--chunk-frames", "25", "--seed", "5"]
    if wait:
        args += ["--wait", "--output", str(out)]
    return submit_script(env, SCRIPT, *args)


def _attempts(url: str, job_id: str) -> dict[int, int]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT idx, attempts FROM chunks WHERE job_id = :j"), {"j": job_id}
        ).all()
    engine.dispose()
    return {idx: n for idx, n in rows}


def _frames(path: Path) -> np.ndarray:
    return probe(path).frames[:, 32, 32, 0].astype(int)


def _clean_run(env: dict[str, str], workers: Workers, out: Path) -> None:
    proc = _submit(env, out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()


@pytest.mark.parametrize("what", ["child", "whole worker"])
def test_render_worker_killed_mid_chunk(farm_env, tmp_path, what):
    env = farm_env
    workers = Workers(env, tmp_path)
    workers.start("cpu", "cpu", concurrency=2)
    workers.start("render1", "render")
    workers.start("render2", "render")
    try:
        workers.wait_ready()
        clean = tmp_path / "clean.mp4"
        _clean_run(env, workers, clean)

        killed = tmp_path / "killed.mp4"
        proc = _submit(env, killed)
        job_id, idx, worker = running_chunk(env["FARM_DATABASE_URL"])
        victim = worker.split("@")[0]
        main = psutil.Process(workers.procs[victim].pid)
        # `farm worker` execs celery: the process is the worker's main process.
        if what == "child":
            (child,) = main.children()
            os.kill(child.pid, signal.SIGKILL)
        else:
            workers.kill(victim)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    finally:
        workers.stop()

    assert _attempts(env["FARM_DATABASE_URL"], job_id)[idx] >= 2  # it really was redone
    a, b = _frames(clean), _frames(killed)
    assert a.shape == b.shape and np.array_equal(a, b)


def test_cancel_while_rendering_stops_everything_and_cleans_up(farm_env, tmp_path):
    env = farm_env
    workers = Workers(env, tmp_path)
    workers.start("cpu", "cpu", concurrency=2)
    workers.start("render1", "render")
    url = env["FARM_DATABASE_URL"]
    try:
        workers.wait_ready()
        proc = _submit(env, tmp_path / "unused.mp4", wait=False)
        out, _ = proc.communicate(timeout=60)
        job_id = out.decode().strip()
        running_chunk(url)
        cancelled_at = time.time()
        cancel = subprocess.run(
            farm_argv("cancel", job_id),
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert cancel.returncode == 0, cancel.stderr.decode()
        # A frame batch is 16 frames of 40 ms: the running chunk stops well within 3 s.
        engine = sa.create_engine(url)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                running = conn.execute(
                    sa.text(
                        "SELECT count(*) FROM chunks WHERE job_id = :j AND state = 'running'"
                        " AND worker IS NOT NULL"
                    ),
                    {"j": job_id},
                ).scalar()
            if not running:
                break
            time.sleep(0.1)
        assert not running, "the running chunk did not stop within a frame batch"
        time.sleep(2)  # anything still queued would have started by now
        with engine.connect() as conn:
            state = conn.execute(
                sa.text("SELECT state FROM jobs WHERE id = :j"), {"j": job_id}
            ).scalar()
            late = conn.execute(
                sa.text("SELECT count(*) FROM chunks WHERE job_id = :j AND started_at > :t"),
                {"j": job_id, "t": _utc(cancelled_at + 0.5)},
            ).scalar()
            done = conn.execute(
                sa.text("SELECT count(*) FROM chunks WHERE job_id = :j AND state = 'done'"),
                {"j": job_id},
            ).scalar()
        engine.dispose()
    finally:
        workers.stop()
    assert state == "cancelled"
    assert late == 0, "a queued chunk started after the cancel"
    assert done <= 1
    assert not (Path(env["FARM_HOME"]) / "artifacts" / "jobs" / job_id).exists() or not any(
        p.is_file() for p in (Path(env["FARM_HOME"]) / "artifacts" / "jobs" / job_id).rglob("*")
    ), "partial artifacts were left behind"


def _utc(ts: float):
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC)


def _job_state(url: str, job_id: str) -> tuple[str, str | None]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT state, error FROM jobs WHERE id = :j"), {"j": job_id}
        ).one()
    engine.dispose()
    return row[0], row[1]


def _wait_final(url: str, job_id: str, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, _ = _job_state(url, job_id)
        if state in ("succeeded", "failed", "cancelled"):
            return state
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end")


def test_a_chunk_that_always_fails_fails_its_job_only_and_retry_redoes_only_it(farm_env, tmp_path):
    env = {**farm_env, "FARM_NULL_FRAME_MS": "0", "FARM_TASK_MAX_RETRIES": "2"}
    url = env["FARM_DATABASE_URL"]
    workers = Workers(env, tmp_path)
    workers.start("cpu", "cpu", concurrency=2)
    # The render worker's renderer fails on frame 60 of any job, every time.
    workers.start("render1", "render", FARM_NULL_FAIL_FRAME="60")

    def submit(text: bytes) -> str:
        proc = subprocess.run(
            farm_argv("submit", "-", "--voice", "espeak", "--size", "64", "--chunk-frames", "25"),
            input=text,
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout.decode().strip()

    try:
        workers.wait_ready()
        doomed = submit(b"This job is long enough to reach frame sixty, where it breaks.")
        other = submit(b"Hi.")  # fewer than 60 frames: unaffected
        assert _wait_final(url, doomed) == "failed"
        assert _wait_final(url, other) == "succeeded"
        status = subprocess.run(
            farm_argv("status", doomed),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        assert "render: chunk 2: RuntimeError: injected renderer error at frame 60" in status
        assert "chunk 2 failed on render1@" in status
        before = _attempts(url, doomed)
        assert before[2] == 3  # the first try and two retries

        # The cause is fixed (a worker without the fault); retry re-runs only chunk 2.
        workers.stop()
        workers.procs.clear()
        workers.start("cpu", "cpu", concurrency=2)
        workers.start("render2", "render")
        workers.wait_ready()
        retried = subprocess.run(
            farm_argv("retry", doomed[:10]),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert retried.returncode == 0, retried.stderr
        assert "1 render task(s)" in retried.stdout
        assert _wait_final(url, doomed) == "succeeded"
        again = subprocess.run(
            farm_argv("retry", doomed),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode == 1 and "only failed jobs" in again.stderr
    finally:
        workers.stop()
    after = _attempts(url, doomed)
    assert after[2] == 4
    assert {i: n for i, n in after.items() if i != 2} == {i: n for i, n in before.items() if i != 2}


def _snapshot(url: str, home: Path, job_id: str) -> dict:
    import hashlib

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = {
            table: conn.execute(
                sa.text(f"SELECT * FROM {table} WHERE job_id = :j ORDER BY 1"), {"j": job_id}
            ).all()
            for table in ("segments", "chunks", "webhook_deliveries")
        }
        rows["attempts"] = conn.execute(
            sa.text(
                "SELECT a.* FROM webhook_attempts a JOIN webhook_deliveries d "
                "ON d.id = a.delivery_id WHERE d.job_id = :j ORDER BY a.id"
            ),
            {"j": job_id},
        ).all()
        rows["job"] = conn.execute(
            sa.text("SELECT state, output_key, finished_at FROM jobs WHERE id = :j"), {"j": job_id}
        ).all()
    engine.dispose()
    root = home / "artifacts" / "jobs" / job_id
    rows["files"] = sorted(
        (str(p.relative_to(root)), hashlib.sha256(p.read_bytes()).hexdigest())
        for p in root.rglob("*")
        if p.is_file()
    )
    return rows


def test_every_task_delivered_twice_changes_nothing_twice(farm_env, tmp_path):
    from farm.config import Settings
    from farm.webhooks import new_secret
    from tests.webhook_receiver import Receiver
    from workers.app import make_app

    secret = new_secret()
    env = {
        **farm_env,
        "FARM_NULL_FRAME_MS": "0",
        "FARM_WEBHOOK_SECRET": secret,
        "FARM_WEBHOOK_ALLOWLIST": "127.0.0.1",
    }
    url, home = env["FARM_DATABASE_URL"], Path(env["FARM_HOME"])
    workers = Workers(env, tmp_path)
    workers.start("cpu", "cpu", concurrency=2)
    workers.start("render1", "render")
    app = make_app(Settings.from_env(env))
    with Receiver(secret) as receiver:
        try:
            workers.wait_ready()
            proc = subprocess.run(
                farm_argv(
                    "submit",
                    "-",
                    "--voice",
                    "espeak",
                    "--size",
                    "64",
                    "--chunk-frames",
                    "20",
                    "--webhook",
                    receiver.url,
                    "--wait",
                ),
                input=b"Deliver every task twice. Nothing may happen twice.",
                env=env,
                capture_output=True,
                timeout=180,
            )
            assert proc.returncode == 0, proc.stderr.decode()
            job_id = proc.stdout.decode().split()[0]
            receiver.wait_for(1, timeout=60)
            before = _snapshot(url, home, job_id)
            assert before["files"] and len(before["chunks"]) > 2

            # Every task of the graph again, as a broker redelivery would hand it over.
            send = app.send_task
            send("farm.prepare", args=(job_id,))
            for seg in before["segments"]:
                send("farm.tts", args=(job_id, seg.idx))
            send("farm.plan", args=(job_id,))
            for chunk in before["chunks"]:
                send("farm.render", args=(job_id, chunk.idx, chunk.start_frame, chunk.stop_frame))
            send("farm.mux", args=(job_id,))
            send("farm.publish", args=(job_id,))
            for delivery in before["webhook_deliveries"]:
                send("farm.notify", args=(delivery.id, 1))
            _drained(app, env["FARM_BROKER_URL"])
            after = _snapshot(url, home, job_id)
        finally:
            workers.stop()
            app.close()
    assert after == before
    assert len(receiver.received) == 1


def _drained(app, broker_url: str, timeout: float = 60) -> None:
    """Every queued task was taken and none is running: the duplicates really ran."""
    import redis

    client = redis.Redis.from_url(broker_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = sum(client.llen(q) for q in ("cpu", "render", "cpu_bulk", "render_bulk"))
        inspect = app.control.inspect(timeout=1.0)
        busy = [*(inspect.active() or {}).values(), *(inspect.reserved() or {}).values()]
        if queued == 0 and not any(busy):
            return
        time.sleep(0.5)
    raise AssertionError("the duplicated tasks did not all run")
