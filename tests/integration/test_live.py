"""`farm live` against a real RTMP listener on loopback (ffmpeg -listen), recorded to FLV
with the timestamps as sent (-copyts) and decoded with PyAV: constant frame rate and
continuous timestamps, continuous audio, idle before the message, the job (mouth moving
with its audio) after it and idle again, cuts without a jump, a failed job skipped, a
dropped connection resumed with timestamps that continue, and the HLS playlist."""

from __future__ import annotations

import signal
import socket
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
from farm.media import ffmpeg_exe
from tests.pipeline import run_stages

av = pytest.importorskip("av")

pytestmark = pytest.mark.integration
FPS = 25
SIZE = (128, 128)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listen(port: int, out: Path) -> subprocess.Popen:
    argv = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-listen", "1"]
    argv += ["-i", f"rtmp://127.0.0.1:{port}/app/key", "-c", "copy", "-copyts"]
    argv += ["-flush_packets", "1", str(out)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    time.sleep(0.5)  # bound and listening
    return proc


def _until(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _video(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(pts seconds, grey frames) of a recording."""
    with av.open(str(path)) as c:
        frames = [
            (float(f.pts * f.time_base), f.to_ndarray(format="gray")) for f in c.decode(video=0)
        ]
    return np.array([p for p, _ in frames]), np.array([g for _, g in frames], np.float32)


def _audio(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(frame start times, mono samples, rate)."""
    starts, chunks, rate = [], [], 0
    with av.open(str(path)) as c:
        for f in c.decode(audio=0):
            a = f.to_ndarray()
            chunks.append(a.mean(axis=0) if a.ndim > 1 else a)
            starts.append(float(f.pts * f.time_base))
            rate = f.sample_rate
    return np.array(starts), np.concatenate(chunks).astype(np.float64), rate


def _check_continuous(pts: np.ndarray, astarts: np.ndarray, samples: np.ndarray, rate: int):
    steps = np.diff(pts)
    assert np.abs(steps - 1 / FPS).max() <= 0.0011, "video timestamps jump (FLV keeps ms)"
    gaps = np.diff(astarts)
    assert gaps.max() <= 1024 / rate + 0.0011, "audio has a gap"
    # the audio covers the video (a recording that joined mid-stream starts its video at
    # the next keyframe, its audio at once)
    a0, a1 = astarts[0], astarts[0] + samples.size / rate
    assert a0 <= pts[0] + 0.05 and a1 >= pts[-1] + 1 / FPS - 0.1, (a0, a1, pts[0], pts[-1])


def test_channel_on_air(tmp_path: Path) -> None:
    home = tmp_path / "home"
    settings = Settings(home=home, fps=FPS, size=SIZE[0])
    migrate.upgrade(settings.effective_database_url)
    ctx = Context(settings, InMemoryDispatcher())
    port = _free_port()
    rec1, rec2, hls = tmp_path / "rec1.flv", tmp_path / "rec2.flv", tmp_path / "hls"
    failures: list[tuple[str, str]] = []
    spec = live.ChannelSpec("demo", f"rtmp://127.0.0.1:{port}/app/key", FPS, SIZE, 3, hls, 4)
    listener = _listen(port, rec1)
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
        _until(lambda: channel.stats.aired == 1 and channel.stats.state == "idle", 60, "the job")
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
        listener2 = _listen(port, rec2)
        _until(lambda: rec2.exists() and rec2.stat().st_size > 50_000, 30, "the reconnection")
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
    pts, grey = _video(rec1)
    astarts, samples, rate = _audio(rec1)
    _check_continuous(pts, astarts, samples, rate)
    # everything up to the drop
    assert frames_at_drop - 2 * FPS < len(pts) <= frames_at_drop + FPS

    # idle (silence) before the message, speech in the job, silence again after it
    per_frame = rate // FPS
    offset = int(round((pts[0] - astarts[0]) * rate))
    voiced = []
    for i in range(len(pts)):
        chunk = samples[offset + i * per_frame : offset + (i + 1) * per_frame]
        voiced.append(chunk.size > 0 and np.sqrt(np.mean(chunk**2)) > 0.01)
    voiced = np.array(voiced)
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
    h, w = grey.shape[1:]
    mouth = grey[:, int(0.62 * h) : int(0.8 * h), int(0.35 * w) : int(0.65 * w)]
    motion = np.abs(np.diff(mouth, axis=0)).mean(axis=(1, 2))
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
    pts2, _ = _video(rec2)
    astarts2, samples2, rate2 = _audio(rec2)
    _check_continuous(pts2, astarts2, samples2, rate2)
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
