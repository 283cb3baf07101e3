"""Audio handed to `farm submit --audio`: decoded and checked on the control plane.

Any container and codec ffmpeg reads (WAV, MP3, M4A/AAC, FLAC, ...) at any sample
rate and channel count becomes mono 16-bit PCM at 22050 Hz, the rate of the TTS
engines (models/wav.py), so the rest of the pipeline sees the same audio as for a
script job.
Refused with one clear line (InvalidInput), before any job row exists: a file
ffmpeg cannot decode as audio, an empty one, one that is silent throughout, and
one longer than FARM_MAX_AUDIO_SECONDS. Decoding stops just past the limit, so
an hours-long file costs no more than a file at the limit.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np

from farm.errors import InvalidInput
from farm.media import ffmpeg_exe
from models.base import Speech
from models.wav import SAMPLE_RATE, write_wav

# Windows of 20 ms; a file whose loudest window stays under -50 dBFS RMS is silence.
_WINDOW_S = 0.02
_SILENCE_DBFS = -50.0
_DECODE_TIMEOUT_S = 300


def decode_argv(exe: str, path: Path, max_seconds: float) -> list[str]:
    """ffmpeg: the first audio stream of `path` as mono s16le at 22050 Hz on stdout,
    at most a little over `max_seconds` of it."""
    return [
        exe, "-hide_banner", "-nostdin", "-loglevel", "error",
        "-i", str(path),
        "-map", "0:a:0", "-vn", "-sn", "-dn",
        "-t", f"{max_seconds + 1.0:.3f}",
        "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "s16le", "-",
    ]  # fmt: skip


def decode(path: Path, max_seconds: float) -> np.ndarray:
    """Mono int16 samples at SAMPLE_RATE, or InvalidInput saying what is wrong."""
    if not path.is_file():
        raise InvalidInput(f"no such audio file: {path}")
    if path.stat().st_size == 0:
        raise InvalidInput(f"the audio file {path.name} is empty")
    try:
        proc = subprocess.run(
            decode_argv(ffmpeg_exe(), path, max_seconds),
            capture_output=True,
            timeout=_DECODE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        raise InvalidInput(f"{path.name}: decoding took over {_DECODE_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        reason = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        detail = reason[-1] if reason else f"ffmpeg exit {proc.returncode}"
        raise InvalidInput(f"{path.name} is not a readable audio file ({detail[:200]})")
    samples = np.frombuffer(proc.stdout[: len(proc.stdout) // 2 * 2], "<i2").astype(np.int16)
    check(samples, path.name, max_seconds)
    return samples


def check(samples: np.ndarray, name: str, max_seconds: float) -> None:
    """Refuse empty, silent and too-long audio (pure: testable without ffmpeg)."""
    seconds = samples.size / SAMPLE_RATE
    if samples.size < int(_WINDOW_S * SAMPLE_RATE):
        raise InvalidInput(f"{name} has no audio in it")
    if seconds > max_seconds:
        raise InvalidInput(
            f"{name} is longer than the limit of {max_seconds:g} s (FARM_MAX_AUDIO_SECONDS)"
        )
    if loudest_window_dbfs(samples) < _SILENCE_DBFS:
        raise InvalidInput(f"{name} is silent: there is no speech to animate")


def loudest_window_dbfs(samples: np.ndarray) -> float:
    """RMS level of the loudest 20 ms window, in dB relative to full scale."""
    n = int(_WINDOW_S * SAMPLE_RATE)
    usable = samples.size - samples.size % n
    if usable == 0:
        return -120.0
    x = samples[:usable].astype(np.float64).reshape(-1, n) / 32768.0
    rms = float(np.sqrt((x**2).mean(axis=1)).max())
    return 20.0 * np.log10(max(rms, 1e-6))


def to_wav(samples: np.ndarray) -> bytes:
    """Mono 16-bit PCM WAV at SAMPLE_RATE."""
    buf = io.BytesIO()
    write_wav(Speech(samples=samples, sample_rate=SAMPLE_RATE), buf)
    return buf.getvalue()
