"""Text to speech with per-phoneme timings.

Engines (``VOICES``):

- ``"joe"`` (default): Piper with the en_US-joe-medium voice (models/tts/piper.py).
- ``"espeak"``: espeak-ng through ctypes (models/tts/espeak.py).
- a registered voice (`farm voice add`), which a worker resolves from its name
  (workers/voices.py): a Piper model's files as a ``PiperModel`` (same code path as
  joe), or an espeak-ng language as an ``EspeakVoice`` (same code path as espeak).

Both return mono int16 at models.wav.SAMPLE_RATE (22050 Hz) and the same phone
list (models/tts/phones.py): phones that tile the audio from 0 to its end, pauses
and silence included. WAV files and resampling are models/wav.py's.

Light to import: an engine module, and the engine itself, load on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from farm.errors import InvalidInput
from models.base import Phone, Speech
from models.tts.phones import (
    mark_emphasis,
    phones_from_json,
    phones_from_raw,
    phones_to_json,
    word_starts,
)
from models.visemes import SILENCE
from models.wav import SAMPLE_RATE

__all__ = [
    "SILENCE",
    "VOICES",
    "Phone",
    "EspeakVoice",
    "PiperModel",
    "Speech",
    "phones_from_json",
    "phones_to_json",
    "phonemize",
    "synthesize",
]

VOICES: tuple[str, ...] = ("joe", "espeak")


@dataclass(frozen=True)
class PiperModel:
    """A Piper voice's files: the ONNX model and its JSON config (models/tts/piper.py).
    A registered voice's files sit in a folder named by their digest (workers/voices.py),
    so a voice removed and added again with other files is other paths, loaded afresh."""

    model: Path
    config: Path


@dataclass(frozen=True)
class EspeakVoice:
    """espeak-ng in another language than the built-in voice's US English: `language`
    is an espeak-ng voice name ("de", "fr", "pt-br")."""

    language: str


def synthesize(
    text: str,
    voice: str | PiperModel | EspeakVoice = "joe",
    rate: float = 1.0,
    emphasis: list[tuple[int, int]] | tuple[()] = (),
) -> Speech:
    """Speak `text` with `voice` (a built-in name, a registered Piper voice's files or an
    espeak-ng language); phones are relative to the start of the returned audio.

    `rate`: times the voice's own speed. `emphasis`: character spans of `text` whose
    words' phones get ``Phone.emphasis`` (farm/markup.py). With neither, the result is
    exactly that of the text alone.

    Raises InvalidInput for an unknown voice or text with nothing to say, and
    MissingDependency when the engine's package is not installed.
    """
    if not isinstance(voice, PiperModel | EspeakVoice) and voice not in VOICES:
        raise InvalidInput(f"unknown voice {voice!r}; valid voices: {', '.join(VOICES)}")
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput("nothing to synthesise: the text is empty")
    if not 0.25 <= rate <= 4.0:
        raise InvalidInput(f"speaking rate {rate} is out of range")
    lead = len(text) - len(text.lstrip())
    spoken = text.strip()
    spans = [(max(a - lead, 0), max(b - lead, 0)) for a, b in emphasis if b > a]
    words: list[tuple[float, int]] = []
    if voice == "joe" or isinstance(voice, PiperModel):
        from models.tts import piper

        model = voice if isinstance(voice, PiperModel) else None
        samples, raw = piper.synthesize(spoken, rate, model)
    else:
        from models.tts import espeak

        language = voice.language if isinstance(voice, EspeakVoice) else None
        samples, raw = espeak.synthesize(spoken, rate, words, language)
    if samples.size == 0:
        raise InvalidInput(f"the text produced no speech: {text[:60]!r}")
    seconds = samples.size / SAMPLE_RATE
    phones = phones_from_raw(raw, seconds)
    if spans:
        if voice == "espeak" or isinstance(voice, EspeakVoice):
            phones = mark_emphasis(phones, _espeak_spans(words, spans))
        else:
            count = _word_counter(voice if isinstance(voice, PiperModel) else None)
            phones = mark_emphasis(phones, _piper_spans(raw, spoken, spans, count))
    return Speech(samples=samples, sample_rate=SAMPLE_RATE, phones=phones)


def _word_counter(model: PiperModel | None) -> Callable[[str], int]:
    """Words espeak-ng finds in a text: joe's through the espeak engine (en-us), a
    registered voice's through Piper's phonemizer in that voice's language."""
    if model is None:
        return lambda text: len(phonemize(text).split())
    from models.tts import piper

    return lambda text: piper.count_words(text, model)


def _piper_spans(
    raw: list, text: str, spans: list[tuple[int, int]], count: Callable[[str], int]
) -> list[tuple[float, float]]:
    """Seconds of each span's words: Piper's tokens mark word boundaries but not where
    in the text a word is, so a span is the words phonemized before its start up to
    those phonemized before its end (espeak-ng, Piper's own phonemizer, counts them)."""
    starts = word_starts(raw)
    out = []
    for a, b in spans:
        first = count(text[:a]) if text[:a].strip() else 0
        last = count(text[:b])
        if first < last and first < len(starts):
            out.append((starts[first], starts[last] if last < len(starts) else float("inf")))
    return out


def _espeak_spans(
    words: list[tuple[float, int]], spans: list[tuple[int, int]]
) -> list[tuple[float, float]]:
    """Seconds of each span's words from espeak's word events (start, character index)."""
    out = []
    for i, (start, at) in enumerate(words):
        if any(a <= at < b for a, b in spans):
            end = words[i + 1][0] if i + 1 < len(words) else float("inf")
            out.append((start, end))
    return out


def phonemize(text: str) -> str:
    """IPA of `text` from espeak-ng's text-to-phoneme pass (no audio is synthesised):
    phones separated by "_", words by spaces, stress marks on their phone."""
    from models.tts import espeak

    return espeak.phonemize(text)
