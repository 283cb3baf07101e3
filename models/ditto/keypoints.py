"""The keypoint arithmetic around Ditto's networks, as upstream computes it.

The motion extractor (and Ditto's audio-to-motion model) describe a face by canonical
keypoints kp, a head pose as 66-bin logits per angle, a translation t, expression
offsets exp and a scale. The warping network is driven by the 3-D keypoints

    x = scale * (kp @ R + exp) + (t_x, t_y, 0)

with R built from the pose in degrees (only t's x and y are applied), and Ditto corrects
the driving keypoints x_d with the stitching MLP, fed the source's x_s beside them.
Everything here is plain torch on [B, ...] tensors; nothing here has weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

NUM_BINS = 66
BIN_DEGREES = 3.0  # width of one pose bin
BIN_OFFSET = 97.5  # degrees subtracted so that the 66 bins span [-97.5, 97.5]


def headpose_to_degrees(logits: torch.Tensor) -> torch.Tensor:
    """Pose logits [B, 66] -> angles in degrees [B]: the softmax expectation of the bin
    index, times 3, minus 97.5 (upstream's ``bin66_to_degree``)."""
    if logits.ndim != 2 or logits.shape[1] != NUM_BINS:
        raise ValueError(f"expected pose logits [B, {NUM_BINS}], got {list(logits.shape)}")
    index = torch.arange(NUM_BINS, dtype=logits.dtype, device=logits.device)
    probs = torch.softmax(logits, dim=1)
    return (probs * index).sum(dim=1) * BIN_DEGREES - BIN_OFFSET


def as_degrees(pose: torch.Tensor) -> torch.Tensor:
    """A pose angle in either form upstream passes around -> degrees [B]: logits
    [B, 66] are converted, angles already in degrees ([B] or [B, 1]) kept."""
    if pose.ndim > 1 and pose.shape[1] == NUM_BINS:
        return headpose_to_degrees(pose)
    return pose.reshape(pose.shape[0])


def rotation_matrix(pitch: torch.Tensor, yaw: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """Angles in degrees [B] (pitch about x, yaw about y, roll about z) -> [B, 3, 3].

    Upstream's matrix: the transpose of Rz(roll) @ Ry(yaw) @ Rx(pitch), so that row
    vectors rotate as ``points @ R`` (points [B, N, 3]).
    """
    x, y, z = (a.reshape(-1) / 180 * math.pi for a in (pitch, yaw, roll))
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rot_x = torch.stack(
        [one, zero, zero, zero, x.cos(), -x.sin(), zero, x.sin(), x.cos()], dim=1
    ).view(-1, 3, 3)
    rot_y = torch.stack(
        [y.cos(), zero, y.sin(), zero, one, zero, -y.sin(), zero, y.cos()], dim=1
    ).view(-1, 3, 3)
    rot_z = torch.stack(
        [z.cos(), -z.sin(), zero, z.sin(), z.cos(), zero, zero, zero, one], dim=1
    ).view(-1, 3, 3)
    return (rot_z @ rot_y @ rot_x).transpose(1, 2)


def transform_keypoints(
    kp: torch.Tensor,
    scale: torch.Tensor,
    rotation: torch.Tensor,
    t: torch.Tensor,
    exp: torch.Tensor,
) -> torch.Tensor:
    """The posed 3-D keypoints x [B, K, 3] = scale * (kp @ R + exp) + (t_x, t_y, 0).

    kp and exp: [B, 3K] or [B, K, 3]; scale: [B, 1] (or [B]); rotation: [B, 3, 3] from
    `rotation_matrix`; t: [B, 3], of which only x and y are added (upstream drops t_z).
    """
    b = kp.shape[0]
    x = kp.reshape(b, -1, 3) @ rotation + exp.reshape(b, -1, 3)
    x = x * scale.reshape(b, 1, 1)
    offset = torch.cat([t[:, :2], torch.zeros_like(t[:, 2:3])], dim=1)
    return x + offset[:, None, :]


def keypoints_from_motion(motion: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Upstream's ``transform_keypoint``: a motion dict (kp, pitch, yaw, roll, t, exp,
    scale, as MotionExtractor returns it; angles as logits or in degrees) -> x [B, K, 3]."""
    rotation = rotation_matrix(*(as_degrees(motion[k]) for k in ("pitch", "yaw", "roll")))
    return transform_keypoints(motion["kp"], motion["scale"], rotation, motion["t"], motion["exp"])


def stitching_input(x_s: torch.Tensor, x_d: torch.Tensor) -> torch.Tensor:
    """What the stitching MLP reads: source and driving keypoints [B, K, 3] flattened
    and concatenated, source first -> [B, 6K]."""
    b = x_s.shape[0]
    return torch.cat([x_s.reshape(b, -1), x_d.reshape(b, -1)], dim=1)


def apply_stitching(x_d: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The driving keypoints corrected by the MLP's output delta [B, 3K + 2]: its first
    3K values are added per keypoint, the last two to every keypoint's x and y."""
    b, k = x_d.shape[0], x_d.shape[1]
    per_point = delta[:, : 3 * k].reshape(b, k, 3)
    shift = delta[:, 3 * k : 3 * k + 2]
    shift = torch.cat([shift, torch.zeros_like(shift[:, :1])], dim=1)
    return x_d + per_point + shift[:, None, :]


def stitch(
    x_s: torch.Tensor, x_d: torch.Tensor, mlp: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Upstream's stitching: x_d [B, K, 3] corrected by `mlp` (the StitchingNetwork)
    run on (x_s, x_d). x_d itself is not modified."""
    return apply_stitching(x_d, mlp(stitching_input(x_s, x_d)))
