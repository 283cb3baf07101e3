"""Ditto's motion stitching, for a whole job at once, in plan.

Upstream stitches frame by frame with running state: the first frame's motion `d0`,
a blink schedule drawn from an unseeded RNG, a frame counter. Here the same steps run
over every frame of the job in one pass, with the blink schedule drawn from the job's
seed, so the plan holds the final driving keypoints x_d of every frame and each frame
renders alone. Per frame, for a still photo (upstream's image defaults):

1. relative motion: x_d = x_s + (x_d - d0) for expression, pitch, yaw, roll and
   translation (pose in logit space, as upstream mixes it); scale and the canonical
   keypoints stay the source's;
2. the expression keeps the source's values except on the lip and eye points; a
   blink (when the config has blink shapes) adds its eye offsets on the eye points;
3. gaze: the eyeballs follow the head turn a little (upstream's ratios);
4. both keypoint sets are posed: x = scale * (kp @ R + exp) + t (x, y only);
5. the stitching network corrects x_d against x_s.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch

from models.ditto.keypoints import headpose_to_degrees, keypoints_from_motion

EYE_POINTS = (11, 13, 15, 16, 18)
LIP_POINTS = (6, 12, 14, 17, 19, 20)
DRIVEN = ("exp", "pitch", "yaw", "roll", "t")
GAZE_X, GAZE_Y = 0.26, 0.28  # eyeball shift per degree of head turn, as upstream
BLINK_OPEN = (60, 100)  # frames between blinks, drawn uniformly, as upstream


def to_degrees(logits: np.ndarray) -> np.ndarray:
    """Pose logits [N, 66] -> degrees [N] (float32, on the CPU)."""
    return headpose_to_degrees(torch.from_numpy(np.asarray(logits, np.float32))).numpy()


def pose(info: dict[str, np.ndarray]) -> np.ndarray:
    """Posed keypoints [N, 21, 3] of a motion dict of [N, ...] arrays (float32, CPU)."""
    n = np.asarray(info["kp"]).shape[0]
    tensors = {
        k: torch.from_numpy(np.asarray(v, np.float32).reshape(n, -1)) for k, v in info.items()
    }
    return keypoints_from_motion(tensors).numpy()


def blink_schedule(frames: int, blink_len: int, seed: int) -> np.ndarray:
    """Per frame, the index into the blink shapes (0: eyes open), as upstream's
    schedule but from the job's seed: a blink of `blink_len` frames every 60-100."""
    rng = random.Random(seed)
    idx = np.zeros(frames, np.int64)
    first, last = rng.randint(*BLINK_OPEN), rng.randint(*BLINK_OPEN)
    at = first
    while at < frames - max(last, blink_len):
        idx[at : at + blink_len] = np.arange(blink_len)
        at += blink_len + rng.randint(*BLINK_OPEN)
    return idx


def stitch_plan(
    source: dict[str, np.ndarray],
    driving: dict[str, np.ndarray],
    stitch: Callable[[np.ndarray, np.ndarray], np.ndarray],
    seed: int,
    blink_shapes: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(x_s [21, 3], x_d [T, 21, 3]) for a source motion (arrays of one frame: kp 63,
    pitch/yaw/roll 66 logits, t 3, exp 63, scale 1) and the job's LMDM motion (the
    same keys, arrays of T frames). `stitch(x_s, x_d)` is the stitching network on
    [T, 21, 3] arrays; `blink_shapes` [K, 63] are expression offsets of one blink."""
    frames = driving["exp"].shape[0]
    src = {k: np.asarray(v, np.float32).reshape(1, -1) for k, v in source.items()}
    d0 = {k: v[:1] for k, v in driving.items()}
    mixed = {k: src[k] + (driving[k] - d0[k]) for k in DRIVEN}
    mixed["scale"] = np.repeat(src["scale"], frames, 0)
    mixed["kp"] = np.repeat(src["kp"], frames, 0)

    lips = np.zeros((21, 3), np.float32)
    lips[list(LIP_POINTS)] = 1
    eyes = np.zeros((21, 3), np.float32)
    eyes[list(EYE_POINTS)] = 1
    if blink_shapes is None:
        keep = (lips + eyes).reshape(1, 63)
        mixed["exp"] = mixed["exp"] * keep + src["exp"] * (1 - keep)
    else:
        lips, eyes = lips.reshape(1, 63), eyes.reshape(1, 63)
        blink = blink_shapes[blink_schedule(frames, len(blink_shapes), seed)]
        mixed["exp"] = mixed["exp"] * lips + src["exp"] * (1 - lips) + blink * eyes

    # Gaze: the eyeballs follow the head a little (expression dims 33/45 x, 34/46 y).
    yaw_s, pitch_s = to_degrees(src["yaw"])[0], to_degrees(src["pitch"])[0]
    dx = (to_degrees(mixed["yaw"]) - yaw_s) * GAZE_X
    dy = (to_degrees(mixed["pitch"]) - pitch_s) * GAZE_Y
    exp = mixed["exp"].copy()
    right = dx > 0
    exp[:, 33] += np.where(right, dx * 0.0007, dx * 0.001)
    exp[:, 45] += np.where(right, dx * 0.001, dx * 0.0007)
    exp[:, 34] += dy * -0.001
    exp[:, 46] += dy * -0.001
    mixed["exp"] = exp

    x_s = pose(src)
    x_d = pose(mixed)
    x_d = stitch(np.repeat(x_s, frames, 0), x_d)
    return x_s[0], x_d.astype(np.float32)


def resample_frames(track: np.ndarray, src_fps: float, dst_fps: float, frames: int) -> np.ndarray:
    """A per-frame track [T, C] at src_fps, linearly interpolated to `frames` frames
    at dst_fps (the same track when the rates agree and the length fits)."""
    if src_fps == dst_fps and len(track) >= frames:
        return track[:frames]
    at = np.arange(frames) * (src_fps / dst_fps)
    lo = np.clip(np.floor(at).astype(np.int64), 0, len(track) - 1)
    hi = np.clip(lo + 1, 0, len(track) - 1)
    w = (at - lo).clip(0, 1)[:, None].astype(np.float32)
    return track[lo] * (1 - w) + track[hi] * w
