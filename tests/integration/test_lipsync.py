"""Checked, not assumed (issue 5): a real clip, rendered in-process from real Piper
speech, measured by an independent face-landmark detector on the output pixels.

What should happen comes from the speech (TTS phones and audio RMS); what did happen
comes from mediapipe FaceMesh run on the rendered frames. The renderer's landmarks and
the motion module's helpers are never consulted, so a bug there cannot agree with
itself. Thresholds sit between numbers measured on this clip (quoted beside each one)
with headroom on both sides. The checks are plain functions so that broken renders can
be put through them: with the plan's track shifted by +-300, +120 or +80 ms, the mouth
frozen, the jaw flapping regardless of speech, or the blinks removed, the lip and eye
checks fail (tried by hand when the thresholds were set).

The chunk tests render the same plan as separate 20-frame render calls, encode each
with farm's FrameEncoder as lossless chunks, join and encode them once as farm's mux
stage does, and decode the result with PyAV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from farm import jobs, quality
from farm.config import Settings
from farm.media import FrameEncoder, VideoFormat, join_and_encode
from farm.script import split_script
from models import tts
from models.base import Phone, Plan
from models.portrait import PortraitAvatar, PortraitRenderer, demo_photo
from models.timeline import assemble_audio
from models.wav import write_wav
from tests import lipsync_measure as measure
from tests.doubles import ListSink
from tests.probe import probe

# Bilabials against open vowels, both stressed and not, two sentences run together
# (Piper's own short break) and a paragraph break (the farm's 2 x 350 ms pause).
SCRIPT = "Papa bought a big blue balloon. Mom made apple pie.\n\nFather, are you far away?"
SIZE = 512  # the farm's default output size: what users see
FPS = 25
SEED = 7  # two full blinks in this clip (at ~2.2 s and ~4.7 s)
CHUNK_FRAMES = 20

# Lips lead the sound they make (coarticulation): a frame shows the shape of the
# phone heard ~40 ms later. The issue asks for anticipation; this is the test's own
# figure, not imported from models.motion.
LEAD_S = 0.04
# A short bilabial (Piper gives a /p/ ~25 ms) may be shown on the frame either side.
CLOSURE_SLACK_S = 0.02
# A pause counts when no phone sounds for this long; its first and last frames are
# left out, because lips may still be closing from (or opening for) speech there:
# LEAD_S plus ~2 frames of movement at the mouth's top speed.
PAUSE_MIN_S = 0.25
PAUSE_EDGE_S = 0.12
SILENT_DB = -40.0  # audio RMS under a pause frame, relative to the loudest frame

# Inner-lip gap (13-14) in inter-ocular distances. Measured on this clip, 512 px,
# over several Piper runs (Piper's timing varies run to run):
#   p/b/m closure, smallest gap per closure ........ 0.000 - 0.027
#   pauses (the photo's smiling mouth at rest) ...... 0.124 - 0.133
#   open vowels, peak per vowel ...................... 0.30 - 0.41, or 0.189 (see below)
CLOSED_MAX = 0.06  # 2x the worst closure; half the rest gap; a seventh of an open vowel
# Every open vowel must open past the rest pose (0.131 at most). The stressed /ɑː/ of
# "Papa" peaks at only 0.189 in about half of the Piper runs: both neighbouring /p/
# closures are widened to their 2-frame minimum and take a frame each from a 4-frame
# vowel. So the per-vowel floor is modest, and the typical vowel is held to more.
OPEN_EACH_MIN = 0.16
OPEN_MEDIAN_MIN = 0.30  # median peak measured 0.39 - 0.40
PAUSE_STILL_MAX = 0.03  # gap range within one pause measured <= 0.009

# Issue 14's figures, measured by farm/quality.py on this clip. Planned from the phones
# alone (as before issue 14) it measures sync corr 0.66 at lag 0 and closed in 82% of 44
# silent frames; with the audio, 0.83 at lag 0 and 100%. The target is corr 0.6
# on its benchmark; this short bilabial clip is held to more, between the two figures.
SYNC_CORR_MIN = 0.75
CLOSED_IN_SILENCE_MIN = 0.95

# Eye aspect ratio (lid opening / eye width), relative to the median over frames with
# no blink. Measured: open median 0.355 - 0.363, every open frame >= 0.90 of it; fully
# closed frames 0.13 - 0.35 of it.
BLINK_CLOSED = 0.9  # blink channel at or above this: the lids must be down
BLINK_NONE = 0.02  # at or below this: the eye must be open
CLOSED_EYE_MAX = 0.5
OPEN_EYE_MIN = 0.75
OPEN_EYE_ABS_MIN = 0.25  # the demo photo's eyes are wide open (0.36): not a squint

# Decoded video against the one-go render. Measured at CRF 20: mean |error| 2.17 - 2.29
# per frame, PSNR >= 38.0 dB.
DECODED_MAE_MAX = 3.5
DECODED_PSNR_MIN = 34.0
# Frame-to-frame change in the decoded video less the change in the rendered frames
# (the content's own motion): what encoding and joining added. Measured with lossless
# chunks and one CRF 20 encode: inside chunks p95 0.06, max 0.12; at joins max 0.03.
# Lossy CRF 20 chunks joined by stream copy (the first design) added ~1 at every join.
SEAM_MAX = 0.25


@dataclass(repr=False)  # arrays: keep failure reports readable
class Speech:
    samples: np.ndarray  # int16 mono, the job's whole timeline (lead-in and tail included)
    rate: int
    phones: list[Phone]

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate

    def as_audio(self) -> tts.Speech:
        """The timeline as the plan stage hands it to the renderer."""
        return tts.Speech(samples=self.samples, sample_rate=self.rate, phones=self.phones)


@dataclass(repr=False)  # arrays: keep failure reports readable
class Clip:
    speech: Speech
    plan: Plan
    frames: np.ndarray  # (n, SIZE, SIZE, 3) RGB as rendered
    points: np.ndarray  # (n, 478, 2) FaceMesh landmarks on those frames

    @property
    def times(self) -> np.ndarray:
        return measure.frame_times(len(self.frames), self.plan.fps)

    @property
    def gap(self) -> np.ndarray:
        return measure.lip_gap(self.points)


def speak(script: str) -> Speech:
    """The farm's audio timeline for a script: its segments, pauses, lead-in and tail."""
    parts = []
    # The farm's default segmenting (class attributes are the settings' defaults).
    for text, pause_ms in split_script(
        script, Settings.max_segment_chars, Settings.segment_pause_ms
    ):
        speech = tts.synthesize(text, "joe")
        parts.append((speech.samples, speech.sample_rate, speech.phones, pause_ms))
    samples, rate, phones = assemble_audio(parts, jobs.LEAD_IN_SECONDS, jobs.TAIL_SECONDS)
    return Speech(samples=samples, rate=rate, phones=phones)


def render_clip(
    renderer: PortraitRenderer, avatar: PortraitAvatar, speech: Speech, plan: Plan
) -> Clip:
    """All frames in one render call, and FaceMesh's landmarks on them."""
    sink = ListSink()
    renderer.render(avatar, plan, range(plan.frame_count), sink)
    frames = sink.frames
    return Clip(speech=speech, plan=plan, frames=frames, points=measure.face_landmarks(frames))


@pytest.fixture(scope="module")
def renderer() -> PortraitRenderer:
    r = PortraitRenderer(batch_size=16)
    r.load(Path("."), "cpu")
    return r


@pytest.fixture(scope="module")
def avatar(renderer: PortraitRenderer) -> PortraitAvatar:
    return renderer.prepare_avatar(demo_photo())


@pytest.fixture(scope="module")
def clip(renderer: PortraitRenderer, avatar: PortraitAvatar) -> Clip:
    speech = speak(SCRIPT)
    plan = renderer.plan(
        avatar, speech.seconds, speech.phones, FPS, (SIZE, SIZE), SEED, speech.as_audio()
    )
    return render_clip(renderer, avatar, speech, plan)


# --- what the speech says should happen ------------------------------------------------------


def pause_frames(clip: Clip) -> list[np.ndarray]:
    """Frame indices per pause: no phone sounding, audio silent, edges left out."""
    speech = clip.speech
    loudness = measure.audio_rms_db(speech.samples, speech.rate, len(clip.frames), clip.plan.fps)
    out = []
    for start, end in measure.pauses(speech.phones, speech.seconds, PAUSE_MIN_S):
        inside = measure.frames_in(clip.times, start + PAUSE_EDGE_S, end - PAUSE_EDGE_S)
        # The phones and the audio must agree that this is silence, or the phone
        # timings (and everything derived from them) are off.
        assert inside.size == 0 or loudness[inside].max() < SILENT_DB, (start, end)
        if inside.size:
            out.append(inside)
    return out


def closure_frames(clip: Clip) -> list[tuple[tuple[float, float], np.ndarray]]:
    """Per p/b/m closure (touching ones merged): its span and the frames that show it."""
    spans = measure.merge_touching(measure.spans_of(clip.speech.phones, measure.BILABIAL))
    return [
        (
            (start, end),
            measure.frames_in(
                clip.times, start - LEAD_S - CLOSURE_SLACK_S, end - LEAD_S + CLOSURE_SLACK_S
            ),
        )
        for start, end in spans
    ]


def open_vowel_frames(clip: Clip) -> list[tuple[Phone, np.ndarray]]:
    return [
        (p, measure.frames_in(clip.times, p.start - LEAD_S, p.end - LEAD_S))
        for p in measure.spans_of(clip.speech.phones, measure.OPEN_VOWEL)
    ]


def blink_frames(clip: Clip, channel: str) -> tuple[np.ndarray, np.ndarray]:
    """(frames with the lids down, frames with no blink at all) for one eye."""
    values = clip.plan.channel(channel)
    return np.flatnonzero(values >= BLINK_CLOSED), np.flatnonzero(values <= BLINK_NONE)


# --- checks (plain functions, so that a deliberately broken clip can be run through them) ----


def check_clip_is_a_fair_test(clip: Clip) -> None:
    assert clip.frames.shape == (math.ceil(clip.speech.seconds * FPS), SIZE, SIZE, 3)
    assert len(closure_frames(clip)) >= 8, "the script should give many p/b/m closures"
    assert len(open_vowel_frames(clip)) >= 5, "the script should give several open vowels"
    pauses = pause_frames(clip)
    assert sum(len(p) for p in pauses) >= 20, "need pause frames, the paragraph break included"
    assert max(len(p) for p in pauses) >= 10, "the paragraph pause is missing"
    for channel in ("blink_left", "blink_right"):
        closed, _ = blink_frames(clip, channel)
        assert closed.size >= 1, f"seed {SEED} should give at least one full blink ({channel})"


def check_lips_close_on_bilabials(clip: Clip) -> None:
    gap = clip.gap
    misses = []
    for (start, end), frames in closure_frames(clip):
        assert frames.size, (start, end)
        if (smallest := float(gap[frames].min())) > CLOSED_MAX:
            misses.append(f"{start:.2f}-{end:.2f} s (frames {frames.tolist()}): {smallest:.3f}")
    # Every closure listed, so a timing error shows as a pattern rather than one line.
    assert not misses, f"lips not closed (gap <= {CLOSED_MAX}) for p/b/m at: " + "; ".join(misses)


def check_mouth_opens_on_open_vowels(clip: Clip) -> None:
    gap = clip.gap
    peaks, misses = [], []
    for phone, frames in open_vowel_frames(clip):
        assert frames.size, phone
        peaks.append(peak := float(gap[frames].max()))
        if peak < OPEN_EACH_MIN:
            misses.append(f"/{phone.symbol}/ {phone.start:.2f}-{phone.end:.2f} s: {peak:.3f}")
    assert not misses, f"mouth not open (gap >= {OPEN_EACH_MIN}) for: " + "; ".join(misses)
    median = float(np.median(peaks))
    assert median >= OPEN_MEDIAN_MIN, (
        f"open vowels open too little: median peak gap {median:.3f} < {OPEN_MEDIAN_MIN}; "
        f"peaks {np.round(peaks, 3).tolist()}"
    )


def check_mouth_rests_in_pauses(clip: Clip) -> None:
    """In a pause the mouth holds still and is never open like a vowel."""
    gap = clip.gap
    misses = []
    for frames in pause_frames(clip):
        values = gap[frames]
        if values.max() >= OPEN_EACH_MIN or np.ptp(values) > PAUSE_STILL_MAX:
            misses.append(f"frames {frames[0]}-{frames[-1]}: {values.round(3).tolist()}")
    assert not misses, (
        f"mouth open (gap >= {OPEN_EACH_MIN}) or moving (range > {PAUSE_STILL_MAX}) in "
        "pauses at: " + "; ".join(misses)
    )


def check_lips_closed_in_pauses(clip: Clip) -> None:
    """Issue 5: "closed in silences and on p/b/m": held to the same bar as a closure."""
    gap = clip.gap
    misses = [
        f"frames {frames[0]}-{frames[-1]}: up to {gap[frames].max():.3f}"
        for frames in pause_frames(clip)
        if gap[frames].max() > CLOSED_MAX
    ]
    assert not misses, (
        f"lips apart in pauses (closed is gap <= {CLOSED_MAX}, as on p/b/m, where it "
        "measures <= 0.03) at: " + "; ".join(misses)
    )


def sync_figures(clip: Clip) -> quality.Figures:
    """Issue 14's figures (farm/quality.py): mouth opening over face height against the
    RMS of the clip's own audio under each frame."""
    speech = clip.speech
    opening = quality.mouth_opening(clip.points)
    rms = quality.frame_rms(speech.samples / 32768.0, speech.rate, len(opening), FPS)
    return quality.figures(opening, rms, FPS, len(opening) / FPS, speech.seconds)


def check_mouth_follows_the_sound(clip: Clip) -> None:
    """Issue 14: opening correlates with loudness at >= SYNC_CORR_MIN, at a lag where
    the mouth leads by at most a frame and never trails (see SYNC_CORR_MIN)."""
    fig = sync_figures(clip)
    by_lag = {k: round(v, 3) for k, v in fig.corr_by_lag.items()}
    assert fig.best_lag in (0, 1), f"best lag {fig.best_lag} frames (corr by lag {by_lag})"
    assert fig.sync_corr >= SYNC_CORR_MIN, f"sync corr {fig.sync_corr:.3f} (by lag {by_lag})"


def check_mouth_closed_in_silence(clip: Clip) -> None:
    """Issue 14: closed (within 15% of the opening's range above its minimum) in at
    least CLOSED_IN_SILENCE_MIN of the frames of silences >= 300 ms heard in the audio
    (82% on this clip before the change, 67-91% on the benchmark's text jobs)."""
    fig = sync_figures(clip)
    assert fig.silent_frames >= 20, "the clip should have long silences"
    assert fig.closed_in_silence >= CLOSED_IN_SILENCE_MIN, (
        f"closed in {100 * fig.closed_in_silence:.0f}% of {fig.silent_frames} silent frames"
    )


def check_eyes_close_on_blinks_only(clip: Clip) -> None:
    right, left = measure.eye_aspect(clip.points)
    # blink_left is the subject's left eye, which FaceMesh calls LEFT_EYE as well.
    for channel, ratio in (("blink_right", right), ("blink_left", left)):
        closed, none = blink_frames(clip, channel)
        open_ear = float(np.median(ratio[none]))
        assert open_ear >= OPEN_EYE_ABS_MIN, f"{channel}: eyes barely open ({open_ear:.3f})"
        lids_up = ratio[closed] / open_ear
        assert lids_up.max() <= CLOSED_EYE_MAX, (
            f"{channel}: eye not closed during the blink at frames {closed.tolist()}: "
            f"aspect {np.round(lids_up, 2).tolist()} of open (closed is <= {CLOSED_EYE_MAX})"
        )
        squints = none[ratio[none] / open_ear < OPEN_EYE_MIN]
        assert squints.size == 0, (
            f"{channel}: eye closing outside blinks at frames {squints.tolist()}: "
            f"aspect {np.round(ratio[squints] / open_ear, 2).tolist()} of open"
        )


# --- the rendered clip -----------------------------------------------------------------------


def test_clip_is_a_fair_test(clip: Clip) -> None:
    check_clip_is_a_fair_test(clip)


def test_lips_close_on_bilabials(clip: Clip) -> None:
    check_lips_close_on_bilabials(clip)


def test_mouth_opens_on_open_vowels(clip: Clip) -> None:
    check_mouth_opens_on_open_vowels(clip)


def test_mouth_rests_in_pauses(clip: Clip) -> None:
    check_mouth_rests_in_pauses(clip)


def test_lips_closed_in_pauses(clip: Clip) -> None:
    check_lips_closed_in_pauses(clip)


def test_mouth_follows_the_sound(clip: Clip) -> None:
    check_mouth_follows_the_sound(clip)


def test_mouth_closed_in_silence(clip: Clip) -> None:
    check_mouth_closed_in_silence(clip)


def test_eyes_close_on_blinks_only(clip: Clip) -> None:
    check_eyes_close_on_blinks_only(clip)


# --- chunks, as separate workers render them -------------------------------------------------


@dataclass(repr=False)  # arrays: keep failure reports readable
class Chunked:
    rendered: np.ndarray  # every chunk's frames, as the render calls wrote them
    decoded: np.ndarray  # the muxed MP4, decoded by PyAV
    starts: list[int]  # first frame of each chunk


@pytest.fixture(scope="module")
def chunked(
    renderer: PortraitRenderer, avatar: PortraitAvatar, clip: Clip, tmp_path_factory
) -> Chunked:
    work = tmp_path_factory.mktemp("chunks")
    plan = clip.plan
    fmt = VideoFormat.chunk(plan.width, plan.height, plan.fps)
    starts = list(range(0, plan.frame_count, CHUNK_FRAMES))
    # Two workers, each with its own renderer and its own copy of the avatar from the
    # store's bytes (so its own render tensors), take alternate chunks, last chunk
    # first: nothing may depend on which process renders a chunk or in what order.
    workers = []
    for _ in range(2):
        worker = PortraitRenderer(batch_size=8)
        worker.load(Path("."), "cpu")
        workers.append((worker, worker.avatar_from_bytes(avatar.to_bytes())))
    parts: dict[int, Path] = {}
    rendered: dict[int, np.ndarray] = {}
    for index in reversed(range(len(starts))):
        worker, copy = workers[index % 2]
        frames = range(starts[index], min(starts[index] + CHUNK_FRAMES, plan.frame_count))
        sink = ListSink()
        worker.render(copy, plan, frames, sink)
        rendered[index] = sink.frames
        parts[index] = work / f"{index:05d}.mp4"
        encoder = FrameEncoder(parts[index], fmt, len(frames))
        encoder.write(rendered[index])
        encoder.close()
    wav = work / "audio.wav"
    speech = clip.speech
    write_wav(tts.Speech(samples=speech.samples, sample_rate=speech.rate), wav)
    ordered = [parts[i] for i in range(len(starts))]
    final = work / "final.mp4"
    join_and_encode(ordered, wav, final, VideoFormat.delivery(plan.width, plan.height, plan.fps))
    decoded = probe(final)
    assert decoded.video_codec == "h264" and decoded.fps == FPS
    return Chunked(
        rendered=np.concatenate([rendered[i] for i in range(len(starts))]),
        decoded=decoded.frames,
        starts=starts,
    )


def test_chunks_render_the_frames_of_one_go(clip: Clip, chunked: Chunked) -> None:
    # The renderer promises a frame depends only on (avatar, plan, index): bit for bit.
    assert chunked.rendered.shape == clip.frames.shape
    differ = np.flatnonzero((chunked.rendered != clip.frames).any(axis=(1, 2, 3)))
    assert differ.size == 0, f"chunked frames differ from the one-go render at {differ.tolist()}"


def test_joined_video_matches_the_one_go_render(clip: Clip, chunked: Chunked) -> None:
    decoded, reference = chunked.decoded, clip.frames
    assert len(decoded) == len(reference), "frames lost or duplicated at the joins"
    error = np.abs(decoded.astype(np.int16) - reference.astype(np.int16)).mean(axis=(1, 2, 3))
    worst = int(error.argmax())
    assert error[worst] <= DECODED_MAE_MAX, f"frame {worst}: mean |error| {error[worst]:.2f}"
    quality = min(measure.psnr(decoded[i], reference[i]) for i in range(len(reference)))
    assert quality >= DECODED_PSNR_MIN, f"PSNR {quality:.1f} dB"


def test_no_jump_at_chunk_boundaries(clip: Clip, chunked: Chunked) -> None:
    """The decoded video changes across a join no more than the picture does.

    A plain frame-to-frame difference mixes what the codec adds with the content's own
    motion, and speech motion dominates its spread: compared with the 95th percentile
    inside chunks it cannot tell a correct join (boundary/p95 up to 1.27 measured) from
    chunks rendered from the wrong plan rows (1.48) or with a head offset (1.44). So
    the rendered frames' change is subtracted first; what remains is what encoding and
    joining added, which inside chunks is a few hundredths of a level.
    """
    shown = measure.consecutive_diffs(chunked.decoded)
    content = measure.consecutive_diffs(clip.frames)
    added = np.abs(shown - content)
    boundaries = np.array(chunked.starts[1:]) - 1  # diff i is between frames i and i + 1
    interior = np.setdiff1d(np.arange(added.size), boundaries)
    inside = float(np.percentile(added[interior], 95))
    assert inside <= SEAM_MAX / 2, f"inside chunks the video does not follow the render: {inside}"
    jumps = {int(b) + 1: round(float(added[b]), 3) for b in boundaries if added[b] > SEAM_MAX}
    assert not jumps, (
        f"frame-to-frame change jumps at chunk starts {jumps} (mean |level| added by "
        f"encoding and joining); inside chunks p95 {inside:.3f}, max "
        f"{added[interior].max():.3f}; limit {SEAM_MAX}"
    )
