"""The per-frame network: blend the bases by the track, warp the photo, paint the mouth.

Every frame is computed independently of the others in its batch, and the blend is
done in exact arithmetic (see `quantize`), so a frame's bytes depend only on the avatar,
the plan and its index: not on the batch size or on where a chunk starts.

The same module traces to ONNX (export.py) and from there to TensorRT, so the forward
pass avoids what either cannot take: searchsorted, Einsum, sort with a computed length,
uint8 and bool constants; and while exporting, writes into slices of intermediates,
which a tracer silently drops (`paste` builds those from concatenations instead).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.base import CHANNEL_INDEX

from . import eyes, mouth
from .fields import FIELD_CHANNELS, DeformationBases

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


def paste(
    base: torch.Tensor, patch: torch.Tensor, top: int, left: int, dims: tuple[int, int]
) -> torch.Tensor:
    """`base` with `patch` written at (top, left) along dims (rows, columns).

    Eager, this writes into `base` and returns it (callers pass tensors they own): the
    renderer's speed depends on not copying whole batches. While exporting it is built
    from concatenations instead, since a tracer drops writes into views of intermediates.
    """
    dy, dx = dims
    height, width = patch.shape[dy], patch.shape[dx]
    if not torch.onnx.is_in_onnx_export():
        base.narrow(dy, top, height).narrow(dx, left, width).copy_(patch)
        return base
    rows = base.narrow(dy, top, height)
    right = rows.shape[dx] - left - width
    middle = [rows.narrow(dx, 0, left), patch, rows.narrow(dx, left + width, right)]
    bottom = base.shape[dy] - top - height
    parts = [base.narrow(dy, 0, top), _cat(middle, dx), base.narrow(dy, top + height, bottom)]
    return _cat(parts, dy)


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    # Empty pieces are left out: zero-sized tensors are where runtimes disagree most.
    kept = [p for p in parts if p.shape[dim] > 0]
    return kept[0] if len(kept) == 1 else torch.cat(kept, dim=dim)


class PortraitNet(torch.nn.Module):
    """One avatar at one output size: track rows in, frames out. Everything that does
    not change per frame (photo, fields, lid tables, mouth style) is a buffer."""

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
        self.register_buffer("lid_tables", torch.from_numpy(lids.lookup()))
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
        return self._render(track, torch.uint8)

    @torch.no_grad()
    def frames(self, track: torch.Tensor) -> torch.Tensor:
        """The same frames in the photo's dtype (whole numbers 0-255): what export.py
        exports, since TensorRT takes no uint8 tensors; a cast gives forward's bytes."""
        return self._render(track, self.image.dtype)

    def _render(self, track: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        fields = self.fields
        count, height, width = fields.shape[0], fields.shape[1], fields.shape[2]
        weights = quantize(track[:, self.channels].float().clamp(-1, 1), WEIGHT_STEP)
        # Plain matmuls (exact, see WEIGHT_STEP): TensorRT's Einsum support is partial.
        disp = (weights @ fields.reshape(count, -1)).reshape(-1, height, width, 2)
        source = torch.addcmul(self.box_shift, self._invert(disp), self.box_to_photo)
        source = self._close_lids(source, track[:, self.blinks].float().clamp(0, 1))
        warped = self._sample(source)  # (N, 3, h, w), 0-255
        motion = self.lip_motion
        lips = self.lip_rest + (weights @ motion.reshape(count, -1)).reshape(-1, *motion.shape[1:])
        tongue = track[:, self.tongue].float().clamp(0, 1)
        x0, y0, x1, y1 = self.box
        mx0, my0, mx1, my1 = self.style.box
        region = warped[:, :, my0 - y0 : my1 - y0, mx0 - x0 : mx1 - x0]
        painted = mouth.composite(region, lips, tongue, self.rest_gap, self.style)
        warped = paste(warped, painted, my0 - y0, mx0 - x0, dims=(2, 3))
        # In place on whole tensors (which tracing records faithfully): a fresh 0-255
        # copy of the batch costs more than the rounding itself.
        box = warped.round_().clamp_(0, 255).to(out_dtype).permute(0, 2, 3, 1)
        still = self.still.to(out_dtype).expand(track.shape[0], -1, -1, -1).clone()
        return paste(still, box, y0, x0, dims=(1, 2))

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

    def _close_lids(self, source: torch.Tensor, blink: torch.Tensor) -> torch.Tensor:
        """Apply the eyelid map, in pixels, over the box the lids can reach."""
        x0, y0, x1, y1 = self.lid_box
        if x1 <= x0 or y1 <= y0:
            return source
        region = source[:, y0:y1, x0:x1]
        half = self.size / 2
        lid_y = eyes.close_lids((region + 1) * half, self.lid_tables, blink)
        region = torch.stack([region[..., 0], lid_y / half - 1], dim=-1)
        return paste(source, region, y0, x0, dims=(1, 2))

    def _sample(self, source: torch.Tensor) -> torch.Tensor:
        """Bilinear samples of the photo at (N, h, w, 2) positions in photo units."""
        height, width = source.shape[1], source.shape[2]
        # One tall grid against the single photo, instead of expanding it N times.
        flat = source.to(self.image.dtype).reshape(1, -1, width, 2)
        out = F.grid_sample(
            self.image, flat, mode="bilinear", padding_mode="border", align_corners=False
        )
        return out.reshape(3, -1, height, width).permute(1, 0, 2, 3)


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
