"""Living eyes on the ditto backend (models/ditto/gaze.py), with the random-weight
checkpoints of tests/ditto_checkpoints.py and MediaPipe's face mesh as an independent
judge of where the irises are.

What is measured, and how. Random weights draw noise, in which no detector finds a face,
so for the measured tests the networks' crops (warp -> decoder) are replaced by a stand-in
with a head motion the test knows: the avatar's registered 512 crop (the real demo face)
moved per frame by a similarity S_i that the test draws (roll, scale, shift), while the
plan's keypoints x_d are x_s moved by the same S_i. The renderer sees only the keypoints:
it must recover the head motion from them, carry the crop's eye regions along, map them
into the output (letterbox or paste-back) and move the irises there. MediaPipe then finds
the irises (landmarks 468 and 473) and the eye corners on the output frames:

- the regions follow the head: on the still render, the detected iris centres lie within
  a pixel of the mapped regions' centres, while the unmoved source regions miss them by
  several pixels;
- the irises follow the gaze: natural minus still, the iris position along the eye's
  corner-to-corner axis correlates with the plan's gaze offset (times the iris radius)
  along that axis, over every frame where the face is found. The detector sees about half
  of a sub-radius move (as tests/unit/test_living_eyes.py found on the demo portrait), so
  the slope is checked loosely. The vertical part of this clip's gaze stays under 0.15
  radii, below a pixel here, and is not asserted;
- nothing else changes: natural and still differ only inside the mapped eye openings.

Not measured: how well the regions follow the head under the real networks (their warp
is not exactly the fitted motion) and under yaw or pitch (an image warp of the crop
cannot turn a head; tests/unit/test_ditto_gaze.py checks the depth handling in numbers).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models.base import Plan
from models.ditto import crop
from models.ditto.gaze import frame_regions, letterbox_matrix, paste_matrix
from models.ditto.renderer import X_D, DittoAvatar, DittoRenderer
from models.eyes import EyeRegions, gaze_track
from models.portrait import demo_photo
from models.tts import synthesize
from tests.ditto_checkpoints import FACE_KEYPOINTS
from tests.doubles import ListSink

SEED = 18  # a gaze track with a glance in this clip's 2 s (0.47 radii sideways)
FAST = {"steps": 4}  # fewer DDIM steps: the motion itself is replaced below
NORM_TO_PX = np.array([[256.0, 0, 256], [0, 256, 256], [0, 0, 1]])
HALF = np.array([[1.0, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])  # pixel index -> continuous


@pytest.fixture(scope="module")
def renderer(ditto_dir: Path) -> DittoRenderer:
    r = DittoRenderer(batch_size=4)
    r.load(ditto_dir, "cpu")
    return r


def aligned_photo() -> np.ndarray:
    """A 640x640 photo of the demo face placed where the stand-in detector and landmark
    models put their face (tests/ditto_checkpoints.py FACE_KEYPOINTS' eyes, at 640/512
    of its 512 input), so that Ditto's crop frames it as it frames a real face: eyes a
    little above the centre, irises about 9 px across in radius, inside the paste-back's
    feathered mask. (On the demo photo itself the stand-ins' crop puts the eyes at its
    top edge, where the paste-back mask fades them out.)"""
    eyes = np.float32([[203.5, 101.1], [246.6, 103.5]])  # the demo face's irises (MediaPipe)
    where = np.float32(FACE_KEYPOINTS[:2]) * (640 / 512)
    m, _ = cv2.estimateAffinePartial2D(eyes, where)
    return cv2.warpAffine(demo_photo(), m, (640, 640), borderMode=cv2.BORDER_REFLECT)


@pytest.fixture(scope="module")
def avatar(renderer: DittoRenderer) -> DittoAvatar:
    pytest.importorskip("mediapipe")
    made = renderer.prepare_avatar(aligned_photo())
    if made.eye_regions is None:
        pytest.skip("mediapipe found no face in the photo's crop")
    return made


@pytest.fixture(scope="module")
def speech():
    return synthesize("Hello there, this is Ditto speaking.", "espeak")


def plan(renderer, avatar, speech, seed=SEED, size=(512, 512), **options) -> Plan:
    return renderer.plan(
        avatar, speech.seconds, speech.phones, 25, size, seed, speech, FAST | options
    )


def head_motions(count: int) -> list[np.ndarray]:
    """Per frame, a similarity of normalised crop coordinates (3x3): up to 4 degrees of
    roll, 3 % of scale and 13 px of shift, varying smoothly."""
    out = []
    for i in range(count):
        angle, scale = math.radians(4 * math.sin(i / 7)), 1 + 0.03 * math.sin(i / 5)
        c, s = scale * math.cos(angle), scale * math.sin(angle)
        out.append(
            np.array([[c, -s, 0.05 * math.sin(i / 9)], [s, c, 0.04 * math.cos(i / 6)], [0, 0, 1]])
        )
    return out


def driven(x_s: np.ndarray, motion: np.ndarray) -> np.ndarray:
    """x_s [21, 3] moved by an in-plane similarity, depth scaled with the head."""
    scale = math.sqrt(abs(np.linalg.det(motion[:2, :2])))
    xy = x_s[:, :2] @ motion[:2, :2].T + motion[:2, 2]
    return np.column_stack([xy, scale * x_s[:, 2]]).astype(np.float32)


class StandInCrops:
    """In place of the networks' crops: the avatar's registered 512 crop moved by the
    similarity the test assigned to each frame's keypoints (looked up by their bytes)."""

    def __init__(self, avatar: DittoAvatar, track: np.ndarray, motions: list[np.ndarray]):
        self.face = crop.warp(avatar.photo, np.linalg.inv(avatar.m_c2o), (512, 512))
        self.motions = {row.tobytes(): m for row, m in zip(track, motions, strict=True)}
        self.calls = 0

    def __call__(self, f_s, x_s, x_d) -> torch.Tensor:
        self.calls += 1
        frames = []
        for row in x_d.detach().cpu().numpy().astype(np.float32).reshape(-1, 63):
            # cv2.warpAffine maps pixel indices; the motion is in normalised coordinates.
            to_px = np.linalg.inv(HALF) @ NORM_TO_PX
            m = to_px @ self.motions[row.tobytes()] @ np.linalg.inv(to_px)
            frames.append(cv2.warpAffine(self.face, m[:2], (512, 512), flags=cv2.INTER_LINEAR))
        return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255


def staged(renderer, avatar, base: Plan, monkeypatch) -> tuple[Plan, StandInCrops]:
    """The plan with its keypoints replaced by the known head motion, and the stand-in
    crops installed on the renderer (undone after the test)."""
    motions = head_motions(base.frame_count)
    x_d = np.stack([driven(avatar.x_s, m) for m in motions]).reshape(-1, 63)
    stand_in = StandInCrops(avatar, x_d, motions)
    monkeypatch.setattr(renderer, "crops", stand_in)
    return dataclasses.replace(base, track=x_d), stand_in


def render(renderer, avatar, p: Plan, frames: range | None = None) -> np.ndarray:
    out = ListSink()
    renderer.render(avatar, p, frames or range(p.frame_count), out)
    return out.frames


def still(p: Plan) -> Plan:
    return dataclasses.replace(p, arrays={k: v for k, v in p.arrays.items() if k != "gaze"})


def landmarks(frame: np.ndarray) -> np.ndarray | None:
    from models.eyes import detect_landmarks478

    return detect_landmarks478(frame)


def along_eye(points: np.ndarray, iris: int, corners: tuple[int, int]) -> tuple[float, np.ndarray]:
    """The iris's position along the eye's corner-to-corner axis from its midpoint (px),
    and that axis (a unit vector)."""
    a, b = points[corners[0], :2], points[corners[1], :2]
    axis = (b - a) / np.linalg.norm(b - a)
    return float((points[iris, :2] - (a + b) / 2) @ axis), axis


EYES = ((468, (33, 133)), (473, (263, 362)))  # image left, image right: iris, corners


def openings_mask(regions: EyeRegions, shape: tuple[int, int]) -> np.ndarray:
    """The eye openings' pixels, grown by one pixel for the rasteriser's edges."""
    mask = np.zeros(shape, np.uint8)
    for eye in regions.eyes:
        cv2.fillPoly(mask, [np.round((eye.opening - 0.5) * 16).astype(np.int32)], 1, shift=4)
    return cv2.dilate(mask, np.ones((3, 3), np.uint8)) > 0


# --- the avatar and the plan ------------------------------------------------------------


def test_the_avatar_keeps_its_crop_eyes_and_an_old_avatar_still_loads(renderer, avatar, speech):
    regions = avatar.eye_regions
    left, right = regions.eyes
    assert left.centre[0] < right.centre[0] and 3 < left.radius < 30
    assert all(0 < c < 512 for eye in regions.eyes for c in eye.centre)
    again = DittoAvatar.from_bytes(avatar.to_bytes())
    assert again.eye_regions is not None
    assert np.allclose(again.eye_regions.right.opening, right.opening, atol=1e-3)
    assert again.eye_regions.left.radius == pytest.approx(left.radius, abs=1e-4)
    # An avatar stored before the regions were kept has no `eyes_` entries: it loads, its
    # plan has no gaze and it renders as before.
    old = DittoAvatar.from_bytes(dataclasses.replace(avatar, eye_regions=None).to_bytes())
    assert old.eye_regions is None
    p = plan(renderer, old, speech)
    assert "gaze" not in p.arrays and p.channels == X_D


def test_the_gaze_track_is_planned_with_natural_eyes_only(renderer, avatar, speech, monkeypatch):
    natural = plan(renderer, avatar, speech)  # natural is the default
    n = natural.frame_count
    gaze = natural.arrays["gaze"]
    assert gaze.shape == (n, 2) and gaze.dtype == np.float32
    # The seeded track of models/eyes.py (no blink falls in these 2 s: the first comes
    # 60 to 100 frames in, so nothing is faded).
    assert np.array_equal(gaze, gaze_track(n, 25, SEED))
    assert np.array_equal(plan(renderer, avatar, speech).arrays["gaze"], gaze)
    assert not np.allclose(plan(renderer, avatar, speech, seed=SEED + 1).arrays["gaze"], gaze)
    assert np.array_equal(Plan.from_bytes(natural.to_bytes()).arrays["gaze"], gaze)
    # Still: no gaze, and the same keypoints (the eyes do not disturb the motion).
    still_plan = plan(renderer, avatar, speech, eyes=0)
    assert "gaze" not in still_plan.arrays and np.array_equal(still_plan.track, natural.track)
    # A worker whose default is still plans none unless the job asks.
    monkeypatch.setattr(renderer, "eyes", "still")
    assert "gaze" not in plan(renderer, avatar, speech).arrays
    assert np.array_equal(plan(renderer, avatar, speech, eyes=1).arrays["gaze"], gaze)


# --- measured on the output ---------------------------------------------------------------


def test_mediapipe_sees_the_irises_follow_the_head_and_the_gaze(
    renderer, avatar, speech, monkeypatch
):
    p, stand_in = staged(renderer, avatar, plan(renderer, avatar, speech), monkeypatch)
    natural, plain = render(renderer, avatar, p), render(renderer, avatar, still(p))
    assert stand_in.calls > 0  # the stand-in drew the crops
    gaze = p.arrays["gaze"]
    x_d = p.track.reshape(-1, 21, 3)
    to_frame = letterbox_matrix(512, 512)
    seen, placed, unmoved, measured, expected = 0, [], [], [], []
    for i in range(p.frame_count):
        regions = frame_regions(avatar.eye_regions, avatar.x_s, x_d[i], to_frame)
        # Nothing outside the eye openings changes.
        changed = (natural[i] != plain[i]).any(axis=2)
        assert not (changed & ~openings_mask(regions, changed.shape)).any(), f"frame {i}"
        moved_eyes, still_eyes = landmarks(natural[i]), landmarks(plain[i])
        if moved_eyes is None or still_eyes is None:
            continue
        seen += 1
        for (iris, corners), eye, source in zip(
            EYES, regions.eyes, avatar.eye_regions.eyes, strict=True
        ):
            placed.append(np.linalg.norm(still_eyes[iris, :2] - eye.centre))
            unmoved.append(np.linalg.norm(still_eyes[iris, :2] - source.centre))
            after, axis = along_eye(moved_eyes, iris, corners)
            before, _ = along_eye(still_eyes, iris, corners)
            measured.append(after - before)
            expected.append(float(gaze[i] @ axis) * eye.radius)
    measured, expected = np.array(measured), np.array(expected)
    print(
        f"frames {p.frame_count}, face found in {seen}; iris to mapped centre "
        f"{np.mean(placed):.2f} px (unmoved regions {np.mean(unmoved):.2f} px); gaze along "
        f"the eye {expected.min():.2f}..{expected.max():.2f} px, correlation "
        f"{np.corrcoef(measured, expected)[0, 1]:.3f}, slope "
        f"{measured @ expected / (expected @ expected):.2f}"
    )
    assert seen >= 0.8 * p.frame_count
    # The regions follow the head: they sit on the irises the detector finds, where the
    # source's regions, left in place, would miss them.
    assert np.mean(placed) < 1.0 and np.max(placed) < 2.0
    assert np.mean(unmoved) > 5.0
    # The irises follow the gaze track.
    assert np.ptp(expected) > 3.0  # the clip has a glance worth measuring
    assert np.corrcoef(measured, expected)[0, 1] > 0.85
    assert 0.25 < measured @ expected / (expected @ expected) < 1.5


@pytest.mark.parametrize("geometry", ["letterbox", "photo"])
def test_the_regions_land_on_the_eyes_in_the_output_frame(
    renderer, avatar, speech, monkeypatch, geometry
):
    """The crop's regions carried into a letterboxed frame (1024x576) or pasted back into
    the whole photo (640x640) sit on the irises MediaPipe finds there, and natural differs
    from still only inside them."""
    if geometry == "photo":
        size, to_frame = avatar.photo_size, paste_matrix(avatar.m_c2o)
    else:
        size, to_frame = (1024, 576), letterbox_matrix(1024, 576)
    p, _ = staged(renderer, avatar, plan(renderer, avatar, speech, size=size), monkeypatch)
    frames = range(8, 14)  # the head turned and shifted
    natural, plain = render(renderer, avatar, p, frames), render(renderer, avatar, still(p), frames)
    assert natural.shape == (len(frames), size[1], size[0], 3)
    x_d = p.track.reshape(-1, 21, 3)
    errors = []
    for k, i in enumerate(frames):
        regions = frame_regions(avatar.eye_regions, avatar.x_s, x_d[i], to_frame)
        changed = (natural[k] != plain[k]).any(axis=2)
        assert not (changed & ~openings_mask(regions, changed.shape)).any(), f"frame {i}"
        points = landmarks(plain[k])
        if points is None:
            continue
        for (iris, _), eye in zip(EYES, regions.eyes, strict=True):
            errors.append(np.linalg.norm(points[iris, :2] - eye.centre) / eye.radius)
    print(f"{geometry}: iris to mapped centre, in iris radii: {np.round(errors, 2)}")
    assert len(errors) >= len(frames)  # the face was found in at least half the frames
    assert np.mean(errors) < 0.2


def test_a_frame_s_eyes_are_the_same_inside_a_chunk_and_alone(
    renderer, avatar, speech, monkeypatch
):
    p, _ = staged(renderer, avatar, plan(renderer, avatar, speech), monkeypatch)
    whole = render(renderer, avatar, p, range(0, 19))
    parts = [render(renderer, avatar, p, range(a, b)) for a, b in ((0, 5), (5, 6), (6, 19))]
    assert np.array_equal(np.concatenate(parts), whole)  # batches of 4 fall differently
    plain = render(renderer, avatar, still(p), range(0, 19))
    assert sum(not np.array_equal(a, b) for a, b in zip(whole, plain, strict=True)) >= 15
