"""A pipeline driver: the real stages (workers/stages.py) run in this process, in the
order their messages were queued on the in-memory dispatcher (farm/dispatch.py). For
tests about what the stages do to the database and the store, without a broker or a
worker process; errors propagate to the test instead of failing the job."""

from __future__ import annotations

from typing import Any

from farm.context import Context
from farm.dispatch import InMemoryDispatcher, Message
from farm.pipeline import Stage


def run_stages(ctx: Context, until: Stage | None = None) -> list[Message]:
    """Run queued stage messages, oldest first, and those they queue in turn, until
    none is left or the next is one of `until` (left queued). Revoked messages are
    dropped; messages that are not stages (webhooks, batch reports) are left queued.
    Returns the messages that ran, in order."""
    from workers import stages

    dispatcher = ctx.dispatch
    assert isinstance(dispatcher, InMemoryDispatcher), "the driver runs in-memory messages"
    ran = []
    while (message := _next_stage(dispatcher, stages.RUN)) is not None:
        if until is not None and message.task == until.task:
            break
        dispatcher.messages.remove(message)
        if message.id not in dispatcher.revoked:
            stages.RUN[message.task](ctx, *message.args, bulk=message.bulk)
            ran.append(message)
    return ran


def _next_stage(dispatcher: InMemoryDispatcher, run: dict[str, Any]) -> Message | None:
    return next((m for m in dispatcher.messages if m.task in run), None)


def rendered_job(ctx: Context, request: Any) -> Any:
    """Submit `request` (a jobs.JobRequest), run every stage, and return the job's row,
    which must have succeeded."""
    from farm import jobs, queries, states

    job_id = jobs.submit(ctx, request)
    run_stages(ctx)
    with ctx.session() as s:
        job = queries.get_job(s, job_id)
    assert job.state == states.SUCCEEDED, job.error
    return job


def stored(ctx: Context, key: str) -> Any:
    """The file behind a store key of the local store (FARM_HOME/artifacts)."""
    return ctx.settings.home / "artifacts" / key
