"""The "espeak" voice: espeak-ng through ctypes on the library bundled in
``espeakng-loader``.

Timings come from its phoneme events (millisecond positions), mended where
espeak places them off the sound: a phoneme with no duration borrows from the
one before, and a stop gets back the silent closure espeak writes before its
burst. The library loads once per process, lazily, on first use.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from typing import Any

import numpy as np

from farm.errors import MissingDependency, PermanentError
from models.tts.phones import Raw
from models.wav import SAMPLE_RATE, normalise_peak, resample, to_float, to_int16


def synthesize(
    text: str,
    rate: float = 1.0,
    words: list[tuple[float, int]] | None = None,
    language: str | None = None,
) -> tuple[np.ndarray, list[Raw]]:
    """`text` spoken at SAMPLE_RATE as int16, and its timed phoneme events; `rate` times
    the voice's own speed. `words`, when given, receives each word's (start seconds,
    0-based character index in `text`). `language`: an espeak-ng voice name ("de");
    None is the built-in voice's US English."""
    engine = _engine()
    samples, events, word_events = engine.speak(text, rate, language)
    if words is not None:
        words.extend((ms / 1000.0, max(pos - 1, 0)) for ms, pos in word_events)
    if samples.size == 0:
        return samples, []
    samples = resample(to_int16(normalise_peak(to_float(samples))), engine.rate, SAMPLE_RATE)
    # Event times are in milliseconds of audio, so they survive resampling unchanged.
    return samples, _closures(_raw(events, samples.size / SAMPLE_RATE), samples)


def phonemize(text: str) -> str:
    """IPA of `text` from espeak-ng's text-to-phoneme pass (no audio is synthesised):
    phones separated by "_", words by spaces, stress marks on their phone."""
    return _engine().phonemes(text)


def has_voice(language: str) -> bool:
    """Whether espeak-ng has a voice of that name ("de", "fr", "pt-br")."""
    return _engine().has_voice(language)


# --- timings ---------------------------------------------------------------------------------

# Share of the previous phone given to a phoneme espeak reports with no duration.
_BORROW = 0.4


def _raw(events: list[tuple[str, int]], seconds: float) -> list[Raw]:
    """Each phoneme runs from its event to the next one (the last to the end of the audio).

    espeak sometimes posts a phoneme at the same millisecond as the next event
    (a final /l/ folded into its vowel); it then borrows the tail of the phone
    before it so that it is not lost.
    """
    if not events:
        return []
    starts = np.maximum.accumulate(np.array([ms for _, ms in events], dtype=np.float64)) / 1000.0
    ends = np.append(starts[1:], max(seconds, starts[-1]))
    for i in range(1, len(events)):
        empty = ends[i] - starts[i] <= 0.0
        if empty and events[i][0] and events[i - 1][0] and ends[i - 1] > starts[i - 1]:
            split = ends[i - 1] - _BORROW * (ends[i - 1] - starts[i - 1])
            ends[i - 1], starts[i] = split, split
    names = [name for name, _ in events]
    return [(n, float(s), float(e)) for n, s, e in zip(names, starts, ends, strict=True)]


_STOPS = frozenset("pbtdkgɡ")
_DIGITAL_SILENCE = 16  # int16; espeak writes stop closures as exact zeros
_MAX_CLOSURE_S = 0.15
_KEEP_OF_PREVIOUS = 0.3


def _closures(raw: list[Raw], samples: np.ndarray) -> list[Raw]:
    """Give stops their closure.

    espeak posts an unvoiced stop (and a voiced one after a consonant) at its
    burst and writes the silent closure before it, inside the previous phoneme.
    The lips are shut during the closure, so the stop's span starts there.
    """
    out = list(raw)
    rate = float(SAMPLE_RATE)
    for i in range(1, len(out)):
        name, start, end = out[i]
        prev_name, prev_start, prev_end = out[i - 1]
        if not name or name.lstrip("ˈˌ")[:1] not in _STOPS or not prev_name:
            continue
        begin = _silent_run_before(samples, int(start * rate), int(_MAX_CLOSURE_S * rate))
        floor = prev_start + _KEEP_OF_PREVIOUS * (prev_end - prev_start)
        new_start = max(begin / rate, floor)
        if new_start < start:
            out[i - 1] = (prev_name, prev_start, new_start)
            out[i] = (name, new_start, end)
    return out


def _silent_run_before(samples: np.ndarray, end: int, limit: int) -> int:
    """Index where the run of near-zero samples that ends at `end` begins."""
    window = np.abs(samples[max(0, end - limit) : end].astype(np.int32)) <= _DIGITAL_SILENCE
    loud = np.flatnonzero(~window)
    return end - (window.size - (loud[-1] + 1 if loud.size else 0))


# --- the library -----------------------------------------------------------------------------

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_PHONEME_EVENTS = 0x0001
_INIT_PHONEME_IPA = 0x0002
_INIT_DONT_EXIT = 0x8000  # without it espeak calls exit() on a fatal error
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_PHONEME = 7
_EVENT_WORD = 1
_PARAMETER_RATE = 1
# espeak_TextToPhonemes phonememode: bit 1 IPA, bits 8-23 the separator between phones.
_PHONEMES_IPA_SEPARATED = 0x02 | (ord("_") << 8)
_VOICE = b"en-us"


@functools.cache
def _engine() -> _Espeak:
    return _Espeak()


class _Event(ctypes.Structure):
    # espeak_EVENT from speak_lib.h; `id` is a union whose phoneme member is char[8].
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # milliseconds
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


class _Espeak:
    """The espeak-ng library: global state, so one instance and one synthesis at a time."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:
            raise MissingDependency(
                "the 'espeak' voice needs espeakng-loader (pip install espeakng-loader)"
            ) from exc
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        lib.espeak_TextToPhonemes.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_int,
            ctypes.c_int,
        ]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        options = _INIT_PHONEME_EVENTS | _INIT_PHONEME_IPA | _INIT_DONT_EXIT
        data = espeakng_loader.get_data_path().encode()
        self.rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, options)
        if self.rate <= 0:
            raise PermanentError(f"espeak-ng failed to initialise (code {self.rate})")
        if lib.espeak_SetVoiceByName(_VOICE) != 0:
            raise PermanentError("espeak-ng has no en-us voice")
        self._lib = lib
        self._lock = threading.Lock()
        self._audio: list[np.ndarray] = []
        self._events: list[tuple[str, int]] = []
        self._words: list[tuple[int, int]] = []
        self._callback = _SYNTH_CALLBACK(self._on_synth)  # kept alive as long as the library
        lib.espeak_SetSynthCallback(self._callback)

    def has_voice(self, language: str) -> bool:
        with self._lock:
            found = self._lib.espeak_SetVoiceByName(language.encode("utf-8")) == 0
            self._lib.espeak_SetVoiceByName(_VOICE)
            return found

    def speak(
        self, text: str, rate: float = 1.0, language: str | None = None
    ) -> tuple[np.ndarray, list[tuple[str, int]], list[tuple[int, int]]]:
        """`text` as int16 at the library's rate, its (phoneme, milliseconds) events and
        its (milliseconds, 1-based character position) word events; in `language` (an
        espeak-ng voice name), else the default voice."""
        encoded = text.encode("utf-8")
        with self._lock:
            if language is not None:
                if self._lib.espeak_SetVoiceByName(language.encode("utf-8")) != 0:
                    self._lib.espeak_SetVoiceByName(_VOICE)
                    raise PermanentError(f"espeak-ng has no voice {language!r}")
                try:
                    return self._speak(encoded, rate)
                finally:
                    self._lib.espeak_SetVoiceByName(_VOICE)
            return self._speak(encoded, rate)

    def _speak(
        self, encoded: bytes, rate: float
    ) -> tuple[np.ndarray, list[tuple[str, int]], list[tuple[int, int]]]:
        """One synthesis in the current voice; the caller holds the lock."""
        self._audio, self._events, self._words = [], [], []
        default = self._lib.espeak_GetParameter(_PARAMETER_RATE, 1)
        if rate != 1.0:
            self._lib.espeak_SetParameter(_PARAMETER_RATE, int(round(default * rate)), 0)
        try:
            status = self._lib.espeak_Synth(
                encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
            )
        finally:
            if rate != 1.0:
                self._lib.espeak_SetParameter(_PARAMETER_RATE, default, 0)
        if status != 0:
            raise PermanentError(f"espeak-ng synthesis failed (code {status})")
        audio = np.concatenate(self._audio) if self._audio else np.zeros(0, np.int16)
        return audio.astype(np.int16), list(self._events), list(self._words)

    def phonemes(self, text: str) -> str:
        """IPA of `text` without synthesising it: phones separated by "_", words by " "."""
        buf = ctypes.create_string_buffer(text.encode("utf-8"))
        pointer = ctypes.c_void_p(ctypes.addressof(buf))
        clauses: list[str] = []
        with self._lock:
            while pointer.value:
                out = self._lib.espeak_TextToPhonemes(
                    ctypes.byref(pointer), _CHARS_UTF8, _PHONEMES_IPA_SEPARATED
                )
                if out:
                    clauses.append(out.decode("utf-8", "ignore"))
        return " ".join(c.strip() for c in clauses if c.strip())

    def _on_synth(self, wav: Any, count: int, events: Any) -> int:
        if count > 0 and wav:
            self._audio.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            event = events[i]
            if event.type == _EVENT_PHONEME:
                name = bytes(event.id).split(b"\0", 1)[0].decode("utf-8", "ignore")
                self._events.append((name, event.audio_position))
            elif event.type == _EVENT_WORD:
                self._words.append((event.audio_position, event.text_position))
            i += 1
        return 0  # continue synthesis
