"""Script markup, measured on the output (issue 17, item 2): a marked-up script runs
through the real stages (tests/pipeline.py, SQLite) with Piper and the portrait
renderer, and the MP4 is measured the way farm/quality.py measures any video: the
audio's own RMS for silence, FaceMesh on the decoded frames for the mouth. Nothing of
the plan or the renderer is consulted."""

from __future__ import annotations

import numpy as np
import pytest

from farm import jobs, quality, queries, states
from farm.context import Context
from tests.pipeline import run_stages

BREAK_MS = 800
SCRIPT = (
    "<speak>Papa made a <emphasis>big</emphasis> apple pie."
    f'<break time="{BREAK_MS}ms"/>'
    "Mom ate it all.</speak>"
)
WINDOW_S = 0.01


def silent_runs(audio: np.ndarray, rate: int) -> list[tuple[float, float]]:
    """Runs of 10 ms windows below quality's silence level (a tenth of the 95th
    percentile), in seconds."""
    n = int(WINDOW_S * rate)
    windows = audio[: audio.size // n * n].astype(np.float64).reshape(-1, n)
    rms = np.sqrt((windows**2).mean(axis=1))
    quiet = rms < quality.SILENCE_FRACTION * float(np.percentile(rms, 95))
    return [(a * WINDOW_S, b * WINDOW_S) for a, b in quality.runs(quiet)]


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_a_break_is_silence_with_the_mouth_closed_in_the_video(db_ctx: Context):
    request = jobs.JobRequest(SCRIPT, "demo", "joe", 25, (256, 256), 50, seed=7)
    job_id = jobs.submit(db_ctx, request)
    run_stages(db_ctx)
    with db_ctx.session() as s:
        job = queries.get_job(s, job_id)
        pauses = [seg.pause_after_ms for seg in queries.get_segments(s, job_id)]
    assert job.state == states.SUCCEEDED, job.error
    assert pauses == [BREAK_MS, 0]

    video = quality.decode(db_ctx.settings.home / "artifacts" / job.output_key)
    duration = video.audio.size / video.rate
    inner = [
        (a, b) for a, b in silent_runs(video.audio, video.rate) if a > 0.1 and b < duration - 0.1
    ]
    gap = max(inner, key=lambda run: run[1] - run[0])
    # The break is real silence in the delivered audio (Piper's own edges add to it).
    assert gap[1] - gap[0] >= 0.75, inner

    opening = quality.mouth_opening(quality.face_landmarks(video.frames))
    shut = quality.closed(opening)
    edge = quality.SILENCE_EDGE_FRAMES
    frames = np.arange(
        int(np.ceil(gap[0] * video.fps)) + edge, int(gap[1] * video.fps) - edge, dtype=int
    )
    assert frames.size >= 0.75 * video.fps - 2 * edge - 2
    assert shut[frames].all(), (opening[frames], opening.min(), opening.max())
    # And the mouth does open for the speech around it.
    assert opening.max() > opening[frames].max() + 0.02
