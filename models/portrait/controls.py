"""Face controls as landmark displacements: where each landmark goes at weight 1.

Each control moves a few "handle" landmarks explicitly (lips, brows, irises);
the other landmarks follow with a smooth falloff, so the mesh built on them carries
the motion into the skin around. Magnitudes are fractions of the face height so they
look the same at any crop scale. Work happens in the face frame (u across, v down).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .landmarks import (
    LEFT_BROW,
    LEFT_EYE_LOWER,
    LEFT_EYE_UPPER,
    LEFT_IRIS,
    LOWER_INNER_LIP,
    LOWER_OUTER_LIP,
    MOUTH_CORNERS,
    RIGHT_BROW,
    RIGHT_EYE_LOWER,
    RIGHT_EYE_UPPER,
    RIGHT_IRIS,
    UPPER_INNER_LIP,
    UPPER_OUTER_LIP,
    FaceFrame,
)

JAW_DROP = 0.11  # lower lip travel at jaw_open=1: the mouth opens ~11% of the face height
BROW_LIFT = 0.045
UPPER_LIP_LIFT = 0.045
# Iris travel in eye widths. Kept small: the lids stay put, so a larger travel would
# squeeze the white of the eye past what the backward warp can invert cleanly.
GAZE_ACROSS = 0.12
GAZE_DOWN = 0.06
CORNERS = (*MOUTH_CORNERS, UPPER_INNER_LIP[0], UPPER_INNER_LIP[-1])


def smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def points_in_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd rule; (P, 2) points, (M, 2) closed polygon -> (P,) bool."""
    x, y = points[:, :1], points[:, 1:]
    xa, ya = polygon[:, 0], polygon[:, 1]
    xb, yb = np.roll(xa, -1), np.roll(ya, -1)
    straddles = (ya > y) != (yb > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = xa + (y - ya) * (xb - xa) / (yb - ya)
    return np.logical_xor.reduce(straddles & (x < x_cross), axis=1)


def spread(points: np.ndarray, disp: np.ndarray, handles: np.ndarray, radius: float) -> np.ndarray:
    """Give non-handle points an inverse-distance blend of the handle displacements,
    faded out with the distance to the nearest handle."""
    out = disp.copy()
    free = ~handles
    dist = np.linalg.norm(points[free, None] - points[None, handles], axis=-1)
    weights = 1.0 / (dist**2 + 1e-6)
    blended = weights @ disp[handles] / weights.sum(axis=1, keepdims=True)
    out[free] = blended * np.exp(-((dist.min(axis=1) / radius) ** 2))[:, None]
    return out


class FaceControls:
    """Computes the (478, 2) image-space displacement of every landmark per control."""

    def __init__(self, landmarks: np.ndarray) -> None:
        self.frame = FaceFrame.of(landmarks)
        self.uv = self.frame.to_local(landmarks)
        self.hf = self.frame.height
        self._init_mouth()

    def displacements(self) -> dict[str, np.ndarray]:
        builders: dict[str, Callable[[], np.ndarray]] = {
            "jaw_open": self.jaw_open,
            "lip_spread": self.lip_spread,
            "lip_round": self.lip_round,
            "lip_press": self.lip_press,
            "lower_lip_tuck": self.lower_lip_tuck,
            "upper_lip_raise": self.upper_lip_raise,
            "brow_raise": self.brow_raise,
            "gaze_x": lambda: self.gaze(np.array([GAZE_ACROSS, 0.0])),
            "gaze_y": lambda: self.gaze(np.array([0.0, GAZE_DOWN])),
        }
        return {name: self.frame.to_image(build()) for name, build in builders.items()}

    # -- mouth ---------------------------------------------------------------------

    def _init_mouth(self) -> None:
        u, v = self.uv[:, 0], self.uv[:, 1]
        self.half_mouth = abs(u[MOUTH_CORNERS[1]] - u[MOUTH_CORNERS[0]]) / 2
        self.q = np.clip(np.abs(u) / self.half_mouth, 0.0, 1.0)  # 0 mid-mouth, 1 corners
        self.q[list(CORNERS)] = 1.0
        self.q_signed = np.sign(u) * self.q
        upper_inner = self._curve(UPPER_INNER_LIP)
        lower_inner = self._curve(LOWER_INNER_LIP)
        self.seam = (upper_inner + lower_inner) / 2  # per landmark, at its u
        self.gap = np.maximum(lower_inner - upper_inner, 0.0)
        outline = np.r_[UPPER_OUTER_LIP, LOWER_OUTER_LIP[::-1]]
        self.lips = points_in_polygon(self.uv, self.uv[outline])
        self.lips[list(set(outline) | set(UPPER_INNER_LIP) | set(LOWER_INNER_LIP))] = True
        self.upper = self.lips & (v < self.seam)
        self.upper[list(UPPER_INNER_LIP)] = True
        self.upper[list(LOWER_INNER_LIP)] = False
        self.lower = self.lips & ~self.upper
        self.lower_lip_bottom = float(v[LOWER_OUTER_LIP[5]])

    def _curve(self, indices: tuple[int, ...]) -> np.ndarray:
        """A lip contour's v, interpolated at every landmark's u."""
        u, v = self.uv[list(indices), 0], self.uv[list(indices), 1]
        order = np.argsort(u)
        return np.interp(self.uv[:, 0], u[order], v[order])

    def _lip_profile(self, centre: float, corner: float) -> np.ndarray:
        """A value that is `centre` mid-mouth and `corner` at the corners."""
        q2 = self.q**2
        return corner * q2 + centre * (1 - q2)

    def _lips_then_spread(self, du: np.ndarray, dv: np.ndarray, radius: float) -> np.ndarray:
        disp = np.stack([du, dv], axis=-1) * self.lips[:, None]
        return spread(self.uv, disp, self.lips, radius * self.hf)

    def jaw_open(self) -> np.ndarray:
        drop = JAW_DROP * self.hf
        u, v = self.uv[:, 0], self.uv[:, 1]
        dv = np.zeros(len(u))
        dv[self.upper] = drop * self._lip_profile(-0.05, 0.35)[self.upper]
        dv[self.lower] = drop * self._lip_profile(1.0, 0.35)[self.lower]
        du = -0.1 * drop * self.q_signed * self.lips  # opening narrows the mouth a little
        # The mandible: under the lips it follows their profile (corners held by the
        # cheeks), deeper down it moves as one block, less toward the jaw angles, which
        # sit closer to the hinge.
        near = self._lip_profile(1.0, 0.35)
        far = 1 - 0.6 * smoothstep(np.abs(u), self.half_mouth, 0.5 * self.frame.width)
        bottom = self.lower_lip_bottom
        depth = smoothstep(v, bottom, bottom + 0.15 * self.hf)
        mandible = drop * smoothstep(v, 0.0, bottom) * (near + (far - near) * depth)
        # Skin next to the lips is dragged along with them, corners included.
        dragged = spread(self.uv, np.stack([du, dv], axis=-1), self.lips, 0.1 * self.hf)
        free = ~self.lips
        # Above the mouth only the drag acts (the upper lip lifts a little).
        below = np.where(mandible > 0, np.maximum(mandible, dragged[:, 1]), dragged[:, 1])
        dv[free] = below[free]
        du[free] = dragged[free, 0]
        return np.stack([du, dv], axis=-1)

    def lip_spread(self) -> np.ndarray:
        du = 0.22 * self.half_mouth * self.q_signed
        dv = -0.12 * (self.uv[:, 1] - self.seam)  # wide lips are thinner
        return self._lips_then_spread(du, dv, 0.12)

    def lip_round(self) -> np.ndarray:
        du = -0.3 * self.half_mouth * self.q_signed
        dv = 0.15 * (self.uv[:, 1] - self.seam)  # pushed-out lips look fuller
        return self._lips_then_spread(du, dv, 0.12)

    def lip_press(self) -> np.ndarray:
        towards_seam = np.where(self.upper, 0.5, -0.5) * self.gap
        dv = towards_seam - 0.2 * (self.uv[:, 1] - self.seam)
        return self._lips_then_spread(np.zeros_like(dv), dv, 0.08)

    def lower_lip_tuck(self) -> np.ndarray:
        # The lower lip rolls up under the upper teeth: its inner edge reaches the seam
        # and it looks thinner; the upper lip lifts a little so the teeth show.
        below_edge = self.uv[:, 1] - self.seam - self.gap / 2
        dv = np.where(
            self.upper,
            -0.02 * self.hf * (1 - self.q**2),
            -self.gap / 2 - 0.5 * below_edge,
        )
        return self._lips_then_spread(np.zeros_like(dv), dv, 0.1)

    def upper_lip_raise(self) -> np.ndarray:
        dv = -UPPER_LIP_LIFT * self.hf * self._lip_profile(1.0, 0.4) * self.upper
        return self._lips_then_spread(np.zeros_like(dv), dv, 0.1)

    # -- brows and eyes ------------------------------------------------------------

    def brow_raise(self) -> np.ndarray:
        """Brows lift and pull the upper lids up a little; the lower lids stay."""
        brows, upper_lids = RIGHT_BROW + LEFT_BROW, RIGHT_EYE_UPPER + LEFT_EYE_UPPER
        handles = np.zeros(len(self.uv), dtype=bool)
        handles[list(brows + upper_lids + RIGHT_EYE_LOWER + LEFT_EYE_LOWER)] = True
        disp = np.zeros_like(self.uv)
        disp[list(brows), 1] = -BROW_LIFT * self.hf
        disp[list(upper_lids), 1] = -0.2 * BROW_LIFT * self.hf
        # Eye corners belong to both lids; they stay with the lower one.
        disp[[33, 133, 263, 362], 1] = 0.0
        return spread(self.uv, disp, handles, 0.15 * self.hf)

    def gaze(self, eye_widths: np.ndarray) -> np.ndarray:
        """Irises slide inside fixed eyelids; nothing else moves."""
        disp = np.zeros_like(self.uv)
        for iris, corners in ((RIGHT_IRIS, (33, 133)), (LEFT_IRIS, (263, 362))):
            eye_width = float(np.linalg.norm(self.uv[corners[0]] - self.uv[corners[1]]))
            disp[list(iris)] = eye_widths * eye_width
        return disp
