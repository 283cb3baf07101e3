"""Text to speech with per-phoneme timings.

Engines (``VOICES``):

- ``"joe"`` (default): Piper with the en_US-joe-medium voice (models/tts/piper.py).
- ``"espeak"``: espeak-ng through ctypes (models/tts/espeak.py).

Both return mono int16 at models.wav.SAMPLE_RATE (22050 Hz) and the same phone
list (models/tts/phones.py): phones that tile the audio from 0 to its end, pauses
and silence included. WAV files and resampling are models/wav.py's.

Light to import: an engine module, and the engine itself, load on first use.
"""

from __future__ import annotations

from farm.errors import InvalidInput
from models.base import Phone, Speech
from models.tts.phones import phones_from_json, phones_from_raw, phones_to_json
from models.visemes import SILENCE
from models.wav import SAMPLE_RATE

__all__ = [
    "SILENCE",
    "VOICES",
    "Phone",
    "Speech",
    "phones_from_json",
    "phones_to_json",
    "phonemize",
    "synthesize",
]

VOICES: tuple[str, ...] = ("joe", "espeak")


def synthesize(text: str, voice: str = "joe") -> Speech:
    """Speak `text` with `voice`; phones are relative to the start of the returned audio.

    Raises InvalidInput for an unknown voice or text with nothing to say, and
    MissingDependency when the engine's package is not installed.
    """
    if voice not in VOICES:
        raise InvalidInput(f"unknown voice {voice!r}; valid voices: {', '.join(VOICES)}")
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput("nothing to synthesise: the text is empty")
    if voice == "joe":
        from models.tts import piper as engine
    else:
        from models.tts import espeak as engine
    samples, raw = engine.synthesize(text.strip())
    if samples.size == 0:
        raise InvalidInput(f"the text produced no speech: {text[:60]!r}")
    seconds = samples.size / SAMPLE_RATE
    return Speech(samples=samples, sample_rate=SAMPLE_RATE, phones=phones_from_raw(raw, seconds))


def phonemize(text: str) -> str:
    """IPA of `text` from espeak-ng's text-to-phoneme pass (no audio is synthesised):
    phones separated by "_", words by spaces, stress marks on their phone."""
    from models.tts import espeak

    return espeak.phonemize(text)
