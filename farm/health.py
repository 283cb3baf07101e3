"""Workers that take themselves out of rotation (Flamenco's blocklist, Deadline's bad
worker): the rules, without Celery. workers/health.py applies them in the worker.

- A render attempt that fails for a reason that is not the input's (a renderer crash, a
  CUDA error, an encoder that dies, a child process that is killed) counts against its
  worker; `FARM_WORKER_MAX_FAILURES` of them in a row and the worker stops consuming the
  render queues, stays up and says why. A rendered chunk resets the count. An input
  error (InvalidInput, NotFound, any other PermanentError not named below), a cancel or
  an outage of a shared service (the database, the store, the broker) counts neither way.
- A chunk that fails on one worker while another worker taking render work has not
  failed it is requeued without spending its retries (FARM_TASK_MAX_RETRIES): at most
  FARM_WORKER_MAX_FAILURES such requeues per render worker answering, so a farm whose
  every worker is bad does not pass a chunk around forever.
- Only a chunk's first failure counts: a chunk that failed before (retried, or requeued
  from another worker) is suspect itself, so a chunk that crashes every renderer cannot
  take the farm's workers, or the embedded default's one render worker, out of rotation
  by itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from farm.errors import (
    BrokerUnavailable,
    Cancelled,
    FarmError,
    InvalidInput,
    MissingDependency,
    NotFound,
    PermanentError,
    RetryableError,
)

# A worker's own: a backend it lacks, an encoder it cannot use. (EncoderDied is a
# RetryableError and EncoderError a PermanentError: both are named by class name, as
# farm.encoders imports ffmpeg and this module is imported by the CLI.)
WORKER_ERRORS: tuple[type[Exception], ...] = (MissingDependency,)
WORKER_ERROR_NAMES = frozenset({"EncoderDied", "EncoderError"})
# Not the worker's fault and not the input's: a shared service that is down, or a
# worker being shut down (warm shutdown signals arrive as these in the child).
_NEUTRAL_NAMES = frozenset(
    {
        "OperationalError",  # sqlalchemy's and kombu's: the database, the broker
        "InterfaceError",
        "Terminated",
        "Reject",
        "Ignore",
    }
)


def worker_fault(exc: BaseException | None) -> bool:
    """Whether a failed render attempt counts against the worker that made it. The one
    place that decides; anything not named is the worker's (a RuntimeError from the
    renderer, a CUDA error, a killed child: WorkerLostError, a time limit)."""
    if exc is None:
        return False
    name = type(exc).__name__
    if name in WORKER_ERROR_NAMES or isinstance(exc, WORKER_ERRORS):
        return True
    if isinstance(exc, PermanentError):
        # the input's: InvalidInput, NotFound, an avatar artifact that does not load
        return False
    if isinstance(exc, Cancelled | RetryableError | BrokerUnavailable):
        return False  # a cancel; an outage of the store, a webhook target, the broker
    if isinstance(exc, FarmError) or isinstance(exc, SystemExit | KeyboardInterrupt):
        return False
    return name not in _NEUTRAL_NAMES


def counts_against(exc: BaseException | None, retries: int, failed_on: Iterable[str]) -> bool:
    """A worker fault counts against the worker on the chunk's first failure only: not
    on a retry (`retries`) nor after a requeue (`failed_on`: the workers that failed it)."""
    return worker_fault(exc) and not retries and not list(failed_on)


@dataclass(frozen=True)
class WorkerReport:
    """What one worker answers to `farm workers`."""

    name: str
    queues: tuple[str, ...]
    taking: bool  # consuming the render queues (a worker without them: True)
    failures: int  # consecutive render failures counted against it
    max_failures: int
    last_error: str
    reason: str  # why it left rotation; '' while taking work
    left_at: float  # when (Unix time); 0 while taking work
    gpu: str
    render_path: str
    encoder: str

    @classmethod
    def from_reply(cls, name: str, reply: object) -> WorkerReport:
        """A worker's reply; one that does not know the command (an older farm) shows
        as such rather than failing the listing."""
        if not isinstance(reply, dict) or "taking" not in reply:
            unknown = "?"
            why = reply.get("error", "") if isinstance(reply, dict) else ""
            return cls(name, (), True, 0, 0, str(why), "", 0.0, unknown, unknown, unknown)
        return cls(
            name=name,
            queues=tuple(reply.get("queues") or ()),
            taking=bool(reply["taking"]),
            failures=int(reply.get("failures") or 0),
            max_failures=int(reply.get("max_failures") or 0),
            last_error=str(reply.get("last_error") or ""),
            reason=str(reply.get("reason") or ""),
            left_at=float(reply.get("left_at") or 0.0),
            gpu=str(reply.get("gpu") or "none"),
            render_path=str(reply.get("render_path") or ""),
            encoder=str(reply.get("encoder") or ""),
        )

    def takes(self, queue: str) -> bool:
        return self.taking and queue in self.queues


def reports(replies: Iterable[dict[str, object]]) -> list[WorkerReport]:
    """Celery's broadcast replies ([{hostname: reply}, ...]), one report per worker, by
    name."""
    found = {name: WorkerReport.from_reply(name, r) for one in replies for name, r in one.items()}
    return [found[name] for name in sorted(found)]


def may_requeue(
    worker: str,
    failed_on: Sequence[str],
    requeued: int,
    queue: str,
    workers: Sequence[WorkerReport],
    max_failures: int,
) -> bool:
    """Whether a chunk that `worker` just failed goes back to the queue without
    spending a retry: another worker taking `queue` has not failed it yet, and the
    chunk has not been passed around more than max_failures times per render worker."""
    if max_failures <= 0:
        return False
    tried = {*failed_on, worker}
    takers = [w for w in workers if w.takes(queue)]
    bound = max_failures * len([w for w in workers if queue in w.queues])
    return any(w.name not in tried for w in takers) and requeued < bound


def resolve(name: str, names: Sequence[str]) -> str:
    """A worker named in full (render1@host) or by the part before '@' when that is
    unique. NotFound names the workers that answered."""
    if name in names:
        return name
    short = [n for n in names if n.split("@")[0] == name]
    if len(short) == 1:
        return short[0]
    answering = ", ".join(names) or "none"
    if len(short) > 1:
        raise InvalidInput(f"worker {name!r} is ambiguous: {', '.join(short)}")
    raise NotFound(f"no worker named {name!r} answered (answering: {answering})")


def one_line(text: str, limit: int = 300) -> str:
    """An error as one line of at most `limit` characters (tracebacks and CUDA's
    multi-line messages included)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def describe_error(exc: BaseException) -> str:
    return one_line(f"{type(exc).__name__}: {exc}")


RENDER_QUEUES = ("render", "render_bulk")  # workers/app.py
COLUMNS = ("WORKER", "RENDER WORK", "FAILS", "QUEUES", "GPU", "RENDER PATH", "ENCODER")


def _render_work(report: WorkerReport) -> str:
    if not report.taking:
        return "NO (out of rotation)"
    return "yes" if any(q in RENDER_QUEUES for q in report.queues) else "- (no render queue)"


def table(rows: Sequence[WorkerReport]) -> list[str]:
    """`farm workers`: one line per worker, then its last error (and why it is out of
    rotation) indented beneath it."""
    cells = [
        (
            r.name,
            _render_work(r),
            f"{r.failures}/{r.max_failures}" if r.max_failures else str(r.failures),
            ",".join(r.queues) or "-",
            r.gpu,
            r.render_path or "-",
            r.encoder.split(" (")[0] or "-",
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [COLUMNS, *cells]) for i in range(len(COLUMNS))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths, strict=True)).rstrip()]
    for report, row in zip(rows, cells, strict=True):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if report.reason:
            since = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(report.left_at))
            lines.append(f"    out of rotation{since if report.left_at else ''}: {report.reason}")
        if report.last_error:
            lines.append(f"    last error: {report.last_error}")
    return lines
