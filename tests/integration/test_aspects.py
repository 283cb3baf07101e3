"""Aspect ratios and fit (issue 16, item 2), through the real stages in process with
the portrait renderer: the delivered MP4 is probed (PyAV) for its size and frame count,
and the face is found again on its pixels by FaceMesh, not where the layout put it."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from farm import jobs, output
from farm.context import Context
from farm.errors import InvalidInput
from tests.composed import FPS, SCRIPT, add_avatar, find_face, run_job, wide_photo
from tests.conftest import job_rows
from tests.probe import probe

# (aspect, the short side asked) -> the delivered size
CASES = {
    ("9:16", 180): (180, 320),
    ("16:9", 180): (320, 180),
    ("1:1", 256): (256, 256),
    ("4:5", 256): (256, 320),
}


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
@pytest.mark.parametrize("fit", ["contain", "cover"])
@pytest.mark.parametrize("aspect,short", sorted(CASES))
def test_each_aspect_and_fit_delivers_its_size_with_the_face_inside(
    db_ctx: Context, aspect: str, short: int, fit: str
):
    add_avatar(db_ctx)
    job, path = run_job(db_ctx, (short, short), aspect=aspect, fit=fit)
    width, height = CASES[(aspect, short)]
    video = probe(path)
    assert (video.width, video.height) == (width, height) == (job.width, job.height)
    # every frame, across chunk joins (6 frames a chunk)
    assert video.frame_count == job.frame_count == math.ceil(job.audio_seconds * FPS)
    assert job.chunks_total >= 2

    frame = video.frames[len(video.frames) // 2]
    points = find_face(frame)
    assert points is not None, "no face in the delivered frame"
    lo, hi = points.min(axis=0), points.max(axis=0)
    assert lo[0] >= -1 and lo[1] >= -1 and hi[0] <= width + 1 and hi[1] <= height + 1
    cx, cy = points.mean(axis=0)
    if aspect == "9:16":
        assert cy < height / 3, (cy, height)  # the head in the upper third
    if aspect == "1:1":
        assert abs(cx - width / 2) < 0.1 * width  # centred across

    # contain shows the whole photo: the canvas around it is empty (black bars, as no
    # background was asked) on the axis with room; cover leaves no empty edge.
    edges = [frame[:2], frame[-2:], frame[:, :2], frame[:, -2:]]
    dark = [float(e.mean()) < 12 for e in edges]
    if fit == "cover":
        assert not any(dark), [float(e.mean()) for e in edges]
    elif (width / height) != pytest.approx(288 / 256, rel=0.02):
        assert any(dark), [float(e.mean()) for e in edges]


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_a_draft_of_the_whole_photo_is_half_its_size(db_ctx: Context):
    add_avatar(db_ctx)
    job, path = run_job(db_ctx, (0, 0), draft=True)
    video = probe(path)
    assert (video.width, video.height) == (144, 128) == (job.width, job.height)
    assert video.frame_count == job.frame_count
    # the whole photo, scaled by half: its lower half (away from the face, and from the
    # draft's watermark) matches the photo's at half size within the codec's error
    photo = cv2.resize(wide_photo(), (144, 128), interpolation=cv2.INTER_AREA)
    diff = np.abs(video.frames[0, 64:].astype(int) - photo[64:].astype(int))
    assert diff.mean() < 6, diff.mean()


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_a_renderer_without_the_whole_photo_is_refused_with_a_reason(db_ctx: Context):
    request = jobs.JobRequest(
        script=SCRIPT,
        avatar="demo",
        voice="espeak",
        fps=FPS,
        size=(180, 180),
        chunk_frames=6,
        renderer="null",
        output=output.build(aspect="9:16", captions="off"),
    )
    # at submission: no row, nothing queued
    with pytest.raises(InvalidInput, match="the null renderer cannot render"):
        jobs.submit(db_ctx, request)
    assert job_rows(db_ctx.settings.home) == 0
    assert not db_ctx.dispatch.messages

    # and at plan, for a job that got past submission (a row from elsewhere): the avatar
    # has no whole photo to frame, said in one line
    from workers import compose
    from workers.avatars import load_avatar

    avatar = load_avatar(db_ctx, "demo", "null")
    with pytest.raises(InvalidInput, match="null renderer has no whole-photo output"):
        compose.plan_sizes(request.output, (180, 320), avatar, "null")
