"""A live channel's broadcast, as a viewer gets it: a real RTMP listener on loopback
(ffmpeg -listen) recording to FLV with the timestamps as sent (-copyts), and the
recording decoded with PyAV (video frames, audio, which frames are voiced, the mouth's
motion). Shared by the `farm live` integration tests."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np

from farm.media import ffmpeg_exe

FPS = 25


def listen(port: int, out: Path) -> subprocess.Popen:
    """An RTMP server on 127.0.0.1:port (app/key) that records what it gets to `out`."""
    argv = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-listen", "1"]
    argv += ["-i", f"rtmp://127.0.0.1:{port}/app/key", "-c", "copy", "-copyts"]
    argv += ["-flush_packets", "1", str(out)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    time.sleep(0.5)  # bound and listening
    return proc


def until(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def video(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(pts seconds, grey frames) of a recording."""
    import av

    with av.open(str(path)) as c:
        frames = [
            (float(f.pts * f.time_base), f.to_ndarray(format="gray")) for f in c.decode(video=0)
        ]
    return np.array([p for p, _ in frames]), np.array([g for _, g in frames], np.float32)


def audio(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(frame start times, mono samples, rate)."""
    import av

    starts, chunks, rate = [], [], 0
    with av.open(str(path)) as c:
        for f in c.decode(audio=0):
            a = f.to_ndarray()
            chunks.append(a.mean(axis=0) if a.ndim > 1 else a)
            starts.append(float(f.pts * f.time_base))
            rate = f.sample_rate
    return np.array(starts), np.concatenate(chunks).astype(np.float64), rate


def check_continuous(pts: np.ndarray, astarts: np.ndarray, samples: np.ndarray, rate: int):
    steps = np.diff(pts)
    assert np.abs(steps - 1 / FPS).max() <= 0.0011, "video timestamps jump (FLV keeps ms)"
    gaps = np.diff(astarts)
    assert gaps.max() <= 1024 / rate + 0.0011, "audio has a gap"
    # the audio covers the video (a recording that joined mid-stream starts its video at
    # the next keyframe, its audio at once)
    a0, a1 = astarts[0], astarts[0] + samples.size / rate
    assert a0 <= pts[0] + 0.05 and a1 >= pts[-1] + 1 / FPS - 0.1, (a0, a1, pts[0], pts[-1])


def voiced_frames(
    pts: np.ndarray, astarts: np.ndarray, samples: np.ndarray, rate: int
) -> np.ndarray:
    """Per video frame: whether its audio is above silence (RMS > 0.01)."""
    per_frame = rate // FPS
    offset = int(round((pts[0] - astarts[0]) * rate))
    voiced = []
    for i in range(len(pts)):
        chunk = samples[offset + i * per_frame : offset + (i + 1) * per_frame]
        voiced.append(chunk.size > 0 and np.sqrt(np.mean(chunk**2)) > 0.01)
    return np.array(voiced)


def mouth_motion(grey: np.ndarray) -> np.ndarray:
    """Mean absolute change of the mouth region from each frame to the next."""
    h, w = grey.shape[1:]
    mouth = grey[:, int(0.62 * h) : int(0.8 * h), int(0.35 * w) : int(0.65 * w)]
    return np.abs(np.diff(mouth, axis=0)).mean(axis=(1, 2))
