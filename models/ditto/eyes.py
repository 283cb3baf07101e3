"""The eye values Ditto conditions its motion on: how open each eye is (2) and where
each eyeball sits in it (3 x 2), from MediaPipe's 478 face-mesh landmarks on the crop,
by the formulas Ditto's preprocessing uses.

Openness: the sum of three lid-to-lid distances over the eye's width. Ball movement:
the iris centre's offset from the eye centre, as a direction (relative to the eye's
own axis) times its length. MediaPipe's face mesh with iris refinement ships inside
the mediapipe package; where it finds no face in the crop (a drawn or stand-in face)
the neutral values below are used and the caller is told.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Landmark indices of MediaPipe's 478-point mesh.
_LEFT = {"width": (33, 133), "lids": ((145, 159), (144, 160), (153, 158)), "ball": 468}
_RIGHT = {"width": (263, 362), "lids": ((374, 386), (373, 387), (380, 385)), "ball": 473}
NEUTRAL_OPEN = np.array([0.9, 0.9], np.float32)  # a typical open eye, both sides
NEUTRAL_BALL = np.zeros(6, np.float32)  # looking straight ahead


def _dist(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v) + 1e-8)


def _eye(points: np.ndarray, idx: dict) -> tuple[float, np.ndarray]:
    outer, inner = points[idx["width"][0]], points[idx["width"][1]]
    width = _dist(outer, inner)
    openness = sum(_dist(points[a], points[b]) for a, b in idx["lids"]) / (width + 1e-8)
    centre = (outer + inner) / 2
    ball = points[idx["ball"]]
    direction = _unit(ball - centre) - _unit(outer - inner)
    return openness, direction * _dist(ball, centre)


def eye_values(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From 478 landmarks [478, 3]: (open [2], ball [6]) as Ditto's condition reads
    them (ball: the 3 coordinates of the left and right movement, interleaved as
    numpy stacks them on the last axis, then flattened)."""
    l_open, l_move = _eye(points, _LEFT)
    r_open, r_move = _eye(points, _RIGHT)
    opened = np.array([l_open, r_open], np.float32)
    ball = np.stack([l_move, r_move], -1).reshape(6).astype(np.float32)
    return opened, ball


def landmarks478(rgb: np.ndarray) -> np.ndarray | None:
    """MediaPipe's face mesh (with irises) on an RGB uint8 image: [478, 3] in pixels,
    or None where it finds no face."""
    import mediapipe as mp

    h, w = rgb.shape[:2]
    with mp.solutions.face_mesh.FaceMesh(
        static_image_mode=True, max_num_faces=1, refine_landmarks=True
    ) as mesh:
        found = mesh.process(np.ascontiguousarray(rgb))
    if not found.multi_face_landmarks:
        return None
    marks = found.multi_face_landmarks[0].landmark
    return np.array([(p.x * w, p.y * h, p.z * w) for p in marks], np.float32)


def measure(crop_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """(open, ball, measured): the crop's eye values, or the neutral ones (measured
    False) where the face mesh finds no face."""
    opened, ball, regions = measure_with_regions(crop_rgb)
    return opened, ball, regions is not None


def measure_with_regions(crop_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any]:
    """(open, ball, regions): as `measure`, from one run of the face mesh, with the
    crop's eye regions for the living eyes (models/eyes.py EyeRegions, crop pixels), or
    None (and the neutral values) where it finds no face."""
    from models.eyes import eye_regions_from_mediapipe

    points = landmarks478(crop_rgb)
    if points is None:
        return NEUTRAL_OPEN.copy(), NEUTRAL_BALL.copy(), None
    opened, ball = eye_values(points)
    return opened, ball, eye_regions_from_mediapipe(points)
