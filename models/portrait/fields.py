"""Dense deformation bases: one forward displacement field per motion channel.

Face controls move landmarks (controls.py); a triangle mesh over the landmarks, a ring
of fixed anchors around the head and the image border spreads each landmark motion
over the image, linearly per triangle, so the background never moves. Head rotation
is an analytic field that fades from the head to zero at the neck and background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import Delaunay

from models.base import CHANNELS

from .controls import FaceControls, smoothstep
from .landmarks import (
    CHIN,
    FOREHEAD_TOP,
    HIDDEN_IRIS,
    LANDMARK_COUNT,
    LOWER_INNER_LIP,
    UPPER_INNER_LIP,
    FaceFrame,
)

# Channels drawn rather than warped: the tongue by the mouth interior, blinks by the
# eyelid map (eyes.py).
DRAWN_CHANNELS = ("tongue_tip", "blink_left", "blink_right")
FIELD_CHANNELS: tuple[str, ...] = tuple(c for c in CHANNELS if c not in DRAWN_CHANNELS)
HEAD_CHANNELS = ("head_yaw", "head_pitch", "head_roll")
ANCHOR_RING = 0.8  # ring semi-axes in face widths/heights: far enough below the chin
RING_POINTS = 28
HEAD_YAW = 0.045  # face-centre travel at |yaw| = 1, in face heights (about 4 degrees)
HEAD_PITCH = 0.035
HEAD_ROLL = np.radians(3.0)
ACTIVE = 0.01  # pixels: displacement below this counts as still


@dataclass(frozen=True)
class DeformationBases:
    """Everything the renderer needs from the geometry, at one output size."""

    size: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1: where any field moves pixels
    fields: np.ndarray  # float32 (K, y1 - y0, x1 - x0, 2) pixel displacements, K = FIELD_CHANNELS
    lip_rest: np.ndarray  # float32 (2, 11, 2): upper and lower inner lip contours
    lip_motion: np.ndarray  # float32 (K, 2, 11, 2): their displacement per channel


def build_bases(landmarks: np.ndarray, size: int) -> DeformationBases:
    """Bases for a square `size` x `size` rendering of a crop whose landmarks are given
    in the same pixel units."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # pixel centres
    pixels = np.stack([xs.ravel(), ys.ravel()], axis=-1)
    lips = landmarks[list(UPPER_INNER_LIP + LOWER_INNER_LIP)]
    dense = channel_displacements(landmarks, size, np.concatenate([pixels, lips]))
    fields = dense[:, : len(pixels)].reshape(len(FIELD_CHANNELS), size, size, 2)
    x0, y0, x1, y1 = _active_box(fields)
    return DeformationBases(
        size=size,
        box=(x0, y0, x1, y1),
        fields=np.ascontiguousarray(fields[:, y0:y1, x0:x1]),
        lip_rest=lips.reshape(2, -1, 2).astype(np.float32),
        lip_motion=dense[:, len(pixels) :].reshape(len(FIELD_CHANNELS), 2, -1, 2),
    )


def channel_displacements(landmarks: np.ndarray, size: int, points: np.ndarray) -> np.ndarray:
    """(K, P, 2) float32 forward displacement of arbitrary points, per field channel."""
    face = FaceControls(landmarks).displacements()
    mesh = _Mesh(landmarks, size)
    frame = FaceFrame.of(landmarks)
    out = np.empty((len(FIELD_CHANNELS), len(points), 2), dtype=np.float32)
    for k, name in enumerate(FIELD_CHANNELS):
        if name in HEAD_CHANNELS:
            out[k] = head_displacement(name, points, landmarks, frame)
        else:
            out[k] = mesh.interpolate(face[name], points)
    return out


class _Mesh:
    """Delaunay triangles over the landmarks plus fixed anchors; interpolates vertex
    displacements linearly inside each triangle."""

    def __init__(self, landmarks: np.ndarray, size: int) -> None:
        keep = np.setdiff1d(np.arange(LANDMARK_COUNT), HIDDEN_IRIS)
        self.landmark_ids = keep
        anchors = np.concatenate([_ring(landmarks, size), _border(size)])
        self.triangulation = Delaunay(np.concatenate([landmarks[keep], anchors]))
        self.anchor_count = len(anchors)
        self.size = size

    def interpolate(self, landmark_disp: np.ndarray, points: np.ndarray) -> np.ndarray:
        values = np.concatenate(
            [landmark_disp[self.landmark_ids], np.zeros((self.anchor_count, 2))]
        )
        points = np.clip(points, 0.0, self.size)  # the border anchors cover [0, size]
        simplex = self.triangulation.find_simplex(points)
        transform = self.triangulation.transform[simplex]
        partial = np.einsum("pij,pj->pi", transform[:, :2], points - transform[:, 2])
        bary = np.concatenate([partial, 1 - partial.sum(axis=1, keepdims=True)], axis=1)
        corners = values[self.triangulation.simplices[simplex]]  # (P, 3, 2)
        return np.einsum("pc,pcd->pd", bary, corners)


def _ring(landmarks: np.ndarray, size: int) -> np.ndarray:
    """Fixed points on an ellipse around the face, inside the image."""
    frame = FaceFrame.of(landmarks)
    centre = (landmarks[FOREHEAD_TOP] + landmarks[CHIN]) / 2
    angles = np.linspace(0, 2 * np.pi, RING_POINTS, endpoint=False)
    u = np.cos(angles)[:, None] * ANCHOR_RING * frame.width * frame.across
    v = np.sin(angles)[:, None] * ANCHOR_RING * frame.height * frame.down
    ring = centre + u + v
    margin = 2.0
    inside = np.all((ring > margin) & (ring < size - margin), axis=1)
    return ring[inside]


def _border(size: int) -> np.ndarray:
    steps = np.linspace(0, size, 9)
    edge = [(s, e) for s in steps for e in (0.0, float(size))]
    return np.unique(np.array(edge + [(e, s) for e, s in edge]), axis=0)


def head_displacement(
    name: str, points: np.ndarray, landmarks: np.ndarray, frame: FaceFrame
) -> np.ndarray:
    """Small head rotation as a 2D field: the face slides over a rounded head (yaw,
    pitch) or the head turns about the neck (roll); all of it fades out from the
    head to the neck, shoulders and background."""
    centre = (landmarks[FOREHEAD_TOP] + landmarks[CHIN]) / 2 - 0.12 * frame.height * frame.down
    half_w, half_h = 0.75 * frame.width, 0.75 * frame.height
    rel = points - centre
    u, v = rel @ frame.across, rel @ frame.down
    radius = np.sqrt((u / half_w) ** 2 + (v / half_h) ** 2)
    weight = 1 - smoothstep(radius, 0.8, 1.35)
    if name == "head_yaw":
        along = np.maximum(1 - (u / half_w) ** 2, 0) * HEAD_YAW * frame.height
        return (weight * along)[:, None] * frame.across
    if name == "head_pitch":
        along = np.maximum(1 - (v / half_h) ** 2, 0) * HEAD_PITCH * frame.height
        return (weight * along)[:, None] * frame.down
    pivot = landmarks[CHIN] + 0.35 * frame.height * frame.down
    arm = points - pivot
    cos, sin = np.cos(HEAD_ROLL), np.sin(HEAD_ROLL)
    turned = np.stack([cos * arm[:, 0] - sin * arm[:, 1], sin * arm[:, 0] + cos * arm[:, 1]], -1)
    return weight[:, None] * (turned - arm)


def _active_box(fields: np.ndarray) -> tuple[int, int, int, int]:
    moving = np.abs(fields).max(axis=(0, 3)) > ACTIVE
    rows, cols = np.flatnonzero(moving.any(axis=1)), np.flatnonzero(moving.any(axis=0))
    size = fields.shape[1]
    if len(rows) == 0:
        return 0, 0, 1, 1
    pad = 2
    return (
        max(int(cols[0]) - pad, 0),
        max(int(rows[0]) - pad, 0),
        min(int(cols[-1]) + 1 + pad, size),
        min(int(rows[-1]) + 1 + pad, size),
    )
