"""The frame limit, exactly, at plan time: submission only checks an estimate of how
long a script speaks (farm/script.py), so the plan checks the real audio."""

from __future__ import annotations

import dataclasses

import pytest

from farm import jobs
from farm.context import Context
from farm.errors import InvalidInput
from models import stages


def test_the_plan_refuses_speech_longer_than_the_frame_limit(db_ctx: Context):
    # "Hello there." speaks for about a second, plus 0.8 s of lead-in and tail: at 25 fps
    # that is well over 20 frames. The estimate at submission would let it through.
    ctx = Context(dataclasses.replace(db_ctx.settings, max_job_frames=20))
    job_id = jobs.create(ctx, jobs.JobRequest("Hello there.", "demo", "espeak", 25, (64, 64), 10))
    for idx in range(jobs.prepare(ctx, job_id)):
        jobs.segment_finished(ctx, job_id, idx, stages.speak(ctx, job_id, idx))
    with pytest.raises(InvalidInput, match="FARM_MAX_JOB_FRAMES"):
        stages.plan(ctx, job_id)
    # With room for it, the same job plans.
    ctx = Context(dataclasses.replace(db_ctx.settings, max_job_frames=1000))
    assert stages.plan(ctx, job_id)
