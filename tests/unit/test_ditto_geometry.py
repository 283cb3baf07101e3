"""Ditto's crop, paste-back and whole-job motion stitching (models/ditto/crop.py,
stitching.py, the renderer's on-device paste-back): geometry and plan purity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.ditto import crop, stitching
from models.ditto.renderer import DittoAvatar, PasteBack


def face_203(cx: float, cy: float, size: float, angle_deg: float) -> np.ndarray:
    """203 landmarks with eyes and lips where crop.py reads them, rotated by angle."""
    pts = np.zeros((203, 2))
    rng = np.random.default_rng(0)
    pts[:] = rng.uniform(-0.4, 0.4, (203, 2)) * size  # the face's outline cloud
    pts[[0, 6, 12, 18]] = [-0.2 * size, -0.1 * size]  # left eye
    pts[[24, 30, 36, 42]] = [0.2 * size, -0.1 * size]  # right eye
    pts[48] = [0, 0.25 * size]
    pts[66] = [0, 0.3 * size]  # upper, lower lip
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return pts @ rot.T + [cx, cy]


@pytest.mark.parametrize("angle", [0.0, 17.0, -30.0])
def test_the_crop_undoes_the_roll_and_centres_the_face(angle):
    pts = face_203(400, 300, 200, angle)
    m = crop.crop_matrix(pts, 512, scale=2.3, vy=-0.125)
    mapped = np.c_[pts, np.ones(len(pts))] @ m.T
    eyes, lips = crop.eye_lip_axis(mapped[:, :2])
    axis = lips - eyes
    assert abs(axis[0]) < 1e-6 * np.linalg.norm(axis)  # vertical in the crop: no roll
    assert axis[1] > 0  # lips below the eyes
    assert np.all((mapped[:, :2] > 0) & (mapped[:, :2] < 512))  # the face is inside
    # A similarity: the inverse puts crop corners back at the photo's scale.
    inv = np.linalg.inv(m)
    side = np.linalg.norm((inv @ [512, 0, 1])[:2] - (inv @ [0, 0, 1])[:2])
    a = math.radians(angle)
    upright = pts @ np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    assert side == pytest.approx(2.3 * np.ptp(upright, axis=0).max(), rel=1e-6)


def test_the_feather_mask_is_one_inside_and_falls_to_zero_at_the_border():
    mask = crop.feather_mask(512)
    assert mask.shape == (512, 512) and mask.dtype == np.float32
    assert mask[26:486, 26:486].min() == 1.0
    assert mask[0, 256] == 0.0 and mask[256, 0] == 0.0 and mask[0, 0] == 0.0
    assert np.all(np.diff(mask[:27, 256]) >= 0)  # monotone ramp
    assert np.allclose(mask, mask.T) and np.allclose(mask, mask[::-1, ::-1])


def test_paste_back_on_the_device_matches_the_cv2_blend():
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 255, (300, 420, 3), dtype=np.uint8)
    m_o2c = crop.crop_matrix(face_203(200, 150, 90, 12.0), 512, scale=2.3, vy=-0.125)
    m_c2o = np.linalg.inv(m_o2c)
    face = np.full((1, 512, 512, 3), 200, np.uint8)
    face[0, :, :256] = 40
    reference = crop.paste_back(photo, face, m_c2o, crop.feather_mask())[0]
    avatar = DittoAvatar(
        photo,
        m_c2o,
        np.zeros((32, 16, 64, 64), np.float16),
        {},
        np.zeros((21, 3), np.float32),
        np.zeros(2, np.float32),
        np.zeros(6, np.float32),
    )
    paste = PasteBack.of(avatar, torch.device("cpu"))
    crops = torch.from_numpy(face).permute(0, 3, 1, 2).float() / 255
    ours = paste(crops)[0].numpy()
    diff = np.abs(ours.astype(int) - reference.astype(int))
    assert diff.mean() < 0.5 and np.percentile(diff, 99.9) <= 3
    far = (slice(0, 5), slice(0, 5))  # a corner the crop does not reach: the photo
    assert np.array_equal(ours[far], photo[far])


def motion(frames: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "kp": rng.normal(0, 0.1, (frames, 63)).astype(np.float32),
        "pitch": rng.normal(0, 1, (frames, 66)).astype(np.float32),
        "yaw": rng.normal(0, 1, (frames, 66)).astype(np.float32),
        "roll": rng.normal(0, 1, (frames, 66)).astype(np.float32),
        "t": rng.normal(0, 0.05, (frames, 3)).astype(np.float32),
        "exp": rng.normal(0, 0.02, (frames, 63)).astype(np.float32),
        "scale": rng.uniform(1.0, 1.5, (frames, 1)).astype(np.float32),
    }


def no_stitch(x_s: np.ndarray, x_d: np.ndarray) -> np.ndarray:
    return x_d


def test_driving_with_the_first_frame_only_reproduces_the_source():
    src = {k: v[0] for k, v in motion(1, 3).items()}
    still = {k: np.repeat(v, 30, 0) for k, v in motion(1, 4).items()}  # d - d0 = 0
    x_s, x_d = stitching.stitch_plan(src, still, no_stitch, seed=1)
    assert x_d.shape == (30, 21, 3)
    assert np.allclose(x_d, x_s[None], atol=1e-5)


def test_only_lips_and_eyes_move_the_expression_and_blinks_follow_the_seed():
    src = {k: v[0] for k, v in motion(1, 3).items()}
    driving = motion(400, 5)
    blink = np.zeros((4, 63), np.float32)
    blink[1:3, 11 * 3 : 11 * 3 + 3] = 0.5  # eye point 11 moves mid-blink
    a = stitching.stitch_plan(src, driving, no_stitch, 7, blink)[1]
    b = stitching.stitch_plan(src, driving, no_stitch, 7, blink)[1]
    c = stitching.stitch_plan(src, driving, no_stitch, 8, blink)[1]
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    schedule = stitching.blink_schedule(400, 4, 7)
    assert set(np.unique(schedule)) == {0, 1, 2, 3}
    starts = np.flatnonzero(np.diff(np.r_[0, (schedule == 1).astype(int)]) == 1)
    assert np.all(np.diff(starts) >= 4 + 60) and starts[0] >= 60


def test_resampling_motion_to_another_frame_rate():
    track = np.arange(50, dtype=np.float32)[:, None]
    same = stitching.resample_frames(track, 25, 25, 40)
    assert np.array_equal(same, track[:40])
    half = stitching.resample_frames(track, 25, 50, 7)
    assert np.allclose(half[:, 0], [0, 0.5, 1, 1.5, 2, 2.5, 3])
