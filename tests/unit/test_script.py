import pytest

from farm.errors import InvalidInput
from farm.script import clean_script, decode_script, split_script


def test_sentences_are_packed_up_to_the_limit():
    text = "One. Two two. Three three three. Four."
    parts = split_script(text, max_chars=16, pause_ms=300)
    assert [p for p, _ in parts] == ["One. Two two.", "Three three", "three. Four."]
    assert " ".join(p for p, _ in parts).split() == text.split()
    assert all(len(p) <= 16 for p, _ in parts)


def test_paragraph_breaks_pause_twice_as_long_and_last_segment_none():
    parts = split_script("First one.\n\nSecond one. Third.", max_chars=12, pause_ms=300)
    assert parts[0] == ("First one.", 600)
    assert parts[-1][1] == 0
    assert [p for p, _ in parts] == ["First one.", "Second one.", "Third."]


def test_long_sentence_is_cut_at_a_clause_then_a_space():
    sentence = "alpha beta gamma, delta epsilon zeta eta theta iota kappa lambda"
    parts = split_script(sentence, max_chars=20, pause_ms=100)
    assert parts[0][0] == "alpha beta gamma,"
    assert all(len(p) <= 20 for p, _ in parts)
    assert " ".join(p for p, _ in parts).split() == sentence.split()


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"   \n\t  \n", "empty"),
        (b"... !!! ???", "empty"),
        (b"\xff\xfe\xfa hello", "UTF-8"),
        (b"hello\x00world", "binary"),
        (b"x" * 101, "limit is 100"),
    ],
)
def test_bad_scripts_are_refused_with_a_reason(data, message):
    with pytest.raises(InvalidInput, match=message):
        decode_script(data, max_chars=100)


def test_bidi_overrides_and_control_characters_are_removed():
    text = clean_script("Hello\u202e dlrow\x07 there", max_chars=100)
    assert "\u202e" not in text and "\x07" not in text
    assert text.split() == ["Hello", "dlrow", "there"]


def test_bom_is_ignored():
    assert decode_script("\ufeffHi there.".encode(), 100) == "Hi there."
