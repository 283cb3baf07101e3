"""Full-photo output: the animated face crop pasted back into the whole photo."""

from __future__ import annotations

import io

import numpy as np
import pytest

from farm.errors import PermanentError
from models.base import CHANNEL_INDEX, CHANNELS, Plan
from models.portrait import PortraitAvatar, PortraitRenderer, demo_photo
from models.portrait.avatar import CROP_SIZE, MAX_PHOTO_SIDE, fit_photo
from models.portrait.landmarks import LOWER_INNER_LIP, UPPER_INNER_LIP
from models.portrait.renderer import FEATHER
from tests.doubles import ListSink


@pytest.fixture(scope="module")
def avatar() -> PortraitAvatar:
    # Odd sides and wider than tall, so the trim to even sides is exercised too.
    photo = np.pad(demo_photo(), ((40, 61), (150, 121), (0, 0)), mode="edge")
    return PortraitRenderer().prepare_avatar(photo)


def render(avatar: PortraitAvatar, rows: list[dict[str, float]], *ranges: range, batch=16):
    track = np.zeros((len(rows), len(CHANNELS)), dtype=np.float32)
    for i, row in enumerate(rows):
        for name, value in row.items():
            track[i, CHANNEL_INDEX[name]] = value
    width, height = avatar.photo_size
    plan = Plan(fps=25, width=width, height=height, seed=0, track=track)
    sink = ListSink()
    renderer = PortraitRenderer(batch_size=batch)
    for frames in ranges or (range(len(rows)),):
        renderer.render(avatar, plan, frames, sink)
    return np.concatenate(sink.batches)


def diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1)


def test_full_photo_frames_keep_the_photo_away_from_the_face(avatar):
    assert avatar.photo is not None and avatar.crop_box is not None
    width, height = avatar.photo_size
    assert (width, height) == (782, 612)  # 783x613 trimmed to even sides
    frames = render(avatar, [{}, {"jaw_open": 1.0, "head_yaw": 1.0, "blink_left": 1.0}])
    assert frames.shape == (2, height, width, 3) and frames.dtype == np.uint8
    x0, y0, side = avatar.crop_box
    outside = np.ones((height, width), dtype=bool)
    outside[max(y0, 0) : y0 + side, max(x0, 0) : x0 + side] = False
    assert outside.mean() > 0.5
    for frame in frames:
        assert np.array_equal(frame[outside], avatar.photo[outside])


def test_the_mouth_moves_with_jaw_open(avatar):
    x0, y0, side = avatar.crop_box
    lips = np.concatenate(
        [avatar.landmarks[list(UPPER_INNER_LIP)], avatar.landmarks[list(LOWER_INNER_LIP)]]
    )
    points = lips * (side / CROP_SIZE) + np.array([x0, y0])
    (cx0, cy0), (cx1, cy1) = points.min(axis=0).astype(int), points.max(axis=0).astype(int)
    shut, open_ = render(avatar, [{"jaw_open": 0.0}, {"jaw_open": 1.0}])
    mouth = np.s_[cy0 - 4 : cy1 + 12, cx0 - 2 : cx1 + 2]
    assert diff(shut[mouth], open_[mouth]).mean() > 20


def test_no_seam_at_the_crop_border(avatar):
    x0, y0, side = avatar.crop_box
    height, width = avatar.photo.shape[:2]
    frame = render(avatar, [{"jaw_open": 1.0, "head_yaw": 1.0, "head_pitch": 1.0}])[0]
    change = diff(frame, avatar.photo)
    ramp = int(FEATHER * side)
    # Mean change along square rings k pixels inside the crop border (within the photo).
    profile = []
    for k in range(2 * ramp):
        ring = np.zeros((height, width), dtype=bool)
        top, left = y0 + k, x0 + k
        bottom, right = y0 + side - 1 - k, x0 + side - 1 - k
        for r in (top, bottom):
            if 0 <= r < height:
                ring[r, max(left, 0) : min(right + 1, width)] = True
        for c in (left, right):
            if 0 <= c < width:
                ring[max(top, 0) : min(bottom + 1, height), c] = True
        profile.append(float(change[ring].mean()))
    profile = np.array(profile)
    assert profile[:2].max() < 1.0  # at the border, the photo itself
    assert np.abs(np.diff(profile)).max() < 2.0  # no step anywhere across the ramp
    assert change[y0 : y0 + 2].max() <= 2  # not even single pixels stand out on the edge


def test_full_photo_frames_do_not_depend_on_batching(avatar):
    rows = [{"jaw_open": i / 5, "head_roll": 0.5 - i / 10} for i in range(6)]
    whole = render(avatar, rows, batch=16)
    split = render(avatar, rows, range(0, 4), range(4, 6), batch=3)
    assert np.array_equal(whole, split)


def test_large_photos_are_downscaled_to_even_sides():
    photo = np.zeros((2001, 3001, 3), dtype=np.uint8)
    fitted, factor = fit_photo(photo)
    assert max(fitted.shape[:2]) <= MAX_PHOTO_SIDE
    assert fitted.shape[0] % 2 == 0 and fitted.shape[1] % 2 == 0
    assert factor == pytest.approx(MAX_PHOTO_SIDE / 3001)


def test_format_1_artifacts_still_render_the_crop(avatar):
    buf = io.BytesIO()
    np.savez_compressed(buf, version=np.array(1), image=avatar.image, landmarks=avatar.landmarks)
    old = PortraitAvatar.from_bytes(buf.getvalue())
    assert old.photo is None
    with pytest.raises(PermanentError, match="add it again"):
        _ = old.photo_size
    again = PortraitAvatar.from_bytes(avatar.to_bytes())
    assert again.photo_size == avatar.photo_size and again.crop_box == avatar.crop_box
    assert np.array_equal(again.photo, avatar.photo)
