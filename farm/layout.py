"""Where a render sits on the delivered frame: pure geometry for composed output.

A composed job (an aspect ratio, a background, alpha, or a draft of the whole photo;
farm/output.py) hands each rendered frame to the compositor (workers/compositor.py),
which scales it by `Layout.scale` and places it at `Layout.offset` on a canvas of
`Layout.size`. With an aspect ratio the renderer draws the avatar's whole photo and
the layout frames it; a draft of `--size photo` is the whole photo at half its size;
otherwise (a background or alpha at the job's own size) the layout is the identity.

- `contain`: the whole render is visible; the rest of the canvas is background
  (letterbox or pillarbox). `cover`: the canvas is filled; the render is cropped.
- Along the axis with room to move, the face is placed by the aspect's convention
  (`ANCHORS`: the face centre's place on the canvas, as fractions of its width and
  height): in the upper third for 9:16, a little above the middle for 4:5 and 16:9
  (the eyes near the upper third line), centred for 1:1. The offset is then clamped, so
  `contain` never crops the render and `cover` never shows an empty edge. On 9:16 and
  4:5, `cover` may zoom in beyond filling the canvas (up to `MAX_ZOOM`) where that is
  what it takes to reach the anchor: a landscape photo on 9:16 fills the height with
  the face at about 40 % of it, not in the upper third, until it is zoomed a little.

Every chunk of a job computes the same layout from the same inputs (the job row's size,
the plan's size, the avatar's face box): integers, and Python's own rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The face centre's place on the canvas, (x, y) as fractions of (width, height).
ANCHORS: dict[str, tuple[float, float]] = {
    "9:16": (0.5, 0.30),  # vertical video: the head in the upper third
    "4:5": (0.5, 0.38),
    "16:9": (0.5, 0.40),
    "1:1": (0.5, 0.50),  # square: centred
}
# cover: at most this much beyond filling the canvas, to place the face. Only the tall
# formats, whose convention is the head high up; 16:9 and 1:1 keep the whole fill.
MAX_ZOOM: dict[str, float] = {"9:16": 1.5, "4:5": 1.25, "16:9": 1.0, "1:1": 1.0}


@dataclass(frozen=True)
class Layout:
    """A render of `render` pixels scaled to `scaled` and placed with its top-left corner
    at `offset` on a canvas of `size` (negative where `cover` crops it)."""

    size: tuple[int, int]  # (width, height) of the output
    render: tuple[int, int]  # (width, height) of the renderer's frames
    scaled: tuple[int, int]  # (width, height) of the render on the canvas
    offset: tuple[int, int]  # (x, y) of the scaled render's top-left corner

    @property
    def scale(self) -> float:
        return self.scaled[0] / self.render[0]

    @property
    def identity(self) -> bool:
        return self.size == self.render == self.scaled and self.offset == (0, 0)

    def window(self) -> tuple[slice, slice, slice, slice]:
        """(canvas rows, canvas cols, scaled rows, scaled cols): the part of the scaled
        render that lands on the canvas, and where."""
        (w, h), (sw, sh), (ox, oy) = self.size, self.scaled, self.offset
        cx0, cy0 = max(ox, 0), max(oy, 0)
        cx1, cy1 = min(ox + sw, w), min(oy + sh, h)
        return (
            slice(cy0, cy1),
            slice(cx0, cx1),
            slice(cy0 - oy, cy1 - oy),
            slice(cx0 - ox, cx1 - ox),
        )


def output_size(
    job_size: tuple[int, int], photo_size: tuple[int, int], draft: bool
) -> tuple[int, int]:
    """The delivered size: the job's own (with an aspect ratio submission made it the
    output size, a draft's already halved), or for `--size photo` the whole photo, halved
    (farm/output.py draft_side) for a draft."""
    from farm.output import draft_side

    if job_size != (0, 0):
        return job_size
    if not draft:
        return photo_size
    return draft_side(photo_size[0]), draft_side(photo_size[1])


def aspect_of(size: tuple[int, int], aspect: str | None = None) -> str:
    """The convention to place the face by: the job's aspect, else the one nearest the
    output's own ratio."""
    if aspect is not None:
        if aspect not in ANCHORS:
            raise ValueError(f"unknown aspect {aspect!r}")
        return aspect
    from farm.output import ASPECTS, ratio

    own = size[0] / size[1]
    return min(ASPECTS, key=lambda name: abs(math.log(own / ratio(name))))


def compute(
    size: tuple[int, int],
    render: tuple[int, int],
    face_box: tuple[float, float, float],
    fit: str = "contain",
    aspect: str | None = None,
) -> Layout:
    """The layout of a `render`-sized frame on a `size` canvas. `face_box`: (x0, y0, side)
    of the face in render pixels."""
    (w_out, h_out), (w, h) = size, render
    if min(w_out, h_out, w, h) <= 0:
        raise ValueError(f"bad sizes: output {size}, render {render}")
    if fit not in ("contain", "cover"):
        raise ValueError(f"unknown fit {fit!r}")
    sx, sy = w_out / w, h_out / h
    convention = aspect_of(size, aspect)
    ax, ay = ANCHORS[convention]
    x0, y0, side = face_box
    fx, fy = x0 + side / 2, y0 + side / 2  # the face centre in render pixels
    if fit == "contain":
        if sx <= sy:  # the width fits exactly
            scaled = (w_out, max(min(h_out, round(h * sx)), 1))
        else:
            scaled = (max(min(w_out, round(w * sy)), 1), h_out)
    else:
        fill = max(sx, sy)
        # Zoom (within MAX_ZOOM) only as far as it takes to lift a low face up to its
        # anchor: a face higher than the anchor is where the convention wants it.
        lift = (1 - ay) * h_out / (h - fy) if fy < h else math.inf
        s = min(max(fill, lift), MAX_ZOOM[convention] * fill)
        scaled = (max(w_out, round(w * s)), max(h_out, round(h * s)))
    cx, cy = fx * scaled[0] / w, fy * scaled[1] / h
    offset = (
        _clamp(round(ax * w_out - cx), w_out - scaled[0]),
        _clamp(round(ay * h_out - cy), h_out - scaled[1]),
    )
    return Layout(size, render, scaled, offset)


def _clamp(value: int, room: int) -> int:
    """Within [0, room] when the render is smaller (room >= 0: never cropped), within
    [room, 0] when larger (never an empty edge)."""
    return max(min(value, max(room, 0)), min(room, 0))
