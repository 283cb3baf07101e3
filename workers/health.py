"""A render worker that takes itself out of rotation, in Celery (the rules: farm/health.py).

Where each part runs, and why:
- The count of consecutive failures, the last error and whether the worker takes render
  work live in shared memory made in the worker's main process before the pool forks
  (`worker_init`), so every pool process of one worker counts into the same numbers.
- Failures are counted in the main process, by the render task's Request (`on_failure`
  runs there for failures, retries and a pool process that died: WorkerLostError, the
  way a CUDA crash usually ends). The main process owns the consumer, so it cancels the
  render queues itself, at once.
- A rendered chunk resets the count in the pool process (`succeeded`).
- A pool process hands back (Reject, requeue) a render message it took while the worker
  is out of rotation: messages prefetched or held for their countdown before it left.
- Remote control: `farm_health` (what `farm workers` shows) and `farm_resume` (`farm
  workers resume NAME`: the render queues again, the count reset).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject, Retry
from celery.signals import worker_init, worker_ready
from celery.worker.control import control_command, inspect_command
from celery.worker.request import Request

from farm import health
from farm.errors import BrokerUnavailable, NotFound, RetryableError
from workers.app import RENDER_QUEUE, settings

log = logging.getLogger("farm.worker")

RENDER_QUEUES = health.RENDER_QUEUES
HEALTH_COMMAND = "farm_health"
RESUME_COMMAND = "farm_resume"
TEXT = 400  # bytes kept of the last error, the reason and the render path
# How long a pool process asks the other workers whether one can take a failed chunk.
ASK_TIMEOUT = 1.0


class Shared:
    """The worker's health, in memory shared by its main process and its pool."""

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures
        self.lock = multiprocessing.Lock()
        self.failures = multiprocessing.RawValue(ctypes.c_int, 0)
        self.taking = multiprocessing.RawValue(ctypes.c_bool, True)
        self.left_at = multiprocessing.RawValue(ctypes.c_double, 0.0)
        self.last_error = multiprocessing.RawArray(ctypes.c_char, TEXT)
        self.reason = multiprocessing.RawArray(ctypes.c_char, TEXT)
        self.render_path = multiprocessing.RawArray(ctypes.c_char, TEXT)

    @staticmethod
    def _put(array: Any, text: str) -> None:
        data = text.encode("utf-8", "replace")[: TEXT - 1]
        array.value = data.decode("utf-8", "ignore").encode()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # A pool process killed while holding the lock must not hang the main process
        # (which counts that very failure): after a second, go on without it.
        held = self.lock.acquire(timeout=1.0)
        try:
            yield
        finally:
            if held:
                self.lock.release()

    def failed(self, error: str) -> bool:
        """Count one failure; True when it takes the worker out of rotation."""
        with self._locked():
            self.failures.value += 1
            self._put(self.last_error, error)
            if not self.taking.value or not 0 < self.max_failures <= self.failures.value:
                return False
            self.taking.value = False
            self.left_at.value = time.time()
            self._put(
                self.reason,
                f"{self.failures.value} render failures in a row, the last: {error}",
            )
            return True

    def succeeded(self) -> None:
        with self._locked():
            self.failures.value = 0

    def resume(self) -> None:
        with self._locked():
            self.failures.value = 0
            self.taking.value = True
            self.left_at.value = 0.0
            self._put(self.reason, "")

    def saw_renderer(self, path: str) -> None:
        if self.render_path.value.decode() != path[: TEXT - 1]:
            with self._locked():
                self._put(self.render_path, path)


# Made in the main process before the pool forks; None outside a worker (the CLI, tests
# that call stages in process).
_shared: Shared | None = None
# The main process's consumer (worker_ready), the worker's static facts and the render
# queues it stopped consuming.
_consumer: Any = None
_facts: dict[str, str] = {}
_order: list[str] = []  # the queues it consumed at start, in the order it drains them
_left_queues: list[str] = []


@worker_init.connect
def _share(sender: Any, **_: Any) -> None:
    global _shared
    _shared = Shared(settings.worker_max_failures)


@worker_ready.connect
def _remember(sender: Any, **_: Any) -> None:
    global _consumer
    _consumer = sender
    _order[:] = _consuming(sender)
    _facts.update(gpu=gpu_description(), encoder=_encoder())


def gpu_description() -> str:
    """The GPUs this worker is pinned to (CUDA_VISIBLE_DEVICES, else what nvidia-smi
    lists), with their names as `farm doctor` shows them. Never imports torch."""
    from farm import doctor, gpus

    visible = gpus.visible_gpus()
    if not visible:
        return "none"
    result = doctor.check_nvidia_smi(settings)[0]
    names = result.detail.split("; ") if result.ok else []
    shown = [names[int(g)] if g.isdigit() and int(g) < len(names) else "" for g in visible]
    return "; ".join(
        f"GPU {g}: {n}" if n else f"GPU {g}" for g, n in zip(visible, shown, strict=True)
    )


def _encoder() -> str:
    from farm import encoders

    try:
        return encoders.choose(settings.video_encoder).reason
    except encoders.EncoderError as exc:
        return f"none: {exc}"


# --- the main process ---------------------------------------------------------------


class RenderRequest(Request):
    """The render task's request in the worker's main process: counts failures."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False):
        try:
            retries = int((self.request_dict or {}).get("retries") or 0)
            _count(exc_info.exception, self.hostname or "?", retries, self.kwargs or {})
        except Exception:  # the count must never lose the message
            log.exception("could not count a render failure")
        return super().on_failure(exc_info, send_failed_event, return_ok)


def _count(exc: BaseException, worker: str, retries: int, kwargs: dict[str, Any]) -> None:
    exc = getattr(exc, "exc", exc)  # ExceptionWithTraceback
    if isinstance(exc, Retry):
        exc = exc.exc
    if _shared is None or exc is None:
        return
    if not health.counts_against(exc, retries, kwargs.get("failed_on") or ()):
        return
    error = health.describe_error(exc)
    if _shared.failed(error):
        leave_rotation(worker)
    else:
        log.warning(
            "render failure %d of %d in a row on %s: %s",
            _shared.failures.value,
            _shared.max_failures,
            worker,
            error,
        )


def leave_rotation(worker: str) -> None:
    """Stop consuming the render queues (the main process's own consumer); the worker
    stays up, answers `farm workers` and keeps its other queues."""
    consumer = _consumer
    queues = _consuming(consumer)
    _left_queues[:] = [q for q in queues if q in RENDER_QUEUES]
    consumer.call_soon(_cancel, consumer, list(_left_queues))
    reason = _shared.reason.value.decode() if _shared else ""
    log.error(
        "%s leaves rotation: %s; it no longer takes render work (%s); "
        "`farm workers resume %s` puts it back",
        worker,
        reason,
        ", ".join(_left_queues) or "no render queue",
        worker,
    )


def _cancel(consumer: Any, queues: list[str]) -> None:
    for queue in queues:
        consumer.cancel_task_queue(queue)


def _restore(consumer: Any, queues: list[str]) -> None:
    """Consume `queues` again in their place: a worker drains its queues in the order
    it consumes them (the bulk lane after the interactive one, workers/app.py), and a
    queue added back would otherwise come last. So the queues from the first one left
    onwards are taken off and added back in the worker's original order."""
    order = _order or queues
    first = min((order.index(q) for q in queues if q in order), default=len(order))
    current = _consuming(consumer)
    tail = [q for q in order[first:] if q in queues or q in current]
    tail += [q for q in queues if q not in tail]
    _cancel(consumer, [q for q in tail if q in current])
    for queue in tail:
        consumer.add_task_queue(queue)


def _consuming(consumer: Any) -> list[str]:
    if consumer is None or not consumer.task_consumer:
        return []
    return [q.name for q in consumer.task_consumer.queues]


@inspect_command(name=HEALTH_COMMAND)
def _health(state: Any, **_: Any) -> dict[str, Any]:
    shared = _shared
    consumer = getattr(state, "consumer", None) or _consumer
    return {
        "queues": _consuming(consumer),
        "taking": bool(shared.taking.value) if shared else True,
        "failures": shared.failures.value if shared else 0,
        "max_failures": shared.max_failures if shared else 0,
        "last_error": shared.last_error.value.decode() if shared else "",
        "reason": shared.reason.value.decode() if shared else "",
        "left_at": shared.left_at.value if shared else 0.0,
        "render_path": (shared.render_path.value.decode() if shared else "")
        or f"{settings.renderer}, not loaded yet (FARM_DEVICE={settings.device})",
        "gpu": _facts.get("gpu") or gpu_description(),
        "encoder": _facts.get("encoder") or _encoder(),
        "pid": os.getpid(),
    }


@control_command(name=RESUME_COMMAND)
def _resume(state: Any, **_: Any) -> dict[str, Any]:
    consumer = getattr(state, "consumer", None) or _consumer
    queues = list(_left_queues)
    if _shared is not None:
        _shared.resume()
    if queues:
        consumer.call_soon(_restore, consumer, queues)
    _left_queues.clear()
    log.warning("back in rotation: render work again (%s)", ", ".join(queues) or "unchanged")
    return {"resumed": queues}


# --- a pool process -----------------------------------------------------------------


def hand_back_if_out() -> None:
    """A render message taken while the worker is out of rotation goes back to the
    queue for another worker (prefetched, or held for its countdown, before it left)."""
    if _shared is not None and not _shared.taking.value:
        raise Reject("this worker is out of rotation", requeue=True)


def succeeded() -> None:
    if _shared is not None:
        _shared.succeeded()


def saw_renderer(renderer: Any) -> None:
    """The render path of the renderer this process loaded (models/engines.py's choice,
    as the backend made it), for `farm workers`."""
    if _shared is None:
        return
    path = getattr(renderer, "backend", None) or str(getattr(renderer, "device", "?"))
    reason = getattr(renderer, "backend_reason", "")
    name = getattr(renderer, "name", type(renderer).__name__)
    _shared.saw_renderer(f"{name} on {path}" + (f" ({reason})" if reason else ""))


def requeue_elsewhere(task: Task, exc: BaseException) -> Retry | None:
    """A Retry that puts the chunk back on its queue without spending a retry, when
    another worker can take it (farm/health.py, may_requeue); None otherwise (the
    task's own retries apply). The message names the workers that failed it."""
    request = task.request
    if not health.worker_fault(exc) or settings.worker_max_failures <= 0:
        return None
    me = request.hostname or "?"
    failed_on = list(request.kwargs.get("failed_on") or ())
    requeued = int(request.kwargs.get("requeued") or 0)
    queue = (request.delivery_info or {}).get("routing_key") or RENDER_QUEUE
    try:
        replies = task.app.control.broadcast(HEALTH_COMMAND, reply=True, timeout=ASK_TIMEOUT)
    except Exception as exc_ask:  # the broker: leave it to the task's own retries
        log.warning("could not ask the other workers: %s", exc_ask)
        return None
    workers = health.reports(replies or [])
    if not health.may_requeue(
        me, failed_on, requeued, queue, workers, settings.worker_max_failures
    ):
        return None
    kwargs = {
        **request.kwargs,
        "failed_on": sorted({*failed_on, me}),
        "requeued": requeued + 1,
    }
    countdown = 0.5
    signature = task.signature_from_request(
        request, None, kwargs, countdown=countdown, retries=request.retries
    )
    signature.apply_async()
    log.warning(
        "chunk %s of job %s failed on %s (%s); requeued for another worker",
        request.args[1] if len(request.args) > 1 else "?",
        request.args[0] if request.args else "?",
        me,
        health.describe_error(exc),
    )
    return Retry(exc=exc, when=countdown, sig=signature)


# --- the caller's side (the CLI) ------------------------------------------------------


def _ask(app: Celery, command: str, timeout: float, **options: Any) -> list[dict[str, Any]]:
    """Broadcast a command and collect the replies; a broker that cannot be reached (a
    redis-py error as much as kombu's) is BrokerUnavailable, one line."""
    with app.connection_for_write() as conn:
        errors = (*conn.connection_errors, *conn.channel_errors)
        try:
            return app.control.broadcast(
                command, reply=True, timeout=timeout, connection=conn, **options
            )
        except errors as exc:
            raise BrokerUnavailable(f"the broker is unavailable: {exc}") from exc


def survey(app: Celery, timeout: float = 1.0) -> list[health.WorkerReport]:
    """Every worker that answers within `timeout`, with its health."""
    return health.reports(_ask(app, HEALTH_COMMAND, timeout) or [])


def resume(app: Celery, name: str, timeout: float = 1.0) -> tuple[str, list[str]]:
    """Put worker `name` (in full, or the part before '@') back in rotation: its full
    name and the queues it consumes again."""
    names = [w.name for w in survey(app, timeout)]
    if not names:
        raise RetryableError(f"no worker answered within {timeout:g} s")
    full = health.resolve(name, names)
    replies = _ask(app, RESUME_COMMAND, timeout, destination=[full])
    for reply in replies or []:
        if full in reply and isinstance(reply[full], dict) and "resumed" in reply[full]:
            return full, list(reply[full]["resumed"])
    raise NotFound(f"worker {full!r} did not answer the resume within {timeout:g} s")
