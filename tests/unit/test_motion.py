"""The per-frame motion track: shape, determinism, lip sync properties, face and head."""

from __future__ import annotations

import math

import numpy as np
import pytest

from farm.errors import InvalidInput
from models.base import CHANNEL_INDEX, CHANNELS, Phone
from models.motion import build_track

MOUTH = [CHANNEL_INDEX[c] for c in CHANNELS[:7]]
JAW, PRESS = CHANNEL_INDEX["jaw_open"], CHANNEL_INDEX["lip_press"]
ROUND, SPREAD = CHANNEL_INDEX["lip_round"], CHANNEL_INDEX["lip_spread"]
BLINK_L, BLINK_R = CHANNEL_INDEX["blink_left"], CHANNEL_INDEX["blink_right"]
HEAD = [CHANNEL_INDEX[c] for c in ("head_yaw", "head_pitch", "head_roll")]
PITCH = CHANNEL_INDEX["head_pitch"]
BROW = CHANNEL_INDEX["brow_raise"]
GAZE = [CHANNEL_INDEX["gaze_x"], CHANNEL_INDEX["gaze_y"]]
SIGNED = HEAD + GAZE


def timeline(spec: list[tuple[str, float] | tuple[str, float, int]], start: float = 0.0):
    """Phones laid end to end from (symbol, seconds[, stress])."""
    phones, t = [], start
    for item in spec:
        symbol, length = item[0], item[1]
        stress = item[2] if len(item) > 2 else 0
        phones.append(Phone(symbol, t, t + length, stress))
        t += length
    return phones


# "Bob met Pam." with realistic durations, between pauses.
BOB_MET_PAM = [
    ("_", 0.5),
    ("b", 0.07),
    ("ɑː", 0.16, 2),
    ("b", 0.06),
    ("m", 0.07),
    ("ɛ", 0.1, 2),
    ("t", 0.08),
    ("p", 0.09),
    ("æ", 0.15, 2),
    ("m", 0.09),
    ("_", 0.6),
]


def speech_minute() -> tuple[list[Phone], float]:
    """About 60 s of syllables in phrases of 2-3 s separated by pauses."""
    rng = np.random.default_rng(1234)
    onsets = ["p", "t", "k", "s", "m", "l", "d", "w", "f", "h", "b", "n"]
    nuclei = ["ɑː", "i", "u", "ɛ", "ə", "aɪ", "oʊ", "æ", "ɪ", "ʌ"]
    spec: list = [("_", 0.4)]
    while sum(item[1] for item in spec) < 58:
        for _ in range(rng.integers(6, 12)):
            spec.append((str(rng.choice(onsets)), float(rng.uniform(0.05, 0.1))))
            stress = int(rng.choice([0, 0, 1, 2]))
            spec.append((str(rng.choice(nuclei)), float(rng.uniform(0.08, 0.22)), stress))
        spec.append(("_", float(rng.uniform(0.3, 0.8))))
    phones = timeline(spec)
    return phones, phones[-1].end


def frames_in(start: float, end: float, fps: int) -> np.ndarray:
    """Frame indices whose centres fall in [start, end]."""
    first = math.ceil(start * fps - 0.5)
    last = math.floor(end * fps - 0.5)
    return np.arange(max(first, 0), last + 1)


@pytest.mark.parametrize(
    ("seconds", "fps"), [(2.0, 25), (2.01, 25), (3.3, 30), (1.0, 60), (0.5, 24)]
)
def test_shape_and_dtype(seconds: float, fps: int) -> None:
    track = build_track(timeline(BOB_MET_PAM), seconds, fps, seed=1)
    assert track.dtype == np.float32
    assert track.shape == (math.ceil(seconds * fps), len(CHANNELS))


def test_empty_job_and_no_phones() -> None:
    assert build_track([], 0.0, 25, 0).shape == (0, len(CHANNELS))
    track = build_track([], 4.0, 25, 0)
    assert track.shape == (100, len(CHANNELS))
    assert np.all(track[:, JAW] <= 0.02)  # nothing said: the mouth stays shut


@pytest.mark.parametrize(("seconds", "fps"), [(-1.0, 25), (float("nan"), 25), (1.0, 0), (1.0, -5)])
def test_invalid_arguments(seconds: float, fps: int) -> None:
    with pytest.raises(InvalidInput):
        build_track([], seconds, fps, 0)


def test_same_inputs_same_track() -> None:
    phones, seconds = speech_minute()
    first = build_track(phones, seconds, 25, seed=42)
    second = build_track(list(phones), seconds, 25, seed=42)
    assert np.array_equal(first, second)


def test_seed_changes_face_and_head_but_not_mouth() -> None:
    phones, seconds = speech_minute()
    a = build_track(phones, seconds, 25, seed=1)
    b = build_track(phones, seconds, 25, seed=2)
    assert np.array_equal(a[:, MOUTH], b[:, MOUTH])
    assert not np.array_equal(a[:, BLINK_L], b[:, BLINK_L])
    for column in HEAD + GAZE:
        assert not np.allclose(a[:, column], b[:, column])


def test_negative_and_huge_seeds_work() -> None:
    phones = timeline(BOB_MET_PAM)
    assert build_track(phones, 2.0, 25, seed=-7).shape[0] == 50
    assert build_track(phones, 2.0, 25, seed=2**63 - 1).shape[0] == 50


def test_ranges_respected() -> None:
    phones, seconds = speech_minute()
    for seed in range(5):
        track = build_track(phones, seconds, 30, seed)
        assert np.all(np.isfinite(track))
        face = [i for i in range(len(CHANNELS)) if i not in SIGNED]
        assert track[:, face].min() >= 0 and track[:, face].max() <= 1
        assert track[:, SIGNED].min() >= -1 and track[:, SIGNED].max() <= 1


@pytest.mark.parametrize("fps", [25, 30, 60])
def test_mouth_closed_in_silences_and_before_and_after_speech(fps: int) -> None:
    phones, seconds = speech_minute()
    track = build_track(phones, seconds + 1.0, fps, seed=3)  # a second of video after the audio
    pauses = [p for p in phones if p.symbol == "_" and p.end - p.start >= 0.3]
    assert len(pauses) > 5
    for pause in pauses:
        # Lips may still be closing at the very start, or already forming the next sound.
        idx = frames_in(pause.start + 0.12, pause.end - 0.12, fps)
        assert idx.size > 0
        assert track[idx, JAW].max() < 0.05, pause
        assert track[idx][:, [ROUND, SPREAD]].max() < 0.1, pause
    tail = frames_in(seconds + 0.15, seconds + 1.0, fps)
    assert track[tail, JAW].max() < 0.05


@pytest.mark.parametrize("fps", [25, 30, 60])
def test_bilabial_closures_are_held_visibly(fps: int) -> None:
    phones, seconds = speech_minute()
    track = build_track(phones, seconds, fps, seed=0)
    needed = max(2, math.ceil(0.07 * fps))
    checked = 0
    for phone in phones:
        if phone.symbol not in ("p", "b", "m"):
            continue
        # The closure may lead the sound (anticipation) by up to a frame plus 60 ms.
        near = frames_in(phone.start - 0.06 - 1 / fps, phone.end + 1 / fps, fps)
        closed = (track[near, PRESS] >= 0.95) & (track[near, JAW] <= 0.05)
        assert closed.sum() >= needed, (phone, track[near][:, [JAW, PRESS]])
        checked += 1
    assert checked > 20


def test_short_closure_at_25_fps_still_spans_two_frames() -> None:
    phones = timeline([("_", 0.3), ("ɑː", 0.15, 2), ("b", 0.03), ("ɑː", 0.15), ("_", 0.3)])
    track = build_track(phones, 1.0, 25, seed=0)
    assert ((track[:, PRESS] >= 0.95) & (track[:, JAW] <= 0.05)).sum() >= 2


def test_open_vowels_open_the_mouth_and_rounding_differs_from_spreading() -> None:
    phones = timeline(
        [("_", 0.5), ("ɑː", 0.3, 2), ("_", 0.5), ("uː", 0.3, 2), ("_", 0.5), ("iː", 0.3, 2)]
        + [("_", 0.5)]
    )
    track = build_track(phones, phones[-1].end, 25, seed=0)

    def middle(p: Phone) -> np.ndarray:
        return track[frames_in(p.start + 0.08, p.end - 0.08, 25)]

    a, u, i = phones[1], phones[3], phones[5]
    assert middle(a)[:, JAW].min() > 0.5
    assert middle(u)[:, ROUND].min() > 0.6 > middle(u)[:, SPREAD].max()
    assert middle(i)[:, SPREAD].min() > 0.6 > middle(i)[:, ROUND].max()
    assert middle(a)[:, JAW].mean() > middle(i)[:, JAW].mean() + 0.2


@pytest.mark.parametrize("before", ["_", "s"])
def test_lips_anticipate_the_next_sound(before: str) -> None:
    # Rounding for "uː" is half-way formed 30-100 ms before the vowel is heard.
    phones = timeline([("_", 0.5), (before, 0.15), ("uː", 0.3, 2), ("_", 0.5)])
    fps = 100
    track = build_track(phones, phones[-1].end, fps, seed=0)
    vowel = phones[2]
    peak = track[frames_in(vowel.start, vowel.end, fps), ROUND].max()
    rising = np.flatnonzero(track[:, ROUND] >= 0.5 * peak)[0]
    lead = vowel.start - (rising + 0.5) / fps
    assert 0.03 <= lead <= 0.1


def test_tongue_consonants_let_the_vowel_rounding_through() -> None:
    # Coarticulation: the /t/ of "two" is already rounded, the /t/ of "tea" is spread.
    two = timeline([("_", 0.5), ("t", 0.08), ("uː", 0.3, 2), ("_", 0.5)])
    tea = timeline([("_", 0.5), ("t", 0.08), ("iː", 0.3, 2), ("_", 0.5)])
    fps = 100
    at_t = frames_in(0.5 + 0.02, 0.5 + 0.06, fps)
    a = build_track(two, 1.4, fps, 0)[at_t]
    b = build_track(tea, 1.4, fps, 0)[at_t]
    assert a[:, ROUND].mean() > b[:, ROUND].mean() + 0.2
    assert b[:, SPREAD].mean() > a[:, SPREAD].mean() + 0.2


@pytest.mark.parametrize(("fps", "bound"), [(25, 0.65), (30, 0.55), (60, 0.3)])
def test_per_frame_change_is_bounded(fps: int, bound: float) -> None:
    phones, seconds = speech_minute()
    track = build_track(phones, seconds, fps, seed=5)
    steps = np.abs(np.diff(track, axis=0))
    assert steps[:, MOUTH].max() <= bound
    assert steps[:, JAW].max() <= bound * 0.75  # the jaw is slower than the lips
    assert steps[:, HEAD].max() <= 0.05 * 25 / fps
    assert steps[:, BROW].max() <= 0.3


def test_per_frame_change_bounded_even_for_adversarial_input() -> None:
    # Alternating 10 ms closures and wide vowels: targets flip every frame.
    spec = [("_", 0.3)] + [("b", 0.01), ("ɑː", 0.01, 2)] * 100 + [("_", 0.3)]
    phones = timeline(spec)
    track = build_track(phones, phones[-1].end, 25, seed=0)
    assert np.abs(np.diff(track[:, MOUTH], axis=0)).max() <= 0.65


def blink_peaks(column: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    above = column > threshold
    return np.flatnonzero(above[1:] & ~above[:-1]) + 1


def test_blink_rate_is_human() -> None:
    phones, seconds = speech_minute()
    rates = []
    for seed in range(10):
        track = build_track(phones, seconds, 25, seed)
        per_minute = blink_peaks(track[:, BLINK_L]).size * 60.0 / seconds
        assert 8 <= per_minute <= 30, (seed, per_minute)
        rates.append(per_minute)
    assert 13 <= np.mean(rates) <= 22


def test_blinks_are_brief_fully_closed_and_both_eyes_together() -> None:
    phones, seconds = speech_minute()
    fps = 100
    asymmetric = 0
    total = 0
    for seed in range(6):
        track = build_track(phones, seconds, fps, seed)
        left, right = track[:, BLINK_L], track[:, BLINK_R]
        assert max(left.max(), right.max()) == pytest.approx(1.0, abs=1e-6)
        for onset in blink_peaks(np.maximum(left, right), 0.05):
            closed = np.maximum(left, right)[onset : onset + 40] > 0.05
            length = np.argmin(closed) if not closed.all() else closed.size
            assert 0.06 <= length / fps <= 0.22
            window = slice(onset, onset + length)
            assert abs(int(np.argmax(left[window])) - int(np.argmax(right[window]))) <= 1
            peak_gap = abs(left[window].max() - right[window].max())
            assert peak_gap <= 0.25
            asymmetric += peak_gap > 0.05
            total += 1
    assert 0 < asymmetric < 0.4 * total  # occasionally, not usually, one lid closes less


def test_blinks_seen_closed_at_low_frame_rates() -> None:
    phones, seconds = speech_minute()
    track = build_track(phones, seconds, 24, seed=9)
    peaks = blink_peaks(track[:, BLINK_L], 0.05)
    assert peaks.size > 5
    for onset in peaks:
        assert track[onset : onset + 5, [BLINK_L, BLINK_R]].max() >= 0.99


def test_gaze_holds_fixations_between_quick_saccades() -> None:
    phones, seconds = speech_minute()
    fps = 25
    track = build_track(phones, seconds, fps, seed=11)
    gaze = track[:, GAZE]
    assert np.abs(gaze).max() <= 0.35
    moving = np.abs(np.diff(gaze, axis=0)).max(axis=1) > 1e-4
    assert 0 < moving.mean() < 0.25  # mostly still
    starts = np.flatnonzero(moving[1:] & ~moving[:-1]) + 1
    holds = np.diff(starts) / fps
    assert holds.size > 10 and np.median(holds) >= 0.5


def test_head_nods_follow_primary_stress() -> None:
    spec = [("_", 0.5)]
    for _ in range(12):
        spec += [("t", 0.07), ("ɑː", 0.18, 2), ("k", 0.07), ("ə", 0.1), ("_", 0.3)]
    stressed = timeline(spec)
    flat = [Phone(p.symbol, p.start, p.end, 0) for p in stressed]
    seconds = stressed[-1].end
    diffs = []
    for seed in range(4):
        a = build_track(stressed, seconds, 25, seed)[:, PITCH]
        b = build_track(flat, seconds, 25, seed)[:, PITCH]
        diffs.append(a - b)
    diff = np.concatenate(diffs)
    assert np.abs(diff).max() > 0.02  # stress moves the head
    onsets = [p.start for p in stressed if p.stress == 2]
    times = (np.arange(len(diffs[0])) + 0.5) / 25
    near = np.array([min(abs(t - o) for o in onsets) for t in times])
    for d in diffs:
        assert np.all(np.abs(d[near > 0.5]) < 1e-6)  # ...and only around stressed syllables


def test_head_is_calmer_in_pauses_than_in_speech() -> None:
    speech = timeline([("_", 0.3)] + [("t", 0.08), ("ɑː", 0.15, 2), ("n", 0.07)] * 40)
    pause_start = speech[-1].end
    phones = speech + [Phone("_", pause_start, pause_start + 12.0)]
    seconds = phones[-1].end
    ratios = []
    for seed in range(8):
        head = build_track(phones, seconds, 25, seed)[:, HEAD]
        speed = np.abs(np.diff(head, axis=0)).sum(axis=1)
        talking = speed[: int(pause_start * 25)].mean()
        resting = speed[int((pause_start + 1.5) * 25) :].mean()
        ratios.append(resting / talking)
    assert np.median(ratios) < 0.8


def test_brows_lift_on_emphasis_only() -> None:
    # A stressed vowel right after a pause is an emphasis; unstressed speech has none.
    emphatic = timeline([("_", 1.0), ("ɑː", 0.3, 2), ("t", 0.1), ("_", 1.0)])
    plain = timeline([("_", 1.0), ("ə", 0.3), ("t", 0.1), ("_", 1.0)])
    raised = 0
    for seed in range(10):
        vowel = frames_in(1.05, 1.3, 25)
        raised += build_track(emphatic, 2.4, 25, seed)[vowel, BROW].max() > 0.3
        assert build_track(plain, 2.4, 25, seed)[:, BROW].max() == 0
    assert raised >= 6


# --- the job's audio (issue 14) ----------------------------------------------------------------

RATE = 16_000


def voice(spans: list[tuple[float, float, float]], seconds: float) -> tuple[np.ndarray, int]:
    """int16 audio: a 150 Hz buzz at `level` (of full scale) over each (start, end, level),
    silence elsewhere."""
    t = np.arange(int(seconds * RATE)) / RATE
    out = np.zeros(t.size)
    for start, end, level in spans:
        inside = (t >= start) & (t < end)
        out[inside] = level * np.sign(np.sin(2 * np.pi * 150 * t[inside]))
    return (out * 32767).astype(np.int16), RATE


def test_silence_in_the_audio_closes_the_mouth_whatever_the_phones_say() -> None:
    # The phones say one long vowel; the audio is silent for 600 ms in its middle
    # (a recogniser that stretched a word over a pause).
    phones = timeline([("_", 0.3), ("ɑː", 1.8, 2), ("_", 0.4)])
    audio = voice([(0.3, 0.9, 0.5), (1.5, 2.1, 0.5)], 2.5)
    track = build_track(phones, 2.5, 25, seed=0, audio=audio)
    silent = frames_in(0.9 + 0.08, 1.5 - 0.08, 25)  # the measure leaves 2 frames each side
    assert track[silent, PRESS].min() >= 0.95 and track[silent, JAW].max() <= 0.05
    # Without the audio the phones alone leave the mouth open there (how it was).
    alone = build_track(phones, 2.5, 25, seed=0)
    assert alone[silent, JAW].min() > 0.5


def test_jaw_follows_loudness_within_a_stretch_of_speech() -> None:
    # Identical syllables, no pause; the second half is spoken at a third of the level.
    spec: list = [("_", 0.3)] + [("d", 0.08), ("ɑː", 0.2, 2)] * 8 + [("_", 0.4)]
    phones = timeline(spec)
    seconds = phones[-1].end
    vowels = [p for p in phones if p.symbol == "ɑː"]
    level = [(p.start - 0.08, p.end, 0.6 if k < 4 else 0.2) for k, p in enumerate(vowels)]
    track = build_track(phones, seconds, 25, seed=0, audio=voice(level, seconds))

    def peak(p: Phone) -> float:
        return float(track[frames_in(p.start, p.end, 25), JAW].max())

    loud = [peak(p) for p in vowels[1:4]]
    quiet = [peak(p) for p in vowels[5:8]]
    assert min(loud) > 0.6
    assert max(quiet) < 0.6 * min(loud), (loud, quiet)


def test_louder_open_and_stressed_vowels_open_wider_with_audio() -> None:
    phones = timeline(
        [("_", 0.4), ("ɑː", 0.25, 2), ("t", 0.08), ("ɑː", 0.25, 0), ("t", 0.08), ("ə", 0.25)]
        + [("_", 0.4)]
    )
    seconds = phones[-1].end
    audio = voice([(0.4, phones[-1].start, 0.5)], seconds)  # one level throughout
    track = build_track(phones, seconds, 25, seed=0, audio=audio)
    stressed, unstressed, schwa = (
        float(track[frames_in(p.start, p.end, 25), JAW].max()) for p in phones[1:6:2]
    )
    assert stressed > unstressed + 0.05 and unstressed > schwa + 0.2


def test_mouth_opens_at_most_a_frame_before_the_sound_after_silence() -> None:
    phones = timeline([("_", 0.7), ("ɑː", 0.4, 2), ("_", 0.7)])
    # The recogniser put the vowel 120 ms early; the audio says when it sounds.
    audio = voice([(0.82, 1.22, 0.5)], 1.8)
    track = build_track(phones, 1.8, 25, seed=0, audio=audio)
    first_open = int(np.flatnonzero(track[:, JAW] > 0.1)[0])
    onset_frame = int(0.82 * 25)  # the frame whose span holds the onset
    assert first_open >= onset_frame - 1, (first_open, onset_frame)


def test_same_audio_same_track() -> None:
    phones = timeline(BOB_MET_PAM)
    seconds = phones[-1].end
    audio = voice([(0.5, 1.37, 0.4)], seconds)
    a = build_track(phones, seconds, 25, seed=5, audio=audio)
    b = build_track(phones, seconds, 25, seed=5, audio=(audio[0].copy(), RATE))
    assert np.array_equal(a, b)
