"""IPA -> viseme -> mouth targets: categories, multi-character symbols, robustness."""

from __future__ import annotations

import random

import numpy as np
import pytest

from models import visemes as v
from models.base import CHANNELS

CH = {name: i for i, name in enumerate(v.MOUTH_CHANNELS)}


def target_of(symbol: str, channel: str) -> float:
    """The mouth target of a phone's dominant viseme for one channel."""
    return float(v.targets(v.viseme_for(symbol))[CH[channel]])


def test_mouth_channels_are_the_first_seven_channels_of_the_track() -> None:
    assert v.MOUTH_CHANNELS == CHANNELS[:7]
    assert [CHANNELS[i] for i in v.MOUTH_INDEX] == list(v.MOUTH_CHANNELS)


def test_at_least_twelve_visemes_with_complete_tables() -> None:
    assert len(v.VISEMES) >= 12
    assert set(v.VISEME_TARGETS) == set(v.VISEME_DOMINANCE)
    for name in v.VISEMES:
        target = v.targets(name)
        assert target.shape == (7,) and target.dtype == np.float32
        assert np.all((target >= 0) & (target <= 1)), name
        assert np.all(v.dominance(name) > 0), name


def test_visemes_are_distinct_shapes() -> None:
    shapes = {tuple(np.round(v.targets(name), 3)) for name in v.VISEMES}
    # "neutral" (unknown consonants, h) may share the velar shape; the rest must differ.
    assert len(shapes) >= len(v.VISEMES) - 1


@pytest.mark.parametrize("symbol", ["p", "b", "m"])
def test_bilabials_press_the_lips_shut(symbol: str) -> None:
    assert v.viseme_for(symbol) == "bilabial"
    assert target_of(symbol, "lip_press") >= 0.95
    assert target_of(symbol, "jaw_open") <= 0.05


@pytest.mark.parametrize("symbol", ["f", "v"])
def test_labiodentals_tuck_the_lower_lip(symbol: str) -> None:
    assert target_of(symbol, "lower_lip_tuck") >= 0.9
    assert target_of(symbol, "lip_press") == 0


@pytest.mark.parametrize("symbol", ["o", "u", "w", "ʊ", "ɔ", "uː", "ˈɔː"])
def test_rounded(symbol: str) -> None:
    assert target_of(symbol, "lip_round") >= 0.6
    assert target_of(symbol, "lip_spread") < target_of(symbol, "lip_round")


@pytest.mark.parametrize("symbol", ["i", "e", "ɪ", "ɛ", "iː"])
def test_spread(symbol: str) -> None:
    assert target_of(symbol, "lip_spread") >= 0.6
    assert target_of(symbol, "lip_round") < 0.1


@pytest.mark.parametrize("symbol", ["a", "ɑ", "æ", "ʌ", "ɑː"])
def test_open_vowels_open_the_jaw_most(symbol: str) -> None:
    assert target_of(symbol, "jaw_open") >= 0.6
    for other in ("i", "u", "ə", "s", "t", "k"):
        assert target_of(symbol, "jaw_open") > target_of(other, "jaw_open")


@pytest.mark.parametrize("symbol", ["l", "t", "d", "n", "θ", "ð"])
def test_tongue_tip_consonants(symbol: str) -> None:
    assert target_of(symbol, "tongue_tip") >= 0.8


def test_distinct_consonant_classes() -> None:
    assert v.viseme_for("θ") == v.viseme_for("ð") != v.viseme_for("t")
    assert v.viseme_for("s") == v.viseme_for("z")
    assert v.viseme_for("k") == v.viseme_for("ɡ") == v.viseme_for("g") == v.viseme_for("ŋ")
    classes = {v.viseme_for(s) for s in ("p", "f", "θ", "s", "ʃ", "k", "ɹ", "t")}
    assert len(classes) == 8


@pytest.mark.parametrize("symbol", ["ʃ", "ʒ", "tʃ", "dʒ"])
def test_postalveolars_protrude_the_lips(symbol: str) -> None:
    assert v.viseme_sequence(symbol) == (("postalveolar", 1.0),)
    assert 0.2 <= target_of(symbol, "lip_round") < target_of("u", "lip_round")


def test_r_is_slightly_rounded() -> None:
    assert 0.2 <= target_of("ɹ", "lip_round") < target_of("u", "lip_round")


@pytest.mark.parametrize("symbol", ["ə", "ɚ"])
def test_schwa_is_mid(symbol: str) -> None:
    jaw = target_of(symbol, "jaw_open")
    assert target_of("i", "jaw_open") <= jaw < target_of("a", "jaw_open")
    assert target_of(symbol, "lip_round") < 0.3 and target_of(symbol, "lip_spread") < 0.5


@pytest.mark.parametrize("symbol", ["_", " ", "", ".", ",", "!", "^", "$", "ˈ", "ː"])
def test_silence_and_punctuation_rest_with_the_mouth_closed(symbol: str) -> None:
    assert v.is_silence(symbol)
    assert v.viseme_sequence(symbol) == (("rest", 1.0),)
    assert target_of(symbol, "jaw_open") == 0


def test_silence_symbol_is_silent() -> None:
    assert v.is_silence(v.SILENCE)


@pytest.mark.parametrize(
    ("symbol", "first", "last"),
    [
        ("aɪ", "open", "spread"),
        ("aʊ", "open", "rounded"),
        ("oʊ", "rounded_open", "rounded"),
        ("ɔɪ", "rounded_open", "spread"),
        ("ˈaɪ", "open", "spread"),
        ("ɑːɹ", "open", "rhotic"),
    ],
)
def test_diphthongs_glide_from_first_to_second_shape(symbol: str, first: str, last: str) -> None:
    sequence = v.viseme_sequence(symbol)
    assert sequence[0][0] == first and sequence[-1][0] == last
    assert sum(share for _, share in sequence) == pytest.approx(1.0)
    assert sequence[0][1] > sequence[-1][1]  # the glide's start carries most of it
    assert v.viseme_for(symbol) == first


def test_diphthong_within_one_viseme_collapses() -> None:
    assert v.viseme_sequence("eɪ") == (("spread", 1.0),)


@pytest.mark.parametrize(("marked", "plain"), [("ɑː", "ɑ"), ("ˈæ", "æ"), ("ˌoʊ", "oʊ"), ("n̩", "n")])
def test_marks_and_diacritics_do_not_change_the_viseme(marked: str, plain: str) -> None:
    assert v.viseme_sequence(marked) == v.viseme_sequence(plain)


def test_stress_of() -> None:
    assert (v.stress_of("ˈa"), v.stress_of("ˌa"), v.stress_of("a")) == (2, 1, 0)


@pytest.mark.parametrize("symbol", ["a", "ɑː", "aɪ", "ɚ", "ᵻ", "ˈiə", "ʊ"])
def test_vowels(symbol: str) -> None:
    assert v.is_vowel(symbol) and not v.is_silence(symbol)


@pytest.mark.parametrize("symbol", ["p", "tʃ", "ɹ", "_", " ", "ˈ"])
def test_not_vowels(symbol: str) -> None:
    assert not v.is_vowel(symbol)


def test_english_espeak_inventory_is_known() -> None:
    # Every phoneme espeak-ng's en-us voice produces (as Piper tokens or event names).
    inventory = (
        "p b t d k ɡ m n ŋ f v θ ð s z ʃ ʒ h tʃ dʒ l ɹ w j ɾ ʔ "
        "i iː ɪ e ɛ æ a ɐ ɑ ɑː ɒ ɔ ɔː o oː u uː ʊ ʌ ə ɚ ɜ ɜː ᵻ "
        "aɪ aʊ eɪ oʊ ɔɪ iə ɪɹ ɛɹ ʊɹ ɑːɹ ɔːɹ oːɹ aɪɚ aɪə əl n̩ l̩"
    ).split()
    for symbol in inventory:
        assert v.is_known(symbol), symbol
        assert v.viseme_for(symbol) not in ("rest", "neutral") or symbol in ("h", "ʔ"), symbol


def test_unknown_symbols_fall_back_without_crashing() -> None:
    rng = random.Random(7)
    pool = [chr(c) for c in range(0x20, 0x2FF)] + ["\u0301", "\u02e5", "🙂", "\ufffd", "ʘ", "ǃ"]
    for _ in range(2000):
        symbol = "".join(rng.choice(pool) for _ in range(rng.randint(0, 5)))
        sequence = v.viseme_sequence(symbol)
        assert sequence and all(name in v.VISEMES for name, _ in sequence)
        assert all(share > 0 for _, share in sequence)
        assert sum(share for _, share in sequence) == pytest.approx(1.0)
        assert v.targets(v.viseme_for(symbol)).shape == (7,)


def test_unknown_vowel_like_and_accented_letters_fall_back_sensibly() -> None:
    assert v.viseme_for("é") == v.viseme_for("e")
    assert v.viseme_for("ɶ") != "neutral"
    assert not v.is_known("ʘ") and v.viseme_for("ʘ") == "neutral"


def test_targets_of_unknown_viseme_name_are_neutral() -> None:
    assert np.array_equal(v.targets("no-such-viseme"), v.targets("neutral"))
