"""models/wav.py on its own: WAV reading and writing, resampling, and the CLI's WAV
of `farm submit --audio` input (farm.audio.to_wav), which it writes."""

from __future__ import annotations

import io
import math
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from farm import audio
from farm.errors import InvalidInput
from models import wav
from models.base import Speech


def db(samples: np.ndarray) -> float:
    x = samples.astype(np.float64) / 32768.0
    return 10 * math.log10(float(np.mean(x**2)) + 1e-12)


def tone(freq: float, rate: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.round(amplitude * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64) * np.hanning(samples.size)))
    return float(np.argmax(spectrum) * rate / samples.size)


def test_write_then_read_gives_the_samples_back(tmp_path: Path) -> None:
    samples = tone(440.0, wav.SAMPLE_RATE, seconds=0.1)
    path = tmp_path / "tone.wav"
    wav.write_wav(Speech(samples=samples, sample_rate=wav.SAMPLE_RATE), path)
    with wave.open(str(path), "rb") as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate()) == (1, 2, 22050)
    read, rate = wav.read_wav(path)
    assert rate == wav.SAMPLE_RATE and read.dtype == np.int16
    assert np.array_equal(read, samples)


def test_write_wav_refuses_what_is_not_mono_int16() -> None:
    for samples in (np.zeros(10, np.float32), np.zeros((10, 2), np.int16)):
        with pytest.raises(InvalidInput):
            wav.write_wav(Speech(samples=samples, sample_rate=8000), io.BytesIO())


def test_to_wav_of_submitted_audio_is_a_wav_at_the_farm_rate() -> None:
    samples = tone(300.0, wav.SAMPLE_RATE, seconds=0.05)
    data = audio.to_wav(samples)
    assert audio.SAMPLE_RATE == wav.SAMPLE_RATE
    read, rate = wav.read_wav(io.BytesIO(data))
    assert rate == wav.SAMPLE_RATE and np.array_equal(read, samples)


def test_read_wav_downmixes_stereo_and_widens_8_bit(tmp_path: Path) -> None:
    stereo = tmp_path / "stereo.wav"
    frames = np.array([[1000, 3000], [-2000, -4000]], dtype="<i2")
    with wave.open(str(stereo), "wb") as f:
        f.setnchannels(2)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes(frames.tobytes())
    samples, rate = wav.read_wav(stereo)
    assert rate == 16000 and samples.tolist() == [2000, -3000]
    narrow = tmp_path / "narrow.wav"
    with wave.open(str(narrow), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(1)
        f.setframerate(8000)
        f.writeframes(bytes([128, 255, 0]))
    samples, _ = wav.read_wav(narrow)
    assert samples.tolist() == [0, 127 * 256, -128 * 256]


def test_read_wav_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "not.wav"
    path.write_bytes(b"definitely not a wav file")
    with pytest.raises(InvalidInput):
        wav.read_wav(path)


def test_int16_conversions_clip_and_invert() -> None:
    audio_in = np.array([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
    samples = wav.to_int16(audio_in)
    assert samples.dtype == np.int16
    assert samples.tolist() == [-32767, -32767, -16384, 0, 16384, 32767, 32767]
    assert np.allclose(wav.to_float(samples), np.clip(audio_in, -1, 1), atol=1e-4)


def test_normalise_peak_leaves_headroom_and_silence_alone() -> None:
    assert np.max(np.abs(wav.normalise_peak(np.array([0.1, -0.2, 0.05])))) == pytest.approx(
        wav.PEAK
    )
    silence = np.zeros(5)
    assert np.array_equal(wav.normalise_peak(silence), silence)


@pytest.mark.parametrize(("src", "freq"), [(16000, 1000.0), (24000, 3000.0), (44100, 440.0)])
def test_resample_keeps_pitch_level_and_length(src: int, freq: float) -> None:
    out = wav.resample(tone(freq, src), src, 22050)
    assert out.dtype == np.int16
    assert abs(out.size - 22050) <= 1
    assert dominant_frequency(out, 22050) == pytest.approx(freq, abs=3)
    middle = out[2000:-2000].astype(np.float64)
    expected = tone(freq, 22050)[2000:-2000].astype(np.float64)
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(np.sqrt(np.mean(expected**2)), rel=0.02)


@pytest.mark.parametrize("freq", [12000.0, 15000.0])
def test_resample_removes_what_the_new_rate_cannot_hold(freq: float) -> None:
    # Above 11025 Hz a tone cannot exist at 22050 Hz: it must vanish, not alias down.
    out = wav.resample(tone(freq, 44100), 44100, 22050)
    assert db(out[500:-500]) < db(tone(freq, 44100)) - 40


def test_resample_same_rate_is_identity() -> None:
    x = tone(500.0, 22050)
    assert np.array_equal(wav.resample(x, 22050, 22050), x)


def test_resample_refuses_a_bad_rate() -> None:
    with pytest.raises(InvalidInput):
        wav.resample(tone(500.0, 8000), 0, 22050)


def test_the_audio_modules_and_tts_import_no_engine_and_no_torch() -> None:
    # The CLI imports farm.audio; models.tts loads an engine only when it speaks.
    code = (
        "import sys, farm.audio, models.wav, models.tts\n"
        "heavy = [m for m in ('torch', 'piper', 'onnx', 'espeakng_loader', 'models.tts.piper',"
        " 'models.tts.espeak') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
