"""Captions from a job's word timings: the subtitle rules, SRT and WebVTT.

Pure functions, no I/O. Words come from the job itself: a script job's from its TTS
phones (`words_from_phones`: each segment's words spread over its voiced phones, clause
by clause when the pauses match the punctuation), an audio-only job's from the
recogniser (models/asr.py). The plan stage stores them as jobs/{id}/words.json; the mux
stage makes the cues (`make_cues`) and writes captions.srt / captions.vtt.

The rules, all here:

- a cue has at most MAX_LINES lines of at most MAX_LINE_CHARS characters;
- a sentence end (. ! ? ...) always ends a cue, a pause of LONG_PAUSE_S or more too, so
  no cue spans a long pause; a cue lasts at most MAX_CUE_S;
- a cue that overflows is broken at its last clause boundary (, ; : and dashes), else
  before a phrase-starting word (a conjunction or preposition), else before the word that
  did not fit; its two lines are split the same way, as evenly as those allow;
- a cue shows for at least MIN_CUE_S where the next one leaves room, else it joins its
  neighbour when the two fit in one cue;
- a cue starts on its first word and ends on its last word (or later, for the minimum),
  never after the next cue starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from models.base import Word

MAX_LINE_CHARS = 42
MAX_LINES = 2
MIN_CUE_S = 1.0
MAX_CUE_S = 7.0
LONG_PAUSE_S = 0.5
# A silence at least this long between voiced phones separates two stretches of speech
# (words_from_phones matches stretches with the clauses of the text).
STRETCH_GAP_S = 0.1

SENTENCE_END = (".", "!", "?", "…", '."', '?"', '!"', ".)", "?)", "!)")
CLAUSE_END = (",", ";", ":", "—", "–", "-", *SENTENCE_END)
PHRASE_START = frozenset(
    "and but or nor so yet because although though while when where which who whom whose "
    "that if unless until since as than to of in on at by for with from into onto about "
    "after before between through during without under over".split()
)
SILENCE = "_"  # models.visemes.SILENCE: pauses in a phone list


@dataclass(frozen=True)
class Cue:
    start: float
    end: float
    lines: tuple[str, ...]


# --- words ---------------------------------------------------------------------------


def words_to_json(words: Iterable[Word]) -> list[dict[str, Any]]:
    return [{"text": w.text, "start": round(w.start, 4), "end": round(w.end, 4)} for w in words]


def words_from_json(items: list[dict[str, Any]]) -> list[Word]:
    return [Word(str(i["text"]), float(i["start"]), float(i["end"])) for i in items]


def _weight(token: str) -> int:
    return sum(c.isalnum() for c in token)


def _clauses(tokens: list[str]) -> list[list[str]]:
    out: list[list[str]] = [[]]
    for tok in tokens:
        out[-1].append(tok)
        if tok.endswith(CLAUSE_END):
            out.append([])
    return [c for c in out if c]


def _stretches(voiced: list[Any]) -> list[list[Any]]:
    out: list[list[Any]] = [[voiced[0]]]
    for prev, p in zip(voiced, voiced[1:], strict=False):
        if p.start - prev.end >= STRETCH_GAP_S:
            out.append([])
        out[-1].append(p)
    return out


def _spread(tokens: list[str], phones: list[Any], offset: float) -> list[Word]:
    """Tokens over consecutive phones, each a share proportional to its letters, cut at
    phone boundaries (every token keeps at least one phone while there are enough)."""
    weights = [max(_weight(t), 1) for t in tokens]
    total, n, m = sum(weights), len(phones), len(tokens)
    bounds, acc = [0], 0
    for i, w in enumerate(weights):
        acc += w
        b = round(acc / total * n)
        if n >= m:
            b = min(max(b, bounds[-1] + 1), n - (m - i - 1))
        bounds.append(max(b, bounds[-1]))
    words = []
    for i, tok in enumerate(tokens):
        lo, hi = bounds[i], bounds[i + 1]
        if hi <= lo:  # fewer phones than words: share the phone
            lo, hi = min(lo, n - 1), min(lo, n - 1) + 1
        words.append(Word(tok, phones[lo].start + offset, phones[hi - 1].end + offset))
    return words


def words_from_phones(text: str, phones: Sequence[Any], offset: float = 0.0) -> list[Word]:
    """The words of a spoken `text` timed from its phones (symbol, start, end), moved by
    `offset` onto the job's timeline. Each clause of the text goes to its own stretch of
    speech when the text has as many clauses as the audio has stretches; otherwise the
    words are spread over all voiced phones. Tokens without a letter or digit (a lone
    dash) join the word before."""
    tokens: list[str] = []
    for tok in text.split():
        if tokens and _weight(tok) == 0:
            tokens[-1] += " " + tok
        else:
            tokens.append(tok)
    voiced = [p for p in phones if p.symbol != SILENCE and p.end > p.start]
    if not tokens or not voiced:
        return []
    clauses, stretches = _clauses(tokens), _stretches(voiced)
    if len(clauses) == len(stretches):
        return [w for c, st in zip(clauses, stretches, strict=True) for w in _spread(c, st, offset)]
    return _spread(tokens, voiced, offset)


def _normalise(words: Iterable[Word]) -> list[Word]:
    """Sorted, blank words dropped, a word longer than a line cut into line-long pieces
    (its time shared by length)."""
    out: list[Word] = []
    for w in sorted(words, key=lambda w: w.start):
        text = " ".join(w.text.split())
        if not text:
            continue
        end = max(w.end, w.start)
        if len(text) <= MAX_LINE_CHARS:
            out.append(Word(text, w.start, end))
            continue
        pieces = [text[i : i + MAX_LINE_CHARS] for i in range(0, len(text), MAX_LINE_CHARS)]
        step = (end - w.start) / len(pieces)
        out += [Word(p, w.start + i * step, w.start + (i + 1) * step) for i, p in enumerate(pieces)]
    return out


# --- lines and cues ------------------------------------------------------------------


def _text(words: Sequence[Word]) -> str:
    return " ".join(w.text for w in words)


def _boundary(before: Word, after: Word) -> int:
    """How good a break between two words is: 2 after a clause, 1 before a phrase."""
    if before.text.endswith(CLAUSE_END):
        return 2
    if after.text.lower().strip("\"'(") in PHRASE_START:
        return 1
    return 0


def split_lines(words: Sequence[Word]) -> tuple[str, ...] | None:
    """The cue's lines under the rules, or None when the words do not fit in a cue."""
    text = _text(words)
    if len(text) <= MAX_LINE_CHARS:
        return (text,)
    best: tuple[float, int] | None = None
    for j in range(1, len(words)):
        a, b = len(_text(words[:j])), len(_text(words[j:]))
        if a > MAX_LINE_CHARS or b > MAX_LINE_CHARS:
            continue
        # Balance first, a clause or phrase boundary worth up to 12 characters of it.
        score = -abs(a - b) + 6 * _boundary(words[j - 1], words[j])
        if best is None or score > best[0]:
            best = (score, j)
    if best is None:
        return None
    j = best[1]
    return (_text(words[:j]), _text(words[j:]))


def _fits(words: Sequence[Word]) -> bool:
    return split_lines(words) is not None


def _break_overflow(cur: list[Word]) -> int:
    """Where to end a full cue: how many of its words stay. The last clause boundary,
    else the last phrase boundary, that keeps at least 40% of its text; else all."""
    size = len(_text(cur))
    for grade in (2, 1):
        for j in range(len(cur) - 1, 0, -1):
            if _boundary(cur[j - 1], cur[j]) >= grade and len(_text(cur[:j])) >= 0.4 * size:
                return j
    return len(cur)


def _must_break(cur: list[Word], nxt: Word) -> bool:
    last = cur[-1]
    return (
        last.text.endswith(SENTENCE_END)
        or nxt.start - last.end >= LONG_PAUSE_S
        or nxt.end - cur[0].start > MAX_CUE_S
    )


def _groups(words: list[Word]) -> list[list[Word]]:
    groups: list[list[Word]] = []
    cur: list[Word] = []
    for w in words:
        if cur and _must_break(cur, w):
            groups.append(cur)
            cur = []
        while cur and not _fits([*cur, w]):
            keep = _break_overflow(cur)
            groups.append(cur[:keep])
            cur = cur[keep:]
        cur.append(w)
    if cur:
        groups.append(cur)
    return groups


def _can_join(a: list[Word], b: list[Word]) -> bool:
    return (
        b[0].start - a[-1].end < LONG_PAUSE_S
        and b[-1].end - a[0].start <= MAX_CUE_S
        and _fits([*a, *b])
    )


def _join_short(groups: list[list[Word]], total: float | None) -> list[list[Word]]:
    """A group too short to show for MIN_CUE_S before the next starts joins a neighbour."""
    i = 0
    while i < len(groups):
        g = groups[i]
        limit = groups[i + 1][0].start if i + 1 < len(groups) else total
        room = (limit if limit is not None else float("inf")) - g[0].start
        if room < MIN_CUE_S:
            if i + 1 < len(groups) and _can_join(g, groups[i + 1]):
                groups[i : i + 2] = [[*g, *groups[i + 1]]]
                continue
            if i > 0 and _can_join(groups[i - 1], g):
                groups[i - 1 : i + 1] = [[*groups[i - 1], *g]]
                i -= 1
                continue
        i += 1
    return groups


def make_cues(words: Iterable[Word], total: float | None = None) -> list[Cue]:
    """The captions of timed words under the rules above. `total`: the media's length,
    which no cue passes."""
    groups = _join_short(_groups(_normalise(words)), total)
    cues: list[Cue] = []
    for i, g in enumerate(groups):
        start, end = g[0].start, g[-1].end
        limit = groups[i + 1][0].start if i + 1 < len(groups) else total
        end = max(end, start + MIN_CUE_S)
        if limit is not None:
            end = min(end, limit)
        end = max(end, start + 0.001)
        lines = split_lines(g)
        assert lines is not None  # every group was built to fit
        cues.append(Cue(round(start, 3), round(end, 3), lines))
    return cues


# --- formats -------------------------------------------------------------------------


def _clock(seconds: float, sep: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(cues: Sequence[Cue]) -> str:
    """SubRip: numbered cues, comma before the milliseconds, a blank line after each."""
    blocks = [
        f"{i}\n{_clock(c.start, ',')} --> {_clock(c.end, ',')}\n" + "\n".join(c.lines) + "\n"
        for i, c in enumerate(cues, 1)
    ]
    return "\n".join(blocks)


def _vtt_escape(line: str) -> str:
    return line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_vtt(cues: Sequence[Cue]) -> str:
    """WebVTT: the header, then cues with a dot before the milliseconds, text escaped."""
    blocks = [
        f"{_clock(c.start, '.')} --> {_clock(c.end, '.')}\n"
        + "\n".join(_vtt_escape(ln) for ln in c.lines)
        + "\n"
        for c in cues
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


# --- burnt in: Advanced SubStation Alpha for libass -------------------------------------

# The style of burnt-in captions, relative to the video's height so a 512 and a 1080
# video look alike: DejaVu Sans (farm.media.caption_font), white, a black outline and a
# soft shadow, centred at the bottom. The size is smaller where the job's widest line
# would not fit between the side margins (a 9:16 video is narrow for its height).
FONT_NAME = "DejaVu Sans"
FONT_SIZE_OF_HEIGHT = 0.055  # font size (pixels) per pixel of video height
OUTLINE_OF_HEIGHT = 0.004  # outline width, likewise (at least 1 px)
MARGIN_OF_HEIGHT = 0.06  # bottom margin, likewise
SIDE_OF_WIDTH = 0.05  # the side margins, per pixel of video width
# A line's width in ems when no font is at hand to measure it: DejaVu Sans averages
# about 0.52 em a character in mixed text; this bound holds for all but runs of capitals.
EM_PER_CHAR = 0.62


def _ass_clock(seconds: float) -> str:
    cs = max(0, round(seconds * 100))
    h, rest = divmod(cs, 360_000)
    m, rest = divmod(rest, 6000)
    s, cs = divmod(rest, 100)
    return f"{h}:{m:02d}:{s:02d}.{cs:02d}"


def _ass_text(line: str) -> str:
    # "{" opens an override block and "\\" an escape in ASS: neither may reach libass.
    return line.replace("\\", "/").replace("{", "(").replace("}", ")")


def to_ass(
    cues: Sequence[Cue], width: int, height: int, ems: Callable[[str], float] | None = None
) -> str:
    """The cues as an ASS script whose coordinates are the video's pixels (PlayRes), in
    the style above. `ems(line)`: a line's width in ems in the caption font
    (farm.media.caption_ems), else estimated at EM_PER_CHAR a character."""
    side = round(width * SIDE_OF_WIDTH)
    measure = ems or (lambda line: len(line) * EM_PER_CHAR)
    widest = max((measure(ln) for c in cues for ln in c.lines), default=0.0)
    size = height * FONT_SIZE_OF_HEIGHT
    if widest > 0:
        size = min(size, (width - 2 * side) / widest)
    size = max(8, int(size))
    outline = max(1, round(height * OUTLINE_OF_HEIGHT))
    margin = round(height * MARGIN_OF_HEIGHT)
    header = (
        "[Script Info]\nScriptType: v4.00+\n"
        f"PlayResX: {width}\nPlayResY: {height}\nWrapStyle: 2\nScaledBorderAndShadow: yes\n\n"
        "[V4+ Styles]\n"
        "Format: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour, "
        "BackColour, Bold, Italic, Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle, "
        "BorderStyle, Outline, Shadow, Alignment, MarginL, MarginR, MarginV, Encoding\n"
        f"Style: Default,{FONT_NAME},{size},&H00FFFFFF,&H00FFFFFF,&H00000000,&H80000000,"
        f"0,0,0,0,100,100,0,0,1,{outline},1,2,{side},{side},{margin},1\n\n"
        "[Events]\n"
        "Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text\n"
    )
    events = [
        f"Dialogue: 0,{_ass_clock(c.start)},{_ass_clock(c.end)},Default,,0,0,0,,"
        + "\\N".join(_ass_text(ln) for ln in c.lines)
        for c in cues
    ]
    return header + "".join(e + "\n" for e in events)
