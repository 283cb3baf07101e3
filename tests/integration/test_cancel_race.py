"""A cancel that arrives while a stage is writing must leave nothing behind (issue 6).

Cancel deletes jobs/{id}/ once; a stage that was already running can write after
that delete. Here the real stages run on a real database (SQLite, then Postgres) and
store, and the store cancels the job at the worst moment: just before the stage
writes the artifact named in the case, after the cancel's own cleanup. The null
renderer draws the chunks (this is about what is left in the store, not pixels).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from farm import jobs, pipeline, queries, states
from farm.context import Context
from farm.errors import Cancelled
from farm.stores import LocalStore
from tests.pipeline import run_stages


class CancelOnWrite(LocalStore):
    """A real LocalStore that cancels `job_id` right before the write of a key that
    ends with `trigger` (once), the interleaving that used to leak files."""

    def __init__(self, root: Path, ctx: Context, trigger: str) -> None:
        super().__init__(root)
        self.ctx, self.trigger, self.job_id = ctx, trigger, ""
        self.fired = False

    def _maybe_cancel(self, key: str) -> None:
        if self.job_id and not self.fired and key.endswith(self.trigger):
            self.fired = True
            jobs.cancel(self.ctx, self.job_id)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._maybe_cancel(key)
        super().put_bytes(key, data)

    def put_file(self, key: str, path: Path) -> None:
        self._maybe_cancel(key)
        super().put_file(key, path)


def queries_state(ctx: Context, job_id: str) -> str:
    with ctx.session() as s:
        return queries.job_state(s, job_id)


@pytest.mark.parametrize(
    "stage, trigger",
    [("tts", "audio/0000.json"), ("plan", "plan.npz"), ("mux", "final.mp4")],
)
def test_cancel_during_a_stage_leaves_no_artifact(db_ctx: Context, stage, trigger):
    ctx = db_ctx
    store = CancelOnWrite(ctx.settings.home / "artifacts", ctx, trigger)
    ctx.store = store  # the Context's store, for every stage below
    req = jobs.JobRequest(
        "First words. Second words.", "demo", "espeak", 25, (64, 64), 10, seed=3, renderer="null"
    )
    job_id = jobs.submit(ctx, req)
    run_stages(ctx, until=pipeline.BY_NAME[stage])  # the real stages up to this one
    store.job_id = job_id

    if stage == "plan":
        ran = run_stages(ctx)
        assert [m.task for m in ran] == [pipeline.PLAN.task]  # the plan queued no chunk
    else:
        with pytest.raises(Cancelled):
            run_stages(ctx)

    assert store.fired, "the cancel was never injected"
    assert queries_state(ctx, job_id) == states.CANCELLED
    left = [p for p in (store.root / "jobs" / job_id).rglob("*") if p.is_file()]
    assert not left, f"artifacts left after the cancel: {left}"
    if stage == "plan":
        with ctx.session() as s:
            assert not queries.get_chunks(s, job_id), "chunk rows for a cancelled plan"
