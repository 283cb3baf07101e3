"""Captions (farm/captions.py): the subtitle rules, and SRT / WebVTT read back by
independent parsers (`srt`, `webvtt-py`)."""

from __future__ import annotations

import io
import random

import pytest
import srt
import webvtt

from farm import captions
from farm.captions import (
    LONG_PAUSE_S,
    MAX_CUE_S,
    MAX_LINE_CHARS,
    MAX_LINES,
    MIN_CUE_S,
    Cue,
    Word,
    make_cues,
    to_srt,
    to_vtt,
    words_from_phones,
)
from models.base import Phone

FRAME = 1 / 25

TEXT = (
    "Hello there, and welcome to the farm. This is a rather long sentence that keeps "
    "going on and on, well past the line limit of the captions, and beyond it. Yes. "
    "After a long pause, a last clause."
)


def timed(text: str, pause_after: dict[int, float] | None = None) -> list[Word]:
    words, t = [], 0.3
    for i, tok in enumerate(text.split()):
        d = 0.06 * len(tok) + 0.05
        words.append(Word(tok, t, t + d))
        t += d + 0.04 + (pause_after or {}).get(i, 0.0)
    return words


def check_rules(cues: list[Cue], words: list[Word], total: float | None = None) -> None:
    """Every rule, on any set of cues made from `words`."""
    # every word shown exactly once, in order
    assert " ".join(" ".join(c.lines) for c in cues).split() == [
        t for w in words for t in w.text.split()
    ]
    k = 0
    for i, c in enumerate(cues):
        assert 1 <= len(c.lines) <= MAX_LINES
        assert all(0 < len(line) <= MAX_LINE_CHARS for line in c.lines)
        n = len(" ".join(c.lines).split())
        mine = words[k : k + n]
        k += n
        # timing within a frame of the words': starts on its first word, shows at least
        # until its last word ends
        assert abs(c.start - mine[0].start) <= FRAME
        assert c.end >= mine[-1].end - FRAME
        assert mine[-1].end - mine[0].start <= MAX_CUE_S
        # no long pause inside a cue
        for a, b in zip(mine, mine[1:], strict=False):
            assert b.start - a.end < LONG_PAUSE_S
        if i + 1 < len(cues):
            assert c.end <= cues[i + 1].start + 1e-9  # no overlap
            if cues[i + 1].start - c.start >= MIN_CUE_S:
                assert c.end - c.start >= MIN_CUE_S - 1e-9  # the minimum, where room
        elif total is not None:
            assert c.end <= total + 1e-9


def test_sentences_clauses_and_pauses_break_cues():
    words = timed(TEXT, pause_after={len(TEXT.split("After")[0].split()) - 1: 1.2})
    cues = make_cues(words)
    check_rules(cues, words)
    texts = [" ".join(c.lines) for c in cues]
    assert texts[0] == "Hello there, and welcome to the farm."
    # the long sentence is broken at its clause boundaries, not mid-phrase
    assert any(t.endswith("on and on,") for t in texts)
    # nothing spans the long pause
    assert texts[-1].startswith("After a long pause")


def test_a_short_cue_shows_for_the_minimum_or_joins_its_neighbour():
    words = [Word("Yes.", 0.0, 0.3), Word("Then", 3.0, 3.2), Word("more.", 3.2, 3.5)]
    cues = make_cues(words, total=4.0)
    assert cues[0] == Cue(0.0, MIN_CUE_S, ("Yes.",))
    assert cues[-1].end == 4.0  # the minimum, capped at the end of the media
    # no room for the minimum: the short sentence joins the next cue
    tight = [Word("Yes.", 0.0, 0.3), Word("Then", 0.45, 0.6), Word("more.", 0.6, 0.9)]
    assert [c.lines for c in make_cues(tight)] == [("Yes. Then more.",)]


def test_lines_split_evenly_at_a_boundary():
    words = timed("We render every frame on the workers, and the mux joins them all.")
    (cue,) = make_cues(words)
    assert cue.lines == ("We render every frame on the workers,", "and the mux joins them all.")


def test_an_overlong_word_is_cut_to_the_line_limit():
    words = [Word("x" * 100, 0.0, 2.0)]
    cues = make_cues(words)
    assert all(len(line) <= MAX_LINE_CHARS for c in cues for line in c.lines)
    assert "".join("".join(c.lines) for c in cues) == "x" * 100


@pytest.mark.parametrize("seed", range(20))
def test_random_speech_keeps_every_rule(seed):
    rng = random.Random(seed)
    vocab = "a an the farm renders, video frames. quickly and but with of extraordinary " * 3
    tokens = [rng.choice(vocab.split()) for _ in range(rng.randint(1, 120))]
    words, t = [], rng.random()
    for tok in tokens:
        d = rng.uniform(0.1, 0.6)
        words.append(Word(tok, t, t + d))
        t += d + (rng.uniform(0.5, 2) if rng.random() < 0.1 else rng.uniform(0, 0.15))
    cues = make_cues(words, total=t + 0.5)
    check_rules(cues, words, total=t + 0.5)


def test_srt_and_vtt_parse_back_with_independent_parsers():
    words = timed(TEXT + " Fish & chips <b>bold</b> --> arrows.")
    cues = make_cues(words)
    parsed = list(srt.parse(to_srt(cues)))
    assert len(parsed) == len(cues)
    for p, c in zip(parsed, cues, strict=True):
        assert abs(p.start.total_seconds() - c.start) < 0.001
        assert abs(p.end.total_seconds() - c.end) < 0.001
        assert p.content.split("\n") == list(c.lines)
    vtt = webvtt.from_buffer(io.StringIO(to_vtt(cues)))
    assert len(vtt.captions) == len(cues)
    for v, c in zip(vtt.captions, cues, strict=True):
        assert abs(v.start_in_seconds + v.start_time.milliseconds / 1000 - c.start) < 0.0011
        assert v.raw_text.split("\n") == [
            ln.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") for ln in c.lines
        ]
    assert to_vtt(cues).startswith("WEBVTT\n\n")
    assert "-->" not in "".join(v.raw_text for v in vtt.captions)  # escaped in WebVTT


def test_clock_formats():
    cue = Cue(3661.5, 3662.042, ("x",))
    assert "01:01:01,500 --> 01:01:02,042" in to_srt([cue])
    assert "01:01:01.500 --> 01:01:02.042" in to_vtt([cue])
    ass = captions.to_ass([cue], 640, 360)
    assert "PlayResY: 360" in ass and "Dialogue: 0,1:01:01.50,1:01:02.04,Default" in ass


def test_words_from_phones_follow_the_clauses_and_pauses():
    # two stretches of speech split by a pause, two clauses: each clause its stretch
    p = [Phone("_", 0.0, 0.2)]
    p += [Phone(s, 0.2 + i * 0.1, 0.3 + i * 0.1) for i, s in enumerate("hɛloʊ")]
    p += [Phone("_", 0.7, 1.2)]
    p += [Phone(s, 1.2 + i * 0.1, 1.3 + i * 0.1) for i, s in enumerate("wɜːldzɛnd")]
    words = words_from_phones("Hello, wide world.", p, offset=1.0)
    assert [w.text for w in words] == ["Hello,", "wide", "world."]
    assert words[0].start == pytest.approx(1.2) and words[0].end == pytest.approx(1.7)
    assert words[1].start == pytest.approx(2.2)  # after the pause, not inside it
    assert words[-1].end == pytest.approx(3.1)
    assert all(a.end <= b.start + 1e-9 for a, b in zip(words, words[1:], strict=False))
    assert words_from_phones("", p) == [] and words_from_phones("Hi", [Phone("_", 0, 1)]) == []


def test_burnt_captions_are_sized_so_the_widest_line_fits_between_the_margins():
    from farm.media import caption_ems

    line = "Our new product ships today, and here is"
    cues = [Cue(0.0, 2.0, (line, "what it does for you."))]

    def size(ass: str) -> int:
        style = next(ln for ln in ass.splitlines() if ln.startswith("Style: Default"))
        return int(style.split(",")[2])

    wide = size(captions.to_ass(cues, 1920, 1080, caption_ems))
    tall = size(captions.to_ass(cues, 1080, 1920, caption_ems))
    assert wide == round(1080 * captions.FONT_SIZE_OF_HEIGHT)  # fits: the height decides
    side = round(1080 * captions.SIDE_OF_WIDTH)
    assert tall * caption_ems(line) <= 1080 - 2 * side  # the width decides
    assert tall * caption_ems(line) > 0.9 * (1080 - 2 * side)  # and not much smaller
    estimated = size(captions.to_ass(cues, 1080, 1920))  # no font at hand: an upper bound
    assert estimated * caption_ems(line) <= 1080 - 2 * side
