"""`farm live` against a real RTMP listener on loopback (ffmpeg -listen), recorded to FLV
with the timestamps as sent (-copyts) and decoded with PyAV: constant frame rate and
continuous timestamps, continuous audio, idle before the message, the job (mouth moving
with its audio) after it and idle again, cuts without a jump, a failed job skipped, a
dropped connection resumed with timestamps that continue, and the HLS playlist."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from farm import jobs, live, migrate
from farm.config import Settings
from farm.context import Context
from farm.dispatch import InMemoryDispatcher
from tests.onair import (
    FPS,
    audio,
    check_continuous,
    listen,
    mouth_motion,
    until,
    video,
    voiced_frames,
)
from tests.pipeline import run_stages
from tests.services import free_port

av = pytest.importorskip("av")

pytestmark = pytest.mark.integration
SIZE = (128, 128)


def test_channel_on_air(tmp_path: Path) -> None:
    home = tmp_path / "home"
    settings = Settings(home=home, fps=FPS, size=SIZE[0])
    migrate.upgrade(settings.effective_database_url)
    ctx = Context(settings, InMemoryDispatcher())
    port = free_port()
    rec1, rec2, hls = tmp_path / "rec1.flv", tmp_path / "rec2.flv", tmp_path / "hls"
    failures: list[tuple[str, str]] = []
    spec = live.ChannelSpec("demo", f"rtmp://127.0.0.1:{port}/app/key", FPS, SIZE, 3, hls, 4)
    listener = listen(port, rec1)
    channel = live.Channel(ctx, spec, say=print, on_failed=lambda j, e: failures.append((j, e)))
    listener2 = None
    try:
        channel.start()
        time.sleep(2.5)  # idle on air
        # A job that fails, then one that speaks, in the same session: the failure is
        # reported, the channel stays idle through it and the next job still airs.
        bad = live.submit_text(ctx, channel, "This one fails.", "joe", session="s")
        jobs.fail(ctx, bad, "renderer exploded")
        good = live.submit_text(ctx, channel, "Hello there, this is a live test.", "joe", "s")
        run_stages(ctx)
        until(lambda: channel.stats.aired == 1 and channel.stats.state == "idle", 60, "the job")
        time.sleep(4.0)  # idle again
        # status while on air, through the CLI
        from farm.cli import main

        shown = CliRunner().invoke(main, ["live", "status"], env={"FARM_HOME": str(home)})
        assert shown.exit_code == 0, shown.output
        assert "demo: idle" in shown.output and "pending: 0 of 4" in shown.output
        assert "last latency (message to first talking frame): " in shown.output

        # The RTMP server drops the connection, and comes back a moment later.
        frames_at_drop = channel.stats.frames
        listener.send_signal(signal.SIGTERM)  # closes the connection, keeps its recording
        listener.wait()
        time.sleep(1.5)
        listener2 = listen(port, rec2)
        until(lambda: rec2.exists() and rec2.stat().st_size > 50_000, 30, "the reconnection")
        time.sleep(3.0)
    finally:
        channel.stop()
        for proc in (listener, listener2):
            if proc is not None:
                try:
                    proc.wait(timeout=10)  # ends when the channel's output closes
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    proc.wait()

    # --- the failure was published, the job went on air, latency measured
    assert [j for j, _ in failures] == [bad] and "renderer exploded" in failures[0][1]
    (aired,) = channel.stats.latencies
    assert aired["job"] == good and aired["seconds"] > 0
    status = live.read_status(home, "demo")[0]
    assert status["state"] == "stopped" and status["latency_seconds"] == aired["seconds"]
    assert status["outputs"]["rtmp"]["restarts"] >= 1

    # --- recording 1: constant frame rate, continuous timestamps and audio
    pts, grey = video(rec1)
    astarts, samples, rate = audio(rec1)
    check_continuous(pts, astarts, samples, rate)
    # everything up to the drop
    assert frames_at_drop - 2 * FPS < len(pts) <= frames_at_drop + FPS

    # idle (silence) before the message, speech in the job, silence again after it
    voiced = voiced_frames(pts, astarts, samples, rate)
    speech = np.flatnonzero(voiced)
    assert speech.size > FPS  # about a second and more of speech
    start_rec = int(speech[0])
    first_on_clock = aired["frame"]  # the first talking frame on the channel's clock
    lead = first_on_clock - start_rec  # channel frame of the recording's first frame
    assert 0 <= lead <= 2, lead  # the recording holds the broadcast from its first frame
    assert start_rec > 2 * FPS and not voiced[: start_rec - 1].any()  # idle before
    job_start = aired["first_frame"] - lead
    job_end = job_start + aired["frames"]  # the first idle frame after the job
    assert job_end < len(pts) - FPS and not voiced[job_end + 1 :].any()  # idle after
    assert speech[-1] < job_end

    # the mouth moves with the audio: the mouth region changes in speech, not in idle
    motion = mouth_motion(grey)
    in_speech = motion[speech[0] : speech[-1]]
    idle = np.concatenate([motion[: job_start - 1], motion[job_end + 1 :]])
    assert np.median(in_speech) > 5 * max(np.median(idle), 0.02), (in_speech, idle)

    # the cuts show no jump: the frame into the job and the frame back to idle change
    # the picture no more than the idle loop's own frame steps do
    steps = np.abs(np.diff(grey, axis=0)).mean(axis=(1, 2))  # steps[i]: frame i -> i+1
    idle_steps = np.concatenate([steps[: job_start - 1], steps[job_end + 1 :]])
    limit = np.percentile(idle_steps, 99)
    assert steps[job_start - 1] <= limit and steps[job_end - 1] <= limit, (
        steps[job_start - 3 : job_start + 10],
        steps[job_end - 10 : job_end + 3],
        limit,
    )

    # --- recording 2, after the reconnection: its timestamps continue the channel's clock
    pts2, _ = video(rec2)
    astarts2, samples2, rate2 = audio(rec2)
    check_continuous(pts2, astarts2, samples2, rate2)
    assert pts2[0] > pts[-1]
    frames_between = (pts2[0] - pts[0]) * FPS
    assert abs(frames_between - round(frames_between)) < 0.05  # on the same frame grid
    assert len(pts2) >= 2 * FPS

    # --- the HLS playlist plays
    playlist = (hls / "index.m3u8").read_text()
    assert playlist.rstrip().endswith("#EXT-X-ENDLIST")  # the broadcast ended with stop()
    with av.open(str(hls / "index.m3u8")) as c:
        hls_pts = [float(f.pts * f.time_base) for f in c.decode(video=0)]
    assert len(hls_pts) >= 3 * FPS
    assert np.abs(np.diff(hls_pts) - 1 / FPS).max() < 1e-3


def test_live_status_without_a_channel(tmp_path: Path) -> None:
    from farm.cli import main

    env = {"FARM_HOME": str(tmp_path)}
    shown = CliRunner().invoke(main, ["live", "status"], env=env)
    assert shown.exit_code == 0 and "no live channel" in shown.output
    refused = CliRunner().invoke(main, ["live", "--avatar", "demo"], env=env)
    assert refused.exit_code == 1 and "--rtmp" in refused.output
    assert not (tmp_path / "live").exists()
