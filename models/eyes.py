"""Living eyes: a seeded gaze track (computed once per job, in plan) and a post-process
that moves the irises of rendered frames by it (in render, frame by frame).

Frames stay pure: `gaze_track(frames, fps, seed)` is a function of its arguments only
(a fresh generator per call), and `move_irises` for frame i reads only row i of the
track, that frame's pixels and its eye regions. No state is carried between frames.

Units and coordinates
---------------------
Gaze offsets are in *iris radii*, x to the image right, y down: (0.4, 0) puts the iris
centre 0.4 radii to the right of where the renderer drew it. Both eyes get the same
offset (conjugate gaze; vergence is not modelled). Pixel positions are continuous image
coordinates as mediapipe reports them (normalised x times width): pixel (row i, column j)
covers [j, j+1) x [i, i+1) and its centre is (j + 0.5, i + 0.5).

"Left" and "right" in `EyeRegions` are the *image's* sides, as the brief that asked for
this module named them: `left` is mediapipe's iris 468 and eyelid contour 33..133 (the
subject's right eye), `right` is iris 473 and contour 263..362 (the subject's left eye).
Note that models/portrait/landmarks.py names the same eyes by the subject's sides.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from farm.errors import InvalidInput

# --- the gaze model ----------------------------------------------------------------------
#
# A talking head looks at the camera: its gaze rests in fixations near the lens, and now
# and then glances away and back. The track is a sequence of fixations joined by
# saccades, plus a slow drift:
#
# - Fixation durations are uniform in FIXATION_S seconds (0.3 to 1.5 s); a glance away
#   holds for GLANCE_S (0.3 to 0.8 s) and is always followed by a fixation near centre.
# - A fixation's target is uniform in a disk of NEAR_RADIUS (0.12 radii) around the
#   centre, at least MIN_SACCADE (0.05 radii) away from the previous target (small
#   re-fixations, like looking from one of the listener's eyes to the other); with
#   probability GLANCE_P (0.15) it is a glance instead: GLANCE_AMPLITUDE radii (0.25 to
#   0.5) in a random direction, its vertical part scaled by GLANCE_VERTICAL (0.6) since
#   people glance sideways more than up and down.
# - A saccade lasts SACCADE_S[0] + (SACCADE_S[1] - SACCADE_S[0]) * min(amplitude / 0.5,
#   1) seconds (the "main sequence": longer jumps take longer), 0.08 to 0.16 s, which is
#   2 to 4 frames at 25 fps (at least one frame at any fps), along a minimum-jerk ease
#   (10t^3 - 15t^4 + 6t^5): fast in the middle, smooth at both ends.
# - Drift: an Ornstein-Uhlenbeck process per axis with time constant DRIFT_TAU_S (0.5 s)
#   and stationary deviation DRIFT_SIGMA (0.01 radii), added everywhere; its
#   frame-to-frame steps are about 0.004 radii at 25 fps.
# - The result is clipped to MAX_GAZE (0.55 radii) from the centre.
#
# The first fixation starts near centre at frame 0. Measured over 200 seeds x 60 s at
# 25 fps: 91 % of frames lie within 0.15 radii of centre (92 % within 0.2, 6 % beyond
# 0.25), 89 % of frame-to-frame steps are under 0.02 radii, and about 26 steps a minute
# exceed 0.1 (saccades); see the unit tests.

FIXATION_S = (0.3, 1.5)
GLANCE_S = (0.3, 0.8)
NEAR_RADIUS = 0.12
MIN_SACCADE = 0.05
GLANCE_P = 0.15
GLANCE_AMPLITUDE = (0.25, 0.5)
GLANCE_VERTICAL = 0.6
SACCADE_S = (0.08, 0.16)
SACCADE_FULL_AMPLITUDE = 0.5
DRIFT_TAU_S = 0.5
DRIFT_SIGMA = 0.01
MAX_GAZE = 0.55

# --- the iris move -------------------------------------------------------------------------

IRIS_EDGE_PX = 1.5  # the iris disk's alpha ramps from 1 to 0 over this width at its rim
IRIS_MARGIN = 0.2  # the moved disk is the iris plus this share of its radius (at least
# IRIS_MARGIN_PX): a photo's limbus is soft and a little wider than the landmarks' ring,
# and a rim left behind would show as a dark ghost arc
IRIS_MARGIN_PX = 1.0
INPAINT_RADIUS_PX = 3  # cv2.inpaint (Telea) neighbourhood for the uncovered eye white
IRIS_RING = 0.6  # the hidden iris's colour: median of the visible iris beyond 0.6 radii
HOLE_GROW_PX = 2  # the inpainted hole extends this far past the opening (never written)
CONTEXT_PX = 3  # pixels around the opening read (never written) for the inpainting
LID_FEATHER_PX = 1.0  # the change fades out over this width inside the eye opening
SCLERA_QUANTILE = 0.75  # sclera colour: median of the opening's pixels outside the iris
# whose luma is at or above this quantile (the brightest quarter)

# MediaPipe face-mesh indices (478 points, refine_landmarks=True), image left eye first.
LEFT_IRIS_CENTRE, LEFT_IRIS_RING = 468, (469, 470, 471, 472)
RIGHT_IRIS_CENTRE, RIGHT_IRIS_RING = 473, (474, 475, 476, 477)
LEFT_EYE_OPENING = (33, 246, 161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7)
RIGHT_EYE_OPENING = (
    263, 466, 388, 387, 386, 385, 384, 398, 362, 382, 381, 380, 374, 373, 390, 249,
)  # fmt: skip


def gaze_track(frames: int, fps: int, seed: int) -> np.ndarray:
    """A (frames, 2) float32 gaze track in iris radii (x right, y down); see the model
    above. The same (frames, fps, seed) always gives the same track. A longer track with
    the same fps and seed is not an extension of a shorter one (the drift is drawn after
    the whole schedule): compute the job's track once, in plan, for all its frames."""
    if int(frames) != frames or frames < 0:
        raise InvalidInput(f"frames must be a non-negative integer, got {frames!r}")
    if not fps or fps <= 0:
        raise InvalidInput(f"fps must be positive, got {fps!r}")
    frames = int(frames)
    rng = np.random.default_rng(seed)
    track = np.zeros((frames, 2), dtype=np.float64)
    position = _near_target(rng, np.zeros(2), first=True)
    glancing = False
    t = 0
    while t < frames:
        hold = rng.uniform(*(GLANCE_S if glancing else FIXATION_S))
        n = max(int(round(hold * fps)), 1)
        track[t : t + n] = position
        t += n
        if glancing or rng.random() >= GLANCE_P:
            target, glancing = _near_target(rng, position), False
        else:
            target, glancing = _glance_target(rng), True
        amplitude = float(np.linalg.norm(target - position))
        share = min(amplitude / SACCADE_FULL_AMPLITUDE, 1.0)
        steps = max(int(round((SACCADE_S[0] + (SACCADE_S[1] - SACCADE_S[0]) * share) * fps)), 1)
        # Frame k of the saccade is at s = k / steps, k = 1..steps: the last is the target.
        s = np.arange(1, steps + 1) / steps
        ease = s**3 * (10 - 15 * s + 6 * s**2)
        span = position + ease[:, None] * (target - position)
        track[t : t + steps] = span[: max(frames - t, 0)]
        t += steps
        position = target
    track += _drift(rng, frames, fps)
    norm = np.linalg.norm(track, axis=1, keepdims=True)
    track *= np.minimum(1.0, MAX_GAZE / np.maximum(norm, 1e-12))
    return track.astype(np.float32)


def _near_target(rng: np.random.Generator, previous: np.ndarray, first: bool = False):
    """Uniform in the NEAR_RADIUS disk, at least MIN_SACCADE from `previous` (a few tries,
    then the last draw is kept)."""
    for _ in range(8):
        radius = NEAR_RADIUS * math.sqrt(rng.random())
        angle = rng.uniform(0.0, 2 * math.pi)
        target = radius * np.array([math.cos(angle), math.sin(angle)])
        if first or np.linalg.norm(target - previous) >= MIN_SACCADE:
            break
    return target


def _glance_target(rng: np.random.Generator) -> np.ndarray:
    amplitude = rng.uniform(*GLANCE_AMPLITUDE)
    angle = rng.uniform(0.0, 2 * math.pi)
    return amplitude * np.array([math.cos(angle), GLANCE_VERTICAL * math.sin(angle)])


def _drift(rng: np.random.Generator, frames: int, fps: float) -> np.ndarray:
    keep = math.exp(-1.0 / (DRIFT_TAU_S * fps))
    kick = DRIFT_SIGMA * math.sqrt(1.0 - keep * keep)
    noise = rng.standard_normal((frames, 2))
    drift = np.zeros((frames, 2))
    value = DRIFT_SIGMA * rng.standard_normal(2)
    for i in range(frames):
        value = keep * value + kick * noise[i]
        drift[i] = value
    return drift


# --- eye regions ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq=False: an ndarray field has no boolean ==
class Eye:
    """One eye in pixel coordinates (see the module's conventions)."""

    centre: tuple[float, float]  # iris centre x, y
    radius: float  # iris radius
    opening: np.ndarray  # float32 (K, 2): the visible eye area between the lids, a closed
    # polygon (x, y) in contour order; the iris is clipped to it and nothing outside moves

    def __post_init__(self) -> None:
        opening = np.asarray(self.opening, dtype=np.float32).reshape(-1, 2)
        if opening.shape[0] < 3:
            raise InvalidInput("an eye opening needs at least 3 points")
        object.__setattr__(self, "opening", opening)
        object.__setattr__(self, "centre", (float(self.centre[0]), float(self.centre[1])))
        object.__setattr__(self, "radius", float(self.radius))


@dataclass(frozen=True)
class EyeRegions:
    """Both eyes of one face: `left` and `right` are the image's sides."""

    left: Eye
    right: Eye

    @property
    def eyes(self) -> tuple[Eye, Eye]:
        return (self.left, self.right)


def ellipse_opening(centre: Sequence[float], axes: Sequence[float], points: int = 32):
    """An elliptical eye opening (float32 (points, 2)) with semi-axes (a, b), axis-aligned."""
    angle = np.linspace(0.0, 2 * np.pi, points, endpoint=False)
    return np.stack(
        [centre[0] + axes[0] * np.cos(angle), centre[1] + axes[1] * np.sin(angle)], axis=1
    ).astype(np.float32)


def eye_regions_from_mediapipe(points: np.ndarray) -> EyeRegions:
    """EyeRegions from MediaPipe face-mesh landmarks, (478, 2) or (478, 3) in pixels (x, y
    first; z is ignored). The radius is the mean distance of the four iris ring points
    from the iris centre."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[0] < 478 or points.shape[1] not in (2, 3):
        raise InvalidInput(f"expected (478, 2|3) face-mesh landmarks, got {points.shape}")
    xy = points[:, :2]

    def eye(centre: int, ring: tuple[int, ...], opening: tuple[int, ...]) -> Eye:
        radius = float(np.linalg.norm(xy[list(ring)] - xy[centre], axis=1).mean())
        return Eye(centre=tuple(xy[centre]), radius=radius, opening=xy[list(opening)])

    return EyeRegions(
        left=eye(LEFT_IRIS_CENTRE, LEFT_IRIS_RING, LEFT_EYE_OPENING),
        right=eye(RIGHT_IRIS_CENTRE, RIGHT_IRIS_RING, RIGHT_EYE_OPENING),
    )


def detect_landmarks478(rgb: np.ndarray) -> np.ndarray | None:
    """MediaPipe's 478 face-mesh landmarks (float32 (478, 3): x, y in pixels, z in
    mediapipe's units times the width) of the one face in an RGB uint8 image, or None."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidInput("expected an RGB uint8 image (height, width, 3)")
    # Imported here so render-only workers never load mediapipe (and its TFLite runtime).
    import mediapipe

    with mediapipe.solutions.face_mesh.FaceMesh(
        static_image_mode=True, refine_landmarks=True, max_num_faces=1
    ) as mesh:
        result = mesh.process(np.ascontiguousarray(rgb))
    if not result.multi_face_landmarks:
        return None
    height, width = rgb.shape[:2]
    marks = result.multi_face_landmarks[0].landmark
    if len(marks) < 478:
        return None  # no iris points: refine_landmarks did not run
    return np.array([(p.x * width, p.y * height, p.z * width) for p in marks], dtype=np.float32)


def detect_eye_regions(rgb: np.ndarray) -> EyeRegions | None:
    """The eye regions of the one face in an RGB uint8 image, or None if there is none."""
    points = detect_landmarks478(rgb)
    return None if points is None else eye_regions_from_mediapipe(points)


# --- moving the irises -----------------------------------------------------------------


def move_irises(frames: Any, regions: EyeRegions | Sequence[EyeRegions], offsets: Any) -> Any:
    """Frames with each iris moved by offsets[b] * its radius pixels, inside its opening.

    frames: uint8 (B, H, W, 3) numpy array or torch tensor (any device), or one (H, W, 3)
    frame with offsets (2,). regions: one EyeRegions for all frames, or one per frame.
    offsets: (B, 2) in iris radii (x right, y down). Returns a new array or tensor of the
    same type, shape, dtype and device; the input is not modified.

    Per frame and eye, in a box around the opening: I is the frame, V the opening (pixel
    centres inside the polygon), r the landmarks' iris radius, A the alpha of the moved
    disk (radius r plus IRIS_MARGIN, ramping 1 -> 0 over IRIS_EDGE_PX at the rim) and T
    the same for radius r alone. Two layers are rebuilt:

    - F, the eye without lids: I inside V; outside V (the part of the eyeball the lids
      hide) the iris colour where T and the sclera colour elsewhere;
    - Bg, the eye without its iris: inside V, I blended by A towards an inpainting
      (cv2.inpaint, Telea) of the disk from the white and lids around it, so revealed
      white keeps their shading; the sclera colour outside V.

    With d = offset * r pixels and C = A inside V, T outside (only the landmarks' iris
    is carried from under a lid), the moved eye is, bilinearly sampled at p - d,

        out(p) = F(p - d) + (1 - C(p - d)) * (Bg(p) - Bg(p - d))

    the iris where the moved disk covers p, the frame where neither disk does, the
    inpainted white where the iris left; exactly I at d = 0 (an eye with d = 0 is not
    touched at all). `out` replaces I inside the opening, faded in over LID_FEATHER_PX
    from its boundary; pixels outside the opening are never changed, so lids never move.
    Colours: the sclera is the per-channel median of the brightest quarter (by luma) of
    the opening's pixels outside the disk; the iris, the median of its visible pixels
    beyond IRIS_RING * r. An eye whose iris shows no pixel in the opening (a closed eye,
    regions that miss it) is left as it is. Pure: a frame's result depends on that
    frame, its regions and its offset only.

    torch tensors: only the small box around each eye is copied to the host, processed
    as above and copied back, so results equal the numpy path bitwise.
    """
    is_torch = type(frames).__module__.startswith("torch")
    single = len(frames.shape) == 3
    if single:
        frames = frames[None]
        offsets = np.asarray(offsets, dtype=np.float64).reshape(1, -1)
    if len(frames.shape) != 4 or frames.shape[-1] != 3:
        raise InvalidInput(f"expected uint8 frames (B, H, W, 3), got shape {tuple(frames.shape)}")
    if str(frames.dtype) not in ("uint8", "torch.uint8"):
        raise InvalidInput(f"expected uint8 frames, got {frames.dtype}")
    count, height, width = int(frames.shape[0]), int(frames.shape[1]), int(frames.shape[2])
    if is_torch and not isinstance(offsets, np.ndarray):
        offsets = offsets.detach().cpu().numpy() if hasattr(offsets, "detach") else offsets
    offsets = np.asarray(offsets, dtype=np.float64)
    if offsets.shape != (count, 2):
        raise InvalidInput(f"expected offsets ({count}, 2), got {offsets.shape}")
    if isinstance(regions, EyeRegions):
        per_frame = [regions] * count
    else:
        per_frame = list(regions)
        if len(per_frame) != count:
            raise InvalidInput(f"expected 1 or {count} EyeRegions, got {len(per_frame)}")

    out = frames.clone() if is_torch else np.array(frames, copy=True)
    for b in range(count):
        for eye in per_frame[b].eyes:
            shift = offsets[b] * eye.radius
            if not np.any(shift):
                continue
            box = _opening_box(eye, width, height)
            if box is None:
                continue
            x0, y0, x1, y1 = box
            if is_torch:
                crop = out[b, y0:y1, x0:x1].cpu().numpy()
            else:
                crop = out[b, y0:y1, x0:x1]
            moved = _move_eye(crop, (x0, y0), eye, shift)
            if moved is None:
                continue
            if is_torch:
                import torch

                out[b, y0:y1, x0:x1] = torch.from_numpy(moved).to(out.device)
            else:
                out[b, y0:y1, x0:x1] = moved
    return out[0] if single else out


def _opening_box(eye: Eye, width: int, height: int) -> tuple[int, int, int, int] | None:
    """Pixel box (x0, y0, x1, y1), end exclusive, holding every pixel centre inside the
    opening, and CONTEXT_PX more around it; None when it lies outside the frame."""
    lo, hi = eye.opening.min(axis=0), eye.opening.max(axis=0)
    lo, hi = lo - 0.5 - CONTEXT_PX, hi + 0.5 + CONTEXT_PX
    x0, y0 = max(int(math.floor(lo[0])), 0), max(int(math.floor(lo[1])), 0)
    x1, y1 = min(int(math.ceil(hi[0])), width), min(int(math.ceil(hi[1])), height)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _inside_polygon(x: np.ndarray, y: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd test of points (x, y) against a closed polygon (K, 2)."""
    inside = np.zeros(x.shape, dtype=bool)
    px, py = polygon[:, 0].astype(np.float64), polygon[:, 1].astype(np.float64)
    qx, qy = np.roll(px, -1), np.roll(py, -1)
    for ax, ay, bx, by in zip(px, py, qx, qy, strict=True):
        if ay == by:
            continue
        crosses = (ay > y) != (by > y)
        at = ax + (y - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (x < at)
    return inside


def _distance_to_polygon(x: np.ndarray, y: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    best = np.full(x.shape, np.inf)
    px, py = polygon[:, 0].astype(np.float64), polygon[:, 1].astype(np.float64)
    qx, qy = np.roll(px, -1), np.roll(py, -1)
    for ax, ay, bx, by in zip(px, py, qx, qy, strict=True):
        ex, ey = bx - ax, by - ay
        length2 = ex * ex + ey * ey
        t = 0.0 if length2 == 0 else np.clip(((x - ax) * ex + (y - ay) * ey) / length2, 0, 1)
        best = np.minimum(best, np.hypot(x - ax - t * ex, y - ay - t * ey))
    return best


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _move_eye(
    crop: np.ndarray, origin: tuple[int, int], eye: Eye, shift: np.ndarray
) -> np.ndarray | None:
    """The crop (h, w, 3) uint8 at frame pixel `origin` with the eye's iris moved by
    `shift` pixels; None when there is nothing to move."""
    h, w = crop.shape[:2]
    dx, dy = float(shift[0]), float(shift[1])
    pad = int(math.ceil(max(abs(dx), abs(dy)))) + 2
    # The canvas: the crop with `pad` pixels around it, in frame coordinates.
    cx0, cy0 = origin[0] - pad, origin[1] - pad
    ch, cw = h + 2 * pad, w + 2 * pad
    ys, xs = np.mgrid[0:ch, 0:cw].astype(np.float64)
    px, py = xs + cx0 + 0.5, ys + cy0 + 0.5
    visible = np.zeros((ch, cw), dtype=bool)
    visible[pad : pad + h, pad : pad + w] = True
    visible &= _inside_polygon(px, py, eye.opening)
    if not visible.any():
        return None
    image = np.zeros((ch, cw, 3))
    image[pad : pad + h, pad : pad + w] = crop
    rim = np.hypot(px - eye.centre[0], py - eye.centre[1])
    radius = eye.radius + max(IRIS_MARGIN * eye.radius, IRIS_MARGIN_PX)
    alpha = np.clip((radius - rim) / IRIS_EDGE_PX + 0.5, 0.0, 1.0)

    # The landmarks' iris (no margin): its outer ring's median colour stands for the
    # part the lids hide, which the move may bring into view.
    true_alpha = np.clip((eye.radius - rim) / IRIS_EDGE_PX + 0.5, 0.0, 1.0)
    if not (visible & (true_alpha > 0.0)).any():
        return None  # the iris is hidden: a closed eye, or regions that miss it
    iris_px = image[visible & (rim >= IRIS_RING * eye.radius) & (true_alpha >= 1.0)]
    if len(iris_px) == 0:
        iris_px = image[visible & (true_alpha > 0.0)]
    iris = np.median(iris_px, axis=0)
    white_px = image[visible & (alpha <= 0.0)]
    if len(white_px) >= 3:
        luma = _luma(white_px)
        sclera = np.median(white_px[luma >= np.quantile(luma, SCLERA_QUANTILE)], axis=0)
    else:  # the iris fills the opening: the brightest visible pixels are the best guess
        sclera = np.quantile(image[visible], 0.9, axis=0)

    # What the iris hides, inside the opening: inpainted from the eye white and lids
    # around it, so the revealed white keeps their shading.
    inner = (slice(pad, pad + h), slice(pad, pad + w))
    # The hole reaches HOLE_GROW_PX past the opening: landmark lids sit a little inside
    # the drawn ones, and the iris there must not be inpainted back in.
    near = cv2.dilate(visible.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=HOLE_GROW_PX)
    hole = ((alpha > 0.0) & (near > 0))[inner].astype(np.uint8)
    behind = np.array(sclera, dtype=np.float64)[None, None].repeat(ch, 0).repeat(cw, 1)
    behind[inner] = cv2.inpaint(
        np.ascontiguousarray(crop), hole, INPAINT_RADIUS_PX, cv2.INPAINT_TELEA
    )

    a = alpha[..., None]
    v = visible[..., None]
    t = true_alpha[..., None]
    scene = np.where(v, image, t * iris + (1 - t) * sclera)  # F: no lids
    bare = np.where(v, image * (1 - a) + a * behind, sclera)  # Bg: no iris

    # Bilinear sampling of the canvas at p - d, for the crop's pixels.
    sx, sy = xs[pad : pad + h, pad : pad + w] - dx, ys[pad : pad + h, pad : pad + w] - dy
    jx, jy = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = (sx - jx)[..., None], (sy - jy)[..., None]

    def sample(layer: np.ndarray) -> np.ndarray:
        top = layer[jy, jx] * (1 - fx) + layer[jy, jx + 1] * fx
        bottom = layer[jy + 1, jx] * (1 - fx) + layer[jy + 1, jx + 1] * fx
        return top * (1 - fy) + bottom * fy

    # Under the lids only the landmarks' iris is carried: its margin there is eye white.
    carried = np.where(v, a, t)
    moved = sample(scene) + (1 - sample(carried)) * (bare[inner] - sample(bare))

    inside = visible[inner]
    depth = _distance_to_polygon(px[inner], py[inner], eye.opening)
    fade = np.where(inside, np.clip(depth / LID_FEATHER_PX, 0.0, 1.0), 0.0)[..., None]
    blended = image[inner] + fade * (moved - image[inner])
    result = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return np.where(fade > 0, result, crop)


# --- regions under a motion, and in storage ----------------------------------------------


def transform_eye(eye: Eye, matrix: Any) -> Eye:
    """The eye mapped by an affine map of pixel coordinates, a (2, 3) or (3, 3) matrix
    acting on column vectors (x, y, 1): centre and opening map exactly; the radius scales
    by sqrt(|det|) of the linear part (its mean stretch; a sheared iris stays a disk)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape not in ((2, 3), (3, 3)) or not np.isfinite(m).all():
        raise InvalidInput(f"expected a finite (2, 3) or (3, 3) affine matrix, got {m.shape}")
    linear, shift = m[:2, :2], m[:2, 2]
    centre = linear @ np.asarray(eye.centre, dtype=np.float64) + shift
    opening = eye.opening.astype(np.float64) @ linear.T + shift
    radius = eye.radius * math.sqrt(abs(float(np.linalg.det(linear))))
    return Eye(centre=tuple(centre), radius=radius, opening=opening)


def transform_regions(regions: EyeRegions, matrix: Any) -> EyeRegions:
    """Both eyes mapped by one affine map (see `transform_eye`)."""
    return EyeRegions(
        left=transform_eye(regions.left, matrix), right=transform_eye(regions.right, matrix)
    )


def regions_to_arrays(regions: EyeRegions) -> dict[str, np.ndarray]:
    """Plain arrays for storage (an npz): `iris` float32 (2, 3) = (x, y, radius) of the
    left and right eye, `left_opening` and `right_opening` float32 (K, 2)."""
    iris = np.array([[*e.centre, e.radius] for e in regions.eyes], dtype=np.float32)
    return {
        "iris": iris,
        "left_opening": regions.left.opening.astype(np.float32),
        "right_opening": regions.right.opening.astype(np.float32),
    }


def regions_from_arrays(arrays: Any) -> EyeRegions:
    """The inverse of `regions_to_arrays` (any mapping with those keys)."""
    iris = np.asarray(arrays["iris"], dtype=np.float64).reshape(2, 3)
    left = Eye(centre=tuple(iris[0, :2]), radius=iris[0, 2], opening=arrays["left_opening"])
    right = Eye(centre=tuple(iris[1, :2]), radius=iris[1, 2], opening=arrays["right_opening"])
    return EyeRegions(left=left, right=right)
