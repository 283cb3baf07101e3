"""The farm's audio: mono int16 at SAMPLE_RATE, WAV files and resampling.

Every audio path meets here: the TTS engines write their speech at SAMPLE_RATE,
audio handed to `farm submit --audio` is decoded to it (farm/audio.py), the job's
timeline is stored as WAV. numpy and the standard library only: the CLI imports
this module and never imports torch.
"""

from __future__ import annotations

import wave
from pathlib import Path
from typing import BinaryIO

import numpy as np

from farm.errors import InvalidInput
from models.base import Speech

__all__ = [
    "PEAK",
    "SAMPLE_RATE",
    "normalise_peak",
    "read_wav",
    "resample",
    "to_float",
    "to_int16",
    "write_wav",
]

SAMPLE_RATE = 22050
# Speech is written at this share of full scale: headroom for the AAC encoder.
PEAK = 0.9

_INT16_MAX = 32767


def to_int16(audio: np.ndarray) -> np.ndarray:
    """Float audio in [-1, 1] as int16 samples (clipped)."""
    return np.clip(np.rint(audio * _INT16_MAX), -_INT16_MAX, _INT16_MAX).astype(np.int16)


def to_float(samples: np.ndarray) -> np.ndarray:
    """int16 samples as float64 audio in [-1, 1]: the inverse of to_int16."""
    return samples.astype(np.float64) / _INT16_MAX


def normalise_peak(audio: np.ndarray) -> np.ndarray:
    """Float audio scaled so that its loudest sample is at PEAK (silence is left alone)."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    return audio * (PEAK / peak) if peak > 1e-6 else audio


# --- WAV files -------------------------------------------------------------------------------


def write_wav(speech: Speech, path: str | Path | BinaryIO) -> None:
    """Write mono 16-bit PCM to a path or a binary file object."""
    samples = np.asarray(speech.samples)
    if samples.ndim != 1 or samples.dtype != np.int16:
        raise InvalidInput("speech samples must be mono int16")
    with wave.open(_wave_target(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(int(speech.sample_rate))
        wav.writeframes(samples.astype("<i2").tobytes())


def read_wav(path: str | Path | BinaryIO) -> tuple[np.ndarray, int]:
    """Read a PCM WAV (path or binary file object) as mono int16, channels averaged,
    and its sample rate."""
    try:
        with wave.open(_wave_target(path), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            data = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise InvalidInput(f"not a readable PCM WAV file: {path}: {exc}") from exc
    samples = _pcm_to_int16(data, width)
    if channels > 1:
        usable = samples.size - samples.size % channels
        samples = samples[:usable].reshape(-1, channels).mean(axis=1).round().astype(np.int16)
    return samples, rate


def _wave_target(path: str | Path | BinaryIO) -> str | BinaryIO:
    # wave.open takes a file name or a binary file object (BytesIO for the store).
    return str(path) if isinstance(path, str | Path) else path


def _pcm_to_int16(data: bytes, width: int) -> np.ndarray:
    if width == 1:  # 8-bit WAV is unsigned
        return ((np.frombuffer(data, np.uint8).astype(np.int16) - 128) << 8).astype(np.int16)
    if width == 2:
        return np.frombuffer(data, "<i2").astype(np.int16)
    if width == 3:
        raw = np.frombuffer(data, np.uint8).reshape(-1, 3)
        return (raw[:, 2].astype(np.int8).astype(np.int16) << 8) | raw[:, 1].astype(np.int16)
    if width == 4:
        return (np.frombuffer(data, "<i4") >> 16).astype(np.int16)
    raise InvalidInput(f"unsupported WAV sample width: {width} bytes")


# --- resampling ------------------------------------------------------------------------------

_RESAMPLE_ZERO_CROSSINGS = 16
_RESAMPLE_PASSBAND = 0.92
_RESAMPLE_BLOCK = 8192


def resample(samples: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited (Hann-windowed sinc) resampling of int16 mono audio.

    Flat to ~0.85 of the lower Nyquist frequency, tones above it attenuated by 40 dB
    or more: plenty for speech heading to AAC, and no scipy.
    """
    if src_rate <= 0 or dst_rate <= 0:
        raise InvalidInput(f"bad sample rates {src_rate} -> {dst_rate}")
    if src_rate == dst_rate or samples.size == 0:
        return samples.astype(np.int16, copy=True)
    x = to_float(samples)
    n_out = int(round(x.size * dst_rate / src_rate))
    step = src_rate / dst_rate
    # Fraction of the source Nyquist that survives: the lower Nyquist, less a guard band
    # so that the filter's transition lies below it rather than straddling it.
    cutoff = _RESAMPLE_PASSBAND * min(1.0, dst_rate / src_rate)
    half = int(np.ceil(_RESAMPLE_ZERO_CROSSINGS / cutoff))
    offsets = np.arange(-half + 1, half + 1)
    out = np.empty(n_out)
    for first in range(0, n_out, _RESAMPLE_BLOCK):
        positions = np.arange(first, min(n_out, first + _RESAMPLE_BLOCK)) * step
        taps = np.floor(positions).astype(np.int64)[:, None] + offsets[None, :]
        distance = positions[:, None] - taps
        window = 0.5 * (1.0 + np.cos(np.pi * np.clip(distance / half, -1.0, 1.0)))
        kernel = cutoff * np.sinc(cutoff * distance) * window
        inside = (taps >= 0) & (taps < x.size)
        values = np.where(inside, x[np.clip(taps, 0, x.size - 1)], 0.0)
        out[first : first + positions.size] = np.sum(values * kernel, axis=1)
    return to_int16(out)
