"""Fan-in after segments and chunks, counted in the database: exactly one caller moves
the job on, whatever the order, duplicates or concurrency."""

from __future__ import annotations

import threading

from sqlalchemy import update

from farm import jobs, queries, states
from farm.context import Context
from farm.db import Job
from workers import stages


def _job_in(ctx: Context, state: str, chunks: int) -> str:
    job_id = jobs.submit(ctx, jobs.JobRequest("Hello.", "demo", "joe", 25, (64, 64), 10, seed=1))
    with ctx.session() as s:
        queries.insert_chunks(s, job_id, [(i * 10, i * 10 + 10) for i in range(chunks)])
        queries.get_job(s, job_id).chunks_total = chunks
        s.execute(update(Job).where(Job.id == job_id).values(state=state))
    return job_id


def test_last_chunk_moves_job_once_even_with_duplicates(db_ctx):
    ctx = db_ctx
    job_id = _job_in(ctx, states.RENDERING, chunks=3)
    assert stages.chunk_finished(ctx, job_id, 0, 1.0) is False
    assert stages.chunk_finished(ctx, job_id, 0, 1.0) is False  # duplicate delivery
    assert stages.chunk_finished(ctx, job_id, 2, 1.0) is False
    assert stages.chunk_finished(ctx, job_id, 1, 1.0) is True
    assert stages.chunk_finished(ctx, job_id, 1, 1.0) is False  # redelivered last chunk
    with ctx.session() as s:
        assert queries.job_state(s, job_id) == states.MUXING
        assert queries.count_done_chunks(s, job_id) == 3


def test_failed_chunk_can_be_claimed_again_but_done_one_cannot(db_ctx):
    ctx = db_ctx
    job_id = _job_in(ctx, states.RENDERING, chunks=2)
    with ctx.session() as s:
        assert queries.start_chunk(s, job_id, 0, "w1")
        queries.fail_chunk(s, job_id, 0, "boom")
    with ctx.session() as s:
        assert queries.start_chunk(s, job_id, 0, "w2")
        assert queries.get_chunk(s, job_id, 0).attempts == 2
    stages.chunk_finished(ctx, job_id, 0, 0.5)
    with ctx.session() as s:
        assert not queries.start_chunk(s, job_id, 0, "w3")
        assert queries.get_chunk(s, job_id, 0).worker == "w2"


def test_concurrent_finishers_enqueue_mux_exactly_once(db_ctx):
    ctx = db_ctx
    for _ in range(5):
        job_id = _job_in(ctx, states.RENDERING, chunks=8)
        results: list[bool] = []
        barrier = threading.Barrier(8)

        def finish(i: int, job_id: str, barrier: threading.Barrier, out: list[bool]) -> None:
            barrier.wait()
            out.append(stages.chunk_finished(ctx, job_id, i, 0.1))

        threads = [
            threading.Thread(target=finish, args=(i, job_id, barrier, results)) for i in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count(True) == 1


def test_cancelled_job_is_not_moved_on(db_ctx):
    ctx = db_ctx
    job_id = _job_in(ctx, states.RENDERING, chunks=1)
    with ctx.session() as s:
        assert queries.transition(s, job_id, states.CANCELLED)
    assert stages.chunk_finished(ctx, job_id, 0, 1.0) is False
    with ctx.session() as s:
        assert queries.job_state(s, job_id) == states.CANCELLED


def test_prepare_is_idempotent(db_ctx):
    ctx = db_ctx
    job_id = jobs.submit(
        ctx, jobs.JobRequest("One. Two.\n\nThree.", "demo", "joe", 25, (64, 64), 10, seed=1)
    )
    assert stages.prepare(ctx, job_id) == 2
    assert stages.prepare(ctx, job_id) == 0  # redelivered: the job is past preparing
    with ctx.session() as s:
        assert len(queries.get_segments(s, job_id)) == 2
        assert queries.job_state(s, job_id) == states.SPEAKING


def test_done_chunks_are_counted_per_job_in_one_listing(db_ctx):
    ctx = db_ctx
    a = _job_in(ctx, states.RENDERING, chunks=3)
    b = _job_in(ctx, states.RENDERING, chunks=2)
    idle = _job_in(ctx, states.QUEUED, chunks=0)
    for job_id, idx in ((a, 0), (a, 2), (b, 1)):
        stages.chunk_finished(ctx, job_id, idx, 0.1)
    with ctx.session() as s:
        done = queries.chunks_done_by_job(s, [a, b, idle])
    assert done == {a: 2, b: 1}  # a job with none done is simply absent
