"""The portrait renderer on the built-in demo photo: determinism, registration and
whether each control moves what it should (and nothing else)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from farm.errors import InvalidInput, PermanentError
from models.base import CHANNEL_INDEX, CHANNELS, Plan, Speech
from models.portrait import PortraitAvatar, PortraitRenderer, demo_photo
from models.portrait.controls import points_in_polygon
from models.portrait.fields import FIELD_CHANNELS
from models.portrait.landmarks import (
    CHIN,
    LEFT_EYE_LOWER,
    LEFT_EYE_UPPER,
    LOWER_INNER_LIP,
    RIGHT_EYE_LOWER,
    RIGHT_EYE_UPPER,
    UPPER_INNER_LIP,
)
from models.portrait.render import build_rig
from tests.doubles import ListSink


@pytest.fixture(scope="module")
def avatar() -> PortraitAvatar:
    return PortraitRenderer().prepare_avatar(demo_photo())


@pytest.fixture(scope="module")
def jaw_lips(avatar) -> tuple[np.ndarray, np.ndarray]:
    """Inner lip contours (2, 11, 2) at rest and at jaw_open = 1."""
    rig = build_rig(avatar, 512, device=torch.device("cpu"), dtype=torch.float32)
    rest = rig.lip_rest.numpy()
    return rest, rest + rig.lip_motion[FIELD_CHANNELS.index("jaw_open")].numpy()


def plan_of(rows: list[dict[str, float]], size: tuple[int, int] = (512, 512)) -> Plan:
    track = np.zeros((len(rows), len(CHANNELS)), dtype=np.float32)
    for i, row in enumerate(rows):
        for name, value in row.items():
            track[i, CHANNEL_INDEX[name]] = value
    return Plan(fps=25, width=size[0], height=size[1], seed=0, track=track)


def render(avatar: PortraitAvatar, plan: Plan, *ranges: range, batch_size: int = 16):
    renderer = PortraitRenderer(batch_size=batch_size)
    sink = ListSink()
    for frames in ranges or (range(plan.frame_count),):
        renderer.render(avatar, plan, frames, sink)
    return sink.frames


def box_around(points: np.ndarray, pad: int) -> tuple[slice, slice]:
    x0, y0 = np.floor(points.min(axis=0)).astype(int) - pad
    x1, y1 = np.ceil(points.max(axis=0)).astype(int) + pad
    return slice(y0, y1), slice(x0, x1)


def mean_change(a: np.ndarray, b: np.ndarray, where=np.s_[:]) -> float:
    return float(np.abs(a[where].astype(np.int16) - b[where].astype(np.int16)).mean())


def luma(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def test_a_frame_depends_only_on_its_index(avatar):
    rng = np.random.default_rng(7)
    track = rng.uniform(-1, 1, (100, len(CHANNELS))).astype(np.float32)
    plan = Plan(fps=25, width=512, height=512, seed=0, track=track)
    whole = render(avatar, plan, range(0, 100), batch_size=16)
    assert whole.shape == (100, 512, 512, 3) and whole.dtype == np.uint8
    assert len(np.unique(whole.reshape(100, -1)[:, ::997], axis=0)) > 90  # frames differ
    halves = render(avatar, plan, range(0, 50), range(50, 100), batch_size=7)
    assert np.array_equal(whole, halves)
    odd = render(avatar, plan, range(33, 41), batch_size=3)
    assert np.array_equal(whole[33:41], odd)


def test_avatar_round_trips_through_bytes(avatar):
    data = avatar.to_bytes()
    again = PortraitRenderer().avatar_from_bytes(data)
    assert np.array_equal(again.image, avatar.image)
    assert np.array_equal(again.landmarks, avatar.landmarks)
    assert again.image.shape == (512, 512, 3)
    plan = plan_of([{"jaw_open": 0.7, "head_yaw": 0.5}])
    assert np.array_equal(render(avatar, plan), render(again, plan))


def test_garbage_bytes_are_a_permanent_error():
    with pytest.raises(PermanentError):
        PortraitAvatar.from_bytes(b"not an npz")


@pytest.mark.parametrize(
    "photo",
    [
        np.full((256, 256, 3), 128, dtype=np.uint8),
        np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8),
    ],
    ids=["grey", "noise"],
)
def test_a_photo_without_a_face_is_refused(photo):
    with pytest.raises(InvalidInput, match="no face found in the photo"):
        PortraitRenderer().prepare_avatar(photo)


def test_jaw_open_moves_the_mouth_and_not_the_background(avatar):
    rest, open_ = render(avatar, plan_of([{}, {"jaw_open": 1.0}]))
    assert np.array_equal(rest, avatar.image)  # the neutral frame is the photo
    lips = avatar.landmarks[list(UPPER_INNER_LIP + LOWER_INNER_LIP)]
    mouth = box_around(lips, 10)
    assert mean_change(rest, open_, mouth) > 30
    assert mean_change(rest, open_) < mean_change(rest, open_, mouth) / 10
    for corner in (np.s_[:64, :64], np.s_[:64, -64:], np.s_[-64:, :64], np.s_[-64:, -64:]):
        assert np.array_equal(rest[corner], open_[corner])


def test_jaw_open_opens_about_a_tenth_of_the_face(avatar, jaw_lips):
    rest, opened = jaw_lips
    middle = len(UPPER_INNER_LIP) // 2
    gap_rest = rest[1, middle, 1] - rest[0, middle, 1]
    gap_open = opened[1, middle, 1] - opened[0, middle, 1]
    face_height = np.linalg.norm(avatar.landmarks[CHIN] - avatar.landmarks[10])
    assert 0.09 < (gap_open - gap_rest) / face_height < 0.13


def test_the_open_mouth_is_dark_inside_and_the_chin_moves_intact(avatar, jaw_lips):
    rest, open_ = render(avatar, plan_of([{}, {"jaw_open": 1.0}]))
    lips = jaw_lips[1]
    polygon = np.concatenate([lips[0], lips[1][::-1]])
    ys, xs = np.mgrid[0:512, 0:512] + 0.5
    pixels = np.stack([xs.ravel(), ys.ravel()], axis=-1)
    inside = points_in_polygon(pixels, polygon).reshape(512, 512)
    assert inside.sum() > 500
    assert luma(open_)[inside].mean() < luma(rest)[inside].mean() - 30
    # No smear: the chin reappears, whole, where the jaw took it.
    drop = int(round(jaw_lips[1][1, 5, 1] - jaw_lips[0][1, 5, 1]))
    cx, cy = avatar.landmarks[CHIN].astype(int)
    chin = np.s_[cy - 30 : cy - 5, cx - 25 : cx + 25]
    moved = np.s_[cy - 30 + drop : cy - 5 + drop, cx - 25 : cx + 25]
    assert np.abs(luma(open_[moved]) - luma(rest[chin])).mean() < 8


def test_blink_covers_only_its_own_eye(avatar):
    rest, left, both = render(
        avatar, plan_of([{}, {"blink_left": 1.0}, {"blink_left": 1.0, "blink_right": 1.0}])
    )
    left_eye = box_around(avatar.landmarks[list(LEFT_EYE_UPPER + LEFT_EYE_LOWER)], 2)
    right_eye = box_around(avatar.landmarks[list(RIGHT_EYE_UPPER + RIGHT_EYE_LOWER)], 2)
    assert mean_change(rest, left, left_eye) > 15
    assert mean_change(rest, left, right_eye) == 0
    assert mean_change(rest, both, right_eye) > 15
    # The dark iris disappears under the lid: the eye's darkest pixels brighten.
    for eye in (left_eye, right_eye):
        assert np.percentile(luma(both[eye]), 5) > np.percentile(luma(rest[eye]), 5) + 20


def test_every_control_changes_the_picture(avatar):
    rows = [{}] + [{name: 1.0} for name in CHANNELS if name != "tongue_tip"]
    frames = render(avatar, plan_of(rows))
    for name, frame in zip(rows[1:], frames[1:], strict=True):
        changed = np.abs(frame.astype(np.int16) - frames[0]).max(axis=-1) > 10
        assert changed.sum() > 30, name


def test_other_sizes_are_letterboxed(avatar):
    frames = render(avatar, plan_of([{}, {"jaw_open": 1.0}], size=(320, 240)))
    assert frames.shape == (2, 240, 320, 3)
    assert frames[:, :, :40].max() == 0 and frames[:, :, -40:].max() == 0
    assert frames[:, :, 40:280].mean() > 50


def test_render_writes_each_batch_and_stops_when_the_sink_raises(avatar):
    plan = plan_of([{"jaw_open": i / 40} for i in range(40)])

    class Cancelling(ListSink):
        def write(self, frames: np.ndarray) -> None:
            super().write(frames)
            if len(self.batches) == 2:
                raise RuntimeError("cancelled")

    sink = Cancelling()
    with pytest.raises(RuntimeError, match="cancelled"):
        PortraitRenderer(batch_size=16).render(avatar, plan, range(40), sink)
    assert [len(b) for b in sink.batches] == [16, 16]

    stats = PortraitRenderer(batch_size=16).render(avatar, plan, range(5, 40), ListSink())
    assert stats.frames == 35 and stats.device == "cpu"
    with pytest.raises(ValueError):
        PortraitRenderer().render(avatar, plan, range(30, 41), ListSink())


def test_plan_wraps_the_motion_track(avatar, monkeypatch):
    calls = []

    def build_track(phones, seconds, fps, seed, audio=None):
        calls.append((phones, seconds, fps, seed, audio))
        return np.zeros((int(np.ceil(seconds * fps)), len(CHANNELS)), dtype=np.float32)

    monkeypatch.setitem(
        sys.modules, "models.motion", types.SimpleNamespace(build_track=build_track)
    )
    plan = PortraitRenderer().plan(avatar, 2.0, [], 25, (640, 480), 3)
    assert calls == [([], 2.0, 25, 3, None)]
    assert (plan.frame_count, plan.width, plan.height, plan.seed, plan.fps) == (50, 640, 480, 3, 25)
    # The job's audio reaches the motion (issue 14: the mouth follows the sound).
    samples = np.zeros(100, np.int16)
    PortraitRenderer().plan(avatar, 2.0, [], 25, (640, 480), 3, Speech(samples, 16_000))
    assert calls[-1][4][0] is samples and calls[-1][4][1] == 16_000


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_renders_like_the_cpu(avatar):
    plan = plan_of([{}, {"jaw_open": 1.0, "blink_left": 1.0, "head_yaw": 0.5}])
    cpu = render(avatar, plan)
    renderer = PortraitRenderer()
    renderer.load(Path("."), "cuda")
    sink = ListSink()
    stats = renderer.render(avatar, plan, range(plan.frame_count), sink)
    assert stats.device.startswith("cuda")
    diff = np.abs(sink.frames.astype(np.int16) - cpu)
    assert diff.mean() < 1.0 and np.percentile(diff, 99.9) < 24
