"""Script templates for personalised batches: a script with `{name}` fields whose values
come from a manifest row's columns.

The syntax is Python's format syntax cut down to what a mail merge needs: `{name}` is a
field (letters, digits and `_`, starting with a letter; matched case-insensitively, as
manifest column names are), `{{` and `}}` are literal braces. Anything else between
braces is refused: no attribute or index access (`{a.__class__}`, `{a[0]}`), no
positional fields (`{}`, `{0}`), no conversions or format specs (`{a!r}`, `{a:>10}`).
The template is parsed here, never handed to str.format, so a template or a value
cannot reach Python objects.

Values are plain text, inserted once (a value holding `{b}` stays `{b}`). In a
marked-up template (farm/markup.py) they are XML-escaped, so a value cannot open a tag;
a plain template's values may not contain markup tags, which would turn the whole
script into markup.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from farm import markup
from farm.errors import InvalidInput
from farm.script import read_limit

NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_QUOTES = {'"': "&quot;", "'": "&apos;"}


@dataclass(frozen=True)
class Field:
    name: str  # lower case


@dataclass(frozen=True)
class Template:
    name: str  # how messages name it: its path as the user gave it
    parts: tuple[str | Field, ...]
    markup: bool

    @property
    def fields(self) -> tuple[str, ...]:
        """The variables it uses, in order of first use."""
        return tuple(dict.fromkeys(p.name for p in self.parts if isinstance(p, Field)))


def parse(text: str, name: str) -> Template:
    """`text` as a template, or InvalidInput naming the line of the first bad brace."""
    parts: list[str | Field] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in "{}" and text.startswith(ch * 2, i):
            literal.append(ch)
            i += 2
        elif ch == "}":
            raise _error(name, text, i, "a single '}' (write '}}' for a literal brace)")
        elif ch == "{":
            end = text.find("}", i + 1)
            opened = text.find("{", i + 1)
            if end < 0 or 0 <= opened < end:
                raise _error(
                    name, text, i, "a '{' that is not closed (write '{{' for a literal brace)"
                )
            body = text[i + 1 : end]
            if not NAME.fullmatch(body):
                shown = "".join(c if c.isprintable() else "?" for c in body[:40])
                shown += "..." if len(body) > 40 else ""
                raise _error(
                    name,
                    text,
                    i,
                    f"bad field {{{shown}}}: a field is {{name}} (letters, digits and _, "
                    "starting with a letter)",
                )
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(Field(body.lower()))
            i = end + 1
        else:
            literal.append(ch)
            i += 1
    if literal:
        parts.append("".join(literal))
    plain = "".join(p for p in parts if isinstance(p, str))
    return Template(name, tuple(parts), markup=markup.is_markup(plain))


def _error(name: str, text: str, at: int, reason: str) -> InvalidInput:
    return InvalidInput(f"template {name}, line {text.count(chr(10), 0, at) + 1}: {reason}")


def read(path: Path, name: str, max_chars: int) -> Template:
    """The template in file `path` (already checked to be one the caller may read)."""
    try:
        with path.open("rb") as fh:
            data = fh.read(read_limit(max_chars))
    except OSError as exc:
        raise InvalidInput(f"template {name} cannot be read: {exc.strerror or exc}") from exc
    if b"\0" in data:
        raise InvalidInput(f"template {name} is binary data, not text")
    try:
        text = data.decode("utf-8-sig") if len(data) < read_limit(max_chars) else None
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"template {name} is not valid UTF-8 (byte {exc.start})") from exc
    if text is None or len(text) > max_chars:
        raise InvalidInput(
            f"template {name} has more than {max_chars} characters; the limit is {max_chars} "
            "(FARM_MAX_SCRIPT_CHARS)"
        )
    return parse(text, name)


def value_text(name: str, value: Any) -> str | None:
    """A row's value for variable `name` as text; None when it is empty or absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InvalidInput(f"{name} must be a string or a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInput(f"{name} must be a finite number, got {value}")
    return str(value).strip() or None


def render(template: Template, values: Mapping[str, Any]) -> str:
    """The script for one row. `values` are the row's variables (its columns that are
    not farm's own): InvalidInput naming every missing variable (no column, or an empty
    cell) and every column with a value that the template does not use."""
    given = {k: v for k, v in ((k, value_text(k, v)) for k, v in values.items()) if v}
    used = template.fields
    missing = [f for f in used if f not in given]
    unused = sorted(set(given) - set(used))
    if missing or unused:
        raise InvalidInput(describe(template.name, missing, unused))
    if not template.markup:
        for field in used:
            if markup.is_markup(given[field]):
                raise InvalidInput(
                    f"{field}: the value holds script markup, and template {template.name} "
                    "is plain text; values are inserted as text, not tags"
                )
    out = []
    for part in template.parts:
        if isinstance(part, str):
            out.append(part)
        elif template.markup:
            out.append(escape(given[part.name], _QUOTES))
        else:
            out.append(given[part.name])
    text = "".join(out)
    if not template.markup and markup.is_markup(text):  # "<{tag}>" with tag="break/"
        raise InvalidInput(
            f"the values make script markup in plain template {template.name}; "
            "values are inserted as text, not tags"
        )
    return text


def describe(template: str | None, missing: list[str], unused: list[str]) -> str:
    """One line naming all that is wrong with a row's variables (`template`: its name,
    None when the row has none)."""
    if template is None:
        return f"unused column(s) {', '.join(unused)}: the row has no template"
    reasons = []
    if missing:
        reasons.append(f"missing variable(s) {', '.join(missing)} (no column, or an empty cell)")
    if unused:
        reasons.append(f"unused column(s) {', '.join(unused)} (not in the template)")
    return f"template {template}: " + "; ".join(reasons)
