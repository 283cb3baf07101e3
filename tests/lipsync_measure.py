"""Measurements of rendered talking-head frames that trust nothing the renderer says.

The face is found again on the output pixels by mediapipe FaceMesh (the renderer's
own landmarks are never used), and the timing of what should happen comes from the
TTS phones and the audio, not from the motion track. Only the blink test reads the
track, because blinks are random by design and the plan is their only record.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from farm.quality import face_landmarks  # noqa: F401  (the project's own measure)
from models.base import Phone

# FaceMesh indices (canonical 468-point mesh; the same with refine_landmarks=True).
UPPER_INNER_LIP_MID = 13
LOWER_INNER_LIP_MID = 14
# Eyes in the subject's terms: "right" is the eye on the image's left.
RIGHT_EYE = {"upper": 159, "lower": 145, "outer": 33, "inner": 133}
LEFT_EYE = {"upper": 386, "lower": 374, "outer": 263, "inner": 362}

# Phones by the lip shape they must produce. Symbols come from Piper/espeak IPA with
# stress removed; length marks stay on the phone ("ɑː"), so match the first letter.
BILABIAL = frozenset("pbm")
OPEN_VOWEL = frozenset("aɑæʌ")


def _distance(points: np.ndarray, a: int, b: int) -> np.ndarray:
    return np.linalg.norm(points[:, a] - points[:, b], axis=-1)


def interocular(points: np.ndarray) -> np.ndarray:
    """Distance between the eye centres (mean of each eye's corners): a face scale that
    neither the mouth nor a blink changes."""
    right = (points[:, RIGHT_EYE["outer"]] + points[:, RIGHT_EYE["inner"]]) / 2
    left = (points[:, LEFT_EYE["outer"]] + points[:, LEFT_EYE["inner"]]) / 2
    return np.linalg.norm(left - right, axis=-1)


def lip_gap(points: np.ndarray) -> np.ndarray:
    """Inner-lip opening at the middle of the mouth, in inter-ocular distances."""
    gap = _distance(points, UPPER_INNER_LIP_MID, LOWER_INNER_LIP_MID)
    return gap / interocular(points)


def eye_aspect(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(subject's right, subject's left) eye: lid opening over eye width."""
    ratios = []
    for eye in (RIGHT_EYE, LEFT_EYE):
        height = _distance(points, eye["upper"], eye["lower"])
        ratios.append(height / _distance(points, eye["outer"], eye["inner"]))
    return ratios[0], ratios[1]


# --- timing ---------------------------------------------------------------------------------


def frame_times(count: int, fps: int) -> np.ndarray:
    """Frame centres in seconds: what the frame shows is the instant at its middle."""
    return (np.arange(count) + 0.5) / fps


def frames_in(times: np.ndarray, start: float, end: float) -> np.ndarray:
    """Indices of the frames whose centres lie in [start, end]."""
    return np.flatnonzero((times >= start) & (times <= end))


def sounding(phones: Sequence[Phone]) -> list[Phone]:
    """The phones that make sound (everything but the TTS silence symbol "_")."""
    return [p for p in phones if p.symbol.strip("_ ") and p.end > p.start]


def pauses(phones: Sequence[Phone], seconds: float, minimum: float) -> list[tuple[float, float]]:
    """Stretches of at least `minimum` seconds with no sounding phone, the lead-in and
    the tail included. Worked out here, not taken from models.motion, so that a wrong
    pause finder there cannot agree with itself."""
    sounds = sounding(phones)
    edges = [0.0] + [t for p in sounds for t in (p.start, p.end)] + [seconds]
    spans = list(zip(edges[::2], edges[1::2], strict=True))
    return [(a, b) for a, b in spans if b - a >= minimum]


def spans_of(phones: Sequence[Phone], first_letters: frozenset[str]) -> list[Phone]:
    return [p for p in sounding(phones) if p.symbol[0] in first_letters]


def merge_touching(phones: Sequence[Phone]) -> list[tuple[float, float]]:
    """Adjacent phones as one span ("b m" is one closure)."""
    spans: list[tuple[float, float]] = []
    for p in phones:
        if spans and abs(p.start - spans[-1][1]) < 1e-6:
            spans[-1] = (spans[-1][0], p.end)
        else:
            spans.append((p.start, p.end))
    return spans


def audio_rms_db(samples: np.ndarray, rate: int, count: int, fps: int) -> np.ndarray:
    """Per video frame: RMS of the audio under it, in dB relative to the loudest frame."""
    audio = samples.astype(np.float64) / 32768.0
    per = rate / fps
    rms = np.zeros(count)
    for i in range(count):
        under = audio[int(i * per) : int((i + 1) * per)]
        rms[i] = np.sqrt(np.mean(under**2)) if under.size else 0.0
    return 20 * np.log10(np.maximum(rms / max(rms.max(), 1e-12), 1e-9))


# --- pixels ---------------------------------------------------------------------------------


def consecutive_diffs(frames: np.ndarray) -> np.ndarray:
    """diffs[i] = mean |frame[i+1] - frame[i]| over all pixels and channels."""
    out = np.empty(len(frames) - 1)
    for i in range(len(frames) - 1):
        a, b = frames[i].astype(np.int16), frames[i + 1].astype(np.int16)
        out[i] = np.abs(b - a).mean()
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
