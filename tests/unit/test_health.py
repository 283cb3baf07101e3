"""The rules of workers that take themselves out of rotation (farm/health.py): which
failures count against a worker, when a failed chunk goes elsewhere for free, and the
`farm workers` table."""

from __future__ import annotations

import pytest
from celery.exceptions import Reject, WorkerLostError
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import OperationalError as DatabaseError

from farm import encoders, health
from farm.config import Settings
from farm.errors import (
    BrokerUnavailable,
    Cancelled,
    InvalidInput,
    MissingDependency,
    NotFound,
    PermanentError,
    RetryableError,
)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("injected renderer error at frame 60"),
        MemoryError("CUDA out of memory"),
        WorkerLostError("Worker exited prematurely: signal 11 (SIGSEGV)"),
        encoders.EncoderDied("h264_nvenc failed (broken pipe); the retry encodes with libx264"),
        encoders.EncoderError("libx264 failed: broken pipe"),
        MissingDependency("renderer 'ditto' needs onnxruntime: pip install 'farm[ditto]'"),
        OSError(28, "No space left on device"),
    ],
)
def test_failures_that_are_the_workers_count(exc):
    assert health.worker_fault(exc)


@pytest.mark.parametrize(
    "exc",
    [
        InvalidInput("the text produced no speech"),
        NotFound("unknown avatar 'nobody'"),
        PermanentError("portrait avatar artifact has unexpected shapes"),
        Cancelled("job abc was cancelled"),
        RetryableError("the store is unavailable"),
        BrokerUnavailable("the broker is unavailable"),
        BrokerError("connection refused"),
        DatabaseError("SELECT 1", {}, Exception("server closed the connection")),
        Reject("this worker is out of rotation", requeue=True),
        SystemExit(0),
        None,
    ],
)
def test_input_errors_cancels_and_outages_do_not(exc):
    assert not health.worker_fault(exc)


def test_only_a_chunks_first_failure_counts_against_a_worker():
    crash = RuntimeError("CUDA error: an illegal memory access was encountered")
    assert health.counts_against(crash, 0, [])
    assert not health.counts_against(crash, 1, [])  # a retry: the chunk is suspect
    assert not health.counts_against(crash, 0, ["a@h"])  # requeued from a worker it failed on
    assert not health.counts_against(InvalidInput("bad"), 0, [])


def _report(name: str, taking: bool = True, queues=("render", "render_bulk")):
    reply = {"queues": list(queues), "taking": taking, "failures": 0, "max_failures": 3}
    return health.WorkerReport.from_reply(name, reply)


def test_a_failed_chunk_goes_elsewhere_while_another_worker_can_take_it():
    bad, good = _report("bad@h"), _report("good@h")
    cpu = _report("cpu@h", queues=("cpu", "cpu_bulk"))
    workers = [bad, good, cpu]
    assert health.may_requeue("bad@h", [], 0, "render", workers, 3)
    # the other render worker failed it too, or is out of rotation, or takes no renders
    assert not health.may_requeue("bad@h", ["good@h"], 1, "render", workers, 3)
    out = [bad, _report("good@h", taking=False), cpu]
    assert not health.may_requeue("bad@h", [], 0, "render", out, 3)
    assert not health.may_requeue("bad@h", [], 0, "render", [bad, cpu], 3)
    # bounded: max_failures requeues per render worker answering, then retries count
    assert health.may_requeue("bad@h", ["bad@h"], 5, "render", workers, 3)
    assert not health.may_requeue("bad@h", ["bad@h"], 6, "render", workers, 3)
    assert not health.may_requeue("bad@h", [], 0, "render", workers, 0)  # the rule is off
    bulk_only = [bad, _report("good@h", queues=("render_bulk",))]
    assert not health.may_requeue("bad@h", [], 0, "render", bulk_only, 3)
    assert health.may_requeue("bad@h", [], 0, "render_bulk", bulk_only, 3)


def test_workers_are_named_in_full_or_by_their_first_part():
    names = ["render1@box", "render2@box", "cpu@a", "cpu@b"]
    assert health.resolve("render1@box", names) == "render1@box"
    assert health.resolve("render2", names) == "render2@box"
    with pytest.raises(NotFound, match=r"no worker named 'render9' answered \(answering: "):
        health.resolve("render9", names)
    with pytest.raises(InvalidInput, match="ambiguous: cpu@a, cpu@b"):
        health.resolve("cpu", names)


def test_the_table_shows_who_takes_work_and_why_not():
    replies = [
        {"good@h": {"queues": ["render"], "taking": True, "failures": 0, "max_failures": 3}},
        {
            "bad@h": {
                "queues": [],
                "taking": False,
                "failures": 3,
                "max_failures": 3,
                "last_error": "RuntimeError: CUDA error: an illegal memory access",
                "reason": "3 render failures in a row, the last: RuntimeError: CUDA error",
                "left_at": 1796645085.0,
                "gpu": "GPU 0: NVIDIA H200",
                "render_path": "portrait on cuda",
                "encoder": "libx264 (no NVIDIA GPU visible; test encode ok)",
            }
        },
        {"old@h": {"error": "No such inspect command: 'farm_health'"}},
    ]
    rows = health.reports(replies)
    assert [r.name for r in rows] == ["bad@h", "good@h", "old@h"]
    lines = health.table(rows)
    assert lines[0].split() == ["WORKER", "RENDER", "WORK", "FAILS", "QUEUES", "GPU", "RENDER",
                                "PATH", "ENCODER"]  # fmt: skip
    bad = lines[1]
    assert bad.startswith("bad@h") and "NO (out of rotation)" in bad and "3/3" in bad
    assert "GPU 0: NVIDIA H200" in bad and "portrait on cuda" in bad and "libx264" in bad
    assert lines[2] == (
        "    out of rotation since 2026-12-07 12:04:45 UTC: 3 render failures in a row, "
        "the last: RuntimeError: CUDA error"
    )
    assert lines[3].startswith("    last error: RuntimeError: CUDA error")
    assert lines[4].startswith("good@h") and " yes " in lines[4]
    assert "No such inspect command" in "\n".join(lines[5:])


def test_one_line_errors_stay_short():
    text = "CUDA error: an illegal memory access\nCompile with `TORCH_USE_CUDA_DSA`" + "x" * 500
    line = health.describe_error(RuntimeError(text))
    assert "\n" not in line and len(line) == 300 and line.endswith("...")


def test_the_limit_is_a_setting_refused_when_negative():
    assert Settings().worker_max_failures == 3
    assert Settings.from_env({"FARM_WORKER_MAX_FAILURES": "0"}).worker_max_failures == 0
    with pytest.raises(InvalidInput, match="FARM_WORKER_MAX_FAILURES must be 0 or more"):
        Settings.from_env({"FARM_WORKER_MAX_FAILURES": "-1"})
    with pytest.raises(InvalidInput, match="FARM_WORKER_MAX_FAILURES must be an integer"):
        Settings.from_env({"FARM_WORKER_MAX_FAILURES": "three"})


def test_the_count_in_a_workers_shared_memory():
    from workers.health import Shared

    shared = Shared(max_failures=2)
    assert not shared.failed("RuntimeError: CUDA error: one")
    shared.succeeded()  # a rendered chunk resets the count
    assert not shared.failed("RuntimeError: CUDA error: two")
    assert shared.failed("RuntimeError: CUDA error: three")  # two in a row: out
    assert not shared.taking.value and shared.failures.value == 2
    assert shared.reason.value.decode() == (
        "2 render failures in a row, the last: RuntimeError: CUDA error: three"
    )
    assert not shared.failed("again")  # out already: it leaves once
    shared.resume()
    assert shared.taking.value and shared.failures.value == 0 and not shared.reason.value
    assert shared.last_error.value.decode() == "again"  # kept for `farm workers`
    off = Shared(max_failures=0)
    assert not any(off.failed("x") for _ in range(10)) and off.taking.value


class _Consumer:
    """What workers/health.py uses of Celery's consumer: its queues, in the order the
    worker drains them, and cancelling and adding one (appended, as kombu does)."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)

    @property
    def task_consumer(self):
        from types import SimpleNamespace

        return SimpleNamespace(queues=[SimpleNamespace(name=n) for n in self.names])

    def cancel_task_queue(self, name: str) -> None:
        self.names.remove(name)

    def add_task_queue(self, name: str) -> None:
        self.names.append(name)


def test_resume_puts_the_render_queues_back_in_their_place(monkeypatch):
    from workers import health as worker_health

    order = ["cpu", "render", "cpu_bulk", "render_bulk"]
    monkeypatch.setattr(worker_health, "_order", order)
    consumer = _Consumer(order)
    worker_health._cancel(consumer, ["render", "render_bulk"])
    assert consumer.names == ["cpu", "cpu_bulk"]
    worker_health._restore(consumer, ["render", "render_bulk"])
    assert consumer.names == order  # not cpu, cpu_bulk, render, render_bulk
