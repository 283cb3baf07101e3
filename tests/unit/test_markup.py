"""Script markup (farm/markup.py): the SSML subset, its refusals, what the segmenter
makes of it, and what emphasis does to the plan."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from farm import markup
from farm.errors import InvalidInput
from farm.markup import EMPHASIS_OFF, EMPHASIS_ON, speech_of
from farm.script import min_seconds, split_script
from models.base import CHANNEL_INDEX, Phone
from models.motion import build_track


def segments(text: str, max_chars: int = 400, pause_ms: int = 350) -> list[tuple[str, int]]:
    return split_script(text, max_chars, pause_ms)


def refused(text: str, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        segments(text)


# --- detection: plain text stays plain --------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello there. How are you?\n\nFine.", [("Hello there. How are you?", 700), ("Fine.", 0)]),
        (
            "If a < b & c > d, then <b>bold</b> &amp; x.",
            [("If a < b & c > d, then <b>bold</b> &amp; x.", 0)],
        ),
        (
            "A <breakfast> and a <speaker> are not tags.",
            [("A <breakfast> and a <speaker> are not tags.", 0)],
        ),
    ],
)
def test_plain_text_is_segmented_as_before(text, expected):
    assert not markup.is_markup(text)
    assert segments(text) == expected
    for segment, _ in expected:
        assert speech_of(segment) == (segment, 1.0, [])


@pytest.mark.parametrize(
    "text",
    [
        "<speak>Hi.</speak>",
        'Hi <break time="1s"/> there',
        "a <emphasis>b</emphasis>",
        '<prosody rate="slow">x</prosody>',
        'x <say-as interpret-as="characters">ab</say-as>',
        "x </emphasis >",
    ],
)
def test_any_supported_tag_makes_a_script_markup(text):
    assert markup.is_markup(text)


# --- what the segmenter makes of markup -------------------------------------------------------


def test_a_break_ends_a_segment_and_is_its_pause():
    assert segments('Wait <break time="800ms"/> for it.') == [("Wait", 800), ("for it.", 0)]
    assert segments('One. <break time="1.5s"/>Two.') == [("One.", 1500), ("Two.", 0)]
    assert segments('A<break time="0ms"/>B') == [("A", 0), ("B", 0)]
    # Breaks in a row add up; a break before any words or after the last adds nothing.
    assert segments(
        '<break time="1s"/>A <break time="1s"/><break time="250ms"/> B<break time="2s"/>'
    ) == [
        ("A", 1250),
        ("B", 0),
    ]
    # The pauses the segmenter makes itself are kept around the breaks.
    assert segments('One. Two.\n\nThree <break time="500ms"/> four.') == [
        ("One. Two.", 700),
        ("Three", 500),
        ("four.", 0),
    ]


@pytest.mark.parametrize(
    "time, message",
    [
        ("11s", "over the limit of 10 s"),
        ("10001ms", "over the limit"),
        ("-1s", "write e.g."),
        ("fast", "write e.g."),
        ("1 min", "write e.g."),
    ],
)
def test_break_times_are_bounded_and_well_formed(time, message):
    refused(f'A <break time="{time}"/> B', message)
    refused("A <break/> B", "needs a time")
    refused('A <break strength="weak"/> B', "no attribute 'strength'")


def test_emphasis_marks_each_word_and_survives_segmenting():
    ((segment, pause),) = segments("This is <emphasis>very important</emphasis>, really.")
    assert (
        segment
        == f"This is {EMPHASIS_ON}very{EMPHASIS_OFF} {EMPHASIS_ON}important{EMPHASIS_OFF}, really."
    )
    words, rate, spans = speech_of(segment)
    assert words == "This is very important, really." and rate == 1.0
    assert [words[a:b] for a, b in spans] == ["very", "important"]
    # level none or reduced is no emphasis; an unknown level is refused.
    assert segments('a <emphasis level="none">b</emphasis>') == [("a b", 0)]
    refused('a <emphasis level="loud">b</emphasis>', "strong, moderate, reduced or none")
    # A hard cut inside a long emphasised word keeps the marks paired in each segment.
    for segment, _ in segments(f"<emphasis>{'x' * 30}</emphasis>", max_chars=12):
        assert segment.count(EMPHASIS_ON) == segment.count(EMPHASIS_OFF) == 1


def test_prosody_rate_splits_segments_and_rides_along():
    parts = segments(
        'Normal. <prosody rate="slow">Slowly, <emphasis>now</emphasis>.</prosody> Back.'
    )
    assert [speech_of(t)[:2] for t, _ in parts] == [
        ("Normal.", 1.0),
        ("Slowly, now.", 0.8),
        ("Back.", 1.0),
    ]
    assert [p for _, p in parts] == [350, 350, 0]
    assert [speech_of(t)[2] for t, _ in parts][1] == [(8, 11)]
    for value, rate in [
        ("x-slow", 0.6),
        ("x-fast", 1.5),
        ("150%", 1.5),
        ("50%", 0.5),
        ("200%", 2.0),
    ]:
        ((text, _),) = segments(f'<prosody rate="{value}">Hi.</prosody>')
        assert speech_of(text) == ("Hi.", rate, [])
    # The innermost rate counts; medium is the voice's own.
    assert [
        speech_of(t)[1]
        for t, _ in segments('<prosody rate="fast">a <prosody rate="slow">b</prosody> c</prosody>')
    ] == [1.25, 0.8, 1.25]
    for bad in ("300%", "49%", "loud", "-10%", ""):
        refused(f'<prosody rate="{bad}">x</prosody>', "a percentage from 50% to 200%")
    refused('<prosody pitch="high">x</prosody>', "no attribute 'pitch'")


def test_say_as_characters_spells_letters_out():
    assert segments('Call the <say-as interpret-as="characters">fbi</say-as> now.') == [
        ("Call the eff bee eye now.", 0)
    ]
    assert segments('Code <say-as interpret-as="characters">A-7</say-as>.') == [("Code ay 7 .", 0)]
    refused('<say-as interpret-as="date">1/2</say-as>', 'interpret-as="characters" only')
    refused('<say-as interpret-as="characters"><emphasis>a</emphasis></say-as>', "inside <say-as>")


def test_speak_encloses_the_whole_script_only():
    assert segments("<speak>\n  Hello.\n</speak>\n") == [("Hello.", 0)]
    assert segments('<speak version="1.1" xml:lang="en-US">Hi.</speak>') == [("Hi.", 0)]
    refused("Hi <speak>there</speak>", "may only enclose the whole script")
    refused("<emphasis><speak>x</speak></emphasis>", "may only enclose")


def test_xml_escapes_work_in_markup():
    assert segments("<speak>Fish &amp; chips &lt;3 &#x41;.</speak>") == [("Fish & chips <3 A.", 0)]


# --- refusals, with their line --------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("<speak>\nHello.\n<voice name='x'>Hi</voice>\n</speak>", "line 3: unknown tag <voice>"),
        ("Line one <emphasis>yes</emphasis>.\n\n<b>bold</b>", "line 3: unknown tag <b>"),
        ("<speak>\nHello <emphasis>there.\n</speak>", "line 3: mismatched tag"),
        ("Hello <emphasis>there.", "line 1: mismatched tag .a tag is not closed"),
        ("<speak>Fish & chips</speak>", "line 1: not well-formed.*&amp;"),
        ("<speak>\n\nA &nbsp; B</speak>", "line 3: undefined entity"),
        ('<speak>\n<break time="1s">x</break></speak>', "line 2: <break> must be empty"),
        (
            "<speak><!-- fine -->\n<?pi data?>\n<emphasis>x</emphasis><x/></speak>",
            "line 3: unknown tag <x>",
        ),
    ],
)
def test_bad_markup_is_refused_with_its_line(text, message):
    refused(text, f"^script markup, {message}")


@pytest.mark.parametrize(
    "text, line",
    [
        ('<!DOCTYPE speak [<!ENTITY a "aaaaaaaaaa">]>\n<speak>&a;</speak>', 1),
        # The billion laughs: refused before any entity is declared, let alone expanded.
        (
            '<speak>\n<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>'
            "&lol2;</speak>",
            2,
        ),
        ('<speak>x</speak>\n\n<!ENTITY ext SYSTEM "file:///etc/passwd">', 3),
        ('<emphasis>x</emphasis>\n<!doctype x SYSTEM "http://example.com/x.dtd">', 2),
    ],
)
def test_declarations_and_entities_are_refused(text, line):
    refused(text, f"^script markup, line {line}: declarations .* are not allowed")


def test_the_parser_itself_refuses_a_dtd():
    """Past our own check too: defusedxml is called with DTDs and entities forbidden."""
    from defusedxml import DTDForbidden
    from defusedxml.sax import parseString

    with pytest.raises(DTDForbidden):
        parseString(b'<!DOCTYPE a [<!ENTITY b "c">]><a>&b;</a>', markup._Handler(), forbid_dtd=True)


def test_the_length_estimate_counts_words_not_tags():
    tags = '<prosody rate="100%"><emphasis level="strong">word</emphasis></prosody> ' * 20
    plain = "word " * 20
    assert min_seconds(tags, 400, 350) <= min_seconds(plain.strip(), 400, 350)
    assert min_seconds('A <break time="10s"/> B', 400, 350) > 10


# --- the plan: emphasis --------------------------------------------------------------------


def _phones(emphasis: bool) -> list[Phone]:
    """'we need it now'; 'need it' emphasised when `emphasis`."""
    spoken = [
        ("w", 0, False), ("i", 2, False), ("n", 0, True), ("i", 2, True), ("d", 0, True),
        ("ɪ", 0, True), ("t", 0, True), ("n", 0, False), ("aʊ", 2, False),
    ]  # fmt: skip
    out, t = [Phone("_", 0.0, 0.5)], 0.5
    for symbol, stress, marked in spoken:
        out.append(Phone(symbol, t, t + 0.15, stress, emphasis and marked))
        t += 0.15
    out.append(Phone("_", t, t + 0.8))
    return out


def test_emphasis_gives_a_stronger_nod_brow_and_jaw():
    seconds, fps = 3.0, 25
    plain = build_track(_phones(False), seconds, fps, seed=3)
    marked = build_track(_phones(True), seconds, fps, seed=3)
    assert np.array_equal(plain, build_track(_phones(False), seconds, fps, seed=3))
    assert np.array_equal(marked, build_track(_phones(True), seconds, fps, seed=3))
    need_it = slice(int(0.8 * fps), int(1.55 * fps))
    for channel in ("jaw_open", "brow_raise", "head_pitch"):
        c = CHANNEL_INDEX[channel]
        assert marked[need_it, c].max() > plain[need_it, c].max() + 0.05, channel
    # Before the emphasis ("we") the jaw is the same.
    jaw = CHANNEL_INDEX["jaw_open"]
    we = slice(int(0.5 * fps), int(0.75 * fps))
    assert np.allclose(marked[we, jaw], plain[we, jaw], atol=0.02)
    # Phones with no emphasis at all plan exactly as before the flag existed.
    stripped = [dataclasses.replace(p, emphasis=False) for p in _phones(True)]
    assert np.array_equal(build_track(stripped, seconds, fps, seed=3), plain)


def test_phone_json_carries_emphasis_only_where_set():
    from models.tts import phones_from_json, phones_to_json

    phones = _phones(True)
    items = phones_to_json(phones)
    assert "emphasis" not in items[0] and items[3]["emphasis"] is True
    assert phones_from_json(items) == phones


@pytest.mark.parametrize("voice", ["joe", "espeak"])
def test_the_tts_marks_the_emphasised_words_phones(voice):
    from models import tts

    ((segment, _),) = segments("Say it <emphasis>very loudly</emphasis> now.")
    words, rate, spans = speech_of(segment)
    speech = tts.synthesize(words, voice, rate, spans)
    sounds = [p for p in speech.phones if p.symbol != "_"]
    marked = "".join(p.symbol for p in sounds if p.emphasis)
    assert marked.startswith("v") and "l" in marked  # "very loudly"
    assert not any(p.emphasis for p in sounds[:3]) and not sounds[-1].emphasis
    if voice == "joe":  # Piper is deterministic: only the flag differs
        alone = tts.synthesize(words, voice)
        assert np.array_equal(alone.samples, speech.samples)
        assert [dataclasses.replace(p, emphasis=False) for p in speech.phones] == alone.phones


def test_a_rate_changes_how_long_the_voice_speaks():
    from models import tts

    normal = tts.synthesize("The quick brown fox jumps over the lazy dog.", "joe")
    slow = tts.synthesize("The quick brown fox jumps over the lazy dog.", "joe", 0.6)
    fast = tts.synthesize("The quick brown fox jumps over the lazy dog.", "joe", 1.5)
    assert slow.seconds > 1.4 * normal.seconds and fast.seconds < 0.8 * normal.seconds
