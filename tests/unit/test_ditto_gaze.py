"""Living eyes for the ditto backend (models/ditto/gaze.py): the head motion fitted from
the keypoints carries the crop's eye regions exactly as a known motion does, the blink
fade, the output geometries, and the sink that moves the irises frame by frame."""

from __future__ import annotations

import math

import numpy as np
import pytest

from farm.errors import InvalidInput
from models.ditto.gaze import (
    RIGID_POINTS,
    GazeSink,
    eye_openness,
    fit_similarity,
    frame_regions,
    letterbox_matrix,
    paste_matrix,
    plan_gaze,
)
from models.ditto.stitching import EYE_POINTS, LIP_POINTS, blink_schedule
from models.eyes import (
    Eye,
    EyeRegions,
    ellipse_opening,
    gaze_track,
    move_irises,
    regions_from_arrays,
    regions_to_arrays,
    transform_eye,
    transform_regions,
)
from tests.doubles import ListSink

# Normalised keypoint coordinates -> crop pixels (continuous): (u + 1) * 256.
NORM_TO_PX = np.array([[256.0, 0, 256], [0, 256, 256], [0, 0, 1]])


def crop_regions() -> EyeRegions:
    """Eyes about where the demo face's are in its 512 crop."""
    return EyeRegions(
        left=Eye(centre=(200.0, 220.0), radius=9.0, opening=ellipse_opening((200, 220), (24, 11))),
        right=Eye(centre=(300.0, 222.0), radius=9.5, opening=ellipse_opening((300, 222), (24, 11))),
    )


def source_keypoints(seed: int = 0) -> np.ndarray:
    """21 keypoints in normalised crop coordinates, a face's spread, with depth."""
    rng = np.random.default_rng(seed)
    x_s = np.column_stack(
        [rng.uniform(-0.5, 0.5, 21), rng.uniform(-0.6, 0.6, 21), rng.uniform(-0.3, 0.3, 21)]
    )
    # Ditto's eye keypoints near the two eyes (u = px / 256 - 1).
    x_s[list(EYE_POINTS)] = [
        [-0.22, -0.14, 0.21],
        [-0.2, -0.16, 0.2],
        [0.17, -0.13, 0.05],
        [0.19, -0.14, 0.06],
        [0.0, -0.4, 0.3],
    ]
    return x_s


def rotation(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """A rotation of column vectors by degrees about y (yaw), x (pitch), z (roll)."""
    y, p, r = (math.radians(a) for a in (yaw, pitch, roll))
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def moved(x_s: np.ndarray, scale: float, rot: np.ndarray, shift) -> np.ndarray:
    return scale * x_s @ rot.T + np.asarray(shift, dtype=np.float64)


def centres(regions: EyeRegions) -> np.ndarray:
    return np.array([e.centre for e in regions.eyes])


def test_the_fit_recovers_a_known_3d_similarity_exactly():
    x_s = source_keypoints()
    rot = rotation(yaw=8, pitch=-5, roll=3)
    fit = fit_similarity(x_s, moved(x_s, 1.07, rot, (0.03, -0.05, 0.01)))
    assert fit is not None
    scale, fitted, shift = fit
    assert scale == pytest.approx(1.07, abs=1e-9)
    assert np.allclose(fitted, rot, atol=1e-9) and np.allclose(shift, (0.03, -0.05, 0.01))
    assert fit_similarity(np.zeros((10, 3)), x_s[:10]) is None  # degenerate: no motion


def test_a_known_similarity_moves_the_regions_by_exactly_that_similarity():
    """x_d = S(x_s) for an in-plane similarity S (roll, scale, shift; depth scaled with
    the head, as Ditto's x = scale * (kp @ R + exp) + t does): the regions move by S in
    crop pixels, centre, opening and radius, whatever the eyes' depth."""
    x_s, regions = source_keypoints(), crop_regions()
    angle, scale, shift = 6.0, 1.04, (0.05, -0.03, 0.0)
    x_d = moved(x_s, scale, rotation(roll=angle), shift)
    s2d = np.eye(3)
    s2d[:2, :2] = scale * rotation(roll=angle)[:2, :2]
    s2d[:2, 2] = shift[:2]
    expected = transform_regions(regions, NORM_TO_PX @ s2d @ np.linalg.inv(NORM_TO_PX))
    got = frame_regions(regions, x_s, x_d, np.eye(3))
    assert got is not None
    for a, b in zip(got.eyes, expected.eyes, strict=True):
        assert np.allclose(a.centre, b.centre, atol=1e-6)
        assert np.allclose(a.opening, b.opening, atol=1e-4)
        assert a.radius == pytest.approx(b.radius, abs=1e-6) == pytest.approx(9.0 * scale, rel=0.06)
    # The motion is not a no-op: the left eye moved by more than 10 pixels.
    assert np.linalg.norm(np.subtract(got.left.centre, regions.left.centre)) > 10


def test_a_head_turn_moves_each_eye_as_a_point_at_its_own_depth():
    """Yaw and pitch: an eye moves like the 3-D point (x, y, z) with z the depth of the
    nearest eye keypoint, not like the average of the face (a 2-D fit would)."""
    x_s, regions = source_keypoints(), crop_regions()
    rot = rotation(yaw=10, pitch=-6)
    shift = np.array([0.02, 0.01, 0.0])
    x_d = moved(x_s, 1.0, rot, shift)
    got = frame_regions(regions, x_s, x_d, np.eye(3))
    assert got is not None
    for eye, out, depth in zip(regions.eyes, got.eyes, (0.21, 0.05), strict=True):
        u = np.linalg.inv(NORM_TO_PX) @ [*eye.centre, 1]
        point = rot @ [u[0], u[1], depth] + shift
        assert np.allclose(out.centre, (NORM_TO_PX @ [point[0], point[1], 1])[:2], atol=1e-6)
    # Depth matters here: the two eyes' depths differ by 0.16, a sideways difference of
    # 0.16 * sin(10 deg) * 256 = 7 px.
    flat = frame_regions(regions, x_s * [1, 1, 0], x_d - x_d * [0, 0, 1], np.eye(3))
    assert flat is not None and np.abs(centres(got) - centres(flat)).max() > 3


def test_lips_and_blinks_do_not_move_the_regions():
    """Speech moves the lip keypoints and blinks the eye keypoints; neither is head motion."""
    x_s, regions = source_keypoints(), crop_regions()
    x_d = moved(x_s, 1.0, rotation(roll=4), (0.03, 0.02, 0))
    talking = x_d.copy()
    rng = np.random.default_rng(5)
    talking[list(LIP_POINTS + EYE_POINTS)] += rng.normal(0, 0.1, (11, 3))
    a = frame_regions(regions, x_s, x_d, np.eye(3))
    b = frame_regions(regions, x_s, talking, np.eye(3))
    assert a is not None and b is not None
    assert np.allclose(centres(a), centres(b), atol=1e-9)
    assert len(RIGID_POINTS) == 10


def test_the_output_geometries():
    # Letterbox: the crop scaled to the shorter side, centred on black.
    box = letterbox_matrix(1024, 576)
    assert np.allclose(box @ [0, 0, 1], [224, 0, 1]) and np.allclose(
        box @ [512, 512, 1], [800, 576, 1]
    )
    assert np.allclose(letterbox_matrix(512, 512), np.eye(3))
    # Paste-back: the crop matrix maps pixel indices; a pixel's centre at index + 0.5.
    m_c2o = np.array([[0.5, -0.1, 30.0], [0.1, 0.5, 40.0], [0, 0, 1]])
    index = np.array([100.0, 200.0, 1.0])
    assert np.allclose(paste_matrix(m_c2o) @ (index + [0.5, 0.5, 0]), m_c2o @ index + [0.5, 0.5, 0])


def test_regions_survive_storage_and_refuse_a_bad_matrix():
    regions = crop_regions()
    again = regions_from_arrays(regions_to_arrays(regions))
    assert np.allclose(centres(again), centres(regions))
    assert np.allclose(again.right.opening, regions.right.opening)
    assert again.right.radius == pytest.approx(9.5)
    with pytest.raises(InvalidInput):
        transform_eye(regions.left, np.full((2, 3), np.nan))


def test_blinks_fade_the_gaze_on_the_plan_s_schedule():
    """Shape 0 is the open eye (the schedule's value between blinks); a shape's closure is
    its eye-point offset from shape 0 over the largest; other keypoints do not count."""
    shapes = np.zeros((5, 21, 3), np.float32)
    for k, depth in enumerate((0.0, 0.5, 1.0, 0.5, 0.0)):
        shapes[k, list(EYE_POINTS), 1] = 0.02 * depth
    shapes[:, list(LIP_POINTS)] = 7.0  # not the eyes: ignored
    shapes = shapes.reshape(5, 63)
    frames, seed = 400, 11
    opened = eye_openness(shapes, frames, 25, seed, 25, frames)
    schedule = blink_schedule(frames, 5, seed)
    expected = np.array([1.0, 0.5, 0.0, 0.5, 1.0])[schedule]
    assert np.allclose(opened, expected, atol=1e-6) and (opened == 0).any()
    gaze = plan_gaze(frames, 25, seed, opened)
    assert np.allclose(gaze, gaze_track(frames, 25, seed) * expected[:, None], atol=1e-7)
    # No blink shapes (LMDM drives the lids itself): no fade. Another frame rate: resampled.
    assert np.array_equal(eye_openness(None, frames, 25, seed, 25, frames), np.ones(frames))
    assert eye_openness(shapes, frames, 25, seed, 30, 480).shape == (480,)


def striped_frames(count: int) -> np.ndarray:
    """Frames with dark 'irises' on white at the regions' centres, noise elsewhere."""
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 255, (count, 512, 512, 3), dtype=np.uint8)
    for eye in crop_regions().eyes:
        x, y = (int(v) for v in eye.centre)
        frames[:, y - 11 : y + 12, x - 24 : x + 25] = 235
        frames[:, y - 8 : y + 9, x - 8 : x + 9] = 40
    return frames


def test_the_sink_moves_each_frame_by_its_own_row_whatever_the_batches():
    count = 7
    x_s = source_keypoints()
    x_d = np.stack(
        [moved(x_s, 1.0, rotation(roll=0.3 * i), (0.002 * i, 0, 0)) for i in range(count)]
    )
    offsets = np.array([[0.4, 0.0]] * 3 + [[0.0, 0.0]] + [[-0.3, 0.2]] * 3, np.float32)
    frames = striped_frames(count)

    def run(batches: list[int], first: int = 0, stop: int = count, to_frame=None) -> np.ndarray:
        out = ListSink()
        to_frame = np.eye(3) if to_frame is None else to_frame
        sink = GazeSink(out, crop_regions(), x_s, x_d[first:stop], offsets[first:stop], to_frame)
        at = first
        for n in batches:
            sink.write(frames[at : at + n].copy())  # the sink writes into what it is given
            at += n
        return out.frames

    whole = run([7])
    assert np.array_equal(run([2, 3, 2]), whole)
    assert np.array_equal(np.concatenate([run([3], 0, 3), run([4], 3, 7)]), whole)
    assert np.array_equal(whole[3], frames[3])  # a zero offset: untouched
    assert all(not np.array_equal(whole[i], frames[i]) for i in (0, 1, 2, 4, 5, 6))
    # Only the box around the eyes is processed, with the whole frame's result, also
    # where an eye is cut by the frame's edge.
    for to_frame in (np.eye(3), np.array([[1.0, 0, -192], [0, 1, 0], [0, 0, 1]])):
        got = run([7], to_frame=to_frame)
        for i in (0, 5):
            regions = frame_regions(crop_regions(), x_s, x_d[i], to_frame)
            assert np.array_equal(got[i], move_irises(frames[i], regions, offsets[i]))


def test_ditto_takes_the_eyes_option_and_portrait_does_not():
    from farm.jobs import check_options, renderer_options

    check_options("ditto", renderer_options(None, None, "still"))
    check_options("ditto", {"eyes": 1, "steps": 4})
    with pytest.raises(InvalidInput, match="--eyes does not apply to the portrait"):
        check_options("portrait", {"eyes": 1})
