"""Webhook delivery over real HTTP on 127.0.0.1, to a receiver that checks every
request with farm's `verify`. The finer-grained tests call the delivery function
directly (on SQLite and on Postgres); the rest run the `farm.notify` task in real
`farm worker` processes on Redis and Postgres, and one submits a whole job."""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from farm import jobs, migrate, pipeline, queries, states, webhooks
from farm.config import Settings
from farm.context import Context
from farm.db import Job
from farm.dispatch import NOTIFY_TASK, InMemoryDispatcher
from farm.errors import BrokerUnavailable, InvalidInput
from farm.stores import job_key
from tests.conftest import need_service
from tests.services import Workers, farm_argv, free_port, fresh_redis_db, moto_s3, redis_up
from tests.webhook_receiver import Receiver
from workers import stages
from workers.dispatch import CeleryDispatcher

SECRET = "whsec_" + base64.b64encode(b"farm-webhook-tests-secret-32byte").decode()
REDIS_DB = 13
BUCKET = "farm-hooks"


# --- helpers ----------------------------------------------------------------


@pytest.fixture
def ctx(db_ctx: Context) -> Iterator[Context]:
    """db_ctx's database with webhook settings: 127.0.0.1 allowlisted, short retries."""
    settings = db_ctx.settings.with_(
        webhook_secret=SECRET,
        webhook_allowlist="127.0.0.1",
        webhook_retry_schedule="0.3,0.3,0.3",
        webhook_timeout=2.0,
    )
    c = Context(settings, InMemoryDispatcher())
    yield c
    c.engine.dispose()


def sent(ctx: Context) -> list[tuple[str, int]]:
    """The (delivery id, attempt) of every webhook attempt queued on ctx's in-memory
    dispatcher so far; the queue is emptied."""
    dispatcher = ctx.dispatch
    assert isinstance(dispatcher, InMemoryDispatcher)
    got = [m.args for m in dispatcher.messages if m.task == NOTIFY_TASK]
    dispatcher.messages.clear()
    return got


def drive(ctx: Context, delivery_id: str, attempt: int = 1) -> list[webhooks.Outcome]:
    """What the farm.notify task and Celery's retry do, in this process."""
    outcomes, retries = [], 0
    while True:
        outcome = webhooks.attempt_delivery(ctx, delivery_id, attempt, retries)
        outcomes.append(outcome)
        if outcome.retry_in is None:
            return outcomes
        time.sleep(outcome.retry_in)
        attempt, retries = attempt + 1, retries + 1


def event(ctx: Context, url: str, **kw: str) -> str:
    delivery_id = webhooks.enqueue_event(ctx, "job.succeeded", {"job_id": "j1"}, url, **kw)
    assert delivery_id
    return delivery_id


def delivery(ctx: Context, delivery_id: str):
    with ctx.session() as s:
        d = queries.get_delivery(s, delivery_id)
        attempts = queries.list_attempts(s, [delivery_id])
    return d, list(attempts)


def insert_job(ctx: Context, webhook_url: str | None, script: str = "Hello.") -> str:
    import uuid

    job_id = uuid.uuid4().hex
    with ctx.session() as s:
        queries.insert_job(
            s,
            id=job_id,
            avatar="demo",
            renderer="null",
            voice="espeak",
            script=script,
            fps=25,
            width=64,
            height=64,
            chunk_frames=25,
            seed=1,
            webhook_url=webhook_url,
        )
    return job_id


# --- delivery, attempt by attempt --------------------------------------------


def test_retries_until_2xx_spaced_by_the_schedule_and_retry_after(ctx):
    script = [(500, {}), (503, {"Retry-After": "2"})]
    with Receiver(SECRET, script) as rx:
        delivery_id = event(ctx, rx.url)
        outcomes = drive(ctx, delivery_id)
        got = rx.received

    assert [o.state for o in outcomes] == ["pending", "pending", "delivered"]
    assert [r.answered for r in got] == [500, 503, 200]
    assert all(r.error is None for r in got), [r.error for r in got]  # all signatures good
    assert {r.headers["webhook-id"] for r in got} == {delivery_id}
    assert len({r.body for r in got}) == 1  # the same body every time
    gap1, gap2 = got[1].at - got[0].at, got[2].at - got[1].at
    assert 0.3 <= gap1 < 0.3 * 1.2 + 0.5  # the schedule, plus at most 20 % jitter
    assert 2.0 <= gap2 < 2.0 + 0.5  # Retry-After: 2 was longer than the schedule's 0.3

    d, attempts = delivery(ctx, delivery_id)
    assert (d.state, d.attempts, d.last_status, d.last_error) == ("delivered", 3, 200, None)
    assert d.finished_at is not None and d.next_attempt_at is None
    assert [(a.attempt, a.status_code, a.error) for a in attempts] == [
        (1, 500, "HTTP 500"),
        (2, 503, "HTTP 503"),
        (3, 200, None),
    ]
    assert attempts[0].next_attempt_at is not None and attempts[2].next_attempt_at is None
    assert all(a.finished_at >= a.started_at for a in attempts)
    # A duplicate of an old message, or of the last one, changes nothing.
    assert webhooks.attempt_delivery(ctx, delivery_id, 1).state == "skipped"
    assert webhooks.attempt_delivery(ctx, delivery_id, 4).state == "skipped"
    assert delivery(ctx, delivery_id)[0].attempts == 3


def test_gone_disables_the_endpoint(ctx):
    with Receiver(SECRET, [(410, {})]) as rx:
        first = event(ctx, rx.url)
        assert [o.state for o in drive(ctx, first)] == ["disabled"]
        sent(ctx)
        second = event(ctx, rx.url)  # a later event for the same URL
        assert sent(ctx) == []  # is recorded but never sent
        time.sleep(0.2)
        assert len(rx.received) == 1

        assert delivery(ctx, first)[0].state == "disabled"
        d2, attempts2 = delivery(ctx, second)
        assert d2.state == "disabled" and attempts2 == []
        assert "410 Gone" in d2.last_error
        with pytest.raises(InvalidInput, match="farm webhooks enable"):
            webhooks.redeliver(ctx, first)

        assert webhooks.enable_endpoint(ctx, rx.url)
        sent(ctx)
        webhooks.redeliver(ctx, first[:12])  # a prefix is enough
        assert sent(ctx) == [(first, 2)]
        assert [o.state for o in drive(ctx, first, attempt=2)] == ["delivered"]
        assert [r.headers["webhook-id"] for r in rx.received] == [first, first]


def test_a_spent_schedule_fails_the_delivery(ctx):
    with Receiver(SECRET, [(500, {})] * 10) as rx:
        delivery_id = event(ctx, rx.url)
        outcomes = drive(ctx, delivery_id)
        assert len(rx.received) == 4  # the first attempt and three retries
    assert [o.state for o in outcomes] == ["pending"] * 3 + ["failed"]
    d, attempts = delivery(ctx, delivery_id)
    assert (d.state, d.attempts, d.last_error) == ("failed", 4, "HTTP 500")


def test_a_refused_target_fails_at_delivery_without_a_request(ctx):
    strict = Context(ctx.settings.with_(webhook_allowlist=""))
    try:
        with Receiver(SECRET) as rx:
            delivery_id = event(strict, rx.url)
            outcomes = drive(strict, delivery_id)
            assert rx.received == []
        assert [o.state for o in outcomes] == ["failed"]  # permanent: no retries
        d, attempts = delivery(strict, delivery_id)
        assert "127.0.0.1, a loopback address" in d.last_error and len(attempts) == 1
    finally:
        strict.engine.dispose()


def test_the_connection_goes_to_the_address_that_was_checked(ctx, monkeypatch):
    """DNS rebinding: the name first resolves to an allowed address, then to the
    metadata service. farm resolves once per attempt and connects to what it checked."""
    real = socket.getaddrinfo
    answers = ["127.0.0.1", "169.254.169.254", "169.254.169.254"]
    asked: list[str] = []

    def rebinding(host, port, *args, **kwargs):
        if host != "hook.test":
            return real(host, port, *args, **kwargs)
        asked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers.pop(0), port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    with Receiver(SECRET) as rx:
        delivery_id = event(ctx, f"http://hook.test:{rx.port}/hook")
        assert [o.state for o in drive(ctx, delivery_id)] == ["delivered"]
        assert rx.received[0].headers["host"] == f"hook.test:{rx.port}"
        assert rx.received[0].error is None
    assert asked == ["hook.test"]  # one resolution, and the connection used its answer

    # The next attempt sees the metadata address and refuses it outright.
    other = event(ctx, "http://hook.test:9/hook")
    assert [o.state for o in drive(ctx, other)] == ["failed"]
    assert "cloud metadata" in delivery(ctx, other)[0].last_error


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https_is_pinned_too_with_the_host_name_for_sni_and_the_certificate(
    ctx, monkeypatch, tmp_path
):
    cert, key = _self_signed(tmp_path, "hook.test")
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    sni: list[str | None] = []
    server_tls.sni_callback = lambda sock, name, context: sni.append(name)
    trusting = ssl.create_default_context
    monkeypatch.setattr(ssl, "create_default_context", lambda: trusting(cafile=str(cert)))
    real = socket.getaddrinfo

    def names(host, port, *args, **kwargs):
        if host in ("hook.test", "other.test"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", names)
    with Receiver(SECRET, tls=server_tls) as rx:
        good = event(ctx, f"https://hook.test:{rx.port}/hook")
        assert [o.state for o in drive(ctx, good)] == ["delivered"]
        assert sni == ["hook.test"] and rx.received[0].error is None
        assert rx.received[0].headers["host"] == f"hook.test:{rx.port}"

        # The same address under a name the certificate does not cover: refused by TLS.
        wrong = event(ctx, f"https://other.test:{rx.port}/hook")
        outcome = webhooks.attempt_delivery(ctx, wrong, 1)
        assert outcome.state == "pending" and "CERTIFICATE_VERIFY_FAILED" in outcome.error
        assert len(rx.received) == 1


def test_each_attempt_has_a_timeout(ctx):
    slow = Context(ctx.settings.with_(webhook_timeout=0.5))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections (in the backlog) and never answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
        delivery_id = event(slow, url)
        started = time.monotonic()
        outcome = webhooks.attempt_delivery(slow, delivery_id, 1)
        assert time.monotonic() - started < 3
        assert outcome.state == "pending" and outcome.error == "timed out after 0.5 s"
    finally:
        listener.close()
        slow.engine.dispose()


def test_connection_refused_is_retried(ctx):
    url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    delivery_id = event(ctx, url)
    outcome = webhooks.attempt_delivery(ctx, delivery_id, 1)
    assert outcome.state == "pending" and "connection refused" in outcome.error
    assert outcome.retry_in is not None and outcome.retry_in >= 0.3


def test_a_broker_outage_at_dispatch_is_recorded_and_redeliver_recovers(ctx):
    class Down(InMemoryDispatcher):
        def deliver(self, delivery_id: str, attempt: int, countdown: float | None = None) -> None:
            raise BrokerUnavailable("broker unreachable")

    down = Context(ctx.settings, Down())
    delivery_id = webhooks.enqueue_event(down, "batch.completed", {"batch": "b"}, "http://x/")
    d, _ = delivery(ctx, delivery_id)
    assert d.state == "pending" and "not queued: broker unreachable" in d.last_error
    webhooks.redeliver(ctx, delivery_id)
    assert sent(ctx) == [(delivery_id, 1)]


# --- job events ---------------------------------------------------------------


def test_job_failed_is_recorded_and_sent_exactly_once(ctx):
    job_id = insert_job(ctx, "http://127.0.0.1:9/hook")
    assert jobs.fail(ctx, job_id, "tts: the voice broke")
    assert not jobs.fail(ctx, job_id, "render: a duplicate failure")  # a redelivered task

    with ctx.session() as s:
        rows = queries.list_deliveries(s, job_id=job_id)
    assert len(rows) == 1 and sent(ctx) == [(rows[0].id, 1)]
    body = json.loads(rows[0].payload)
    assert body["type"] == "job.failed" and rows[0].event_type == "job.failed"
    data = body["data"]
    assert data["job_id"] == job_id and data["status"] == "failed"
    assert data["error"] == "tts: the voice broke" and data["output_url"] is None
    assert data["duration"] >= 0

    quiet = insert_job(ctx, None)  # no webhook: nothing recorded, nothing sent
    assert jobs.fail(ctx, quiet, "boom")
    with ctx.session() as s:
        assert queries.list_deliveries(s, job_id=quiet) == []
    assert sent(ctx) == []


def test_job_succeeded_after_publish_once_with_the_output_url(ctx):
    job_id = insert_job(ctx, "http://127.0.0.1:9/hook")
    with ctx.session() as s:
        s.execute(sa.update(Job).where(Job.id == job_id).values(state=states.PUBLISHING))
    ctx.store.put_bytes(job_key(job_id, "final.mp4"), b"not really an mp4")
    assert stages.publish(ctx, job_id)
    assert not stages.publish(ctx, job_id)
    with ctx.session() as s:
        rows = queries.list_deliveries(s, job_id=job_id)
        job = queries.get_job(s, job_id)
    assert len(rows) == 1 and len(sent(ctx)) == 1
    assert "total" in job.timings  # the event did not lose publish's own writes
    data = json.loads(rows[0].payload)["data"]
    assert data["status"] == "succeeded" and data["job_id"] == job_id
    assert data["output_url"].startswith("file://") and data["output_url"].endswith("final.mp4")
    assert "error" not in data


def test_the_job_webhook_comes_from_submit_then_avatar_then_configuration(ctx):
    default = Context(
        ctx.settings.with_(webhook_url="http://127.0.0.1:3/default"), InMemoryDispatcher()
    )
    try:
        with default.session() as s:
            queries.upsert_avatar(
                s,
                name="roman",
                renderer="null",
                artifact_key="a",
                source_key="s",
                width=8,
                height=8,
            )
            queries.set_avatar_webhook(s, "roman", "http://127.0.0.1:2/avatar")

        def submit(avatar: str, webhook: str | None = None) -> str | None:
            req = jobs.JobRequest("Hi.", avatar, "espeak", 25, (64, 64), 25, webhook=webhook)
            job_id = jobs.submit(default, req)
            with default.session() as s:
                return queries.get_job(s, job_id).webhook_url

        assert submit("roman", "http://127.0.0.1:1/explicit") == "http://127.0.0.1:1/explicit"
        assert submit("roman") == "http://127.0.0.1:2/avatar"
        assert submit("demo") == "http://127.0.0.1:3/default"
        assert jobs.submit(ctx, jobs.JobRequest("Hi.", "demo", "espeak", 25, (64, 64), 25))
    finally:
        default.engine.dispose()


@pytest.mark.parametrize(
    "webhook, settings, message",
    [
        ("http://10.1.2.3/hook", {}, "private"),
        ("http://169.254.169.254/latest", {}, "cloud metadata"),
        ("ftp://127.0.0.1/hook", {}, "only http and https"),
        ("http://127.0.0.1/hook", {"webhook_secret": ""}, "FARM_WEBHOOK_SECRET is not set"),
        (None, {"webhook_url": "http://192.168.0.1/"}, "private"),
    ],
)
def test_submit_refuses_bad_webhooks_and_leaves_no_job(ctx, webhook, settings, message):
    c = Context(ctx.settings.with_(**settings), InMemoryDispatcher())
    try:
        req = jobs.JobRequest("Hi.", "demo", "espeak", 25, (64, 64), 25, webhook=webhook)
        with pytest.raises(InvalidInput, match=message):
            jobs.submit(c, req)
        with c.session() as s:
            assert queries.list_jobs(s) == []
    finally:
        c.engine.dispose()


def test_the_cli_refuses_a_metadata_webhook_in_one_line(tmp_path):
    env = {
        **os.environ,
        "FARM_HOME": str(tmp_path / "home"),
        "FARM_WEBHOOK_SECRET": SECRET,
    }
    env.pop("FARM_BROKER_URL", None)
    env.pop("FARM_DATABASE_URL", None)
    proc = subprocess.run(
        farm_argv("submit", "-", "--webhook", "http://169.254.169.254/latest/meta-data"),
        input=b"Hello there.",
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "cloud metadata" in lines[0], proc.stderr.decode()
    assert proc.stdout == b""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'home' / 'farm.db'}")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar() == 0
    engine.dispose()


# --- through real workers ----------------------------------------------------


@pytest.fixture
def farm(postgres_url, tmp_path, monkeypatch):
    """Redis, Postgres and a moto S3 endpoint, and a cpu `farm worker`, configured as
    an operator would: a secret, 127.0.0.1 allowlisted, a schedule of 1-2 s retries."""
    need_service(redis_up(), "Redis at 127.0.0.1:6379")
    with moto_s3(BUCKET) as endpoint:
        env = {
            **os.environ,
            "FARM_HOME": str(tmp_path / "home"),
            "FARM_BROKER_URL": fresh_redis_db(REDIS_DB),
            "FARM_DATABASE_URL": postgres_url,
            "FARM_STORE_URL": f"s3://{BUCKET}/artifacts",
            "FARM_S3_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "FARM_RENDERER": "null",
            "FARM_WEBHOOK_SECRET": SECRET,
            "FARM_WEBHOOK_ALLOWLIST": "127.0.0.1",
            "FARM_WEBHOOK_RETRY_SCHEDULE": "1,1,1,2,2,2",
            "FARM_WEBHOOK_TIMEOUT": "3",
        }
        migrate.upgrade(postgres_url)
        workers = Workers(env, tmp_path)
        workers.start("cpu", "cpu", concurrency=2)
        settings = Settings.from_env(env)
        c = Context(settings, CeleryDispatcher.for_settings(settings))
        try:
            workers.wait_ready()
            yield env, workers, c
        finally:
            workers.stop()
            c.engine.dispose()
            fresh_redis_db(REDIS_DB)


def wait_state(ctx: Context, delivery_id: str, want: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if delivery(ctx, delivery_id)[0].state == want:
            return
        time.sleep(0.1)
    raise AssertionError(f"delivery {delivery_id} is {delivery(ctx, delivery_id)[0].state}")


def test_a_failed_job_notifies_through_workers_with_retries(farm):
    """The worker fails the job (an empty script), FarmTask.on_failure records one
    job.failed event, and farm.notify retries it on the schedule until the receiver
    takes it. Then the CLI lists the attempts and redelivers it."""
    env, workers, ctx = farm
    script = [(500, {}), (503, {"Retry-After": "3"})]
    with Receiver(SECRET, script) as rx:
        job_id = insert_job(ctx, rx.url, script="")
        ctx.dispatch.enqueue(pipeline.PREPARE, job_id)
        got = rx.wait_for(3)
        with ctx.session() as s:
            (d,) = queries.list_deliveries(s, job_id=job_id)
        wait_state(ctx, d.id, "delivered")

        assert [r.answered for r in got] == [500, 503, 200]
        assert all(r.error is None for r in got)
        assert {r.headers["webhook-id"] for r in got} == {d.id}
        data = got[-1].payload["data"]
        assert got[-1].payload["type"] == "job.failed"
        assert data["job_id"] == job_id and data["status"] == "failed"
        assert "script is empty" in data["error"]
        gap1, gap2 = got[1].at - got[0].at, got[2].at - got[1].at
        assert 1.0 <= gap1 < 1.2 + 1.5, gap1  # schedule 1 s (+20 % jitter), plus slack
        assert 3.0 <= gap2 < 3.0 + 1.5, gap2  # Retry-After: 3 beat the schedule's 1 s

        listing = subprocess.run(
            farm_argv("webhooks", "list", job_id[:10]), env=env, capture_output=True, timeout=60
        )
        out = listing.stdout.decode()
        assert listing.returncode == 0, listing.stderr.decode()
        assert d.id in out and "delivered" in out and "job.failed" in out
        assert [ln.split()[0] for ln in out.splitlines() if ln.startswith("  #")] == [
            "#1",
            "#2",
            "#3",
        ]

        again = subprocess.run(
            farm_argv("webhooks", "redeliver", d.id), env=env, capture_output=True, timeout=60
        )
        assert again.returncode == 0, again.stderr.decode()
        fourth = rx.wait_for(4)[3]
        assert fourth.headers["webhook-id"] == d.id and fourth.error is None
        assert fourth.body == got[0].body
        wait_state(ctx, d.id, "delivered")
    d, attempts = delivery(ctx, d.id)
    assert d.attempts == 4 and [a.status_code for a in attempts] == [500, 503, 200, 200]
    with ctx.session() as s:
        assert len(queries.list_deliveries(s, job_id=job_id)) == 1
        assert queries.get_job(s, job_id).state == states.FAILED


def test_nothing_is_lost_while_the_receiver_is_down(farm):
    env, workers, ctx = farm
    rx = Receiver(SECRET)  # its port is known, nothing listens yet: connection refused
    ids = [
        webhooks.enqueue_event(ctx, "batch.completed", {"n": i}, rx.url, batch_id=f"b{i}")
        for i in range(5)
    ]
    time.sleep(3.5)  # attempts at ~0, 1, 2 and 3 s were refused
    for delivery_id in ids:
        d, attempts = delivery(ctx, delivery_id)
        finished = [a for a in attempts if a.finished_at is not None]  # one may be in flight
        assert d.state == "pending" and len(finished) >= 3
        assert all("connection refused" in a.error for a in finished)
    with rx:
        received = rx.wait_for(5, timeout=30)
        for delivery_id in ids:
            wait_state(ctx, delivery_id, "delivered")
        time.sleep(1.5)  # anything extra would show up now
        assert len(rx.received) == 5
    assert sorted(r.headers["webhook-id"] for r in received) == sorted(ids)
    assert sorted(r.payload["data"]["n"] for r in received) == [0, 1, 2, 3, 4]
    for delivery_id in ids:
        d, attempts = delivery(ctx, delivery_id)
        assert attempts[-1].status_code == 200 and d.attempts == len(attempts) >= 4


def test_end_to_end_a_submitted_job_notifies_with_a_presigned_output_url(farm):
    """A scheduling test: the `null` renderer draws flat frames. The job is submitted
    with --webhook through the CLI and its job.succeeded event arrives signed."""
    env, workers, ctx = farm
    workers.start("render", "render")
    workers.wait_ready()
    with Receiver(SECRET) as rx:
        proc = subprocess.run(
            farm_argv("submit", "-", "--voice", "espeak", "--size", "64", "--webhook", rx.url),
            input=b"A short line for the webhook test.",
            env=env,
            capture_output=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr.decode()
        job_id = proc.stdout.decode().strip()
        (hook,) = rx.wait_for(1, timeout=180)
        time.sleep(1)
        assert len(rx.received) == 1
    assert hook.error is None, hook.error
    assert hook.payload["type"] == "job.succeeded"
    data = hook.payload["data"]
    assert data["job_id"] == job_id and data["status"] == "succeeded"
    assert data["duration"] > 0 and "error" not in data
    url = data["output_url"]
    assert url.startswith(f"{env['FARM_S3_ENDPOINT_URL']}/{BUCKET}/artifacts/jobs/{job_id}/")
    assert "Signature=" in url or "X-Amz-Signature=" in url
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read(12)[4:8] == b"ftyp"  # an MP4, fetched with the presigned URL
    with ctx.session() as s:
        (d,) = queries.list_deliveries(s, job_id=job_id)
    assert d.state == "delivered" and d.attempts == 1 and d.id == hook.headers["webhook-id"]
