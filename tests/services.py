"""Real services for integration tests: Redis on 127.0.0.1:6379, a moto S3 endpoint
on loopback, and farm worker processes started as an operator would start them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REDIS_URL = os.environ.get("FARM_TEST_REDIS_URL", "redis://127.0.0.1:6379")


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


def fresh_redis_db(db: int) -> str:
    import redis

    url = f"{REDIS_URL}/{db}"
    redis.Redis.from_url(url).flushdb()
    return url


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


class Workers:
    """`farm worker` processes, stopped with a warm shutdown at the end."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, queues: str, concurrency: int = 1, **extra_env: str) -> None:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            farm_argv(
                "worker", "-Q", queues, "-c", str(concurrency), "-n", name, "--loglevel", "INFO"
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
