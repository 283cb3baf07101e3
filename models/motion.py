"""The whole job's motion track: mouth from phoneme timings, face and head procedural.

``build_track`` is computed once per job by the plan stage, so everything
time-dependent (smoothing, blinks, nods, gaze) lives here and chunks render
without seams. The mouth depends only on the phones and, when the plan has it, the
job's audio; the seed drives blinks, gaze, head and brows, through separate random
streams so that one component's draws never shift another's.

Mouth model: each phone becomes one or more viseme segments (diphthongs glide),
shifted ``LEAD_S`` earlier because lips form before the sound is heard. Targets
are blended by per-channel dominance weights under a Gaussian window (tongue
consonants leave the lips to their neighbouring vowels), then hard constraints
are applied: bilabial closures and long silences are pinned shut, and every
mouth channel moves at most ``MOUTH_SPEED`` units per second. The pins are
imposed as Lipschitz envelopes, which the speed limiter provably preserves, so
closures survive the smoothing.

With the audio (issue 14), the sound has the last word on when and how far: silences
heard in it (>= PAUSE_S below a tenth of the loud level) are pinned shut whatever the
phones say, the jaw of every frame is scaled by that frame's loudness relative to its
stretch of speech, and quiet frames inside speech press the lips towards closure.
Loudness is read on each frame's own span, so the energy-driven part has no lead and
the viseme part keeps its LEAD_S: the mouth never trails the sound and leads it by at
most a frame. The demo photo's own mouth is parted (0.063 of face height with every
channel at 0, against 0.0004 with lip_press 1), so rest means lip_press, not zero.

Rest pose (issue 15, `farm live`): every track starts and ends exactly at ``rest_pose()``
(mouth pressed shut, every other channel 0), eased there over ``SETTLE_IN_S`` and
``SETTLE_OUT_S`` (the mouth over ``MOUTH_SETTLE_S``: a script job's lead-in and tail are
silent, so it is at rest there anyway), and no blink is cut by the ease. The idle loop of
a live channel (``idle_track``) passes through the same pose at every cut point, so a
job's video can replace the loop there without a visible cut.
"""

from __future__ import annotations

import math

import numpy as np

from farm.errors import InvalidInput
from models.base import CHANNEL_INDEX, CHANNELS, Phone
from models.visemes import (
    MOUTH_CHANNELS,
    MOUTH_INDEX,
    dominance,
    is_silence,
    is_vowel,
    targets,
    viseme_sequence,
)

LEAD_S = 0.04  # lips lead the audio (coarticulatory anticipation)
# Fastest a mouth channel may move, in channel units per second, in MOUTH_CHANNELS
# order. Lips part and press faster than the jaw swings (a /b/ release takes < 20 ms).
MOUTH_SPEED: tuple[float, ...] = (11.0, 9.0, 9.0, 16.0, 12.0, 9.0, 14.0)
MIN_CLOSURE_S = 0.07  # a p/b/m closure stays visible at least this long (and >= 2 frames)
PAUSE_S = 0.2  # a silence at least this long counts as a pause
_SMOOTH_SIGMA_S = 0.025
_GRID_HZ = 200
_PAUSE_MARGIN_S = 0.08  # lips may still be moving this close to the pause edges
_REST_JAW = 0.02
_REST_OTHER = 0.05
_VOWEL_JAW_BY_STRESS = (0.85, 0.95, 1.1)
# <emphasis> in a marked-up script (Phone.emphasis): the jaw of its vowels opens wider, the
# head nods on its stressed vowels (about twice an ordinary nod) and the brows rise over it.
EMPHASIS_JAW = 1.35
EMPHASIS_NOD = 0.1
EMPHASIS_BROW = 0.8

_J = {name: MOUTH_CHANNELS.index(name) for name in MOUTH_CHANNELS}

# Blinks: humans blink ~15-20 times a minute, 100-200 ms each, more often at phrase breaks.
BLINKS_PER_MINUTE = 17.0
_BLINK_GAMMA_SHAPE = 4.0
_BLINK_MIN_GAP_S = 0.8
_BLINK_SNAP_S = 0.6
_BLINK_ASYMMETRY_P = 0.15


def build_track(
    phones: list[Phone],
    seconds: float,
    fps: int,
    seed: int,
    audio: tuple[np.ndarray, int] | None = None,
) -> np.ndarray:
    """float32 (ceil(seconds*fps), len(CHANNELS)); identical for identical inputs.

    `audio`: the job's timeline (int16 mono samples, rate), when the caller has it. The
    jaw then follows its loudness and its silences close the mouth, whatever the phones
    say (see ``Loudness``)."""
    _validate(seconds, fps)
    times = (np.arange(frame_count(seconds, fps)) + 0.5) / fps  # frame centres
    phones = sorted(phones, key=lambda p: (p.start, p.end))
    streams = _streams(seed, 4)
    track = np.zeros((times.size, len(CHANNELS)), dtype=np.float64)
    if times.size == 0:
        return track.astype(np.float32)
    loudness = Loudness.of(audio[0], audio[1], times, fps) if audio is not None else None
    track[:, list(MOUTH_INDEX)] = mouth_track(phones, times, fps, loudness)
    pauses = pause_spans(phones, seconds)
    left, right = blink_track(streams[0], times, fps, pauses)
    track[:, CHANNEL_INDEX["blink_left"]] = left
    track[:, CHANNEL_INDEX["blink_right"]] = right
    gaze = gaze_track(streams[1], times)
    track[:, CHANNEL_INDEX["gaze_x"]], track[:, CHANNEL_INDEX["gaze_y"]] = gaze
    head = head_track(streams[2], phones, times)
    for name, values in zip(("head_yaw", "head_pitch", "head_roll"), head, strict=True):
        track[:, CHANNEL_INDEX[name]] = values
    brows = brow_track(streams[3], phones, times)
    track[:, CHANNEL_INDEX["brow_raise"]] = np.maximum(brows, emphasis_brow_track(phones, times))
    return clip_to_ranges(settle_ends(track, fps)).astype(np.float32)


# --- rest pose at the ends, and the idle loop of a live channel ------------------------------

SETTLE_IN_S = 0.3  # head, gaze and brows leave the rest pose over a script's lead-in ...
SETTLE_OUT_S = 0.5  # ... and come back to it over its tail
MOUTH_SETTLE_S = 0.08  # the mouth: two frames at 25 fps (a script's is at rest there)
IDLE_BEAT_S = 2.5  # the idle loop passes through the rest pose this often (a breath each)
IDLE_BEATS = 3  # beats of one idle loop, each a different stretch of idle motion
_BREATH_PITCH = 0.025  # the head rises a little with each breath


def rest_pose() -> np.ndarray:
    """The pose every track starts and ends in: lips together, all else at 0."""
    rest = np.zeros(len(CHANNELS))
    rest[CHANNEL_INDEX["lip_press"]] = 1.0
    return rest


def _ease(x: np.ndarray) -> np.ndarray:
    """Smoothstep on [0, 1]: no velocity at either end, so the rest pose is a turning point."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def settle_window(n: int, fps: int, start_s: float, end_s: float) -> np.ndarray:
    """Weights (n,): 0 at the first and last frame, eased to 1 over start_s / end_s."""
    i = np.arange(n, dtype=np.float64)
    rise = _ease(i / max(start_s * fps, 1.0))
    fall = _ease((n - 1 - i) / max(end_s * fps, 1.0))
    return rise * fall


def settle_ends(
    track: np.ndarray, fps: int, start_s: float = SETTLE_IN_S, end_s: float = SETTLE_OUT_S
) -> np.ndarray:
    """The track eased to exactly ``rest_pose()`` at its first and last frame."""
    n = track.shape[0]
    if n == 0:
        return track
    rest = rest_pose()
    weight = np.repeat(settle_window(n, fps, start_s, end_s)[:, None], track.shape[1], axis=1)
    mouth = list(MOUTH_INDEX)
    weight[:, mouth] = settle_window(n, fps, MOUTH_SETTLE_S, MOUTH_SETTLE_S)[:, None]
    return rest + weight * (track - rest)


def idle_beat_frames(fps: int) -> int:
    """Frames from one cut point of the idle loop to the next."""
    return max(1, int(round(IDLE_BEAT_S * fps)))


def idle_track(fps: int, seed: int, beats: int = IDLE_BEATS) -> np.ndarray:
    """A seamless idle loop, float32 (beats * idle_beat_frames(fps), len(CHANNELS)): mouth
    shut, blinks, a breath per beat, small head and eye motion. Frame 0 of every beat is
    ``rest_pose()`` and each beat eases into the next one's first frame, so the loop's
    last frame leads into its first and a job may start at any beat's first frame."""
    _validate(0.0, fps)
    beat = idle_beat_frames(fps)
    streams = np.random.SeedSequence(int(seed) % 2**64).spawn(beats)
    parts = []
    for child in streams:
        part_seed = int(child.generate_state(1, dtype=np.uint64)[0])
        # One frame more than the beat: its last frame is the next beat's first (rest).
        part = build_track([], (beat + 1) / fps, fps, part_seed).astype(np.float64)
        t = np.arange(beat + 1) / beat
        part[:, CHANNEL_INDEX["head_pitch"]] -= _BREATH_PITCH * (0.5 - 0.5 * np.cos(2 * np.pi * t))
        parts.append(part[:-1])
    return clip_to_ranges(np.concatenate(parts)).astype(np.float32)


IDLE_EXIT_EVERY_S = 0.4  # between the beats' cut points, a way out of the loop this often
IDLE_EXIT_S = 0.24  # ... that eases the loop to the rest pose over this long


def idle_exits(track: np.ndarray, fps: int) -> list[tuple[int, np.ndarray]]:
    """Ways out of an idle loop (`idle_track`) between its cut points, so a job need not
    wait up to a whole beat: (frame j, frames that follow loop frame j instead of j+1...),
    the loop's own motion eased to ``rest_pose()`` (smoothstep: the loop's velocity at
    the start, none at the end) so the exit's last frame is the rest pose exactly, a cut
    point. None where a beat's cut point comes as soon, none through a blink (it would be
    cut), and the mouth stays shut as in the loop."""
    n = track.shape[0]
    beat = idle_beat_frames(fps)
    every = max(1, int(round(IDLE_EXIT_EVERY_S * fps)))
    length = max(2, int(round(IDLE_EXIT_S * fps)))
    rest = rest_pose()
    blinks = [CHANNEL_INDEX["blink_left"], CHANNEL_INDEX["blink_right"]]
    weight = _ease(np.arange(1, length + 1) / length)[:, None]
    exits = []
    for j in range(0, n, every):
        if (beat - j % beat) % beat <= length:  # a cut point at j or within the exit's time
            continue
        follow = track[(j + 1 + np.arange(length)) % n].astype(np.float64)
        if np.any(follow[:, blinks] > 0) or np.any(track[j, blinks] > 0):
            continue
        part = follow * (1.0 - weight) + rest * weight
        part[-1] = rest
        exits.append((j, part.astype(np.float32)))
    return exits


def frame_count(seconds: float, fps: int) -> int:
    # Exactly the plan stage's formula, float noise included, so that the counts agree.
    return int(math.ceil(seconds * fps))


def _validate(seconds: float, fps: int) -> None:
    if not isinstance(fps, int | np.integer) or fps <= 0:
        raise InvalidInput(f"fps must be a positive integer, got {fps!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidInput(f"seconds must be finite and >= 0, got {seconds!r}")


def _streams(seed: int, count: int) -> list[np.random.Generator]:
    children = np.random.SeedSequence(int(seed) % 2**64).spawn(count)
    return [np.random.default_rng(child) for child in children]


def clip_to_ranges(track: np.ndarray) -> np.ndarray:
    """[0, 1] for face controls, [-1, 1] for head rotation and gaze."""
    signed = [CHANNEL_INDEX[n] for n in ("head_yaw", "head_pitch", "head_roll", "gaze_x", "gaze_y")]
    low = np.zeros(len(CHANNELS))
    low[signed] = -1.0
    return np.clip(track, low, 1.0)


# --- mouth -----------------------------------------------------------------------------------


def viseme_segments(phones: list[Phone]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(starts, targets (K, 7), weights (K, 7), viseme names), shifted by LEAD_S, one row
    per viseme a phone passes through; silences are rest."""
    starts: list[float] = []
    rows: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    names: list[str] = []
    for phone in phones:
        span = max(phone.end - phone.start, 0.0)
        cursor = phone.start - LEAD_S
        for viseme, share in viseme_sequence(phone.symbol):
            target = targets(viseme).astype(np.float64)
            if is_vowel(phone.symbol):
                target[_J["jaw_open"]] *= _VOWEL_JAW_BY_STRESS[min(max(phone.stress, 0), 2)]
                if phone.emphasis:
                    target[_J["jaw_open"]] *= EMPHASIS_JAW
            starts.append(cursor)
            rows.append(target)
            weights.append(dominance(viseme).astype(np.float64))
            names.append(viseme)
            cursor += span * share
    return np.array(starts), np.array(rows).reshape(-1, 7), np.array(weights).reshape(-1, 7), names


def _blend(phones: list[Phone], times: np.ndarray) -> np.ndarray:
    """Dominance-weighted Gaussian blend of viseme targets, sampled at `times`."""
    starts, rows, weights, _ = viseme_segments(phones)
    rest_t, rest_w = targets("rest").astype(np.float64), dominance("rest").astype(np.float64)
    first = phones[0].start - LEAD_S if phones else 0.0
    last = phones[-1].end - LEAD_S if phones else 0.0
    pad = 4 * _SMOOTH_SIGMA_S + 1.0 / _GRID_HZ
    grid = np.arange(min(times[0], first) - pad, max(times[-1], last) + pad, 1.0 / _GRID_HZ)
    index = np.searchsorted(starts, grid, side="right") - 1
    outside = (index < 0) | (grid >= last)
    inside = np.clip(index, 0, None)
    target = np.where(outside[:, None], rest_t, rows[inside] if rows.size else 0.0)
    weight = np.where(outside[:, None], rest_w, weights[inside] if rows.size else 1.0)
    kernel = _gaussian(_SMOOTH_SIGMA_S * _GRID_HZ)
    numerator = _convolve_columns(weight * target, kernel)
    denominator = _convolve_columns(weight, kernel)
    blended = numerator / np.maximum(denominator, 1e-9)
    return np.stack([np.interp(times, grid, blended[:, c]) for c in range(7)], axis=1)


def _gaussian(sigma_samples: float) -> np.ndarray:
    half = int(math.ceil(4 * sigma_samples))
    x = np.arange(-half, half + 1)
    kernel = np.exp(-0.5 * (x / sigma_samples) ** 2)
    return kernel / kernel.sum()


def _convolve_columns(values: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    # Edge-padded so the ends of the job see rest, not zeros pulled in by the kernel.
    half = kernel.size // 2
    padded = np.pad(values, ((half, half), (0, 0)), mode="edge")
    return np.stack(
        [np.convolve(padded[:, c], kernel, mode="valid") for c in range(values.shape[1])], axis=1
    )


def _frames_within(start: float, end: float, fps: int) -> tuple[int, int]:
    """[first, last] frames whose centres fall in [start, end] (last < first if none)."""
    return math.ceil(start * fps - 0.5), math.floor(end * fps - 0.5)


def _closure_frames(start: float, end: float, fps: int, minimum: int, grow: str) -> tuple[int, int]:
    """The frames of a closure, widened to `minimum` frames. A short closure grows
    into an adjacent pause ("before"/"after") rather than into a vowel if it can,
    otherwise about its middle."""
    first, last = _frames_within(start, end, fps)
    if last - first + 1 >= minimum:
        return first, last
    if grow == "before":
        return max(last, first) - minimum + 1, max(last, first)
    if grow == "after":
        return min(first, last), min(first, last) + minimum - 1
    first = math.floor((start + end) / 2 * fps - minimum / 2)  # nearest frames to the middle
    return first, first + minimum - 1


def closure_spans(phones: list[Phone]) -> list[tuple[float, float, str]]:
    """Lip closures as (start, end, grow) on the shifted timeline; touching bilabials
    ("b m") are one closure; grow says which side is a pause."""
    starts, _, _, names = viseme_segments(phones)
    ends = np.append(starts[1:], phones[-1].end - LEAD_S) if phones else starts
    spans: list[tuple[float, float, str]] = []
    i = 0
    while i < len(names):
        if names[i] != "bilabial":
            i += 1
            continue
        j = i
        while j + 1 < len(names) and names[j + 1] == "bilabial":
            j += 1
        after_rest = i == 0 or names[i - 1] == "rest"
        before_rest = j + 1 >= len(names) or names[j + 1] == "rest"
        grow = "before" if after_rest else "after" if before_rest else "middle"
        spans.append((float(starts[i]), float(ends[j]), grow))
        i = j + 1
    return spans


def _pins(
    phones: list[Phone],
    seconds_end: float,
    fps: int,
    n: int,
    silences: list[tuple[float, float]] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds (n, 7) the mouth must meet: closures and pauses (from
    the phones, shifted by LEAD_S; and `silences` heard in the audio, unshifted)."""
    lower = np.full((n, 7), -np.inf)
    upper = np.full((n, 7), np.inf)
    min_closure = max(2, math.ceil(MIN_CLOSURE_S * fps))
    for start, end, grow in closure_spans(phones):
        first, last = _closure_frames(start, end, fps, min_closure, grow)
        rows = slice(max(first, 0), max(min(last, n - 1) + 1, 0))
        lower[rows, _J["lip_press"]] = 1.0
        upper[rows, _J["jaw_open"]] = 0.0
        upper[rows, _J["lower_lip_tuck"]] = 0.0
    relaxed = [c for c in range(7) if c not in (_J["jaw_open"], _J["lip_press"])]
    # A pause in the phones is pinned inside margins on the shifted timeline. A silence
    # heard in the audio is pinned from just after the sound stops until the lips must
    # part for the next one (LEAD_S before it): the speed limit lets them close within
    # ~2 frames, so the mouth is shut for the rest of it.
    spans = [
        (start - LEAD_S + _PAUSE_MARGIN_S, end - LEAD_S - _PAUSE_MARGIN_S)
        for start, end in pause_spans(phones, seconds_end)
    ] + [(start + _SILENCE_CLOSE_S, end - LEAD_S - _SILENCE_OPEN_S) for start, end in silences]
    for start, end in spans:
        start, end = max(start, -1.0), min(end, seconds_end + 1.0)
        first, last = _frames_within(start, end, fps)
        rows = slice(max(first, 0), max(min(last, n - 1) + 1, 0))
        upper[rows, _J["jaw_open"]] = np.minimum(upper[rows, _J["jaw_open"]], _REST_JAW)
        upper[rows, relaxed] = np.minimum(upper[rows, relaxed], _REST_OTHER)
        # A photo often smiles with parted lips; a silent speaker's lips are together.
        lower[rows, _J["lip_press"]] = 1.0
    return lower, upper


def _upper_envelope(bounds: np.ndarray, step: np.ndarray) -> np.ndarray:
    """The tightest bound that is `step`-Lipschitz per column: min_p(b_p + step*|i - p|)."""
    ramp = np.arange(bounds.shape[0])[:, None] * step[None, :]
    forward = np.minimum.accumulate(bounds - ramp, axis=0) + ramp
    backward = np.minimum.accumulate((bounds + ramp)[::-1], axis=0)[::-1] - ramp
    return np.minimum(forward, backward)


def limit_speed(values: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Forward then backward slew limiting: |x[i+1] - x[i]| <= step for every column."""
    out = values.copy()
    for i in range(1, out.shape[0]):
        out[i] = np.clip(out[i], out[i - 1] - step, out[i - 1] + step)
    for i in range(out.shape[0] - 2, -1, -1):
        out[i] = np.clip(out[i], out[i + 1] - step, out[i + 1] + step)
    return out


def mouth_track(
    phones: list[Phone], times: np.ndarray, fps: int, loudness: Loudness | None = None
) -> np.ndarray:
    """(len(times), 7) mouth channels in MOUTH_CHANNELS order."""
    n = times.size
    seconds_end = float(times[-1] + 0.5 / fps) if n else 0.0
    blended = _blend(phones, times) if n else np.zeros((0, 7))
    silences: list[tuple[float, float]] = []
    if loudness is not None and n:
        blended[:, _J["jaw_open"]] *= loudness.jaw_gain
        press = blended[:, _J["lip_press"]]
        blended[:, _J["lip_press"]] = np.maximum(press, loudness.quiet_press)
        silences = loudness.silences
    step = np.minimum(1.0, np.asarray(MOUTH_SPEED) / fps)
    lower, upper = _pins(phones, seconds_end, fps, n, silences)
    upper = _upper_envelope(upper, step)
    lower = -_upper_envelope(-lower, step)
    constrained = np.clip(blended, lower, upper)
    return np.clip(limit_speed(constrained, step), 0.0, 1.0)


# --- the job's audio ---------------------------------------------------------------------------

# Loudness is read on 10 ms windows. A window is silent below SILENT_FRACTION of the
# 95th-percentile window RMS (speech at its loud end, whatever the recording's level);
# silent runs of at least PAUSE_S are silences. Within each stretch of speech between
# silences, a frame's jaw opening is scaled by its RMS over the stretch's loud level
# (its 90th percentile): from JAW_FLOOR for a whisper of sound to 1 at full voice.
_LOUD_STEP_S = 0.01
SILENT_FRACTION = 0.10
JAW_FLOOR = 0.15
QUIET_PRESS = 0.6
QUIET_BELOW = 0.4
_LOUD_PERCENTILE = 90
_SILENCE_CLOSE_S = 0.02  # the lips close this long after the sound stops ...
_SILENCE_OPEN_S = 0.02  # ... and start to part this long (plus LEAD_S) before it resumes


class Loudness:
    """What the job's audio says about the mouth, per frame: how loud (`jaw_gain`) and
    where it is silent (`silences`, seconds). Pure function of the samples."""

    def __init__(self, relative: np.ndarray, silences: list[tuple[float, float]]) -> None:
        self.relative = relative  # per frame: RMS over its stretch's loud level, in [0, 1]
        self.silences = silences

    @property
    def jaw_gain(self) -> np.ndarray:
        """Jaw opening scale: JAW_FLOOR for a whisper of sound, 1 at full voice."""
        return JAW_FLOOR + (1.0 - JAW_FLOOR) * self.relative

    @property
    def quiet_press(self) -> np.ndarray:
        """Lip pressure the quiet frames of speech add (a consonant's near-closure, the
        dip between syllables): QUIET_PRESS at no sound, none from QUIET_BELOW up."""
        return QUIET_PRESS * np.clip(1.0 - self.relative / QUIET_BELOW, 0.0, 1.0)

    @classmethod
    def of(cls, samples: np.ndarray, rate: int, times: np.ndarray, fps: int) -> Loudness:
        window = window_rms(samples, rate, _LOUD_STEP_S)
        silences = silent_spans(window, _LOUD_STEP_S, PAUSE_S)
        rms = frame_rms(samples, rate, times, fps)
        relative = np.ones(times.size)
        edges = [-math.inf] + [t for span in silences for t in span] + [math.inf]
        for start, end in zip(edges[::2], edges[1::2], strict=True):
            inside = (times >= start) & (times < end)
            if not inside.any():
                continue
            level = float(np.percentile(rms[inside], _LOUD_PERCENTILE))
            if level > 0:
                relative[inside] = np.clip(rms[inside] / level, 0.0, 1.0)
        return cls(relative, silences)


def window_rms(samples: np.ndarray, rate: int, step: float) -> np.ndarray:
    """Linear RMS (full scale 1) of consecutive windows of `step` seconds."""
    n = max(1, int(round(step * rate)))
    x = np.asarray(samples, dtype=np.float64) / 32768.0
    pad = (-x.size) % n
    x = np.pad(x, (0, pad)).reshape(-1, n)
    return np.sqrt((x**2).mean(axis=1))


def frame_rms(samples: np.ndarray, rate: int, times: np.ndarray, fps: int) -> np.ndarray:
    """RMS of the audio a frame spans ([t - 1/(2 fps), t + 1/(2 fps)) about its centre)."""
    x = np.asarray(samples, dtype=np.float64) / 32768.0
    out = np.zeros(times.size)
    for i, t in enumerate(times):
        a = max(int(round((t - 0.5 / fps) * rate)), 0)
        b = min(int(round((t + 0.5 / fps) * rate)), x.size)
        if b > a:
            out[i] = math.sqrt(float(np.mean(x[a:b] ** 2)))
    return out


def silent_spans(window: np.ndarray, step: float, minimum: float) -> list[tuple[float, float]]:
    """Runs of quiet windows at least `minimum` seconds long, as (start, end) seconds;
    a run touching either end of the audio extends to +-infinity."""
    if window.size == 0:
        return []
    loud = float(np.percentile(window, 95))
    quiet = window < SILENT_FRACTION * loud if loud > 0 else np.ones(window.size, bool)
    padded = np.concatenate([[False], quiet, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    spans = []
    for a, b in zip(edges[::2], edges[1::2], strict=True):
        if (b - a) * step + 1e-9 < minimum:
            continue
        start = -math.inf if a == 0 else a * step
        end = math.inf if b == window.size else b * step
        spans.append((start, end))
    return spans


# --- timing helpers shared by the face ---------------------------------------------------------


def pause_spans(phones: list[Phone], seconds: float) -> list[tuple[float, float]]:
    """Silences of at least PAUSE_S, including before the first and after the last sound;
    the ends of the job extend to +-infinity so the mouth rests there."""
    sounds = [(p.start, p.end) for p in phones if not is_silence(p.symbol) and p.end > p.start]
    if not sounds:
        return [(-math.inf, math.inf)]
    spans = [(-math.inf, sounds[0][0])]
    gaps = zip(sounds, sounds[1:], strict=False)
    spans += [(a_end, b_start) for (_, a_end), (b_start, _) in gaps]
    spans.append((sounds[-1][1], math.inf))
    return [(s, e) for s, e in spans if e - s >= PAUSE_S]


def _activity(phones: list[Phone], times: np.ndarray, smooth_s: float) -> np.ndarray:
    """1 while speaking, 0 in pauses, eased over `smooth_s`."""
    speaking = np.ones(times.size)
    for start, end in pause_spans(phones, float(times[-1]) if times.size else 0.0):
        speaking[(times >= start) & (times < end)] = 0.0
    if times.size < 2:
        return speaking
    dt = times[1] - times[0]
    width = max(1, int(round(smooth_s / dt)))
    kernel = np.hanning(2 * width + 1)
    return _convolve_columns(speaking[:, None], kernel / kernel.sum())[:, 0]


def _pulse(
    times: np.ndarray, onset: float, attack: float, hold: float, release: float
) -> np.ndarray:
    """0 -> 1 over `attack`, 1 for `hold`, 1 -> 0 over `release`, cosine-eased."""
    rise = np.clip((times - onset) / max(attack, 1e-6), 0.0, 1.0)
    fall = np.clip((times - onset - attack - hold) / max(release, 1e-6), 0.0, 1.0)
    return (0.5 - 0.5 * np.cos(np.pi * rise)) * (0.5 + 0.5 * np.cos(np.pi * fall))


def _stressed_vowels(phones: list[Phone]) -> list[Phone]:
    return [p for p in phones if p.stress == 2 and is_vowel(p.symbol) and p.end > p.start]


# --- blinks ----------------------------------------------------------------------------------


def blink_onsets(
    rng: np.random.Generator, duration: float, pauses: list[tuple[float, float]]
) -> np.ndarray:
    """Blink start times: gamma-distributed gaps at a human rate, nudged to pause onsets
    (people blink at phrase breaks)."""
    mean_gap = 60.0 / BLINKS_PER_MINUTE
    count = int(duration / mean_gap * 2) + 4
    gaps = rng.gamma(_BLINK_GAMMA_SHAPE, mean_gap / _BLINK_GAMMA_SHAPE, size=count)
    onsets = rng.uniform(0.3, mean_gap) + np.cumsum(np.maximum(gaps, _BLINK_MIN_GAP_S)) - gaps[0]
    onsets = onsets[onsets < duration]
    breaks = np.array([s for s, _ in pauses if math.isfinite(s) and 0 < s < duration])
    if breaks.size and onsets.size:
        nearest = breaks[np.abs(onsets[:, None] - breaks[None, :]).argmin(axis=1)]
        snap = np.abs(nearest - onsets) < _BLINK_SNAP_S
        onsets = np.where(snap, nearest + 0.05, onsets)
    return _drop_crowded(np.sort(onsets), _BLINK_MIN_GAP_S)


def _drop_crowded(onsets: np.ndarray, gap: float) -> np.ndarray:
    kept: list[float] = []
    for onset in onsets:
        if not kept or onset - kept[-1] >= gap:
            kept.append(float(onset))
    return np.array(kept)


def blink_track(
    rng: np.random.Generator, times: np.ndarray, fps: int, pauses: list[tuple[float, float]]
) -> tuple[np.ndarray, np.ndarray]:
    """Left and right eyelid closure in [0, 1]; both eyes together, sometimes one a bit less."""
    duration = float(times[-1] + 0.5 / fps)
    left, right = np.zeros(times.size), np.zeros(times.size)
    for onset in blink_onsets(rng, duration, pauses):
        length = rng.uniform(0.10, 0.20)
        attack = 0.4 * length  # lids close faster than they open
        # Put the fully-closed instant on a frame so that every blink is seen closed.
        peak = (np.round((onset + attack) * fps - 0.5) + 0.5) / fps
        shape = _pulse(times, peak - attack, attack, 0.0, length - attack)
        weaker = rng.uniform(0.8, 0.92) if rng.random() < _BLINK_ASYMMETRY_P else 1.0
        scale_left, scale_right = (weaker, 1.0) if rng.random() < 0.5 else (1.0, weaker)
        if peak - attack < SETTLE_IN_S or peak - attack + length > duration - SETTLE_OUT_S:
            continue  # the ends settle to the rest pose: no half blink there (draws kept)
        left = np.maximum(left, shape * scale_left)
        right = np.maximum(right, shape * scale_right)
    return left, right


# --- gaze ------------------------------------------------------------------------------------


def gaze_track(rng: np.random.Generator, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixations of ~0.5-4 s joined by fast (~50 ms) saccades; mostly at the camera."""
    duration = float(times[-1]) + 1.0 if times.size else 0.0
    holds = np.maximum(rng.lognormal(np.log(1.6), 0.5, size=int(duration / 0.4) + 2), 0.4)
    switches = np.cumsum(holds)
    switches = np.concatenate([[-np.inf], switches[switches < duration]])
    k = switches.size
    at_camera = rng.random(k) < 0.55
    x = np.where(at_camera, rng.normal(0, 0.03, k), rng.uniform(-0.25, 0.25, k))
    y = np.where(at_camera, rng.normal(0, 0.02, k), rng.uniform(-0.12, 0.08, k))
    index = np.searchsorted(switches, times, side="right") - 1
    previous = np.maximum(index - 1, 0)
    progress = np.clip((times - switches[index]) / 0.05, 0.0, 1.0)
    ease = 0.5 - 0.5 * np.cos(np.pi * progress)
    return (
        x[previous] + (x[index] - x[previous]) * ease,
        y[previous] + (y[index] - y[previous]) * ease,
    )


# --- head ------------------------------------------------------------------------------------

_HEAD_DRIFT = (0.10, 0.06, 0.04)  # yaw, pitch, roll amplitude
_NOD_PROBABILITY = 0.7
_NOD_MIN_GAP_S = 0.35


def _drift(rng: np.random.Generator, times: np.ndarray, amplitude: float) -> np.ndarray:
    """Slow wandering: a few incommensurate sinusoids between 0.05 and 0.35 Hz."""
    freqs = rng.uniform(0.05, 0.35, 3)
    phases = rng.uniform(0, 2 * np.pi, 3)
    weights = rng.dirichlet(np.ones(3))
    waves = np.sin(2 * np.pi * freqs[None, :] * times[:, None] + phases[None, :])
    return amplitude * (waves @ weights)


def nod_track(rng: np.random.Generator, phones: list[Phone], times: np.ndarray) -> np.ndarray:
    """A small downward pitch bump just before most primary-stressed vowels."""
    out = np.zeros(times.size)
    last = -math.inf
    for vowel in _stressed_vowels(phones):
        if rng.random() > _NOD_PROBABILITY or vowel.start - last < _NOD_MIN_GAP_S:
            continue
        last = vowel.start
        amplitude = rng.uniform(0.03, 0.06) * (1.0 + min(vowel.end - vowel.start, 0.3))
        out += amplitude * _pulse(times, vowel.start - 0.1, 0.15, 0.0, 0.25)
    return out


def head_track(
    rng: np.random.Generator, phones: list[Phone], times: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Yaw, pitch, roll: drift that calms in pauses, plus nods on stressed syllables."""
    activity = 0.35 + 0.65 * _activity(phones, times, 0.6)
    yaw, pitch, roll = (activity * _drift(rng, times, a) for a in _HEAD_DRIFT)
    pitch = pitch + nod_track(rng, phones, times) + emphasis_nod_track(phones, times)
    roll = roll + 0.2 * yaw  # the head tilts a little into a turn
    return yaw, pitch, roll


# --- brows -----------------------------------------------------------------------------------


def emphasis_vowels(phones: list[Phone]) -> list[Phone]:
    """Primary-stressed vowels that open a phrase or are held long."""
    vowels = _stressed_vowels(phones)
    if not vowels:
        return []
    long_s = max(0.16, 1.5 * float(np.median([v.end - v.start for v in vowels])))
    pause_ends = [e for _, e in pause_spans(phones, phones[-1].end)]
    picked = []
    for vowel in vowels:
        after_pause = any(0 <= vowel.start - e <= 0.5 for e in pause_ends)
        if after_pause or vowel.end - vowel.start >= long_s:
            picked.append(vowel)
    return picked


def brow_track(rng: np.random.Generator, phones: list[Phone], times: np.ndarray) -> np.ndarray:
    """Brow raises on emphasis: up just before the vowel, held through it, eased down."""
    out = np.zeros(times.size)
    last = -math.inf
    for vowel in emphasis_vowels(phones):
        if rng.random() > 0.8 or vowel.start - last < 1.0:
            continue
        last = vowel.start
        shape = _pulse(times, vowel.start - 0.2, 0.2, vowel.end - vowel.start, 0.4)
        out = np.maximum(out, rng.uniform(0.35, 0.7) * shape)
    return out


# --- emphasis (marked-up scripts) --------------------------------------------------------------

_EMPHASIS_JOIN_S = 0.25  # emphasised words this close together are one emphasis


def emphasis_runs(phones: list[Phone]) -> list[list[Phone]]:
    """The sounds of each stretch of emphasised words (Phone.emphasis), in order."""
    runs: list[list[Phone]] = []
    joinable = False
    for phone in phones:
        if phone.emphasis and not is_silence(phone.symbol):
            if joinable and runs and phone.start - runs[-1][-1].end < _EMPHASIS_JOIN_S:
                runs[-1].append(phone)
            else:
                runs.append([phone])
            joinable = True
        elif not is_silence(phone.symbol):
            joinable = False
    return runs


def emphasis_nod_track(phones: list[Phone], times: np.ndarray) -> np.ndarray:
    """A firm nod on each emphasised stressed vowel (the first vowel of a stretch without
    one); no random draws, so scripts without emphasis keep their head track exactly."""
    out = np.zeros(times.size)
    last = -math.inf
    for run in emphasis_runs(phones):
        vowels = [p for p in run if is_vowel(p.symbol)]
        stressed = [p for p in vowels if p.stress == 2] or vowels[:1]
        for vowel in stressed:
            if vowel.start - last < _NOD_MIN_GAP_S:
                continue
            last = vowel.start
            out += EMPHASIS_NOD * _pulse(times, vowel.start - 0.1, 0.15, 0.0, 0.25)
    return out


def emphasis_brow_track(phones: list[Phone], times: np.ndarray) -> np.ndarray:
    """Brows up just before each emphasised stretch, held through it, eased down."""
    out = np.zeros(times.size)
    for run in emphasis_runs(phones):
        start, end = run[0].start, run[-1].end
        out = np.maximum(out, EMPHASIS_BROW * _pulse(times, start - 0.2, 0.2, end - start, 0.4))
    return out
