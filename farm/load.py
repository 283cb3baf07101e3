"""A load run: N short jobs submitted at once, then watched until every one has ended.

Jobs go in through the library path `farm submit` takes (jobs.submit: the row, then
the prepare stage queued; a job that cannot be queued is forgotten), from a few
threads at once. While they run, every ~0.5 s: the depth of the Celery queues in
Redis, the memory of each worker process, and the time `farm jobs` takes (its
queries, in this process); every few seconds the real `python -m farm jobs` too.

The jobs are a scheduling load, not a rendering one: espeak, 64x64, one chunk per
job, and the `null` renderer, which does no work.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from farm import jobs, queries, states
from farm.config import Settings
from farm.context import Context
from farm.errors import FarmError, InvalidInput

# Every queue the workers consume (workers/app.py), and kombu's Redis keys for them:
# with priorities the transport keeps one list per priority step ("cpu" for 0-2,
# "cpu\x06\x163" for 3-5, ...), so a queue's depth is the sum over its lists.
QUEUES: tuple[str, ...] = ("cpu", "render", "cpu_bulk", "render_bulk")
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS: tuple[int, ...] = (0, 3, 6, 9)
SIZE = (64, 64)
ONE_CHUNK = 10_000  # chunk frames: more than any short job has, so one chunk per job


@dataclass(frozen=True)
class CliRun:
    """One `python -m farm jobs` during the run."""

    seconds: float
    returncode: int
    error: str  # the last line of stderr when it failed


@dataclass
class LoadResult:
    jobs: int
    succeeded: int
    failed: int
    cancelled: int
    submit_seconds: float  # all N created and queued
    wall_seconds: float  # first submit to the last job ended
    jobs_per_minute: float
    peak_queue_depth: int  # messages waiting in Redis, all queues together
    peak_rss_mib: dict[str, float]  # process role -> the largest RSS one process had
    list_ms_median: float  # `farm jobs` queries, timed in this process
    list_ms_max: float
    cli_runs: list[CliRun] = field(default_factory=list)
    samples: int = 0
    job_ids: list[str] = field(default_factory=list)

    @property
    def cli_seconds_median(self) -> float:
        return statistics.median(r.seconds for r in self.cli_runs) if self.cli_runs else 0.0

    @property
    def cli_seconds_max(self) -> float:
        return max((r.seconds for r in self.cli_runs), default=0.0)

    def figures(self) -> dict[str, Any]:
        """The result without the job ids, for JSON."""
        return {
            "jobs": self.jobs,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "submit_seconds": round(self.submit_seconds, 2),
            "wall_seconds": round(self.wall_seconds, 2),
            "jobs_per_minute": round(self.jobs_per_minute, 1),
            "peak_queue_depth": self.peak_queue_depth,
            "peak_rss_mib": {k: round(v, 1) for k, v in self.peak_rss_mib.items()},
            "list_ms_median": round(self.list_ms_median, 1),
            "list_ms_max": round(self.list_ms_max, 1),
            "cli_seconds_median": round(self.cli_seconds_median, 2),
            "cli_seconds_max": round(self.cli_seconds_max, 2),
            "cli_runs": len(self.cli_runs),
            "cli_failures": sum(1 for r in self.cli_runs if r.returncode != 0),
            "samples": self.samples,
        }


def request(i: int, webhook: str | None = None) -> jobs.JobRequest:
    """The i-th job of a load run: one short sentence, tiny video, no rendering work."""
    return jobs.JobRequest(
        script=f"Load test job number {i}.",
        avatar="demo",
        voice="espeak",
        fps=25,
        size=SIZE,
        chunk_frames=ONE_CHUNK,
        seed=i,
        renderer="null",
        webhook=webhook,
    )


def run(
    ctx: Context,
    n: int,
    *,
    workers: dict[str, int] | None = None,
    webhook: str | None = None,
    threads: int = 4,
    interval: float = 0.5,
    cli_every: float = 15.0,
    timeout: float = 1800.0,
) -> LoadResult:
    """Submit `n` jobs at once and watch them to the end. `workers`: role -> pid of
    each worker's main process (its pool children and their ffmpeg are found under
    it), for the memory figures. Raises FarmError if they have not all ended within
    `timeout` seconds; failed jobs are counted, not raised."""
    if n < 1:
        raise InvalidInput(f"a load run needs at least one job, got {n}")
    depth = queue_depth_reader(ctx.settings)
    depth()  # an unusable broker: refused before any job exists
    ctx.store.check()
    memory = _MemorySampler(workers or {})
    cli = _CliRunner(ctx.settings, cli_every)
    watch = _Sampler(ctx, depth, memory, interval)

    started = time.monotonic()
    watch.start()
    cli.start()
    try:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="load-submit") as pool:
            requests = [request(i, webhook) for i in range(n)]
            job_ids = list(pool.map(lambda r: jobs.submit(ctx, r), requests))
        submit_seconds = time.monotonic() - started
        counts = _wait_until_final(ctx, job_ids, started + timeout, interval)
        wall = time.monotonic() - started
    finally:
        cli.stop()
        watch.stop()

    return LoadResult(
        jobs=n,
        succeeded=counts.get(states.SUCCEEDED, 0),
        failed=counts.get(states.FAILED, 0),
        cancelled=counts.get(states.CANCELLED, 0),
        submit_seconds=submit_seconds,
        wall_seconds=wall,
        jobs_per_minute=60 * n / wall,
        peak_queue_depth=watch.peak_depth,
        peak_rss_mib=memory.peaks(),
        list_ms_median=1000 * statistics.median(watch.list_seconds or [0.0]),
        list_ms_max=1000 * max(watch.list_seconds, default=0.0),
        cli_runs=cli.runs,
        samples=watch.samples,
        job_ids=job_ids,
    )


def _wait_until_final(
    ctx: Context, job_ids: Sequence[str], deadline: float, interval: float
) -> dict[str, int]:
    while True:
        with ctx.session() as s:
            counts = queries.job_state_counts(s, job_ids)
        if sum(counts.get(st, 0) for st in states.FINAL) == len(job_ids):
            return counts
        if time.monotonic() > deadline:
            raise FarmError(f"load run: jobs still active at the deadline: {counts}")
        time.sleep(interval)


def list_jobs(ctx: Context, limit: int = 20) -> list[tuple[Any, queries.Progress]]:
    """The queries of `farm jobs`: the newest jobs and the progress of each."""
    with ctx.session() as s:
        return [(j, queries.progress(s, j.id)) for j in queries.list_jobs(s, limit)]


# --- queue depth --------------------------------------------------------------


def queue_keys() -> list[str]:
    return [q if p == 0 else f"{q}{PRIORITY_SEP}{p}" for q in QUEUES for p in PRIORITY_STEPS]


def queue_depth_reader(settings: Settings) -> Callable[[], int]:
    """A function that returns the messages waiting in every farm queue (taken but
    unacknowledged ones are not waiting). Needs a Redis broker."""
    import redis

    url = settings.effective_broker_url
    if url.startswith("redis+socket://"):
        url = "unix://" + url.removeprefix("redis+socket://")
    elif not url.startswith(("redis://", "rediss://")):
        raise InvalidInput("a load run reads queue depths from Redis: the broker is not Redis")
    client = redis.Redis.from_url(url, socket_timeout=10)
    keys = queue_keys()

    def depth() -> int:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.llen(key)
        return sum(pipe.execute())

    return depth


# --- memory -------------------------------------------------------------------


class _MemorySampler:
    """Peak RSS per role: each worker's main process, its pool processes, the ffmpeg
    processes they run, and this process (which submits and watches)."""

    def __init__(self, workers: dict[str, int]) -> None:
        import psutil

        self.roots = {role: psutil.Process(pid) for role, pid in workers.items()}
        self.me = psutil.Process()
        self.peak: dict[str, float] = {}

    def _note(self, role: str, rss: int) -> None:
        self.peak[role] = max(self.peak.get(role, 0.0), rss / 2**20)

    def sample(self) -> None:
        import psutil

        self._note("load runner", self.me.memory_info().rss)
        for role, root in self.roots.items():
            try:
                self._note(f"{role} main", root.memory_info().rss)
                children = root.children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for child in children:
                try:
                    kind = "ffmpeg" if "ffmpeg" in child.name() else f"{role} pool"
                    self._note(kind, child.memory_info().rss)
                except psutil.NoSuchProcess:  # an ffmpeg that just ended
                    pass

    def peaks(self) -> dict[str, float]:
        return dict(sorted(self.peak.items()))


# --- watchers -----------------------------------------------------------------


class _Sampler(threading.Thread):
    """Every `interval`: queue depth, memory, and the time of the `farm jobs` queries."""

    def __init__(
        self, ctx: Context, depth: Callable[[], int], memory: _MemorySampler, interval: float
    ) -> None:
        super().__init__(name="load-sampler", daemon=True)
        self.ctx, self.depth, self.memory, self.interval = ctx, depth, memory, interval
        self.done = threading.Event()
        self.peak_depth = 0
        self.list_seconds: list[float] = []
        self.samples = 0

    def run(self) -> None:
        while not self.done.is_set():
            tick = time.monotonic()
            self.peak_depth = max(self.peak_depth, self.depth())
            self.memory.sample()
            listed = time.perf_counter()
            list_jobs(self.ctx)
            self.list_seconds.append(time.perf_counter() - listed)
            self.samples += 1
            self.done.wait(max(0.0, self.interval - (time.monotonic() - tick)))

    def stop(self) -> None:
        self.done.set()
        self.join()


class _CliRunner(threading.Thread):
    """The real `python -m farm jobs`, at once and then every `every` seconds."""

    def __init__(self, settings: Settings, every: float) -> None:
        super().__init__(name="load-cli", daemon=True)
        self.env = {**os.environ, **settings.as_env()}
        self.every = every
        self.done = threading.Event()
        self.runs: list[CliRun] = []

    def run(self) -> None:
        while not self.done.is_set():
            started = time.monotonic()
            try:
                proc = subprocess.run(
                    [sys.executable, "-m", "farm", "jobs"],
                    env=self.env,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                code, err = proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1]
            except subprocess.TimeoutExpired:
                code, err = -1, "timed out after 300 s"
            self.runs.append(CliRun(time.monotonic() - started, code, err))
            self.done.wait(self.every)

    def stop(self) -> None:
        self.done.set()
        self.join()
