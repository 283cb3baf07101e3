"""The per-frame renderer: blend the bases by the track, warp the photo, paint the mouth.

Every frame is computed independently of the others in its batch, and the blend is
done in exact arithmetic (see `quantize`), so a frame's bytes depend only on the avatar,
the plan and its index: not on the batch size or on where a chunk starts.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from models.base import CHANNEL_INDEX

from . import eyes, mouth
from .avatar import CROP_SIZE, PortraitAvatar
from .fields import FIELD_CHANNELS, DeformationBases, build_bases

# Weights on a 2^-10 grid times fields on a 2^-6 pixel grid give products on a 2^-16
# grid; float32 holds such sums exactly below 256 pixels, so matmul blocking, FMA and
# summation order (which vary with the batch size) cannot change a single bit.
WEIGHT_STEP = 2.0**-10
FIELD_STEP = 2.0**-6
# Fixed-point steps inverting the forward field (x + d(x) = y) for the backward warp.
INVERSE_STEPS = 2
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels


def quantize(x: torch.Tensor, step: float) -> torch.Tensor:
    return torch.round(x / step) * step


class PortraitRig(torch.nn.Module):
    """One avatar at one output size, ready to render batches of track rows."""

    def __init__(
        self,
        image: np.ndarray,
        bases: DeformationBases,
        style: mouth.MouthStyle,
        lids: eyes.Eyelids,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.size = bases.size
        self.box = bases.box
        self.style = style
        x0, y0, x1, y1 = bases.box
        height, width = y1 - y0, x1 - x0
        self.lid_box = _within(_reachable(lids.region, bases), bases.box)
        self.register_buffer("lid_tables", torch.from_numpy(lids.tables))
        self.register_buffer("lid_left", torch.from_numpy(lids.left))
        blinks = [CHANNEL_INDEX["blink_left"], CHANNEL_INDEX["blink_right"]]
        self.register_buffer("blinks", torch.tensor(blinks, dtype=torch.long))
        self.register_buffer("still", torch.from_numpy(image.copy()))  # (S, S, 3) uint8
        # Only the photo and what is sampled from it use `dtype` (fp16 on CUDA); positions
        # are worked out in float32 and rounded to it only for the final sample.
        self.register_buffer("image", torch.from_numpy(image).permute(2, 0, 1)[None].to(dtype))
        self.register_buffer("fields", quantize(torch.from_numpy(bases.fields), FIELD_STEP))
        self.register_buffer("lip_rest", torch.from_numpy(bases.lip_rest))
        self.register_buffer("lip_motion", quantize(torch.from_numpy(bases.lip_motion), FIELD_STEP))
        channels = [CHANNEL_INDEX[name] for name in FIELD_CHANNELS]
        self.register_buffer("channels", torch.tensor(channels, dtype=torch.long))
        self.tongue = CHANNEL_INDEX["tongue_tip"]
        xs_mouth = torch.arange(style.box[0], style.box[2], dtype=torch.float32) + 0.5
        self.rest_gap = float(mouth.max_gap(self.lip_rest[None], xs_mouth)[0])
        # Positions are kept in grid_sample's [-1, 1] units: of the box while inverting
        # the field (sampled over the box), of the photo when sampling it. These
        # constants convert in one fused multiply-add each.
        ys, xs = torch.meshgrid(
            (torch.arange(height, dtype=torch.float32) + 0.5) * (2 / height) - 1,
            (torch.arange(width, dtype=torch.float32) + 0.5) * (2 / width) - 1,
            indexing="ij",
        )
        self.register_buffer("grid", torch.stack([xs, ys], dim=-1))  # (h, w, 2)
        self.register_buffer("pixels_to_box", torch.tensor([-2 / width, -2 / height]))
        size = self.size
        self.register_buffer("box_to_photo", torch.tensor([width / size, height / size]))
        shift = [(2 * x0 + width) / size - 1, (2 * y0 + height) / size - 1]
        self.register_buffer("box_shift", torch.tensor(shift))

    @torch.no_grad()
    def forward(self, track: torch.Tensor) -> torch.Tensor:
        """(N, len(CHANNELS)) float32 track rows -> (N, S, S, 3) uint8 RGB frames."""
        weights = quantize(track[:, self.channels].float().clamp(-1, 1), WEIGHT_STEP)
        disp = torch.einsum("nk,khwc->nhwc", weights, self.fields)
        source = torch.addcmul(self.box_shift, self._invert(disp), self.box_to_photo)
        self._close_lids(source, track[:, self.blinks].float().clamp(0, 1))
        warped = self._sample(source)  # (N, 3, h, w), 0-255
        lips = self.lip_rest + torch.einsum("nk,kabc->nabc", weights, self.lip_motion)
        tongue = track[:, self.tongue].float().clamp(0, 1)
        x0, y0, x1, y1 = self.box
        mouth.composite(warped, lips, tongue, self.rest_gap, self.style, origin=(x0, y0))
        frames = self.still.expand(len(track), -1, -1, -1).clone()
        box = warped.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        frames[:, y0:y1, x0:x1] = box
        return frames

    def _invert(self, disp: torch.Tensor) -> torch.Tensor:
        """Source position x of each output pixel y (box units), solving x + d(x) = y
        by fixed-point steps. The first-order guess alone would shear the chin when
        the jaw drops."""
        field = disp.permute(0, 3, 1, 2)
        source = torch.addcmul(self.grid, disp, self.pixels_to_box)
        for _ in range(INVERSE_STEPS):
            moved = F.grid_sample(field, source, mode="bilinear", align_corners=False)
            source = torch.addcmul(self.grid, moved.permute(0, 2, 3, 1), self.pixels_to_box)
        return source

    def _close_lids(self, source: torch.Tensor, blink: torch.Tensor) -> None:
        """Apply the eyelid map in place, in pixels, over the box the lids can reach."""
        x0, y0, x1, y1 = self.lid_box
        region = source[:, y0:y1, x0:x1]
        half = self.size / 2
        pixels = (region + 1) * half
        lid_y = eyes.close_lids(pixels, self.lid_tables, self.lid_left, blink)
        region[..., 1] = lid_y / half - 1

    def _sample(self, source: torch.Tensor) -> torch.Tensor:
        """Bilinear samples of the photo at (N, h, w, 2) positions in photo units."""
        n, height, width = source.shape[:3]
        # One tall grid against the single photo, instead of expanding it N times.
        flat = source.to(self.image.dtype).reshape(1, n * height, width, 2)
        out = F.grid_sample(
            self.image, flat, mode="bilinear", padding_mode="border", align_corners=False
        )
        return out.view(3, n, height, width).permute(1, 0, 2, 3)


def build_rig(
    avatar: PortraitAvatar, size: int, device: torch.device, dtype: torch.dtype
) -> PortraitRig:
    """The rig for a square output of `size` pixels; the crop is resampled once here."""
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
    return PortraitRig(image, bases, style, lids, dtype).to(device)


def _reachable(region: Box, bases: DeformationBases) -> Box:
    """Output pixels whose source can lie in a photo region: the region grown by the
    most that all fields at full weight together move its pixels, per axis."""
    x0, y0, x1, y1 = _within(region, bases.box)
    moves = np.abs(bases.fields[:, y0:y1, x0:x1]).sum(axis=0)
    rx, ry = (np.ceil(moves.reshape(-1, 2).max(axis=0)).astype(int) + 1) if moves.size else (0, 0)
    size = bases.size
    return (
        max(region[0] - int(rx), 0),
        max(region[1] - int(ry), 0),
        min(region[2] + int(rx), size),
        min(region[3] + int(ry), size),
    )


def _within(box: Box, outer: Box) -> Box:
    """`box` clipped to `outer`, in coordinates relative to outer's corner."""
    x0, y0 = max(box[0], outer[0]) - outer[0], max(box[1], outer[1]) - outer[1]
    x1, y1 = min(box[2], outer[2]) - outer[0], min(box[3], outer[3]) - outer[1]
    return x0, y0, max(x1, x0), max(y1, y0)
