"""IPA phonemes to visemes, and visemes to mouth-channel targets.

Both TTS engines emit espeak-ng flavoured IPA: single code points from Piper,
whole phonemes ("ˈaʊ", "dʒ", "ɑːɹ") from espeak's phoneme events. Everything
here works on either form and never raises on a symbol it does not know: an
unfamiliar vowel falls back to a neutral schwa shape, anything else to a
relaxed half-open mouth, so a new phonemizer version degrades instead of failing
a job.

Pure functions and constant tables only; no numpy state.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache

import numpy as np

from models.base import CHANNELS

# The phone symbol for a pause (sentence/clause break, leading and trailing silence).
SILENCE = "_"

MOUTH_CHANNELS: tuple[str, ...] = (
    "jaw_open",
    "lip_spread",
    "lip_round",
    "lip_press",
    "lower_lip_tuck",
    "upper_lip_raise",
    "tongue_tip",
)
MOUTH_INDEX: tuple[int, ...] = tuple(CHANNELS.index(name) for name in MOUTH_CHANNELS)

# Targets in MOUTH_CHANNELS order. Values are what a clearly articulated
# phoneme looks like at its centre; coarticulation (models.motion) blends them.
VISEME_TARGETS: dict[str, tuple[float, ...]] = {
    #                jaw   spread round press tuck  raise tongue
    "rest": (0.00, 0.00, 0.00, 0.15, 0.00, 0.00, 0.00),
    "bilabial": (0.00, 0.00, 0.00, 1.00, 0.00, 0.00, 0.00),
    "labiodental": (0.08, 0.10, 0.00, 0.00, 1.00, 0.35, 0.00),
    "rounded": (0.18, 0.00, 1.00, 0.00, 0.00, 0.00, 0.00),
    "rounded_open": (0.45, 0.00, 0.70, 0.00, 0.00, 0.05, 0.00),
    "spread": (0.25, 0.80, 0.00, 0.00, 0.00, 0.20, 0.00),
    "open": (0.75, 0.25, 0.00, 0.00, 0.00, 0.10, 0.00),
    "mid": (0.35, 0.15, 0.05, 0.00, 0.00, 0.05, 0.00),
    "alveolar": (0.20, 0.15, 0.00, 0.00, 0.00, 0.05, 1.00),
    "dental": (0.20, 0.15, 0.00, 0.00, 0.00, 0.15, 0.90),
    "sibilant": (0.08, 0.45, 0.00, 0.00, 0.00, 0.35, 0.20),
    "postalveolar": (0.12, 0.00, 0.55, 0.00, 0.00, 0.30, 0.10),
    "velar": (0.30, 0.10, 0.00, 0.00, 0.00, 0.00, 0.00),
    "rhotic": (0.20, 0.00, 0.45, 0.00, 0.00, 0.10, 0.00),
    "neutral": (0.30, 0.10, 0.00, 0.00, 0.00, 0.00, 0.00),
}

# How strongly a viseme holds each channel against its neighbours (a dominance
# model of coarticulation). Tongue-only consonants barely touch the lips, so the
# rounding of "two" starts on the /t/; lip consonants own the lips.
_LOW, _MID, _HIGH, _OWN = 0.15, 1.0, 2.0, 8.0
VISEME_DOMINANCE: dict[str, tuple[float, ...]] = {
    #                 jaw   spread round press tuck  raise tongue
    "rest": (_MID, _MID, _MID, _MID, _MID, _MID, _MID),
    "bilabial": (_OWN, _LOW, _LOW, _OWN, _OWN, _MID, _LOW),
    "labiodental": (_HIGH, _LOW, _LOW, _HIGH, _OWN, _HIGH, _LOW),
    "rounded": (_HIGH, _HIGH, _HIGH, _MID, _MID, _MID, _LOW),
    "rounded_open": (_HIGH, _HIGH, _HIGH, _MID, _MID, _MID, _LOW),
    "spread": (_HIGH, _HIGH, _HIGH, _MID, _MID, _MID, _LOW),
    "open": (_HIGH, _HIGH, _HIGH, _MID, _MID, _MID, _LOW),
    "mid": (_MID, _MID, _MID, _MID, _MID, _MID, _LOW),
    "alveolar": (_MID, _LOW, _LOW, _MID, _MID, _LOW, _HIGH),
    "dental": (_MID, _LOW, _LOW, _MID, _MID, _MID, _HIGH),
    "sibilant": (_HIGH, _MID, _LOW, _MID, _MID, _MID, _MID),
    "postalveolar": (_HIGH, _MID, _HIGH, _MID, _MID, _MID, _MID),
    "velar": (_MID, _LOW, _LOW, _MID, _MID, _LOW, _LOW),
    "rhotic": (_MID, _MID, _HIGH, _MID, _MID, _LOW, _LOW),
    "neutral": (_LOW, _LOW, _LOW, _LOW, _LOW, _LOW, _LOW),
}

VISEMES: tuple[str, ...] = tuple(VISEME_TARGETS)

_SINGLE: dict[str, str] = {}


def _assign(viseme: str, chars: str) -> None:
    for char in chars:
        _SINGLE[char] = viseme


_assign("bilabial", "pbmɸβʙ")
_assign("labiodental", "fvɱʋⱱ")
_assign("rounded", "uʊwʍʉyʏɥ")
_assign("rounded_open", "oɔɒɵøœɶ")
_assign("spread", "ieɪɛjɨ")
_assign("open", "aɑæʌɐ")
_assign("mid", "əɚɜɝɘɞᵻɤɯ")
_assign("alveolar", "ltdnɾɫɬɮɭɳɖʈɲʎɺ")
_assign("dental", "θð")
_assign("sibilant", "szʦʣ")
_assign("postalveolar", "ʃʒʂʐɕʑ")
_assign("velar", "kgɡŋxɣχʁʀqɢɴçʝɟcɰʟ")
_assign("rhotic", "ɹrɻ")
_assign("neutral", "hɦʔʕħʜʢ")

# Affricates and other clusters that are one gesture, matched before single characters.
_CLUSTERS: dict[str, str] = {
    "tʃ": "postalveolar",
    "dʒ": "postalveolar",
    "tɕ": "postalveolar",
    "dʑ": "postalveolar",
    "ts": "sibilant",
    "dz": "sibilant",
}

_VOWEL_CHARS = frozenset("aeiouyæøœɐɑɒɔəɘɚɛɜɝɞɤɨɪɯɵɶʉʊʌʏᵻ")
_STRESS_MARKS = {"ˈ": 2, "ˌ": 1}
# The first unit of a diphthong carries most of it ("aɪ" is mostly /a/ gliding to /ɪ/).
_FIRST_UNIT_WEIGHT = 1.5


def _is_attachment(char: str) -> bool:
    """Length marks, diacritics, tie bars, modifier letters: they refine a phone
    but do not change its viseme."""
    category = unicodedata.category(char)
    return category.startswith("M") or category in ("Lm", "Sk")


def strip_symbol(symbol: str) -> str:
    """The base letters of an IPA symbol: no stress, length, tie bars or diacritics."""
    decomposed = unicodedata.normalize("NFD", symbol)
    return "".join(c for c in decomposed if not _is_attachment(c) and c.isalpha())


def stress_of(symbol: str) -> int:
    """0 none, 1 secondary, 2 primary, from the strongest mark in the symbol."""
    return max((_STRESS_MARKS.get(c, 0) for c in symbol), default=0)


def is_silence(symbol: str) -> bool:
    """Pauses, word boundaries, punctuation and empty symbols all mean "no sound"."""
    return not strip_symbol(symbol)


def is_vowel(symbol: str) -> bool:
    """True when the phone contains a vowel (monophthong, diphthong, r-coloured vowel)."""
    return any(c in _VOWEL_CHARS for c in strip_symbol(symbol))


def is_known(symbol: str) -> bool:
    """True when every base letter of the symbol has a viseme of its own (no fallback)."""
    return all(c in _SINGLE for c in strip_symbol(symbol))


def _fallback(char: str) -> str:
    if char in _VOWEL_CHARS:
        return "mid"
    # Accented Latin letters decompose to a known base ("é" -> "e").
    base = unicodedata.normalize("NFD", char)[0]
    if base != char and base in _SINGLE:
        return _SINGLE[base]
    return "neutral"


def _units(base: str) -> list[str]:
    """Split base letters into articulatory units, clusters first."""
    units: list[str] = []
    i = 0
    while i < len(base):
        pair = base[i : i + 2]
        if pair in _CLUSTERS:
            units.append(_CLUSTERS[pair])
            i += 2
            continue
        units.append(_SINGLE.get(base[i]) or _fallback(base[i]))
        i += 1
    return units


@lru_cache(maxsize=4096)
def viseme_sequence(symbol: str) -> tuple[tuple[str, float], ...]:
    """The visemes a phone moves through, each with its share of the phone's span.

    "p" -> (("bilabial", 1.0),); "aɪ" -> (("open", 0.6), ("spread", 0.4));
    "eɪ" collapses to (("spread", 1.0),). Silence and unknown punctuation -> rest.
    """
    base = strip_symbol(symbol)
    if not base:
        return (("rest", 1.0),)
    merged: list[list] = []
    for index, viseme in enumerate(_units(base)):
        weight = _FIRST_UNIT_WEIGHT if index == 0 else 1.0
        if merged and merged[-1][0] == viseme:
            merged[-1][1] += weight
        else:
            merged.append([viseme, weight])
    total = sum(weight for _, weight in merged)
    return tuple((viseme, weight / total) for viseme, weight in merged)


def viseme_for(symbol: str) -> str:
    """The dominant viseme of a phone (the one with the largest share)."""
    return max(viseme_sequence(symbol), key=lambda item: item[1])[0]


def targets(viseme: str) -> np.ndarray:
    """Mouth-channel targets of a viseme, float32 in MOUTH_CHANNELS order."""
    return np.asarray(VISEME_TARGETS.get(viseme, VISEME_TARGETS["neutral"]), dtype=np.float32)


def dominance(viseme: str) -> np.ndarray:
    """Per-channel dominance weights of a viseme, float32 in MOUTH_CHANNELS order."""
    return np.asarray(VISEME_DOMINANCE.get(viseme, VISEME_DOMINANCE["neutral"]), dtype=np.float32)
