"""The compositor: renderer frames (render size, RGB) to delivered frames (output size;
RGB, or RGBA for alpha formats), by a Layout (farm/layout.py).

Each frame is scaled to the layout's size (area averaging down, bilinear up) and placed
on the canvas. Where the person is segmented (a background, or alpha), the render's
own background is replaced: out = person * mask + background * (1 - mask), with the
soft mask of models/segment.py. Alpha output is straight (not premultiplied), as VP9
and ProRes 4444 carry it: RGB is the render itself, alpha the person mask, and 0
outside the person and outside the placed render.

Backgrounds: a colour, an image (decoded once per chunk, scaled to cover the canvas
and centred), or a video (decoded by ffmpeg at the output size and the job's fps,
looping; a chunk starts at its first frame's place in the loop, so chunks join without
a seam). Everything is a function of the frame index: any worker renders any chunk.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import IO, Protocol

import cv2
import numpy as np

from farm.errors import PermanentError
from farm.layout import Layout
from models.base import FrameSink
from models.segment import PersonSegmenter


class Backdrop(Protocol):
    def take(self, n: int) -> np.ndarray:
        """The next n canvases, uint8 (n, height, width, 3) (may be a broadcast view)."""
        ...

    def close(self) -> None: ...


class Still:
    """One canvas for every frame: a colour or an image."""

    def __init__(self, canvas: np.ndarray) -> None:
        self.canvas = np.ascontiguousarray(canvas, dtype=np.uint8)

    @classmethod
    def colour(cls, rgb: tuple[int, int, int], size: tuple[int, int]) -> Still:
        canvas = np.empty((size[1], size[0], 3), np.uint8)
        canvas[:] = np.asarray(rgb, np.uint8)
        return cls(canvas)

    @classmethod
    def image(cls, path: Path, size: tuple[int, int]) -> Still:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                rgb = np.asarray(img.convert("RGB"))
        except (OSError, UnidentifiedImageError) as exc:
            raise PermanentError(f"the background image does not decode: {exc}") from exc
        return cls(cover(rgb, size))

    def take(self, n: int) -> np.ndarray:
        return np.broadcast_to(self.canvas, (n, *self.canvas.shape))

    def close(self) -> None:
        pass


def cover(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`image` scaled to cover (width, height) and centre-cropped to it."""
    (w_out, h_out), (h, w) = size, image.shape[:2]
    s = max(w_out / w, h_out / h)
    sw, sh = max(w_out, round(w * s)), max(h_out, round(h * s))
    interpolation = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    scaled = cv2.resize(image, (sw, sh), interpolation=interpolation)
    x0, y0 = (sw - w_out) // 2, (sh - h_out) // 2
    return np.ascontiguousarray(scaled[y0 : y0 + h_out, x0 : x0 + w_out])


def video_argv(exe: str, path: Path, size: tuple[int, int], fps: int, start: int) -> list[str]:
    """One pass of the background video as raw RGB frames: resampled to `fps` first (so
    a frame index means the same in every chunk), from frame `start` of that pass,
    scaled to cover `size` and centre-cropped."""
    w, h = size
    vf = (
        f"fps={fps},trim=start_frame={start},setpts=PTS-STARTPTS,"
        f"scale={w}:{h}:force_original_aspect_ratio=increase:flags=bilinear,"
        f"crop={w}:{h},setsar=1"
    )
    return [exe, "-hide_banner", "-nostats", "-loglevel", "error", "-i", str(path), "-an"] + [
        "-vf", vf, "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"
    ]  # fmt: skip


def video_frames_argv(exe: str, path: Path, fps: int) -> list[str]:
    """Counts the frames of one pass at `fps` (ffmpeg's last progress line says)."""
    return [exe, "-hide_banner", "-i", str(path), "-an", "-vf", f"fps={fps}", "-f", "null", "-"]


class Looping:
    """A background video, looped: frame i of the job is frame i mod P of one pass at the
    job's fps (P frames). A chunk starting at frame `start` reads from there on."""

    def __init__(
        self, path: Path, size: tuple[int, int], fps: int, start: int, period: int | None = None
    ) -> None:
        """`period`: the frames of one pass when already known (counted otherwise)."""
        from farm.media import ffmpeg_exe

        self.exe, self.path, self.size, self.fps = ffmpeg_exe(), path, size, fps
        self.period = period or self._period()
        self._pos = start % self.period
        self._proc: subprocess.Popen[bytes] | None = None

    def _period(self) -> int:
        proc = subprocess.run(video_frames_argv(self.exe, self.path, self.fps), capture_output=True)
        err = proc.stderr.decode("utf-8", "replace")
        found = re.findall(r"frame=\s*(\d+)", err)
        if proc.returncode != 0 or not found or int(found[-1]) == 0:
            tail = " | ".join(err.strip().splitlines()[-2:])
            raise PermanentError(f"the background video does not decode: {tail or 'no frames'}")
        return int(found[-1])

    def _open(self) -> IO[bytes]:
        if self._proc is None:
            argv = video_argv(self.exe, self.path, self.size, self.fps, self._pos)
            self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self._proc.stdout is not None
        return self._proc.stdout

    def take(self, n: int) -> np.ndarray:
        w, h = self.size
        frame_bytes = w * h * 3
        out = np.empty((n, h, w, 3), np.uint8)
        i = 0
        while i < n:
            data = self._open().read(frame_bytes)
            if len(data) < frame_bytes:  # the end of this pass: loop from its start
                if self._pos == 0 and i == 0 and not data:
                    raise PermanentError("the background video gave no frames")
                self._finish()
                self._pos = 0
                continue
            out[i] = np.frombuffer(data, np.uint8).reshape(h, w, 3)
            self._pos += 1
            i += 1
        return out

    def _finish(self) -> None:
        if self._proc is not None:
            proc, self._proc = self._proc, None
            assert proc.stdout is not None and proc.stderr is not None
            proc.stdout.close()
            err = proc.stderr.read().decode("utf-8", "replace")
            if proc.wait() != 0:
                raise PermanentError(f"decoding the background video failed: {err.strip()}")

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


class Compositor:
    """Frames of the render in, frames of the output out, in order."""

    def __init__(
        self,
        layout: Layout,
        backdrop: Backdrop | None = None,
        alpha: bool = False,
        segmenter: PersonSegmenter | None = None,
    ) -> None:
        self.layout, self.backdrop, self.alpha = layout, backdrop, alpha
        # The person is cut out only where something shows through (or alpha needs it):
        # an aspect ratio alone scales and places the render, no segmentation.
        cut_out = alpha or backdrop is not None
        self.segmenter = (segmenter or PersonSegmenter()) if cut_out else None

    @property
    def size(self) -> tuple[int, int]:
        return self.layout.size

    def compose(self, frames: np.ndarray) -> np.ndarray:
        n = len(frames)
        (w, h), lay = self.layout.size, self.layout
        expected = (lay.render[1], lay.render[0], 3)
        if frames.shape[1:] != expected:
            raise PermanentError(f"render frames {frames.shape[1:]} != layout's {expected}")
        out = np.zeros((n, h, w, 4 if self.alpha else 3), np.uint8)
        rows, cols, srows, scols = lay.window()
        backs = None if self.alpha or self.backdrop is None else self.backdrop.take(n)
        for i in range(n):
            frame = np.ascontiguousarray(frames[i])
            fg = self._placed(frame, srows, scols)
            if self.segmenter is None:
                out[i, rows, cols] = fg
                continue
            # segmented at the render's resolution or below, scaled straight onto the
            # window: a 9:16 cover never builds the whole zoomed-in mask
            mask = self._placed(self.segmenter.small_mask(frame), srows, scols)
            if self.alpha:
                out[i, rows, cols, :3] = fg
                out[i, rows, cols, 3] = np.rint(mask * 255).astype(np.uint8)
                continue
            assert backs is not None
            out[i] = backs[i]
            under = np.ascontiguousarray(out[i, rows, cols])
            out[i, rows, cols] = cv2.blendLinear(fg, under, mask, 1.0 - mask)
        return out

    def _placed(self, image: np.ndarray, srows: slice, scols: slice) -> np.ndarray:
        """`image` (the whole render, at any resolution) scaled to the layout's size and
        cut to the visible window. Shrinking averages areas (a resize of the whole);
        enlarging samples bilinearly only the pixels that land on the canvas."""
        (sw, sh), (h, w) = self.layout.scaled, image.shape[:2]
        if (w, h) == (sw, sh):
            return np.ascontiguousarray(image[srows, scols])
        fx, fy = sw / w, sh / h
        if fx < 1 and fy < 1:
            scaled = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
            return np.ascontiguousarray(scaled[srows, scols])
        # pixel centres: scaled x = fx * (x + 0.5) - 0.5, then shifted into the window
        m = np.array(
            [
                [fx, 0.0, 0.5 * fx - 0.5 - scols.start],
                [0.0, fy, 0.5 * fy - 0.5 - srows.start],
            ]
        )
        size = (scols.stop - scols.start, srows.stop - srows.start)
        return cv2.warpAffine(
            image, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )

    def sink(self, inner: FrameSink) -> FrameSink:
        return _ComposingSink(self, inner)

    def close(self) -> None:
        if self.backdrop is not None:
            self.backdrop.close()
        if self.segmenter is not None:
            self.segmenter.close()


class _ComposingSink:
    def __init__(self, compositor: Compositor, inner: FrameSink) -> None:
        self.compositor, self.inner = compositor, inner

    def write(self, frames: np.ndarray) -> None:
        self.inner.write(self.compositor.compose(np.asarray(frames)))
