"""Real services for integration tests: Redis on 127.0.0.1:6379, RabbitMQ on
127.0.0.1:5672 (guest/guest), a moto S3 endpoint on loopback, and farm worker
processes started as an operator would start them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REDIS_URL = os.environ.get("FARM_TEST_REDIS_URL", "redis://127.0.0.1:6379")
AMQP_URL = os.environ.get("FARM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_up() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping())
    except Exception:
        return False


def rabbitmq_up() -> bool:
    import kombu

    try:
        with kombu.Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.connect()
        return True
    except Exception:
        return False


class Broker:
    """Queues of one test on the real RabbitMQ, and a connection to publish and read."""

    def __init__(self, prefix: str = "intake") -> None:
        import kombu

        from farm import intake

        self.tag = uuid.uuid4().hex[:10]
        self.queue = f"farm-test-{prefix}-{self.tag}"
        self.conn = kombu.Connection(AMQP_URL, transport_options={"confirm_publish": True})
        self.conn.connect()
        self.channel = self.conn.channel()
        self.names = {self.queue, intake.dead_letter_name(self.queue)}
        self.declare(self.queue)

    def name(self, suffix: str) -> str:
        return f"{self.queue}.{suffix}"

    def declare(self, name: str) -> str:
        self.names.add(name)
        self.channel.queue_declare(queue=name, durable=True, auto_delete=False)
        return name

    def publish(self, body: bytes, queue: str | None = None, **props: object) -> None:
        import kombu

        kombu.Producer(self.channel).publish(
            body,
            exchange="",
            routing_key=queue or self.queue,
            content_type="application/json",
            content_encoding="binary",
            delivery_mode=2,
            **props,
        )

    def counts(self, name: str) -> tuple[int, int]:
        """(ready messages, consumers) of a queue."""
        _, ready, consumers = self.channel.queue_declare(queue=name, passive=True)
        return ready, consumers

    def take(self, name: str, n: int, timeout: float = 30) -> list:
        """n messages of a queue, acknowledged; fails after `timeout` seconds."""
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            message = self.channel.basic_get(queue=name, no_ack=True)
            if message is not None:
                got.append(message)
            elif time.monotonic() > deadline:
                raise AssertionError(f"{len(got)} of {n} messages arrived on {name}")
            else:
                time.sleep(0.1)
        return got

    def close(self) -> None:
        for name in self.names:
            try:
                self.channel.queue_delete(queue=name)
            except Exception:
                self.channel = self.conn.channel()
        self.conn.close()


def fresh_redis_db(db: int) -> str:
    import redis

    url = f"{REDIS_URL}/{db}"
    redis.Redis.from_url(url).flushdb()
    return url


def aws_test_env(key_id: str = "testing", secret: str = "testing") -> dict[str, str]:
    """Credentials for moto, and nothing from a developer's ~/.aws or proxies leaking in."""
    return {
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        # A corporate proxy must not swallow loopback traffic (urllib and botocore both
        # honour these).
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


@contextmanager
def moto_s3(bucket: str) -> Iterator[str]:
    """A real HTTP S3 endpoint on loopback with `bucket` created; yields its URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        ).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()


def farm_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "farm", *args]


def run_farm(
    *args: str,
    env: dict[str, str],
    stdin: bytes | str | None = None,
    timeout: float = 600,
    text: bool = False,
) -> subprocess.CompletedProcess:
    """`python -m farm ARGS` as a user runs it, in this environment."""
    return subprocess.run(
        farm_argv(*args), input=stdin, env=env, capture_output=True, text=text, timeout=timeout
    )


def scheduling_env(tmp_path: Path, broker_url: str, database_url: str, **extra: str) -> dict:
    """Environment of farm processes for a test about scheduling, not rendering: the
    null renderer, real services, the local store under tmp_path (unless `extra`
    names another)."""
    env = {
        **os.environ,
        "FARM_HOME": str(tmp_path / "home"),
        "FARM_BROKER_URL": broker_url,
        "FARM_DATABASE_URL": database_url,
        "FARM_RENDERER": "null",
    }
    env.pop("FARM_STORE_URL", None)
    return {**env, **extra}


def submit_script(env: dict[str, str], script: bytes, *args: str) -> subprocess.Popen:
    """`farm submit -` with `script` on stdin and espeak at 64 px (fast, and the same
    speech on every run), stdout and stderr piped: call communicate() on it."""
    proc = subprocess.Popen(
        farm_argv("submit", "-", "--voice", "espeak", "--size", "64", *args),
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    proc.stdin.write(script)
    proc.stdin.close()
    proc.stdin = None  # communicate() must not flush it again
    return proc


class Workers:
    """`farm worker` processes, stopped with a warm shutdown at the end."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(
        self,
        name: str,
        queues: str,
        concurrency: int = 1,
        loglevel: str = "INFO",
        **extra_env: str,
    ) -> None:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            farm_argv(
                "worker", "-Q", queues, "-c", str(concurrency), "-n", name, "--loglevel", loglevel
            ),
            env={**self.env, **extra_env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 90) -> None:
        from farm.config import Settings
        from workers.app import make_app

        app = make_app(Settings.from_env(self.env))
        deadline = time.monotonic() + timeout
        want = {n for n in self.procs}
        seen: set[str] = set()
        while time.monotonic() < deadline:
            replies = app.control.ping(timeout=1.0) or []
            seen = {name.split("@")[0] for r in replies for name in r}
            if want <= seen:
                return
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            assert not dead, f"workers exited: {dead}; see {self.logs}"
        raise AssertionError(f"workers not ready: {sorted(want - seen)}; see {self.logs}")

    def stop_one(self, name: str) -> None:
        """A warm shutdown of one worker, which is then forgotten."""
        os.killpg(self.procs[name].pid, signal.SIGTERM)
        self.procs.pop(name).wait(timeout=60)

    def kill(self, name: str) -> None:
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(timeout=30)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def running_chunk(url: str, timeout: float = 120) -> tuple[str, int, str]:
    """The first chunk in state 'running' in the database at `url`: (job, idx, worker)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                row = conn.execute(
                    sa.text(
                        "SELECT job_id, idx, worker FROM chunks WHERE state = 'running' "
                        "ORDER BY started_at LIMIT 1"
                    )
                ).first()
            if row:
                return row[0], row[1], row[2]
            time.sleep(0.05)
    finally:
        engine.dispose()
    raise AssertionError("no chunk started rendering")
