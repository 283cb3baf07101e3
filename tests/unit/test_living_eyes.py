"""Living eyes (models/eyes.py): the seeded gaze track and the iris move, on synthetic
eyes with known regions, and (when mediapipe finds the face) on the demo portrait."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from farm.errors import InvalidInput
from models.eyes import (
    LEFT_EYE_OPENING,
    MAX_GAZE,
    RIGHT_EYE_OPENING,
    Eye,
    EyeRegions,
    eye_regions_from_mediapipe,
    gaze_track,
    move_irises,
)

SKIN = (205, 160, 140)
WHITE = (236, 232, 226)
IRIS = (95, 62, 38)
PUPIL = (18, 12, 10)
RADIUS = 12


def almond(cx: float, cy: float, half_width: float, half_height: float) -> np.ndarray:
    """An eye opening: two arcs meeting at pointed corners, in continuous pixel coords."""
    t = np.linspace(-1.0, 1.0, 24)
    upper = np.stack([cx + half_width * t, cy - half_height * (1 - t**2)], axis=1)
    lower = np.stack([cx - half_width * t[1:-1], cy + half_height * (1 - t[1:-1] ** 2)], axis=1)
    return np.concatenate([upper, lower]).astype(np.float32)


def draw_face(iris_dy: int = 0) -> tuple[np.ndarray, EyeRegions]:
    """Skin, two white almond openings, dark iris disks with pupils clipped to them; the
    iris is drawn at integer pixel (x, y), whose centre is continuous (x + 0.5, y + 0.5)."""
    skin = np.empty((120, 320, 3), dtype=np.uint8)
    skin[:] = SKIN
    eye_layer = np.empty_like(skin)
    eye_layer[:] = WHITE
    inside = np.zeros(skin.shape[:2], dtype=np.uint8)
    eyes = []
    for cx in (80, 240):
        opening = almond(cx + 0.5, 60.5, 45, 22)
        cv2.fillPoly(inside, [np.round((opening - 0.5) * 16).astype(np.int32)], 1, shift=4)
        cv2.circle(eye_layer, (cx, 60 + iris_dy), RADIUS, IRIS, -1, lineType=cv2.LINE_AA)
        cv2.circle(eye_layer, (cx, 60 + iris_dy), 5, PUPIL, -1, lineType=cv2.LINE_AA)
        eyes.append(Eye(centre=(cx + 0.5, 60.5 + iris_dy), radius=RADIUS, opening=opening))
    image = np.where(inside[..., None] > 0, eye_layer, skin)
    return image, EyeRegions(left=eyes[0], right=eyes[1])


def opening_mask(eye: Eye, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies strictly inside the opening (cv2's own polygon test)."""
    contour = eye.opening.reshape(-1, 1, 2).astype(np.float32)
    mask = np.zeros(shape, dtype=bool)
    for y in range(shape[0]):
        for x in range(shape[1]):
            mask[y, x] = cv2.pointPolygonTest(contour, (x + 0.5, y + 0.5), False) > 0
    return mask


def dark_centroid(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    luma = frame.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    ys, xs = np.nonzero(mask & (luma < 140))
    return np.array([xs.mean(), ys.mean()])


@pytest.fixture(scope="module")
def face():
    image, regions = draw_face()
    masks = [opening_mask(eye, image.shape[:2]) for eye in regions.eyes]
    return image, regions, masks


# --- the iris move -------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [(0.4, 0.0), (-0.4, 0.0), (0.0, 0.3), (0.25, -0.25)])
def test_move_shifts_the_iris_centroid_by_offset_times_radius(face, offset):
    image, regions, masks = face
    out = move_irises(image[None], regions, np.array([offset]))
    assert out.shape == (1, *image.shape) and out.dtype == np.uint8
    for mask in masks:
        moved = dark_centroid(out[0], mask) - dark_centroid(image, mask)
        np.testing.assert_allclose(moved, np.array(offset) * RADIUS, atol=0.5)


def test_zero_offset_changes_nothing(face):
    image, regions, _ = face
    frames = np.stack([image, image])
    out = move_irises(frames, regions, np.zeros((2, 2)))
    assert out is not frames and np.array_equal(out, frames)
    tiny = move_irises(frames, regions, np.full((2, 2), 1e-4))
    assert np.abs(tiny.astype(int) - frames).max() <= 1


@pytest.mark.parametrize("iris_dy", [0, -14, 12])  # centred, half under the upper lid, lower
def test_nothing_outside_the_opening_changes(iris_dy):
    image, regions = draw_face(iris_dy)
    inside = np.zeros(image.shape[:2], dtype=bool)
    for eye in regions.eyes:
        inside |= opening_mask(eye, image.shape[:2])
    offsets = np.array([(0.5, 0.0), (-0.5, 0.3), (0.3, -0.5), (1.2, 0.8)])
    before = np.stack([image] * len(offsets))
    out = move_irises(before, regions, offsets)
    assert np.array_equal(before, np.stack([image] * len(offsets)))  # input untouched
    changed = (out != before).any(axis=-1)
    assert changed.any(axis=(1, 2)).all()
    assert not (changed & ~inside).any()


def test_uncovered_area_turns_white(face):
    image, regions, _ = face
    out = move_irises(image[None], regions, np.array([(0.5, 0.0)]))[0]
    for eye in regions.eyes:
        x, y = int(eye.centre[0]) - 9, int(eye.centre[1])  # was iris; the iris moved 6 px
        assert np.abs(image[y, x].astype(int) - IRIS).max() <= 2
        assert np.abs(out[y, x].astype(int) - WHITE).max() <= 12


def test_iris_hidden_by_the_lid_comes_into_view_as_iris():
    image, regions = draw_face(iris_dy=-20)  # the upper lid hides the iris's top 10 px
    out = move_irises(image[None], regions, np.array([(0.0, 0.5)]))[0]
    for eye in regions.eyes:
        # Just under the lid: the source, 6 px higher, is iris hidden under skin; the
        # move shows it in the iris's colour, not the skin's.
        x = int(eye.centre[0]) + 8
        assert np.abs(out[40, x].astype(int) - IRIS).max() <= 30


def test_frames_are_independent_and_regions_can_vary_per_frame(face):
    image, regions, _ = face
    shifted = np.roll(image, 3, axis=1)
    other = EyeRegions(
        *(
            Eye(centre=(e.centre[0] + 3, e.centre[1]), radius=e.radius, opening=e.opening + (3, 0))
            for e in regions.eyes
        )
    )
    offsets = np.array([(0.3, 0.1), (-0.2, 0.0), (0.3, 0.1)])
    batch = move_irises(np.stack([image, shifted, image]), [regions, other, regions], offsets)
    assert np.array_equal(batch[0], move_irises(image, regions, offsets[0]))
    assert np.array_equal(batch[0], batch[2])
    assert np.array_equal(batch[1], move_irises(shifted[None], other, offsets[1:2])[0])


def test_torch_frames_give_the_numpy_result(face):
    torch = pytest.importorskip("torch")
    image, regions, _ = face
    frames = np.stack([image, image])
    offsets = np.array([(0.4, -0.2), (0.0, 0.0)])
    out = move_irises(torch.from_numpy(frames), regions, torch.tensor(offsets))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8
    expected = move_irises(frames, regions, offsets)
    assert np.abs(out.numpy().astype(int) - expected).max() <= 1


def test_bad_inputs_are_refused(face):
    image, regions, _ = face
    with pytest.raises(InvalidInput):
        move_irises(image[None].astype(np.float32), regions, np.zeros((1, 2)))
    with pytest.raises(InvalidInput):
        move_irises(image[None], regions, np.zeros((2, 2)))
    with pytest.raises(InvalidInput):
        move_irises(image[None], [regions, regions], np.zeros((1, 2)))


# --- the gaze track --------------------------------------------------------------------------


def test_gaze_track_is_seeded():
    a = gaze_track(250, 25, seed=7)
    assert a.shape == (250, 2) and a.dtype == np.float32
    assert np.array_equal(a, gaze_track(250, 25, seed=7))
    assert not np.array_equal(a, gaze_track(250, 25, seed=8))
    assert gaze_track(0, 25, seed=7).shape == (0, 2)
    with pytest.raises(InvalidInput):
        gaze_track(-1, 25, seed=7)
    with pytest.raises(InvalidInput):
        gaze_track(10, 0, seed=7)


@pytest.mark.parametrize("seed", range(6))
def test_gaze_track_fixates_near_centre_with_saccades(seed):
    track = gaze_track(500, 25, seed)  # 20 s
    radius = np.linalg.norm(track, axis=1)
    steps = np.linalg.norm(np.diff(track, axis=0), axis=1)
    assert radius.max() <= MAX_GAZE + 1e-6
    assert (radius <= 0.2).mean() >= 0.6
    assert (steps > 0.1).sum() >= 3  # saccades
    assert (steps < 0.02).mean() >= 0.8  # fixations with a little drift
    # Each saccade's fast frames come in runs of at most 4 frames at 25 fps.
    fast = np.concatenate([[0], (steps > 0.02).astype(int), [0]])
    starts, ends = np.nonzero(np.diff(fast) == 1)[0], np.nonzero(np.diff(fast) == -1)[0]
    assert (ends - starts).max() <= 4


def test_gaze_track_glances_away_sometimes():
    radius = np.concatenate([np.linalg.norm(gaze_track(1500, 25, s), axis=1) for s in range(5)])
    assert 0.01 < (radius > 0.25).mean() < 0.3


# --- regions from landmarks -------------------------------------------------------------------


def test_eye_regions_from_mediapipe_points():
    points = np.zeros((478, 3), dtype=np.float32)
    for centre, first, (x, y, r) in ((468, 469, (100, 50, 4.0)), (473, 474, (160, 52, 5.0))):
        points[centre, :2] = (x, y)
        points[first : first + 4, :2] = [(x + r, y), (x, y - r), (x - r, y), (x, y + r)]
    for index, opening in ((0, LEFT_EYE_OPENING), (1, RIGHT_EYE_OPENING)):
        x = (100, 160)[index]
        points[list(opening), :2] = almond(x, 50, 12, 5)[: len(opening)]
    regions = eye_regions_from_mediapipe(points)
    assert regions.left.centre == (100.0, 50.0) and regions.left.radius == pytest.approx(4.0)
    assert regions.right.centre == (160.0, 52.0) and regions.right.radius == pytest.approx(5.0)
    assert regions.left.opening.shape == (16, 2)
    np.testing.assert_allclose(regions.left.opening, points[list(LEFT_EYE_OPENING), :2])
    assert np.array_equal(eye_regions_from_mediapipe(points[:, :2]).right.opening,
                          regions.right.opening)  # fmt: skip
    with pytest.raises(InvalidInput):
        eye_regions_from_mediapipe(points[:400])


# --- a real face ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def portrait():
    """The demo portrait's face, cropped and upscaled 4x: at 512 px its irises are about
    4 px across in radius, too small for mediapipe to see a sub-radius move reliably."""
    pytest.importorskip("mediapipe")
    from models.eyes import detect_eye_regions, detect_landmarks478
    from models.portrait import demo_photo

    face = cv2.resize(demo_photo()[40:200, 140:300], (640, 640), interpolation=cv2.INTER_CUBIC)
    regions = detect_eye_regions(face)
    if regions is None:
        pytest.skip("mediapipe found no face in the demo portrait")
    return face, regions, detect_landmarks478


def test_detect_eye_regions_finds_the_eyes(portrait):
    face, regions, _ = portrait
    left, right = regions.eyes
    assert left.centre[0] < right.centre[0]
    for eye in regions.eyes:
        # The iris centre lies inside its opening, the radius is a plausible share of it.
        assert opening_mask(eye, face.shape[:2])[int(eye.centre[1]), int(eye.centre[0])]
        width = np.ptp(eye.opening[:, 0])
        assert 0.15 * width < eye.radius < 0.4 * width
        # ... and the iris is darker than the eye white around it.
        luma = face.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        assert luma[int(eye.centre[1]), int(eye.centre[0])] < 100


@pytest.mark.parametrize("offset", [(0.4, 0.0), (-0.4, 0.0)])
def test_mediapipe_sees_the_irises_move(portrait, offset):
    face, regions, detect = portrait
    before = detect(face)
    after = detect(move_irises(face, regions, np.array(offset)))
    assert after is not None
    for centre, eye in ((468, regions.left), (473, regions.right)):
        moved = after[centre, :2] - before[centre, :2]
        expected = np.array(offset) * eye.radius
        # The right direction and at least half the distance, hardly any vertical drift.
        assert moved[0] * np.sign(expected[0]) > 0.5 * abs(expected[0])
        assert abs(moved[1]) < 0.5 * abs(expected[0])
