"""Blinks: the upper eyelid slides down over the eye, which it hides.

A forward displacement field cannot express this: closing the lids collapses the eye
to a line, the backward warp then has no unique source there and shows the squeezed
white of the eye. So the lids are a backward map of their own, applied to the source
positions the warp found: per image column, the skin band above the upper lid is
stretched down to the closing line (the lash line comes with it), a smaller band
below the lower lid is stretched up, and whatever lies between stays in place until
the lids cover it. Because it acts on photo positions, it composes with head motion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .landmarks import (
    LEFT_EYE_LOWER,
    LEFT_EYE_UPPER,
    RIGHT_EYE_LOWER,
    RIGHT_EYE_UPPER,
)

CLOSE_AT = 0.2  # the lids meet 20% of the way up from the lower lid, as real lids do
WATERLINE = 0.15  # in eye openings: the pale inner rim of the lower lid, tucked away
RIGHT_BROW_LOWER = (46, 53, 52, 65, 55)
LEFT_BROW_LOWER = (276, 283, 282, 295, 285)
UPPER_BAND = 0.75  # share of the lid-to-brow distance that the closing lid stretches
LOWER_BAND = 0.6  # in eye openings


@dataclass(frozen=True)
class Eyelids:
    """Per image column (the whole width, both eyes): where the lids are. Columns
    away from the eyes hold zeros, and at the eye corners all curves meet: the map is
    the identity wherever lid, closed line and lower lid coincide."""

    tables: np.ndarray  # float32 (6, S): band top, upper lid, closed line, lower lid,
    # band bottom, waterline width
    left: np.ndarray  # bool (S,): column belongs to the subject's left eye
    region: tuple[int, int, int, int]  # photo pixels x0, y0, x1, y1 the lids change

    @classmethod
    def of(cls, landmarks: np.ndarray, size: int) -> Eyelids:
        columns = np.arange(size, dtype=np.float64) + 0.5
        tables = np.zeros((6, size))
        left = np.zeros(size, dtype=bool)
        lo, hi = np.full(2, np.inf), np.full(2, -np.inf)
        for upper, lower, brow, is_left in (
            (RIGHT_EYE_UPPER, RIGHT_EYE_LOWER, RIGHT_BROW_LOWER, False),
            (LEFT_EYE_UPPER, LEFT_EYE_LOWER, LEFT_BROW_LOWER, True),
        ):
            x = landmarks[list(upper), 0]
            span = (columns >= x.min() - 1) & (columns <= x.max() + 1)
            eye = _eye_tables(landmarks, upper, lower, brow, columns[span])
            tables[:, span] = eye
            left[span] = is_left
            lo = np.minimum(lo, [x.min(), eye[0].min()])
            hi = np.maximum(hi, [x.max(), eye[4].max()])
        x0, y0 = np.clip(np.floor(lo).astype(int) - 1, 0, size)
        x1, y1 = np.clip(np.ceil(hi).astype(int) + 1, 0, size)
        return cls(tables.astype(np.float32), left, (int(x0), int(y0), int(x1), int(y1)))

    def lookup(self) -> np.ndarray:
        """(7, S) float32: the six curves, then 1 where the column is the left eye's. One
        float table, so one gather serves every curve and no bool tensor reaches an
        exported graph."""
        return np.concatenate([self.tables, self.left[None].astype(np.float32)])


def _eye_tables(
    landmarks: np.ndarray,
    upper: tuple[int, ...],
    lower: tuple[int, ...],
    brow: tuple[int, ...],
    columns: np.ndarray,
) -> np.ndarray:
    def curve(indices: tuple[int, ...]) -> np.ndarray:
        x, y = landmarks[list(indices), 0], landmarks[list(indices), 1]
        order = np.argsort(x)
        return np.interp(columns, x[order], y[order])

    lid, low = curve(upper), np.maximum(curve(lower), curve(upper))
    opening = float((low - lid).max())
    closed = low + CLOSE_AT * (lid - low)
    top = lid - np.maximum(UPPER_BAND * (lid - curve(brow)), opening)
    bottom = low + LOWER_BAND * opening
    waterline = WATERLINE * (low - lid)
    return np.stack([top, lid, closed, low, bottom, waterline])


def close_lids(source: torch.Tensor, lookup: torch.Tensor, blink: torch.Tensor) -> torch.Tensor:
    """New source y for source positions (N, h, w, 2) at blink (N, 2) = (left, right);
    `lookup` is `Eyelids.lookup()` as a tensor."""
    sx, sy = source[..., 0], source[..., 1]
    # The nearest column's curves: they move under a quarter pixel per column. Floor
    # before the cast: the same column as truncation after the clamp, and an exported
    # graph does not depend on how a runtime casts negative floats to integers.
    col = sx.floor().clamp(0, lookup.shape[1] - 1).long()
    top, lid, closed, low, bottom, waterline, left = lookup[:, col].unbind(0)
    amount = torch.where(left > 0.5, blink[:, 0, None, None], blink[:, 1, None, None])
    lid_now = lid + amount * (closed - lid)
    low_now = low + amount * (closed - low)
    upper_skin = (sy > top) & (sy < lid_now)
    lower_skin = (sy > low_now) & (sy < bottom)
    from_upper = top + (sy - top) * (lid - top) / (lid_now - top).clamp_min(1e-3)
    # A closing lower lid rolls its pale rim inward, out of sight.
    rim = low + amount * waterline
    from_lower = bottom - (bottom - sy) * (bottom - rim) / (bottom - low_now).clamp_min(1e-3)
    return torch.where(upper_skin, from_upper, torch.where(lower_skin, from_lower, sy))
