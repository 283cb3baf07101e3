"""Pause and emphasis markup in scripts: a small, safe subset of SSML.

A script is markup when it contains one of the supported tags (``<speak``, ``<break``,
``<emphasis``, ``<prosody``, ``<say-as``, opening or closing); anything else, a bare
``<`` or ``&`` included, is plain text and is segmented exactly as before. Markup is XML:
``&``, ``<`` and ``>`` in its text are written ``&amp;``, ``&lt;``, ``&gt;``.

Supported (everything else is refused with its line number):

- ``<speak>`` ... ``</speak>``: optional, around the whole script only.
- ``<break time="800ms"/>`` (or ``"1.5s"``): silence of that length, 0 to 10 s; it
  replaces the pause the segmenter would put there, and ends a segment.
- ``<emphasis>`` (``level="strong|moderate"``, or ``"reduced|none"`` for none): the
  words inside get a stronger nod, a brow raise and a wider jaw in the plan.
- ``<prosody rate="...">``: ``x-slow|slow|medium|fast|x-fast`` or a percentage from 50%
  to 200% of the voice's own rate; the innermost one counts.
- ``<say-as interpret-as="characters">``: its letters and digits are spelled out.

Parsing uses defusedxml's SAX parser with DTDs forbidden: no DOCTYPE, no entity
declaration or expansion beyond XML's five predefined ones, no external entity is ever
fetched. The parser's locator gives each error its line in the script.

What the segmenter hands on (farm/script.py): segment texts in which emphasised words
are wrapped in EMPHASIS_ON/EMPHASIS_OFF and a rate other than 1 is a RATE prefix. They
are private-use code points, which clean_script turns into spaces in any script, so a
plain script's segments never contain them. ``speech_of`` turns a segment text back
into (words, rate, emphasised character spans) for the TTS.
"""

from __future__ import annotations

import re
import xml.sax
from dataclasses import dataclass, field
from xml.sax.handler import ContentHandler

from farm.errors import InvalidInput

EMPHASIS_ON = "\ue000"
EMPHASIS_OFF = "\ue001"
RATE = "\ue002"

MAX_BREAK_MS = 10_000
MIN_RATE, MAX_RATE = 0.5, 2.0
RATES = {"x-slow": 0.6, "slow": 0.8, "medium": 1.0, "fast": 1.25, "x-fast": 1.5}
TAGS = ("speak", "break", "emphasis", "prosody", "say-as")

# Letters by name: a voice reads a lone "A" as the article.
_LETTERS = dict(
    zip(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "ay bee see dee ee eff gee aitch eye jay kay el em en oh pee cue ar ess tee you vee "
        "double-you ex why zee".split(),
        strict=True,
    )
)
_DETECT = re.compile(r"<\s*/?\s*(?:speak|break|emphasis|prosody|say-as)(?=[\s/>])")
_ROOT = "farm-script"
_TIME = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s)\s*")
_PERCENT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*%\s*")


def is_markup(text: str) -> bool:
    """Whether `text` is a marked-up script (it holds one of the supported tags)."""
    return _DETECT.search(text) is not None


@dataclass
class Run:
    """Text spoken at one rate; `emphasis`: is it emphasised."""

    text: str
    rate: float = 1.0
    emphasis: bool = False


@dataclass
class Break:
    ms: int


@dataclass
class _Open:
    tag: str
    rate: float | None = None
    emphasis: bool | None = None
    spell: bool = False
    text: list[str] = field(default_factory=list)


class _Handler(ContentHandler):
    def __init__(self) -> None:
        super().__init__()
        self.items: list[Run | Break] = []
        self.stack: list[_Open] = []
        self.locator = None
        self.spoken = False  # anything said, a break or a tag seen yet

    def setDocumentLocator(self, locator) -> None:  # noqa: N802 (SAX's name)
        self.locator = locator

    def fail(self, message: str) -> InvalidInput:
        line = self.locator.getLineNumber() if self.locator is not None else 0
        return InvalidInput(f"script markup, line {line}: {message}")

    def startElement(self, name: str, attrs) -> None:  # noqa: N802
        attributes = dict(attrs.items())
        if not self.stack:
            self.stack.append(_Open(_ROOT))
            return
        parent = self.stack[-1]
        if name not in TAGS:
            raise self.fail(f"unknown tag <{name}>; supported: {', '.join(TAGS)}")
        if parent.tag in ("say-as", "break"):
            raise self.fail(f"<{name}> inside <{parent.tag}>")
        if name == "speak" and (parent.tag != _ROOT or self.spoken):
            raise self.fail("<speak> may only enclose the whole script")
        self.spoken = True
        opened = _Open(name)
        if name == "break":
            self._only(name, attributes, {"time"})
            if "time" not in attributes:
                raise self.fail('<break> needs a time, e.g. <break time="500ms"/>')
            self.items.append(Break(self._time(attributes["time"])))
        elif name == "emphasis":
            self._only(name, attributes, {"level"})
            level = attributes.get("level", "moderate")
            if level not in ("strong", "moderate", "reduced", "none"):
                raise self.fail(f"<emphasis level={level!r}>: strong, moderate, reduced or none")
            opened.emphasis = level in ("strong", "moderate")
        elif name == "prosody":
            self._only(name, attributes, {"rate"})
            if "rate" not in attributes:
                raise self.fail('<prosody> needs a rate, e.g. <prosody rate="slow">')
            opened.rate = self._rate(attributes["rate"])
        elif name == "say-as":
            self._only(name, attributes, {"interpret-as"})
            if attributes.get("interpret-as") != "characters":
                raise self.fail('<say-as> supports interpret-as="characters" only')
            opened.spell = True
        else:
            self._only(name, attributes, {"version", "xmlns", "xml:lang"})
        self.stack.append(opened)

    def endElement(self, name: str) -> None:  # noqa: N802
        closed = self.stack.pop()
        if closed.spell:
            letters = [_LETTERS.get(ch.upper(), ch) for ch in "".join(closed.text) if ch.isalnum()]
            self._text(" " + " ".join(letters) + " " if letters else " ")

    def characters(self, content: str) -> None:
        if self.stack and self.stack[-1].tag == "break" and content.strip():
            raise self.fail("<break> must be empty: write <break .../>")
        if self.stack and self.stack[-1].spell:
            self.stack[-1].text.append(content)
        else:
            self._text(content)

    def _text(self, content: str) -> None:
        self.spoken = self.spoken or bool(content.strip())
        rate = next((o.rate for o in reversed(self.stack) if o.rate is not None), 1.0)
        emphasis = next((o.emphasis for o in reversed(self.stack) if o.emphasis is not None), False)
        last = self.items[-1] if self.items else None
        if isinstance(last, Run) and (last.rate, last.emphasis) == (rate, emphasis):
            last.text += content
        else:
            self.items.append(Run(content, rate, emphasis))

    def _only(self, name: str, attributes: dict[str, str], allowed: set[str]) -> None:
        for attr in attributes:
            if attr not in allowed:
                raise self.fail(f"<{name}> has no attribute {attr!r}")

    def _time(self, value: str) -> int:
        match = _TIME.fullmatch(value)
        if not match:
            raise self.fail(f'<break time={value!r}>: write e.g. "500ms" or "1.5s"')
        ms = float(match[1]) * (1 if match[2] == "ms" else 1000)
        if ms > MAX_BREAK_MS:
            raise self.fail(f"<break time={value!r}> is over the limit of {MAX_BREAK_MS // 1000} s")
        return int(round(ms))

    def _rate(self, value: str) -> float:
        if value in RATES:
            return RATES[value]
        match = _PERCENT.fullmatch(value)
        rate = float(match[1]) / 100 if match else None
        if rate is None or not MIN_RATE <= rate <= MAX_RATE:
            raise self.fail(
                f"<prosody rate={value!r}>: {', '.join(RATES)} or a percentage "
                f"from {MIN_RATE:.0%} to {MAX_RATE:.0%}"
            )
        return rate


def parse(text: str) -> list[Run | Break]:
    """The runs and breaks of a marked-up script, or InvalidInput naming the line."""
    from defusedxml import DefusedXmlException
    from defusedxml.sax import parseString

    handler = _Handler()
    declaration = re.search(r"<!\s*(DOCTYPE|ENTITY|ELEMENT|ATTLIST)", text, re.IGNORECASE)
    if declaration:
        line = text.count("\n", 0, declaration.start()) + 1
        raise InvalidInput(
            f"script markup, line {line}: declarations (<!{declaration[1].upper()}) are not allowed"
        )
    # The root element sits on the script's first line, so the parser's lines are its lines.
    document = f"<{_ROOT}>{text}</{_ROOT}>".encode()
    try:
        parseString(document, handler, forbid_dtd=True, forbid_entities=True)
    except xml.sax.SAXParseException as exc:
        message = exc.getMessage()
        if "junk after document element" in message or "mismatched tag" in message:
            message += " (a tag is not closed, or closed out of order)"
        elif "undefined entity" in message or "not well-formed" in message:
            message += " (write & as &amp; and < as &lt; in marked-up text)"
        raise InvalidInput(f"script markup, line {exc.getLineNumber()}: {message}") from exc
    except DefusedXmlException as exc:
        raise InvalidInput(
            f"script markup, line {handler.locator.getLineNumber() if handler.locator else 0}: "
            f"declarations and entities are not allowed ({type(exc).__name__})"
        ) from exc
    return handler.items


def segments(text: str, split) -> list[tuple[str, int]]:
    """Segments of a marked-up script, as farm/script.py split_script makes them.

    `split(text)` segments plain text into (text, pause_ms) with a pause after its last
    segment too (a paragraph's). A break ends a segment and is its pause; a change of
    rate ends a segment (its pause is what the text before it says: a sentence or
    paragraph end, or none)."""
    out: list[tuple[str, int]] = []
    block: list[str] = []
    rate = 1.0

    def flush(pause: int | None) -> None:
        body = "".join(block)
        block.clear()
        if not any(ch.isalnum() for ch in body):
            if pause is not None and out:
                out[-1] = (out[-1][0], out[-1][1] + pause)
            return
        parts = split(body)
        if pause is None:  # a change of rate: the pause the text before it asks for
            paragraph = re.search(r"\n\s*\n\s*$", body) is not None
            sentence = body.rstrip().endswith(tuple(".!?…\"')”’"))
            pause = parts[-1][1] if paragraph else parts[-1][1] // 2 if sentence else 0
        prefix = f"{RATE}{rate:g}{RATE}" if rate != 1.0 else ""
        out.extend((prefix + t, p) for t, p in parts[:-1])
        out.append((prefix + parts[-1][0], pause))

    for item in parse(text):
        if isinstance(item, Break):
            flush(item.ms)
            continue
        if item.rate != rate:
            flush(None)
            rate = item.rate
        block.append(_emphasised(item.text) if item.emphasis else item.text)
    flush(None)
    out = _balanced(out)
    if not out:
        raise InvalidInput("the script is empty: it has no words to speak")
    out[-1] = (out[-1][0], 0)
    return out


def _emphasised(text: str) -> str:
    """Each word wrapped in the emphasis marks, so any cut between words keeps them paired."""
    return re.sub(r"\S*\w", lambda m: EMPHASIS_ON + m[0] + EMPHASIS_OFF, text)


def _balanced(parts: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """A hard cut inside an emphasised word leaves its marks in two segments: close it
    at the end of the first and open it again at the start of the next."""
    out = []
    carried = False
    for segment, pause in parts:
        prefix = ""
        if segment.startswith(RATE):
            end = segment.index(RATE, 1) + 1
            prefix, segment = segment[:end], segment[end:]
        if carried and not segment.startswith(EMPHASIS_ON):
            segment = EMPHASIS_ON + segment
        carried = segment.rfind(EMPHASIS_ON) > segment.rfind(EMPHASIS_OFF)
        out.append((prefix + segment + (EMPHASIS_OFF if carried else ""), pause))
    return out


def speech_of(segment: str) -> tuple[str, float, list[tuple[int, int]]]:
    """A segment's text for the TTS: (words, rate, emphasised character spans of words).

    A segment without marks comes back unchanged, at rate 1, with no spans."""
    rate = 1.0
    if segment.startswith(RATE):
        end = segment.index(RATE, 1)
        rate, segment = float(segment[1:end]), segment[end + 1 :]
    words: list[str] = []
    spans: list[tuple[int, int]] = []
    at = 0
    start = None
    for ch in segment:
        if ch == EMPHASIS_ON:
            start = at
        elif ch == EMPHASIS_OFF:
            if start is not None and at > start:
                spans.append((start, at))
            start = None
        else:
            words.append(ch)
            at += 1
    return "".join(words), rate, spans
