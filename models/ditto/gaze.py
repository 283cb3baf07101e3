"""Living eyes for the ditto backend: the irises of each rendered frame moved by the
plan's seeded gaze track (models/eyes.py), inside eye regions that follow the head.

Registration keeps the eyes of the 512 crop (MediaPipe's face mesh, models/eyes.py
EyeRegions) beside the source keypoints x_s. A frame's head is wherever its driving
keypoints x_d put it, so the crop's regions are carried to frame i by the head motion
from x_s to x_d[i], then into the output frame (paste-back or letterbox), and the
irises are moved there on the host, frame by frame, before the frame reaches the sink.

How the regions follow the head
-------------------------------
The warping network draws, at a driving keypoint's position, the source content at the
matching source keypoint (its grid samples the source at g - x_d + x_s), so source
content moves with the keypoints. Keypoints are in the crop's normalised coordinates:
x to the right, y down, [-1, 1] across the crop's edges (F.grid_sample with
align_corners=False), so crop pixel (continuous) = (u + 1) * 512 / 2.

Not every keypoint moves with the head. In the plan (models/ditto/stitching.py) the
expression of the lip points follows the speech and the eye points blink and carry
Ditto's own small eyeball shift; every other keypoint keeps the source's expression, so
apart from the stitching network's small correction it moves rigidly:
x = scale * (kp @ R + exp) + t. The head motion is therefore a 3-D similarity
(scale, rotation, translation) fitted by least squares (Umeyama) from x_s to x_d[i]
over those RIGID_POINTS, in 3-D rather than a 2-D fit of (x, y): a turn of the head
(yaw, pitch) moves a point sideways by its depth times the sine of the angle, and the
eyes sit at another depth than the average of the rigid points; a 2-D fit would put
that difference into the eye regions as an error of several pixels at 10 degrees. Each
eye is lifted to the depth of the nearest of Ditto's eye keypoints (EYE_POINTS) in the
source, moved by the fitted similarity, and projected back (x, y): one affine map of
crop pixels per eye and frame, which carries its centre, opening and radius.

What is approximate: the warp's motion is not exactly rigid (the network blends the
keypoints' displacements), the stitching correction is not rigid, and the iris Ditto
draws can sit a little off the mapped centre (its own gaze-follows-head shift). The
move tolerates that with IRIS_MARGIN in models/eyes.py.

Blinks: the regions are the source's open eyes. While Ditto closes the lids (the
config's blink shapes, on the plan's seeded schedule) the gaze offset fades with the
closure, so no disk of lid skin is shifted under a closed eye.
"""

from __future__ import annotations

import numpy as np

from models.base import FrameSink
from models.ditto.stitching import EYE_POINTS, LIP_POINTS, blink_schedule, resample_frames
from models.eyes import CONTEXT_PX, EyeRegions, gaze_track, move_irises, transform_eye

CROP = 512  # the decoder's crop, in pixels (as models/ditto/renderer.py)
RIGID_POINTS = tuple(i for i in range(21) if i not in LIP_POINTS + EYE_POINTS)
# Normalised keypoint coordinates <-> crop pixels (continuous), as 3x3 matrices.
_NORM_TO_PX = np.array([[CROP / 2, 0, CROP / 2], [0, CROP / 2, CROP / 2], [0, 0, 1]])
_PX_TO_NORM = np.linalg.inv(_NORM_TO_PX)


def fit_similarity(
    source: np.ndarray, target: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray] | None:
    """The least-squares 3-D similarity (scale s, rotation R [3, 3], translation t [3])
    with target ≈ s * R @ source + t, points [N, 3] as rows (Umeyama's solution, no
    reflection); None when the source points are degenerate or the result not finite."""
    src = np.asarray(source, dtype=np.float64)
    dst = np.asarray(target, dtype=np.float64)
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    a, b = src - mu_s, dst - mu_d
    variance = float((a * a).sum(axis=1).mean())
    if not np.isfinite(variance) or variance < 1e-12 or not np.isfinite(b).all():
        return None
    u, d, vt = np.linalg.svd(b.T @ a / len(src))
    flip = np.diag([1.0, 1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ flip @ vt
    scale = float(np.trace(np.diag(d) @ flip)) / variance
    shift = mu_d - scale * rotation @ mu_s
    if not (np.isfinite(scale) and scale > 0 and np.isfinite(shift).all()):
        return None
    return scale, rotation, shift


def eye_depths(regions: EyeRegions, x_s: np.ndarray) -> tuple[float, float]:
    """The depth (keypoint z) of each eye: that of the eye keypoint (EYE_POINTS) of the
    source nearest to the iris centre in (x, y)."""
    eye_points = np.asarray(x_s, dtype=np.float64)[list(EYE_POINTS)]
    depths = []
    for eye in regions.eyes:
        u = _PX_TO_NORM @ np.array([eye.centre[0], eye.centre[1], 1.0])
        nearest = int(np.argmin(np.linalg.norm(eye_points[:, :2] - u[:2], axis=1)))
        depths.append(float(eye_points[nearest, 2]))
    return depths[0], depths[1]


def eye_motions(regions: EyeRegions, x_s: np.ndarray, x_d: np.ndarray) -> list[np.ndarray] | None:
    """Per eye (left, right), the 3x3 affine map of crop pixels that the head motion
    x_s -> x_d [21, 3] applies to it (see the module's notes); None when no motion fits."""
    fit = fit_similarity(
        np.asarray(x_s)[list(RIGID_POINTS)], np.asarray(x_d).reshape(21, 3)[list(RIGID_POINTS)]
    )
    if fit is None:
        return None
    scale, rotation, shift = fit
    motions = []
    for depth in eye_depths(regions, x_s):
        m = np.eye(3)
        m[:2, :2] = scale * rotation[:2, :2]
        m[:2, 2] = scale * rotation[:2, 2] * depth + shift[:2]
        motions.append(_NORM_TO_PX @ m @ _PX_TO_NORM)
    return motions


def frame_regions(
    regions: EyeRegions, x_s: np.ndarray, x_d: np.ndarray, crop_to_frame: np.ndarray
) -> EyeRegions | None:
    """The crop's eye regions in an output frame whose driving keypoints are x_d
    [21, 3]: moved with the head, then by `crop_to_frame` (3x3, crop pixels -> frame
    pixels, continuous coordinates). None when no head motion fits."""
    motions = eye_motions(regions, x_s, x_d)
    if motions is None:
        return None
    left, right = (
        transform_eye(eye, crop_to_frame @ m) for eye, m in zip(regions.eyes, motions, strict=True)
    )
    return EyeRegions(left=left, right=right)


def letterbox_matrix(width: int, height: int) -> np.ndarray:
    """Crop pixels -> frame pixels for the 512 crop scaled to the shorter side and
    centred (models/ditto/renderer.py _letterbox; continuous coordinates, as
    F.interpolate with align_corners=False scales them)."""
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    k = side / CROP
    return np.array([[k, 0, left], [0, k, top], [0, 0, 1]], dtype=np.float64)


def paste_matrix(m_c2o: np.ndarray) -> np.ndarray:
    """Crop pixels -> photo pixels for the paste-back. The crop matrix maps pixel
    indices (cv2's convention: a pixel's centre at its index), the regions are in
    continuous coordinates (a pixel's centre at index + 0.5): shift, map, shift back."""
    half = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]], dtype=np.float64)
    m = np.eye(3)
    m[:2] = np.asarray(m_c2o, dtype=np.float64)[:2]
    return half @ m @ np.linalg.inv(half)


def eye_openness(
    blink_shapes: np.ndarray | None,
    motion_frames: int,
    motion_fps: int,
    seed: int,
    fps: int,
    frames: int,
) -> np.ndarray:
    """Per output frame (`frames` at `fps`), how open the eyes are (1 open, 0 closed) on
    the plan's blink schedule over its `motion_frames` at `motion_fps`
    (stitching.blink_schedule with the same seed, so the same blinks): a blink shape's
    closure is the size of its eye-point offsets from shape 0 (the open eye, which the
    schedule uses between blinks) over the largest. Ones without shapes."""
    if blink_shapes is None or len(blink_shapes) == 0 or motion_frames == 0:
        return np.ones(frames, np.float32)
    shapes = np.asarray(blink_shapes, np.float64).reshape(len(blink_shapes), 21, 3)
    eyes = shapes[:, list(EYE_POINTS)].reshape(len(shapes), -1)
    closure = np.linalg.norm(eyes - eyes[:1], axis=1)
    if closure.max() > 0:
        closure = closure / closure.max()
    schedule = blink_schedule(motion_frames, len(shapes), seed)
    openness = (1.0 - closure[schedule]).astype(np.float32)[:, None]
    return resample_frames(openness, motion_fps, fps, frames)[:, 0].clip(0, 1)


def plan_gaze(frames: int, fps: int, seed: int, openness: np.ndarray | None = None) -> np.ndarray:
    """The plan's gaze [frames, 2] in iris radii: the seeded track (models/eyes.py
    gaze_track), faded by the eyes' openness per frame where given."""
    track = gaze_track(frames, fps, seed)
    if openness is not None:
        track = track * np.asarray(openness, np.float32)[:, None]
    return track.astype(np.float32)


class GazeSink:
    """A FrameSink that moves the irises of frames [start, stop) and passes them on.

    It runs where the frames are already on the host (FrameWriter's writer thread), so
    the move overlaps the next batch's render. Frame start + k gets row k of `offsets`
    and regions mapped by row k of `x_d`: a pure function of the frame, whatever the
    batches are. Frames with a zero offset, or no fitted motion, pass unchanged.

    The frames handed to `write` are changed in place (FrameWriter's host buffers are
    its own until the write returns), and only the box around the eyes is processed:
    move_irises reads and writes nothing beyond CONTEXT_PX around an opening, and the
    regions move by whole pixels into the box, so the result is the whole frame's."""

    def __init__(
        self,
        sink: FrameSink,
        regions: EyeRegions,
        x_s: np.ndarray,
        x_d: np.ndarray,
        offsets: np.ndarray,
        crop_to_frame: np.ndarray,
    ) -> None:
        self.sink, self.regions, self.crop_to_frame = sink, regions, crop_to_frame
        self.x_s = np.asarray(x_s, np.float64)
        self.x_d = np.asarray(x_d, np.float64).reshape(-1, 21, 3)
        self.offsets = np.asarray(offsets, np.float32).reshape(-1, 2)
        if len(self.x_d) != len(self.offsets):
            raise ValueError("one gaze offset per frame's keypoints")
        self.at = 0

    def write(self, frames: np.ndarray) -> None:
        height, width = frames.shape[1:3]
        for b in range(len(frames)):
            k = self.at + b
            offset = self.offsets[k]
            if not np.any(offset):
                continue
            regions = frame_regions(self.regions, self.x_s, self.x_d[k], self.crop_to_frame)
            if regions is None:
                continue
            box = _eyes_box(regions, width, height)
            if box is None:
                continue
            x0, y0, x1, y1 = box
            to_box = np.array([[1.0, 0, -x0], [0, 1, -y0], [0, 0, 1]])
            local = EyeRegions(*(transform_eye(eye, to_box) for eye in regions.eyes))
            frames[b, y0:y1, x0:x1] = move_irises(frames[b, y0:y1, x0:x1], local, offset)
        self.at += len(frames)
        self.sink.write(frames)


def _eyes_box(regions: EyeRegions, width: int, height: int) -> tuple[int, int, int, int] | None:
    """Whole-pixel box (x0, y0, x1, y1), end exclusive, around both openings with more
    than move_irises' CONTEXT_PX to spare, inside the frame; None when empty."""
    points = np.concatenate([eye.opening for eye in regions.eyes])
    if not np.isfinite(points).all():
        return None
    margin = CONTEXT_PX + 2
    lo, hi = points.min(axis=0) - margin, points.max(axis=0) + margin
    x0, y0 = max(int(np.floor(lo[0])), 0), max(int(np.floor(lo[1])), 0)
    x1, y1 = min(int(np.ceil(hi[0])), width), min(int(np.ceil(hi[1])), height)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None
