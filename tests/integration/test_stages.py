"""The stages of a job (workers/stages.py), run in process by the pipeline driver
(tests/pipeline.py) on a real database (SQLite, then Postgres) and store: what each
stage queues next, on which lane, and what a job ends with. The null renderer draws
the frames: this is about the stages and their messages, not pixels."""

from __future__ import annotations

import pytest

from farm import batches, jobs, pipeline, queries, states
from farm.context import Context
from farm.dispatch import BATCH_COMPLETED_TASK
from farm.manifest import Defaults
from tests.pipeline import run_stages
from tests.probe import probe

SCRIPT = "One sentence to speak. And another one after it."


def request(**changes: object) -> jobs.JobRequest:
    values: dict = dict(
        script=SCRIPT, avatar="demo", voice="espeak", fps=25, size=(64, 64), chunk_frames=20
    )
    values = {"renderer": "null", **values, **changes}
    return jobs.JobRequest(seed=2, **values)


def job(ctx: Context, job_id: str):
    with ctx.session() as s:
        return queries.get_job(s, job_id)


def test_a_job_runs_every_stage_once_in_order_and_publishes(db_ctx: Context):
    # Segments of at most 30 characters: the two sentences are spoken apart.
    db_ctx = Context(db_ctx.settings.with_(max_segment_chars=30), db_ctx.dispatch)
    job_id = jobs.submit(db_ctx, request())
    ran = run_stages(db_ctx)
    done = job(db_ctx, job_id)
    assert done.state == states.SUCCEEDED, done.error
    assert done.segments_total == 2 and done.chunks_total > 1
    expected = (
        [pipeline.PREPARE.task]
        + [pipeline.TTS.task] * done.segments_total
        + [pipeline.PLAN.task]
        + [pipeline.RENDER.task] * done.chunks_total
        + [pipeline.MUX.task, pipeline.PUBLISH.task]
    )
    assert [m.task for m in ran] == expected
    assert not any(m.bulk for m in ran)  # an interactive job stays interactive
    renders = [m for m in ran if m.task == pipeline.RENDER.task]
    assert [m.id for m in renders] == [f"{job_id}-render-{i}" for i in range(len(renders))]
    video = probe(db_ctx.settings.home / "artifacts" / done.output_key)
    assert video.frame_count == done.frame_count > 0
    assert (video.width, video.height) == (64, 64) and video.audio_seconds > 1.0

    # Every message delivered again: nothing moves, nothing is recorded twice.
    db_ctx.dispatch.messages.extend(ran)
    run_stages(db_ctx)
    again = job(db_ctx, job_id)
    assert (again.state, again.timings, again.output_key) == (
        done.state,
        done.timings,
        done.output_key,
    )


def test_a_batch_job_keeps_the_bulk_lane_and_completes_its_batch(db_ctx: Context, tmp_path):
    ctx = Context(db_ctx.settings.with_(renderer="null"), db_ctx.dispatch)  # batch rows
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"text": "Bulk words.", "output": "a.mp4"}\n', encoding="utf-8")
    options = batches.Options(
        fps=25, size=(64, 64), chunk_frames=10, seed=None, defaults=Defaults(voice="espeak")
    )
    checked = batches.load(ctx, "lane", manifest, options)
    (job_id,) = batches.submit(ctx, "lane", checked, options).created
    ran = run_stages(ctx)
    assert len(ran) >= 6 and all(m.bulk for m in ran)  # every stage passed the lane on
    assert job(ctx, job_id).state == states.SUCCEEDED
    # The last job of the batch queued its report (a worker writes it).
    left = ctx.dispatch.messages
    assert [m.task for m in left if m.task == BATCH_COMPLETED_TASK] == [BATCH_COMPLETED_TASK]


def test_a_cancelled_job_s_queued_stages_never_run(db_ctx: Context):
    job_id = jobs.submit(db_ctx, request())
    run_stages(db_ctx, until=pipeline.PLAN)
    outcome = jobs.cancel(db_ctx, job_id[:8])
    assert outcome.job.id == job_id and outcome.not_revoked is None
    assert run_stages(db_ctx) == []  # the plan message was revoked
    assert job(db_ctx, job_id).state == states.CANCELLED


def test_a_ditto_job_plans_on_the_render_queue(db_ctx: Context):
    """Ditto's plan runs HuBERT and diffusion sampling: the backend declares that it
    belongs where the GPU is, and the last segment queues it there."""
    job_id = jobs.submit(db_ctx, request(renderer="ditto"))
    run_stages(db_ctx, until=pipeline.PLAN)
    (planned,) = [m for m in db_ctx.dispatch.messages if m.task == pipeline.PLAN.task]
    assert planned.queue == "render" and planned.args == (job_id,)


def test_renderer_options_are_kept_for_their_backend_and_refused_elsewhere(db_ctx: Context):
    from farm.errors import InvalidInput

    options = jobs.renderer_options(12, "Sad")
    assert options == {"steps": 12, "emotion": 5}
    job_id = jobs.submit(db_ctx, request(renderer="ditto", options=options))
    assert job(db_ctx, job_id).options == {"steps": 12, "emotion": 5}
    assert job(db_ctx, jobs.submit(db_ctx, request())).options is None
    with pytest.raises(InvalidInput, match="--ditto-steps does not apply to the null renderer"):
        jobs.submit(db_ctx, request(options={"steps": 3}))  # a null-renderer job
    with pytest.raises(InvalidInput, match="emotion must be within 0..7"):
        jobs.submit(db_ctx, request(renderer="ditto", options={"emotion": 9}))
    with pytest.raises(InvalidInput, match="unknown emotion 'gleeful'"):
        jobs.renderer_options(None, "gleeful")
    with db_ctx.session() as s:
        assert len(queries.list_jobs(s, 10, None)) == 2  # nothing refused was recorded
