"""farm/quality.py's figures on made-up signals (issue 14): lag sign, silences, closure."""

from __future__ import annotations

import numpy as np
import pytest

from farm import quality


def _speechlike(n: int, seed: int = 0) -> np.ndarray:
    """Per-frame RMS: syllables (random levels) with long silences between phrases."""
    rng = np.random.default_rng(seed)
    rms = np.abs(rng.normal(0.2, 0.1, n)) * (np.sin(np.arange(n) * 1.3) > -0.2)
    for start in range(20, n, 60):
        rms[start : start + 15] = 0.001  # 600 ms silences at 25 fps
    return rms


@pytest.mark.parametrize("shift", [-2, 0, 1])
def test_best_lag_has_the_sign_of_the_mouth_leading(shift: int) -> None:
    rms = _speechlike(400)
    # opening[t] = rms[t + shift]: the mouth shows now what is heard `shift` frames later.
    opening = np.roll(rms, -shift)
    fig = quality.figures(opening, rms, 25, 16.0, 16.0)
    assert fig.best_lag == shift and fig.sync_corr > 0.95


def test_silences_are_long_quiet_runs_less_their_edges() -> None:
    rms = np.full(100, 1.0)
    rms[10:20] = 0.05  # 400 ms: counted, less two frames at each edge
    rms[40:46] = 0.05  # 240 ms: too short
    rms[60:68] = 0.2  # not below 10% of the loud level
    assert quality.silent_frames(rms, 25).tolist() == list(range(12, 18))


def test_closed_in_silence_counts_frames_near_the_minimum() -> None:
    rms = np.full(100, 1.0)
    rms[10:30] = 0.0  # silent frames 12..27 (16)
    opening = np.full(100, 0.10)
    opening[0] = 0.0  # range 0 .. 0.1: closed is <= 0.015
    opening[12:24] = 0.01  # 12 of 16 closed
    fig = quality.figures(opening, rms, 25, 4.0, 4.0, input_seconds=4.0)
    assert fig.silent_frames == 16 and fig.closed_in_silence == pytest.approx(0.75)


def test_targets() -> None:
    base = dict(frames=10, corr_by_lag={}, silent_frames=10, audio_seconds=10.0)
    ok = quality.Figures(
        sync_corr=0.65, best_lag=0, closed_in_silence=0.96, video_seconds=10.0, **base
    )
    assert ok.meets_targets()
    for change in (
        {"sync_corr": 0.55},
        {"best_lag": -2},
        {"closed_in_silence": 0.9},
        {"input_seconds": 9.2},  # a padded audio-only job
    ):
        fields = {**ok.__dict__, **change}
        assert not quality.Figures(**fields).meets_targets(), change


def test_input_audio_found_inside_the_mp4s_audio() -> None:
    rng = np.random.default_rng(3)
    given = (rng.normal(0, 0.2, 8000).clip(-1, 1) * 32767).astype(np.int16)  # 0.5 s at 16 kHz
    # The MP4's audio at 16 kHz, 20 ms later (a padded or shifted timeline would show this).
    heard = np.concatenate([np.zeros(320), given / 32768.0])
    offset, corr = quality.compare_audio(given, 16_000, heard, 16_000)
    assert offset == pytest.approx(20.0, abs=0.2) and corr > 0.99
