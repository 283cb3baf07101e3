"""Ditto's face crop and paste-back, as its preprocessing defines them (BACKENDS.md).

The crop is a similarity transform from landmarks: the eye centre and the lip centre
fix the face's vertical axis (which undoes the roll), the landmarks' extent along
that axis fixes the size, times `scale`, shifted by `vx`/`vy` times the size (a
negative `vy` takes in more forehead). `crop_matrix` returns M_o2c (photo -> crop,
3x3); its inverse M_c2o puts a rendered crop back. Paste-back blends the crop into
the photo through a feathered mask: 1 inside the middle 90 % of the crop, falling
linearly to 0 at its border.
"""

from __future__ import annotations

import math

import numpy as np

# Eye and lip points of each landmark layout: (left eye, right eye, upper lip, lower lip).
_LAYOUT = {
    106: ([33, 35, 40, 39], [87, 89, 94, 93], 52, 61),
    203: ([0, 6, 12, 18], [24, 30, 36, 42], 48, 66),
}


def eye_lip_axis(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(eye centre, lip centre) of 106 or 203 landmarks [N, 2]."""
    left, right, upper, lower = _LAYOUT[len(points)]
    eyes = (points[left].mean(0) + points[right].mean(0)) / 2
    lips = (points[upper] + points[lower]) / 2
    return eyes, lips


def crop_matrix(
    points: np.ndarray,
    dsize: int,
    scale: float,
    vx: float = 0.0,
    vy: float = 0.0,
    rotate: bool = True,
) -> np.ndarray:
    """M_o2c, 3x3 float64: photo coordinates to a dsize x dsize crop."""
    pts = points.astype(np.float64)
    eyes, lips = eye_lip_axis(pts)
    uy = lips - eyes
    length = float(np.linalg.norm(uy))
    uy = np.array([0.0, 1.0]) if length <= 1e-3 else uy / length
    ux = np.array([uy[1], -uy[0]])
    angle = math.acos(max(-1.0, min(1.0, ux[0])))
    if ux[1] < 0:
        angle = -angle
    axes = np.stack([ux, uy])  # rows: the face's x and y axes in the photo
    mean = pts.mean(0)
    local = (pts - mean) @ axes.T
    lo, hi = local.min(0), local.max(0)
    side = float((hi - lo).max()) * scale  # square
    mid = (lo + hi) / 2
    centre = mean + ux * mid[0] + uy * mid[1] + ux * (vx * side) + uy * (vy * side)
    s = dsize / side
    c, si = (math.cos(angle), math.sin(angle)) if rotate else (1.0, 0.0)
    t = dsize / 2
    return np.array(
        [
            [s * c, s * si, t - s * (c * centre[0] + si * centre[1])],
            [-s * si, s * c, t - s * (-si * centre[0] + c * centre[1])],
            [0.0, 0.0, 1.0],
        ]
    )


def warp(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """cv2.warpAffine with bilinear sampling; `size` is (width, height)."""
    import cv2

    return cv2.warpAffine(image, matrix[:2].astype(np.float64), size, flags=cv2.INTER_LINEAR)


def feather_mask(size: int = 512, inner: float = 0.9) -> np.ndarray:
    """[size, size] float32: 1 in the middle `inner` of each side, a linear ramp to 0
    over each border band, and corners that fall off with the distance to the inner
    square."""
    band = (size - int(size * inner)) // 2
    ramp = np.ones(size, np.float32)
    ramp[:band] = np.linspace(0, 1, band, dtype=np.float32)
    ramp[size - band :] = np.linspace(1, 0, band, dtype=np.float32)
    x = 1 - ramp[None, :]
    y = 1 - ramp[:, None]
    return np.clip(1 - np.sqrt(x * x + y * y), 0, 1).astype(np.float32)


def paste_back(
    photo: np.ndarray, crops: np.ndarray, m_c2o: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """Rendered crops [B, 512, 512, 3] uint8 into copies of the photo [H, W, 3]."""
    h, w = photo.shape[:2]
    alpha = warp(mask, m_c2o, (w, h))[..., None].clip(0, 1)
    base = photo.astype(np.float32) * (1 - alpha)
    out = np.empty((len(crops), h, w, 3), np.uint8)
    for i, crop in enumerate(crops):
        face = warp(crop, m_c2o, (w, h)).astype(np.float32)
        out[i] = np.clip(face * alpha + base, 0, 255).astype(np.uint8)
    return out
