"""Recognised words to phone timings: pure functions, no model."""

from __future__ import annotations

import pytest

from models.asr import MIN_PAUSE_S, VOWEL_WEIGHT, clean_word, phones_for_words, spread_word
from models.visemes import SILENCE, is_vowel

BOB = ["b", "ˈɑː", "b"]
BOUGHT = ["b", "ˈɔː", "t"]
IT = ["ɪ", "t"]


def _tiles(phones, total):
    assert phones[0].start == 0.0 and phones[-1].end == pytest.approx(total)
    for a, b in zip(phones, phones[1:], strict=False):
        assert a.end == pytest.approx(b.start)  # no gaps, no overlaps
        assert a.start <= a.end
    assert all(p.end > p.start for p in phones)


def test_spread_word_stays_inside_the_word_and_weights_vowels():
    phones = spread_word(BOB, 1.0, 1.4)
    assert [p.symbol for p in phones] == ["b", "ɑː", "b"]
    assert phones[0].start == 1.0 and phones[-1].end == 1.4
    assert [p.stress for p in phones] == [0, 2, 0]
    durations = [p.end - p.start for p in phones]
    assert durations[1] == pytest.approx(VOWEL_WEIGHT * durations[0])
    assert durations[0] == pytest.approx(durations[2])


def test_words_become_phones_with_pauses_between():
    words = [(BOB, 0.5, 0.9), (BOUGHT, 0.92, 1.3), (IT, 2.0, 2.2)]
    phones = phones_for_words(words, 3.0)
    _tiles(phones, 3.0)
    symbols = [p.symbol for p in phones]
    # leading silence, Bob, bought (the 20 ms gap is no pause), a pause, it, trailing silence
    assert symbols == ["_", "b", "ɑː", "b", "b", "ɔː", "t", "_", "ɪ", "t", "_"]
    pause = phones[7]
    assert (pause.start, pause.end) == (pytest.approx(1.3), pytest.approx(2.0))
    # every sound lies within its word's span
    for p in phones[1:4]:
        assert 0.5 <= p.start and p.end <= 0.92 + 1e-9
    for p in phones[8:10]:
        assert 2.0 <= p.start and p.end <= 2.2 + 1e-9


def test_gap_longer_than_min_pause_is_a_pause():
    gap = MIN_PAUSE_S + 0.02
    phones = phones_for_words([(BOB, 0.0, 0.4), (IT, 0.4 + gap, 0.8)], 0.8)
    _tiles(phones, 0.8)
    assert [p.symbol for p in phones] == ["b", "ɑː", "b", SILENCE, "ɪ", "t"]


def test_overlapping_and_out_of_range_word_times_stay_monotonic():
    words = [(BOB, -0.2, 0.5), (BOUGHT, 0.4, 0.9), (IT, 0.85, 5.0), (IT, 6.0, 7.0)]
    phones = phones_for_words(words, 1.5)
    _tiles(phones, 1.5)
    starts = [p.start for p in phones]
    assert starts == sorted(starts)
    assert sum(1 for p in phones if is_vowel(p.symbol)) == 3  # the last word is past the end


def test_no_words_is_one_pause():
    phones = phones_for_words([], 2.0)
    assert [(p.symbol, p.start, p.end) for p in phones] == [(SILENCE, 0.0, 2.0)]


def test_word_without_phones_is_silence():
    phones = phones_for_words([([], 0.5, 1.0)], 1.0)
    assert [p.symbol for p in phones] == [SILENCE]


@pytest.mark.parametrize(
    "raw, clean", [(" Hello,", "Hello"), ("don't", "don't"), (" ...", ""), ("'Bob'?", "Bob")]
)
def test_clean_word(raw, clean):
    assert clean_word(raw) == clean


# --- word times refined against the audio (issue 14) --------------------------------------


def _bursts(spans: list[tuple[float, float]], seconds: float, rate: int = 16_000):
    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    out = np.zeros(t.size)
    for start, end in spans:
        inside = (t >= start) & (t < end)
        out[inside] = 0.4 * np.sin(2 * np.pi * 180 * t[inside])
    return (out * 32767).astype(np.int16), rate


def test_late_word_times_move_onto_the_sound():
    from models.asr import Word, align_to_sound

    samples, rate = _bursts([(0.5, 1.5), (2.2, 3.0)], 3.5)
    # Word times 120 ms late, as Whisper's attention times run (measured ~75 ms median).
    heard = [Word("a", 0.62, 1.0), Word("b", 1.0, 1.62), Word("c", 2.32, 3.12)]
    a, b, c = align_to_sound(heard, samples, rate)
    assert a.start == pytest.approx(0.5, abs=0.011) and b.end == pytest.approx(1.5, abs=0.011)
    assert c.start == pytest.approx(2.2, abs=0.011) and c.end == pytest.approx(3.0, abs=0.011)
    assert a.end == pytest.approx(b.start) and 0.5 < a.end < 1.5  # proportions kept
    # Trimming to the sound inside a word (the recogniser's edges pulled in) could not
    # move the onsets earlier: the mouth trailed the sound.
    from models.asr import trim_to_voice, voiced_frames

    trimmed = trim_to_voice(heard, voiced_frames(samples, rate))
    assert trimmed[0].start >= 0.6 and trimmed[2].start >= 2.3


def test_word_far_from_any_sound_is_kept_as_heard():
    from models.asr import Word, align_to_sound

    samples, rate = _bursts([(0.5, 1.0)], 3.0)
    heard = [Word("a", 0.55, 1.05), Word("ghost", 2.2, 2.5)]
    a, ghost = align_to_sound(heard, samples, rate)
    assert a.start == pytest.approx(0.5, abs=0.011) and ghost == heard[1]
