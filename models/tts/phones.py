"""The phone list: engine tokens folded into phones that tile the audio, and its JSON.

Both engines hand over timed tokens (`Raw`): a Piper code point or an espeak
phoneme event name, with its span in seconds. phones_from_raw folds them into
the farm's phone list: IPA symbols with stress marks removed (stress is in
``Phone.stress``), length marks and diacritics kept on the phone ("ɑː"),
diphthongs and affricates as one phone ("aɪ", "dʒ"). The phones tile the audio
from 0 to its end with no gaps: pauses, punctuation and leading/trailing silence
are phones with the symbol ``SILENCE`` ("_"); the short word-boundary slots
Piper emits are not pauses (they hold the next word's onset, e.g. a stop
closure), so they join the next phone.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any

from farm.errors import InvalidInput
from models.base import Phone
from models.visemes import SILENCE, is_silence, is_vowel, stress_of

# A raw timed token from an engine: (text, start seconds, end seconds). Text is
# one Piper code point or one espeak phoneme event name (which may carry a stress mark).
Raw = tuple[str, float, float]


def phones_from_raw(raw: list[Raw], total: float) -> list[Phone]:
    """The phones of an engine's tokens, tiling [0, total] seconds."""
    builder = _PhoneBuilder()
    for text, start, end in raw:
        builder.add(text, start, end)
    return _tile(_join_pairs(builder.finish()), total)


def phones_to_json(phones: list[Phone]) -> list[dict[str, Any]]:
    """Phones as plain dicts for JSON storage ("emphasis" only where it is set)."""
    return [
        {"symbol": p.symbol, "start": p.start, "end": p.end, "stress": p.stress}
        | ({"emphasis": True} if p.emphasis else {})
        for p in phones
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
                emphasis=bool(item.get("emphasis", False)),
            )
            for item in items
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInput(f"malformed phone timings: {exc}") from exc
    for phone in phones:
        if phone.end < phone.start or phone.stress not in (0, 1, 2):
            raise InvalidInput(f"malformed phone timing: {phone}")
    return phones


def word_starts(raw: list[Raw]) -> list[float]:
    """When each spoken word of an engine's tokens starts (words as the phone list folds
    them: a word boundary or a pause opens one), in seconds."""
    builder = _PhoneBuilder()
    for text, start, end in raw:
        builder.add(text, start, end)
    return [d.start for d in builder.finish() if d.word_initial and not d.silent]


def mark_emphasis(phones: list[Phone], spans: list[tuple[float, float]]) -> list[Phone]:
    """The phones with `emphasis` set on every sound whose middle lies in one of `spans`."""
    out = []
    for p in phones:
        middle = (p.start + p.end) / 2
        hit = p.symbol != SILENCE and any(a <= middle < b for a, b in spans)
        out.append(Phone(p.symbol, p.start, p.end, p.stress, True) if hit else p)
    return out


# --- folding tokens into phones ---------------------------------------------------------------

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

    def finish(self) -> list[_Draft]:
        # A trailing carried span (a stray space or mark) is left as a gap: _tile silences it.
        return self.drafts

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


def _without_stress(text: str) -> str:
    return unicodedata.normalize("NFD", text).replace("ˈ", "").replace("ˌ", "")


def _is_attachment(char: str) -> bool:
    category = unicodedata.category(char)
    return category.startswith("M") or (category in ("Lm", "Sk") and char not in "ˈˌ^")


# Pairs that arrive as two Piper tokens but are one gesture (espeak's events already join them).
_JOINED = frozenset({"aɪ", "aʊ", "eɪ", "oʊ", "ɔɪ", "tʃ", "dʒ"})


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
