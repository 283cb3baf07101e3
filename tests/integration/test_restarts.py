"""Service restarts injected for real: a private redis-server and a private Postgres
cluster, each stopped for a few seconds while a job renders on real `farm worker`
processes, then started again. The `farm submit --wait` that submitted the job must
exit 0 with an MP4 of the planned frames, and the database must show every stage done
once: every segment and chunk row done, one job.succeeded event delivered once, and no
row changing any more once Redis holds no task.

Redis restarts and the messages in flight. Farm's tasks are acknowledged late: a
queued task is an entry in its queue's list, and a task a worker has taken moves to
Redis' `unacked` hash until it ends. Both live in Redis' memory only, unless Redis
persists them: run it with an append-only file (`--appendonly yes`), as docker-compose
and the embedded runtime do and as these tests do, and a restart keeps every queued
and every taken task. Workers reconnect by themselves, for as long as it takes;
`farm submit --wait` reads only the database and does not notice. A chunk rendering
through the restart carries on (rendering needs no broker); the message a worker then
sends for the next stage waits in the publish retry, about two minutes
(workers/app.py), and goes out when Redis is back. The task's own acknowledgement is
sent after the worker reconnects; were it lost, the `unacked` entry would be handed
out again after FARM_VISIBILITY_TIMEOUT, and the task, finding its work done, would
change nothing (every stage is a guarded transition). If the connection drops while
Redis stays up (a network blip), the worker puts its taken task back at once and a
chunk may render twice, to the same result. Without persistence a restart empties
the queues and `unacked`: queued and taken tasks are lost
(test_queued_tasks_survive_a_redis_restart_only_with_persistence shows both cases),
and their jobs wait for the sweep (farm/sweep.py) to queue the work again after
FARM_STALL_SECONDS; so does a job whose next message could not be sent within the
publish retry.

Postgres restarts. A task that meets the outage (refused connections, or connections
dropped by `pg_ctl stop -m fast` or by a crash, `-m immediate`) is retried after 1,
2, 4 ... 30 s, about 10 minutes in all, apart from FARM_TASK_MAX_RETRIES
(workers/tasks.py). Its transaction was rolled back, or committed just before the
connection went; the guarded transitions make it safe to run again either way. A
chunk cut off mid-render is rendered again. Pooled connections the restart closed are
replaced on checkout (pool_pre_ping). `farm submit --wait` keeps polling, quietly,
through up to 10 minutes of outage.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from farm import migrate
from models.null import frame_level
from tests.conftest import need_service
from tests.probe import probe
from tests.services import (
    Workers,
    free_port,
    running_chunk,
    scheduling_env,
    submit_script,
)

OUTAGE_SECONDS = 4
# ~6 s of speech at 25 fps in chunks of 20 frames of 60 ms: about 8 chunks of 1.2 s on
# two render workers, so the outage falls on running chunks and on queued ones.
SCRIPT = (
    b"The broker or the database goes away in the middle of this render. "
    b"The workers wait, reconnect and finish the job."
)
FRAME_MS = "60"
CHUNK_FRAMES = "20"


# --- private services -----------------------------------------------------------


class RedisServer:
    """A redis-server of our own on a free loopback port, to stop and start at will."""

    def __init__(self, workdir: Path, persistent: bool) -> None:
        self.port, self.persistent = free_port(), persistent
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.argv = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if persistent else "no",
            "--appendfsync", "everysec",
            "--dir", str(self.dir),
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                # With AOF, Redis answers LOADING until the file has been replayed.
                if client.ping():
                    return
            except redis.RedisError:
                pass
            assert self.proc.poll() is None, f"redis-server exited; see {self.dir}"
            time.sleep(0.05)
        raise AssertionError(f"redis-server did not start; see {self.dir}")

    def stop(self) -> None:
        """SIGTERM: a graceful shutdown (Redis syncs its append-only file first)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(port=self.port)


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


AS_ROOT = os.geteuid() == 0


class PostgresCluster:
    """A Postgres cluster of our own (initdb, pg_ctl) on a free loopback port. initdb
    refuses root, so as root (CI) the cluster belongs to the postgres user."""

    def __init__(self) -> None:
        self.port = free_port()
        # Not under pytest's tmp_path: its parents are private to the user running it.
        self.dir = Path(tempfile.mkdtemp(prefix="farm-pg-"))
        self.data = self.dir / "data"
        if AS_ROOT:
            shutil.chown(self.dir, "postgres", "postgres")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *argv: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv] if AS_ROOT else list(argv),
            check=True,
            capture_output=True,
            timeout=120,
        )

    def init(self) -> None:
        self._as_postgres(
            _pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "--no-sync", "--no-instructions",
        )  # fmt: skip

    def start(self) -> None:
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off"
            " -c max_connections=100"
        )
        self._as_postgres(
            _pg_bin("pg_ctl"), "-D", str(self.data), "-o", opts,
            "-l", str(self.dir / "postgres.log"), "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.dir, ignore_errors=True)


def _need_binaries(*names: str) -> None:
    for name in names:
        found = _pg_bin(name) if name in ("initdb", "pg_ctl") else shutil.which(name)
        need_service(found is not None, f"the {name} binary")


@pytest.fixture
def redis_server(request, tmp_path: Path):
    _need_binaries("redis-server")
    server = RedisServer(tmp_path / "redis", persistent=getattr(request, "param", True))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def pg_cluster():
    _need_binaries("initdb", "pg_ctl", *(["runuser"] if AS_ROOT else []))
    cluster = PostgresCluster()
    try:
        cluster.init()
        cluster.start()
        migrate.upgrade(cluster.url)
        yield cluster
    finally:
        cluster.remove()


def _env(tmp_path: Path, broker_url: str, database_url: str, secret: str, **extra: str) -> dict:
    return scheduling_env(
        tmp_path,
        broker_url,
        database_url,
        FARM_NULL_FRAME_MS=FRAME_MS,
        FARM_WEBHOOK_SECRET=secret,
        FARM_WEBHOOK_ALLOWLIST="127.0.0.1",
        # The checks count the chunk videos in the store after the job succeeded.
        FARM_KEEP_INTERMEDIATES="1",
        **extra,
    )


def _submit(env: dict[str, str], *extra: str) -> subprocess.Popen:
    return submit_script(env, SCRIPT, "--chunk-frames", CHUNK_FRAMES, "--seed", "3", *extra)


def _start_workers(env: dict[str, str], logs: Path) -> Workers:
    workers = Workers(env, logs)
    workers.start("cpu", "cpu", concurrency=2)
    workers.start("render1", "render")
    workers.start("render2", "render")
    workers.wait_ready()
    return workers


# --- checks -----------------------------------------------------------------------


def _rows(url: str, sql: str, **params: object) -> list:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params).all())
    finally:
        engine.dispose()


def _check_done_once(
    url: str, home: Path, job_id: str, video: Path, stdout: str, stderr: str, receiver
) -> None:
    """The job succeeded, with every stage done once, and its video is whole."""
    assert "Traceback" not in stderr, stderr
    assert stdout.split() == [job_id, str(video)]
    (job,) = _rows(url, "SELECT * FROM jobs WHERE id = :j", j=job_id)
    assert job.state == "succeeded" and job.error is None and job.finished_at is not None
    assert job.output_key == f"jobs/{job_id}/final.mp4"

    segments = _rows(url, "SELECT state FROM segments WHERE job_id = :j", j=job_id)
    assert len(segments) == job.segments_total and {s.state for s in segments} == {"done"}
    chunks = _rows(
        url,
        "SELECT idx, start_frame, stop_frame, state FROM chunks WHERE job_id = :j ORDER BY idx",
        j=job_id,
    )
    assert len(chunks) == job.chunks_total > 4
    assert {c.state for c in chunks} == {"done"}
    assert [(c.start_frame, c.stop_frame) for c in chunks] == [
        (i * int(CHUNK_FRAMES), min((i + 1) * int(CHUNK_FRAMES), job.frame_count))
        for i in range(job.chunks_total)
    ]
    stored = sorted(p.name for p in (home / "artifacts" / "jobs" / job_id / "chunks").iterdir())
    assert len(stored) == job.chunks_total

    # The final transition happened once: one job.succeeded event, sent once. The job
    # reads succeeded a moment before its webhook task has delivered and recorded it.
    got = receiver.wait_for(1, timeout=60)
    deadline = time.monotonic() + 30
    while True:
        deliveries = _rows(
            url,
            "SELECT event_type, state, attempts FROM webhook_deliveries WHERE job_id = :j",
            j=job_id,
        )
        if any(d.state != "pending" for d in deliveries) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [(d.event_type, d.state) for d in deliveries] == [("job.succeeded", "delivered")]
    time.sleep(1)  # a second delivery, were there one, would have arrived by now
    assert len(receiver.received) == 1 and got[0].payload["type"] == "job.succeeded"
    assert set(job.timings) >= {"plan", "mux", "total"}

    p = probe(video)
    assert p.frame_count == job.frame_count
    levels = p.frames[:, 32, 32, 0].astype(int)
    expected = np.array([frame_level(i) for i in range(p.frame_count)])
    assert np.abs(levels - expected).max() <= 3  # every frame once, in order


def _rendering(url: str, last: bool) -> str:
    """Wait until a chunk renders (last: until no chunk waits any more); the job id."""
    if not last:
        return running_chunk(url)[0]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rows = _rows(url, "SELECT job_id, state FROM chunks")
        states = {r.state for r in rows}
        if rows and "pending" not in states and "running" in states:
            return rows[0].job_id
        time.sleep(0.05)
    raise AssertionError("the last chunks did not start rendering")


def _run_through_outage(
    env: dict[str, str],
    tmp_path: Path,
    outage: Callable[[], None],
    receiver: Any,
    redis_client: Any,
    last: bool = False,
) -> None:
    """Submit with --wait, call `outage()` once a chunk is rendering (last: once the
    last chunks are), check the job; then, once Redis holds no task any more (one whose
    acknowledgement was lost comes back after the visibility timeout), that nothing
    changed."""
    url, out = env["FARM_DATABASE_URL"], tmp_path / "out.mp4"
    workers = _start_workers(env, tmp_path)
    try:
        proc = _submit(env, "--webhook", receiver.url, "--wait", "--output", str(out))
        job_id = _rendering(url, last)
        outage()
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr.decode()
        _check_done_once(
            url, Path(env["FARM_HOME"]), job_id, out, stdout.decode(), stderr.decode(), receiver
        )
        before = _snapshot(url, job_id)
        _drained(redis_client)
        time.sleep(1)
        assert _snapshot(url, job_id) == before
        assert len(receiver.received) == 1
    finally:
        workers.stop()


def _snapshot(url: str, job_id: str) -> dict[str, list]:
    """Every row the job's stages write."""
    return {
        table: _rows(url, f"SELECT * FROM {table} WHERE {key} = :j ORDER BY 1", j=job_id)
        for table, key in (
            ("jobs", "id"),
            ("segments", "job_id"),
            ("chunks", "job_id"),
            ("webhook_deliveries", "job_id"),
        )
    }


def _drained(client: Any, timeout: float = 90) -> None:
    """Redis holds no task any more: none queued, none taken and unacknowledged."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = sum(client.llen(q) for q in ("cpu", "render", "cpu_bulk", "render_bulk"))
        if queued == 0 and client.hlen("unacked") == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"tasks still in Redis: {client.hkeys('unacked')}")


# --- tests ------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["first chunks", "last chunks"])
def test_redis_restart_while_rendering(redis_server, postgres_url, tmp_path, when):
    """first chunks: the restart finds chunks taken and chunks queued. last chunks: none
    is queued, and the chunk that finishes the job does so while Redis is down, so the
    mux task it queues has to wait for Redis to come back. Then the tasks whose
    acknowledgement went with the old connection come back and change nothing."""
    from farm.webhooks import new_secret
    from tests.webhook_receiver import Receiver

    migrate.upgrade(postgres_url)
    secret = new_secret()
    # Unacknowledged tasks come back after 8 s instead of 12 h.
    env = _env(tmp_path, redis_server.url, postgres_url, secret, FARM_VISIBILITY_TIMEOUT="8")
    client = redis_server.client()
    seen: dict[str, int] = {}

    def outage() -> None:
        time.sleep(0.3)  # the other render worker takes its chunk too
        seen["queued"] = client.llen("render")
        seen["unacked"] = client.hlen("unacked")
        redis_server.stop()
        time.sleep(OUTAGE_SECONDS)
        redis_server.start()
        # Workers reconnect and ack at once, so what the append-only file brought back
        # is counted where none runs: test_queued_tasks_survive_a_redis_restart_...

    with Receiver(secret) as receiver:
        _run_through_outage(env, tmp_path, outage, receiver, client, when == "last chunks")
    assert seen["unacked"] > 0, seen
    assert seen["queued"] > 0 if when == "first chunks" else seen["queued"] == 0, seen


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_while_rendering(redis_server, pg_cluster, tmp_path, mode):
    from farm.webhooks import new_secret
    from tests.webhook_receiver import Receiver

    secret = new_secret()
    # One retry for renderer errors, spent within 2 s: only the outage's own patience
    # (workers/tasks.py) carries a chunk over a 4 s outage.
    env = _env(tmp_path, redis_server.url, pg_cluster.url, secret, FARM_TASK_MAX_RETRIES="1")

    def outage() -> None:
        # fast: sessions are told and rolled back; immediate: a crash, then recovery.
        pg_cluster.stop(mode)
        time.sleep(OUTAGE_SECONDS)
        pg_cluster.start()

    with Receiver(secret) as receiver:
        _run_through_outage(env, tmp_path, outage, receiver, redis_server.client())


@pytest.mark.parametrize(
    "redis_server", [True, False], ids=["aof", "no-persistence"], indirect=True
)
def test_queued_tasks_survive_a_redis_restart_only_with_persistence(
    redis_server, postgres_url, tmp_path
):
    """No render worker runs: every chunk of the job waits in the render queue when
    Redis restarts. With an append-only file they are all there afterwards; without
    persistence the queue comes back empty, and only the sweep can move the job on."""
    migrate.upgrade(postgres_url)
    env = _env(tmp_path, redis_server.url, postgres_url, "")
    env.pop("FARM_WEBHOOK_SECRET")
    workers = Workers(env, tmp_path)
    workers.start("cpu", "cpu", concurrency=2)
    client = redis_server.client()
    try:
        workers.wait_ready()
        proc = _submit(env)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        job_id = out.decode().strip()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            (job,) = _rows(
                postgres_url, "SELECT state, chunks_total FROM jobs WHERE id = :j", j=job_id
            )
            if job.state == "rendering" and client.llen("render") == job.chunks_total:
                break
            time.sleep(0.1)
        assert job.state == "rendering" and job.chunks_total > 4
        assert client.llen("render") == job.chunks_total
        redis_server.stop()
        redis_server.start()
        after = client.llen("render")
    finally:
        workers.stop()
    assert after == (job.chunks_total if redis_server.persistent else 0)
