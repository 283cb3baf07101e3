"""Secrets stay secret: a job runs on real services configured with a Postgres password,
a Redis password, S3 credentials (moto on loopback) and a webhook signing secret, with
worker logs at DEBUG and INFO captured to files. Then every place a secret could show
is searched for every secret: the worker logs, `farm config`, `farm status`, `farm
jobs`, `farm webhooks list`, the errors of a forced S3 outage (in a worker and at the
CLI) and of an unreachable database (in a worker and at the CLI), the task events
Flower shows (args, kwargs, results, exceptions), the worker config and stats Flower
reads with `inspect`, and every row of the database.

A scheduling test: the `null` renderer draws flat frames. The AWS access key id is not
a secret (it is in every presigned URL, by design); the secret key is. A session token
is a secret too, but a presigned URL made with one carries it (that is how the URL
grants access), so it is looked for everywhere except where output URLs are shown."""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from farm import migrate
from farm.config import Settings
from farm.context import Context
from tests.conftest import need_service
from tests.services import (
    REDIS_URL,
    Workers,
    farm_argv,
    free_port,
    fresh_redis_db,
    moto_s3,
    redis_up,
)
from tests.webhook_receiver import Receiver

REDIS_DB = 7
BUCKET = "secrets"
WEBHOOK_KEY = "c2lnbmluZy1rZXktdGhhdC1tdXN0LXN0YXktc2VjcmV0IQ=="  # 33 bytes
SCRIPT = b"Nothing secret is ever spoken here."
ID = re.compile(r"(msg_)?[0-9a-f]{32}")  # a job, batch or webhook delivery id


class Events:
    """Every Celery event on the broker, as Flower receives them."""

    def __init__(self, app: Any) -> None:
        self.app, self.seen = app, []
        self.receiver: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"*": self.seen.append})
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def __enter__(self) -> Events:
        self.thread.start()
        deadline = time.monotonic() + 30
        while self.receiver is None and time.monotonic() < deadline:
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(timeout=10)


def with_password(url: str, password: str) -> tuple[str, str]:
    """`url` with a password, and that password (its own, if it has one already:
    then it is real, and a made-up one would be refused)."""
    parsed = make_url(url)
    if parsed.password:
        return url, str(parsed.password)
    if not parsed.username:
        parsed = parsed.set(username="default")  # Redis's user: accepts any password
    parsed = parsed.set(password=password)
    return parsed.render_as_string(hide_password=False), password


def farm(env: dict[str, str], *args: str, stdin: bytes = b"", timeout: float = 120):
    return subprocess.run(
        farm_argv(*args), input=stdin, env=env, capture_output=True, timeout=timeout
    )


def wait_for(predicate: Any, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def job_state(ctx: Context, job_id: str) -> tuple[str, str | None]:
    with ctx.engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT state, error FROM jobs WHERE id = :id"), {"id": job_id}
        ).one()
    return row[0], row[1]


def database_text(ctx: Context) -> str:
    """Every row of every table, as text."""
    parts = []
    with ctx.engine.connect() as conn:
        for table in sa.inspect(conn).get_table_names():
            for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')):
                parts.append(f"{table}: {tuple(row)!r}")
    return "\n".join(parts)


@pytest.fixture
def secret_env(postgres_url: str, tmp_path: Path):
    need_service(redis_up(), "Redis at 127.0.0.1:6379")
    fresh_redis_db(REDIS_DB)
    tag = secrets.token_hex(6)
    db_url, db_password = with_password(postgres_url, f"pg-Pa55-{tag}")
    broker, broker_password = with_password(f"{REDIS_URL}/{REDIS_DB}", f"redis-Pa55-{tag}")
    values = {
        "db": db_password,
        "broker": broker_password,
        "aws": f"aws/Secret+Key-{tag}",
        "webhook": f"whsec_{WEBHOOK_KEY}",
        "webhook key": WEBHOOK_KEY,
        "aws session token": f"aws-session-token-{tag}",
    }
    with moto_s3(BUCKET) as endpoint:
        env = {
            **os.environ,
            "FARM_HOME": str(tmp_path / "home"),
            "FARM_DATABASE_URL": db_url,
            "FARM_BROKER_URL": broker,
            "FARM_STORE_URL": f"s3://{BUCKET}/artifacts",
            "FARM_S3_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "AKIAFARMTESTKEYID",
            "AWS_SECRET_ACCESS_KEY": values["aws"],
            "AWS_SESSION_TOKEN": values["aws session token"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "FARM_RENDERER": "null",
            "FARM_WEBHOOK_SECRET": values["webhook"],
            "FARM_WEBHOOK_ALLOWLIST": "127.0.0.1",
            "FARM_TASK_MAX_RETRIES": "1",
        }
        for name in ("AWS_PROFILE", "FARM_WEBHOOK_URL"):
            env.pop(name, None)
        migrate.upgrade(db_url)
        logs = tmp_path / "logs"
        logs.mkdir()
        workers = Workers(env, logs)
        ctx = Context(Settings.from_env(env))
        try:
            yield env, values, workers, ctx, logs
        finally:
            workers.stop()
            ctx.engine.dispose()
            fresh_redis_db(REDIS_DB)


def test_no_secret_in_logs_outputs_errors_events_or_rows(secret_env, tmp_path):
    env, values, workers, ctx, logs = secret_env
    from workers.app import make_app

    app = make_app(ctx.settings)
    shown: dict[str, str] = {}  # where -> what could be seen there

    def run(where: str, *args: str, ok: bool = True, **extra: str) -> str:
        proc = farm({**env, **extra}, *args, stdin=SCRIPT)
        out = proc.stdout.decode() + proc.stderr.decode()
        shown[where] = out
        assert (proc.returncode == 0) == ok, out
        return out

    workers.start("cpu", "cpu", concurrency=2, loglevel="DEBUG")
    workers.start("render", "render", loglevel="INFO")
    workers.wait_ready()
    with Events(app) as events, Receiver(values["webhook"]) as rx:
        # 1. A job that succeeds and notifies its signed webhook.
        job_id = run("submit", "submit", "-", "--voice", "espeak", "--size", "64",
                     "--webhook", rx.url, "--wait").split()[0]  # fmt: skip
        (hook,) = rx.wait_for(1, timeout=120)
        assert hook.error is None and hook.payload["type"] == "job.succeeded"
        shown["inspect conf"] = json.dumps(app.control.inspect(timeout=5).conf())
        shown["inspect stats"] = json.dumps(app.control.inspect(timeout=5).stats())
        assert "cpu@" in shown["inspect conf"]

        # 2. S3 fails in a worker: the job fails with the outage as its reason.
        workers.stop_one("cpu")
        dead = f"http://127.0.0.1:{free_port()}"
        workers.start(
            "cpu-s3-down",
            "cpu",
            loglevel="DEBUG",
            FARM_S3_ENDPOINT_URL=dead,
            FARM_OUTAGE_RETRIES="1",  # fail the job after one retry, not ~10 minutes
            FARM_OUTAGE_MAX_DELAY="1",
        )
        workers.wait_ready()
        failing = run("submit s3 down", "submit", "-", "--voice", "espeak", "--size", "64")
        failing = failing.split()[0]
        wait_for(lambda: job_state(ctx, failing)[0] == "failed", "the S3 outage to fail the job")
        assert "S3" in (job_state(ctx, failing)[1] or "")

        # 3. The database is unreachable from a worker.
        workers.stop_one("cpu-s3-down")
        db_down = make_url(env["FARM_DATABASE_URL"]).set(port=free_port())
        db_down_url = db_down.render_as_string(hide_password=False)
        workers.start("cpu-db-down", "cpu", loglevel="DEBUG", FARM_DATABASE_URL=db_down_url)
        workers.wait_ready()
        app.send_task("farm.prepare", args=("0" * 32,), task_id="0" * 32 + "-prepare")
        wait_for(
            lambda: b"OperationalError" in (logs / "cpu-db-down.log").read_bytes(),
            "the database outage in the worker log",
        )
        time.sleep(2)  # its events
    shown["events"] = "\n".join(json.dumps(e, default=str) for e in events.seen)

    # 4. The CLI, working and failing.
    run("config", "config")
    run("status", "status", job_id)
    run("status of the failed job", "status", failing)
    run("jobs", "jobs")
    run("webhooks list", "webhooks", "list", job_id)
    run("missing bucket", "submit", "-", ok=False, FARM_STORE_URL="s3://no-such-bucket/x")
    run("S3 down", "submit", "-", ok=False, FARM_S3_ENDPOINT_URL=dead)
    run("database down", "status", job_id, ok=False, FARM_DATABASE_URL=db_down_url)
    no_db = make_url(env["FARM_DATABASE_URL"]).set(database="no_such_database")
    run("no database", "jobs", ok=False, FARM_DATABASE_URL=no_db.render_as_string(False))
    for where in ("missing bucket", "S3 down", "database down", "no database"):
        lines = shown[where].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("farm: error:"), shown[where]
    assert "does not exist" in shown["missing bucket"]
    assert "database is unavailable" in shown["database down"]
    assert "***" in shown["config"]

    for path in sorted(logs.glob("*.log")):
        shown[f"log {path.name}"] = path.read_text(errors="replace")
    assert "DEBUG" in shown["log cpu.log"] and "OperationalError" in shown["log cpu-db-down.log"]
    shown["database"] = database_text(ctx)
    (tmp_path / "shown.json").write_text(json.dumps(shown, indent=1))  # to read on failure

    # Nothing anywhere holds a secret.
    with_output_urls = {"submit", "status", "database"}
    leaks = [
        f"{secret_name} in {where}"
        for where, text in shown.items()
        for secret_name, secret in values.items()
        if secret in text and not (secret_name == "aws session token" and where in with_output_urls)
    ]
    assert leaks == [], leaks

    # Flower shows task args and kwargs: only ids and indices, never settings.
    tasks = [e for e in events.seen if e["type"] in ("task-sent", "task-received")]
    assert len(tasks) >= 8, "too few task events"
    for event in tasks:
        args = ast.literal_eval(event["args"])
        assert all(isinstance(a, int) or ID.fullmatch(a) for a in args), event
        assert ast.literal_eval(event["kwargs"]) == {}, event
