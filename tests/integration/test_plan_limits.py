"""The frame limit, exactly, at plan time: submission only checks an estimate of how
long a script speaks (farm/script.py), so the plan checks the real audio."""

from __future__ import annotations

import dataclasses

import pytest

from farm import jobs, pipeline
from farm.context import Context
from farm.errors import InvalidInput
from tests.pipeline import run_stages
from workers import stages


def test_the_plan_refuses_speech_longer_than_the_frame_limit(db_ctx: Context):
    # "Hello there." speaks for about a second, plus 0.8 s of lead-in and tail: at 25 fps
    # that is well over 20 frames. The estimate at submission would let it through.
    settings = dataclasses.replace(db_ctx.settings, max_job_frames=20)
    ctx = Context(settings, db_ctx.dispatch)
    job_id = jobs.submit(ctx, jobs.JobRequest("Hello there.", "demo", "espeak", 25, (64, 64), 10))
    run_stages(ctx, until=pipeline.PLAN)
    with pytest.raises(InvalidInput, match="FARM_MAX_JOB_FRAMES"):
        run_stages(ctx)
    # With room for it, the same job plans.
    ctx = Context(dataclasses.replace(settings, max_job_frames=1000), db_ctx.dispatch)
    assert stages.plan(ctx, job_id) > 0
