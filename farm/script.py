"""Scripts: validation of what the user handed in, and splitting into TTS segments."""

from __future__ import annotations

import math
import re
import unicodedata

from farm import markup
from farm.config import Settings
from farm.errors import InvalidInput

_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+")
_PARAGRAPH = re.compile(r"\n\s*\n")
# Bidi overrides and isolates can make a script display differently from what is spoken.
_BIDI = dict.fromkeys(map(ord, "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"))
# Faster than any voice speaks (about 300 words a minute), so a script's estimated
# duration is a lower bound: a script refused for its length would surely be too long.
SPOKEN_CHARS_PER_SECOND = 25.0


def read_limit(max_chars: int) -> int:
    """Bytes worth reading of a script: a UTF-8 character is at most 4 bytes, plus a
    3-byte BOM; one byte more shows the script is over the limit without reading it all."""
    return max_chars * 4 + 4


def decode_script(data: bytes, max_chars: int) -> str:
    """Bytes from a file or stdin to clean text, or InvalidInput with one clear line."""
    if b"\0" in data:
        raise InvalidInput("the script is binary data, not text")
    if len(data) >= read_limit(max_chars):  # possibly cut short: do not decode the rest
        raise InvalidInput(
            f"the script has more than {max_chars} characters; the limit is {max_chars} "
            "(FARM_MAX_SCRIPT_CHARS)"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"the script is not valid UTF-8 (byte {exc.start})") from exc
    return clean_script(text, max_chars)


def clean_script(text: str, max_chars: int) -> str:
    text = unicodedata.normalize("NFC", text).translate(_BIDI)
    text = "".join(ch if ch in "\n\t" or unicodedata.category(ch)[0] != "C" else " " for ch in text)
    if not any(ch.isalnum() for ch in text):
        raise InvalidInput("the script is empty: it has no words to speak")
    if len(text) > max_chars:
        raise InvalidInput(
            f"the script has {len(text)} characters; the limit is {max_chars} "
            "(FARM_MAX_SCRIPT_CHARS)"
        )
    return text.strip()


def split_script(text: str, max_chars: int, pause_ms: int) -> list[tuple[str, int]]:
    """Segments of at most `max_chars`, each with the pause that follows it.

    Sentences are grouped up to the limit so TTS calls are few but parallel; a
    paragraph break gets twice the pause of a sentence break, and the last
    segment gets none. A marked-up script (farm/markup.py) is parsed first: its
    breaks are pauses, and its segment texts carry emphasis and rate marks
    (markup.speech_of reads them back).
    """
    if markup.is_markup(text):
        return markup.segments(text, lambda body: _split(body, max_chars, pause_ms))
    out = _split(text, max_chars, pause_ms)
    if not out:
        raise InvalidInput("the script is empty: it has no words to speak")
    out[-1] = (out[-1][0], 0)
    return out


def _split(text: str, max_chars: int, pause_ms: int) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for paragraph in _PARAGRAPH.split(text):
        words = " ".join(paragraph.split())
        if not any(ch.isalnum() for ch in words):
            continue
        pieces = _pack(_sentences(words, max_chars), max_chars)
        out.extend((p, pause_ms) for p in pieces[:-1])
        out.append((pieces[-1], 2 * pause_ms))
    return out


def min_seconds(text: str, max_segment_chars: int, pause_ms: int) -> float:
    """A lower bound of how long `text` takes to speak: its characters at the fastest
    rate, plus the pauses between its segments (each paragraph adds one)."""
    parts = split_script(text, max_segment_chars, pause_ms)
    pauses = sum(p for _, p in parts) / 1000
    if markup.is_markup(text):  # the words, not the tags (spoken at up to twice the rate)
        chars = sum(len(markup.speech_of(t)[0]) for t, _ in parts) / markup.MAX_RATE
        return chars / SPOKEN_CHARS_PER_SECOND + pauses
    return len(text) / SPOKEN_CHARS_PER_SECOND + pauses


def check_frames(seconds: float, fps: int, max_frames: int, what: str, estimate: bool) -> None:
    """Refuse a job whose video would have more than `max_frames` frames."""
    frames = math.ceil(seconds * fps)
    if frames > max_frames:
        least = "at least " if estimate else ""
        raise InvalidInput(
            f"{what} makes a video of {least}{frames} frames ({seconds:.0f} s at {fps} fps); "
            f"the limit is {max_frames} frames (FARM_MAX_JOB_FRAMES)"
        )


def check_script_frames(text: str, fps: int, settings: Settings, padding_s: float) -> None:
    """At submission: refuse a script that surely makes more than FARM_MAX_JOB_FRAMES
    frames (`padding_s`: the silence every job adds around its speech)."""
    seconds = min_seconds(text, settings.max_segment_chars, settings.segment_pause_ms)
    check_frames(seconds + padding_s, fps, settings.max_job_frames, "the script", estimate=True)


def _sentences(paragraph: str, max_chars: int) -> list[str]:
    result: list[str] = []
    for sentence in _SENTENCE_END.split(paragraph):
        sentence = sentence.strip()
        while len(sentence) > max_chars:
            cut = _cut_point(sentence, max_chars)
            result.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            result.append(sentence)
    return result


def _cut_point(sentence: str, max_chars: int) -> int:
    """Prefer a clause boundary, then a space, then a hard cut."""
    window = sentence[:max_chars]
    for sep in (";", ",", " "):
        at = window.rfind(sep)
        if at > max_chars // 3:
            return at + 1
    return max_chars


def _pack(sentences: list[str], max_chars: int) -> list[str]:
    packed: list[str] = []
    for s in sentences:
        if packed and len(packed[-1]) + 1 + len(s) <= max_chars:
            packed[-1] = f"{packed[-1]} {s}"
        else:
            packed.append(s)
    return packed
