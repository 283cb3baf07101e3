"""Builds the per-frame network (net.py) for one avatar at one output size: the
geometry (fields, mouth style, eyelid tables) is worked out here once, in numpy."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from . import eyes, mouth
from .avatar import CROP_SIZE, PortraitAvatar
from .fields import build_bases
from .net import FIELD_STEP, INVERSE_STEPS, WEIGHT_STEP, PortraitNet, quantize

# The network was called a rig before it became exportable; the name stays for callers.
PortraitRig = PortraitNet

__all__ = [
    "FIELD_STEP",
    "INVERSE_STEPS",
    "WEIGHT_STEP",
    "PortraitNet",
    "PortraitRig",
    "build_rig",
    "quantize",
]


def build_rig(
    avatar: PortraitAvatar, size: int, device: torch.device, dtype: torch.dtype
) -> PortraitNet:
    """The network for a square output of `size` pixels; the crop is resampled once here."""
    scale = size / CROP_SIZE
    if size == CROP_SIZE:
        image = avatar.image
    else:
        interpolation = cv2.INTER_AREA if size < CROP_SIZE else cv2.INTER_CUBIC
        image = cv2.resize(avatar.image, (size, size), interpolation=interpolation)
    landmarks = avatar.landmarks.astype(np.float64) * scale
    bases = build_bases(landmarks, size)
    reach = bases.lip_rest[None] + np.array([-1.0, 1.0])[:, None, None, None] * np.abs(
        bases.lip_motion
    ).sum(axis=0)
    style = mouth.MouthStyle.of(image, landmarks, reach.reshape(-1, 2), within=bases.box)
    lids = eyes.Eyelids.of(landmarks, size)
    return PortraitNet(image, bases, style, lids, dtype).to(device)
