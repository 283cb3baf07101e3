"""Templated batches without services: template parsing, filling in, and the manifest
checks of templated rows (missing and unused variables by line, injection attempts,
the idempotency key over the filled-in text)."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm import manifest, markup, nightly, script, templates
from farm.errors import InvalidInput
from farm.manifest import Defaults

MAX = 1000


def check_job(avatar: str, voice: str, webhook: str | None) -> str | None:
    if avatar not in ("demo", "roman"):
        raise InvalidInput(f"unknown avatar {avatar!r}")
    return webhook


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def check(path: Path, defaults: Defaults | None = None) -> manifest.Checked:
    defaults = defaults or Defaults()
    base, raw = manifest.read(path, templated=defaults.template is not None)
    return manifest.check_rows(raw, base, defaults, MAX, check_job)


# --- parsing ----------------------------------------------------------------


def test_fields_escapes_and_case() -> None:
    t = templates.parse("Hi {Name}, {{not a field}} and }} {city}{name}.", "t.txt")
    assert t.fields == ("name", "city")  # first use, lower case: as manifest columns are
    assert not t.markup
    out = templates.render(t, {"name": "Ann", "city": "Rome"})
    assert out == "Hi Ann, {not a field} and } RomeAnn."


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Hi {a.__class__}.", r"line 1: bad field \{a.__class__\}"),
        ("Hi {a[0]}.", r"bad field \{a\[0\]\}"),
        ("Hi {0}.", r"bad field \{0\}"),
        ("Hi {}.", r"bad field \{\}"),
        ("Hi {a!r}.", r"bad field \{a!r\}"),
        ("Hi {a:>10}.", r"bad field \{a:>10\}"),
        ("Hi {_private}.", r"bad field \{_private\}"),
        ("Hi { name }.", r"bad field \{ name \}"),
        ("Hi {a\nb}.", r"line 1: bad field \{a\?b\}"),
        ("Hi {" + "x" * 50 + ".y}.", r"bad field \{x{40}\.\.\.\}"),
        ("One.\nTwo {name.\n", r"line 2: a '\{' that is not closed"),
        ("One.\n\nThree {a{b}}.", r"line 3: a '\{' that is not closed"),
        ("Hi name}.", r"line 1: a single '\}'"),
    ],
)
def test_a_template_that_does_not_parse_is_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as caught:
        templates.parse(text, "t.txt")
    assert str(caught.value).startswith("template t.txt, line ")
    assert "\n" not in str(caught.value)


def test_values_are_text_inserted_once() -> None:
    t = templates.parse("Dear {name}, {greeting}", "t.txt")
    # A value that looks like a field, or like format syntax, is just text.
    out = templates.render(t, {"name": "{greeting} {0.__class__}", "greeting": "hello"})
    assert out == "Dear {greeting} {0.__class__}, hello"
    # Numbers (JSON Lines) are text; surrounding blanks go.
    assert templates.render(t, {"name": 7, "greeting": " 1.5 "}) == "Dear 7, 1.5"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["a"], "name must be a string or a number, got list"),
        ({"a": 1}, "got dict"),
        (True, "got bool"),
        (float("nan"), "finite number"),
    ],
)
def test_values_must_be_strings_or_numbers(value: object, message: str) -> None:
    t = templates.parse("Dear {name}.", "t.txt")
    with pytest.raises(InvalidInput, match=message):
        templates.render(t, {"name": value})


def test_markup_in_a_value_cannot_become_tags() -> None:
    t = templates.parse(
        '<speak>Hello <emphasis>{name}</emphasis>.<break time="300ms"/> {city}.</speak>', "t"
    )
    assert t.markup
    evil = '</emphasis><break time="9s"/><voice>x</voice> & co'
    out = templates.render(t, {"name": evil, "city": 'O"Hare'})
    # The value is text: the script still has exactly the template's one break.
    items = markup.parse(out)
    breaks = [i for i in items if isinstance(i, markup.Break)]
    assert [b.ms for b in breaks] == [300]
    spoken = "".join(i.text for i in items if isinstance(i, markup.Run))
    assert '<break time="9s"/>' in spoken and "& co" in spoken and 'O"Hare' in spoken
    segments = script.split_script(out, 200, 250)
    assert len(segments) == 2 and segments[0][1] == 300


def test_markup_in_a_value_of_a_plain_template_is_refused() -> None:
    t = templates.parse("Hello {name}. Bye.", "t.txt")
    with pytest.raises(InvalidInput, match="name: the value holds script markup"):
        templates.render(t, {"name": 'Ann <break time="9s"/>'})
    # Plain text with < and & stays plain text.
    assert templates.render(t, {"name": "R&D <team>"}) == "Hello R&D <team>. Bye."
    # Tags built from a template's own < and a value.
    t = templates.parse("Hello <{tag}>. Bye.", "t.txt")
    with pytest.raises(InvalidInput, match="the values make script markup"):
        templates.render(t, {"tag": "break/"})


def test_missing_and_unused_are_named_together() -> None:
    t = templates.parse("{a} {b} {c}.", "t.txt")
    with pytest.raises(InvalidInput) as caught:
        templates.render(t, {"a": "x", "b": "  ", "d": "y", "e": "z", "f": None})
    assert str(caught.value) == (
        "template t.txt: missing variable(s) b, c (no column, or an empty cell); "
        "unused column(s) d, e (not in the template)"
    )


def test_a_template_file_is_bounded_text(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="template t cannot be read"):
        templates.read(tmp_path / "nope.txt", "t", MAX)
    with pytest.raises(InvalidInput, match="binary data"):
        templates.read(write(tmp_path / "b.txt", b"a\0{b}"), "t", MAX)
    with pytest.raises(InvalidInput, match="not valid UTF-8"):
        templates.read(write(tmp_path / "l.txt", b"caf\xe9 {b}"), "t", MAX)
    with pytest.raises(InvalidInput, match="the limit is 1000"):
        templates.read(write(tmp_path / "big.txt", "{a} " * MAX), "t", MAX)


# --- manifests --------------------------------------------------------------


def test_every_bad_row_is_reported_by_line(tmp_path: Path) -> None:
    write(tmp_path / "greet.txt", "Hello {first_name}, welcome to {city}.")
    m = write(
        tmp_path / "m.csv",
        "template,First_Name,city,colour,output\n"
        "greet.txt,Ann,Paris,,ann.mp4\n"  # line 2: fine
        "greet.txt,,,,x.mp4\n"  # line 3: both missing
        "greet.txt,Bob,Rome,red,bob.mp4\n"  # line 4: colour unused
        "greet.txt,Cy,,blue,cy.mp4\n"  # line 5: city missing, colour unused
        ',"Dee\nDum",Oslo,,dee.mp4\n'  # line 6 (two lines): no template, values unused
        "greet.txt,Eve,Nice,,eve.mp4\n",  # line 8: fine
    )
    result = check(m)
    assert [r.where for r in result.rows] == ["line 2", "line 8"]
    assert [r.script for r in result.rows] == [
        "Hello Ann, welcome to Paris.",
        "Hello Eve, welcome to Nice.",
    ]
    assert all(r.source == "" for r in result.rows)  # named by the output, not the template
    assert [(p.where, p.line) for p in result.problems] == [
        ("line 3", 3),
        ("line 4", 4),
        ("line 5", 5),
        ("line 6", 6),
    ]
    reasons = [p.reason for p in result.problems]
    assert reasons[0] == (
        "template greet.txt: missing variable(s) first_name, city (no column, or an empty cell)"
    )
    assert reasons[1] == "template greet.txt: unused column(s) colour (not in the template)"
    assert reasons[2] == (
        "template greet.txt: missing variable(s) city (no column, or an empty cell); "
        "unused column(s) colour (not in the template)"
    )
    assert reasons[3] == "no script: the row needs a 'script' path, 'text' or a 'template'"


def test_a_row_with_a_script_or_text_has_no_variables(tmp_path: Path) -> None:
    write(tmp_path / "greet.txt", "Hello {name}.")
    write(tmp_path / "plain.txt", "Plain.")
    m = write(
        tmp_path / "m.csv",
        "template,script,text,name,output\n"
        ",plain.txt,,,p.mp4\n"  # fine: no values
        ",,Inline.,Ann,i.mp4\n"  # a value nothing uses
        "greet.txt,plain.txt,,Ann,x.mp4\n"
        "greet.txt,,Inline.,Ann,y.mp4\n",
    )
    result = check(m)
    assert [r.script for r in result.rows] == ["Plain."]
    assert [p.reason for p in result.problems] == [
        "unused column(s) name: the row has no template",
        "give one of 'script' (a path), 'text' or 'template', not both",
        "give one of 'script' (a path), 'text' or 'template', not both",
    ]


def test_a_default_template_needs_no_script_column(tmp_path: Path) -> None:
    t = templates.parse("Hi {name}.", "cli.txt")
    write(tmp_path / "own.txt", "Own {name} here.")
    m = write(
        tmp_path / "m.csv",
        "name,template,text,output\nAnn,,,a.mp4\nBob,own.txt,,b.mp4\n,,Just text.,c.mp4\n",
    )
    result = check(m, Defaults(template=t))
    assert [r.script for r in result.rows] == ["Hi Ann.", "Own Bob here.", "Just text."]
    only_vars = write(tmp_path / "v.csv", "name\nAnn\n\nBob\n")
    result = check(only_vars, Defaults(template=t))
    assert [(r.where, r.script) for r in result.rows] == [
        ("line 2", "Hi Ann."),
        ("line 4", "Hi Bob."),
    ]
    # Without a template, a column farm does not know is a typo, as before.
    with pytest.raises(InvalidInput, match="unknown column 'name'"):
        manifest.read(only_vars)
    with pytest.raises(InvalidInput, match="needs a 'script' or a 'text' column"):
        manifest.read(write(tmp_path / "o.csv", "output\na.mp4\n"))
    with pytest.raises(InvalidInput, match="unknown column 'name'"):
        manifest.read(write(tmp_path / "t.csv", "text,name\nHi.,Ann\n"))


def test_columns_that_cannot_be_variables_refuse_the_manifest(tmp_path: Path) -> None:
    for header in ("first name", "_error", "1st", "a.b"):
        m = write(tmp_path / "m.csv", f"template,{header}\ngreet.txt,x\n")
        with pytest.raises(InvalidInput, match=r"line 1: column .* nor a variable name"):
            manifest.read(m)


def test_template_paths_are_resolved_like_script_paths(tmp_path: Path) -> None:
    base = tmp_path / "in"
    write(tmp_path / "secret.txt", "Secret {name}.")
    write(base / "broken.txt", "Hello\n{name.upper}.")
    (base / "link.txt").symlink_to(tmp_path / "secret.txt")
    m = write(
        base / "m.csv",
        "template,name\n"
        "../secret.txt,A\n"
        "link.txt,A\n"
        "/etc/hostname,A\n"
        "missing.txt,A\n"
        "broken.txt,A\n"
        "broken.txt,B\n",
    )
    result = check(m)
    assert result.rows == []
    assert [p.reason for p in result.problems] == [
        "template path '../secret.txt' leads outside the manifest's directory",
        "template path 'link.txt' leads outside the manifest's directory",
        "template path '/etc/hostname' must be relative to the manifest",
        "no such template file: missing.txt",
        "template broken.txt, line 2: bad field {name.upper}: a field is {name} "
        "(letters, digits and _, starting with a letter)",
        "template broken.txt, line 2: bad field {name.upper}: a field is {name} "
        "(letters, digits and _, starting with a letter)",
    ]


def test_the_filled_in_text_gets_the_checks_of_any_script(tmp_path: Path) -> None:
    write(tmp_path / "t.txt", "{a}{b}")
    m = write(
        tmp_path / "m.csv",
        f"template,a,b\nt.txt,...,!!!\nt.txt,{'x' * 600},{'y' * 600}\nt.txt,a\u202eb,c\n",
    )
    result = check(m)
    assert [p.reason for p in result.problems] == [
        "the script is empty: it has no words to speak",
        "the script has 1200 characters; the limit is 1000 (FARM_MAX_SCRIPT_CHARS)",
    ]
    assert [r.script for r in result.rows] == ["abc"]  # the bidi override is cleaned out


def test_jsonl_rows_work_the_same(tmp_path: Path) -> None:
    write(tmp_path / "t.txt", "Order {order} for {name}.")
    m = write(
        tmp_path / "m.jsonl",
        '{"template": "t.txt", "name": "Ann", "order": 1042, "output": "a.mp4"}\n'
        '{"template": "t.txt", "name": "Bob", "order": [1]}\n'
        '{"template": "t.txt", "Name": "Cy", "colour": "red"}\n'
        '{"text": "Hi.", "colour": "red"}\n'
        '{"template": "t.txt", "name": "Dee", "order": 7, "first name": "x"}\n',
    )
    result = check(m)
    assert [r.script for r in result.rows] == ["Order 1042 for Ann."]
    assert [(p.line, p.reason) for p in result.problems] == [
        (2, "order must be a string or a number, got list"),
        (
            3,
            "template t.txt: missing variable(s) order (no column, or an empty cell); "
            "unused column(s) colour (not in the template)",
        ),
        (4, "unknown field 'colour'; fields are " + ", ".join(manifest.COLUMNS)),
        (
            5,
            "field 'first name' is neither one of farm's (" + ", ".join(manifest.COLUMNS) + ") "
            "nor a variable name (letters, digits and _, starting with a letter)",
        ),
    ]


def test_the_idempotency_key_covers_the_filled_in_text(tmp_path: Path) -> None:
    write(tmp_path / "t.txt", "Hello {name}.")
    m = write(tmp_path / "m.csv", "template,name,output\nt.txt,Ann,a.mp4\nt.txt,Bob,b.mp4\n")
    ann, bob = check(m).rows
    assert manifest.row_key("b", ann) != manifest.row_key("b", bob)
    again = check(m).rows
    assert [manifest.row_key("b", r) for r in again] == [
        manifest.row_key("b", ann),
        manifest.row_key("b", bob),
    ]
    # The same text from a different template (or as plain text) is the same job.
    write(tmp_path / "u.txt", "Hello {who}.")
    (u,) = check(write(tmp_path / "m2.csv", "template,who,output\nu.txt,Ann,a.mp4\n")).rows
    (plain,) = check(write(tmp_path / "m3.csv", "text,output\nHello Ann.,a.mp4\n")).rows
    assert manifest.row_key("b", u) == manifest.row_key("b", ann) == manifest.row_key("b", plain)
    # With no output column, the output is named by the filled-in text.
    m4 = write(tmp_path / "m4.csv", "template,name\nt.txt,Ann\nt.txt,Bob\n")
    outputs = [r.output for r in check(m4).rows]
    assert len(set(outputs)) == 2 and all(o.startswith("text-") for o in outputs)


def test_the_nightly_inbox_does_not_take_a_template_for_a_script(tmp_path: Path) -> None:
    write(tmp_path / "greet.txt", "Hello {name}.")
    write(tmp_path / "loose.txt", "A loose script.")
    write(tmp_path / "m.csv", "template,name,output\ngreet.txt,Ann,ann.mp4\n")
    rows, problems = nightly.scan(tmp_path)
    assert problems == []
    assert [r.where for r in rows] == ["m.csv line 2", "loose.txt"]
