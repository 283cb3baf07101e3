"""A renderer that does (almost) no work, for scheduling tests and for measuring the
farm's own overhead per chunk. Each frame is a flat grey whose level encodes the
frame index, so a test can still check that every frame arrived, once, in order.

FARM_NULL_FRAME_MS makes each frame take that long (a stand-in for GPU time);
FARM_NULL_FAIL_FRAME=N makes rendering frame N raise, every time (a renderer bug);
FARM_NULL_FAIL="message" makes every chunk raise RuntimeError(message) (a broken GPU
host, e.g. "CUDA error: an illegal memory access was encountered"), and
FARM_NULL_BAD_WIDTH=W makes every chunk of a W-pixel-wide job raise InvalidInput (an
input error, checked first)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from farm.errors import InvalidInput
from models.base import CHANNELS, FrameSink, Phone, Plan, RenderStats, Speech


@dataclass(frozen=True)
class NullAvatar:
    width: int
    height: int

    def to_bytes(self) -> bytes:
        return f"{self.width}x{self.height}".encode()


def frame_level(index: int) -> int:
    return (index * 7) % 256


class NullRenderer:
    name = "null"

    def __init__(self, batch_size: int = 16) -> None:
        self.batch_size = batch_size
        self.frame_seconds = float(os.environ.get("FARM_NULL_FRAME_MS", "0")) / 1000
        fail = os.environ.get("FARM_NULL_FAIL_FRAME", "")
        self.fail_frame = int(fail) if fail else None
        self.fail_every = os.environ.get("FARM_NULL_FAIL", "")
        bad_width = os.environ.get("FARM_NULL_BAD_WIDTH", "")
        self.bad_width = int(bad_width) if bad_width else None

    def load(self, model_dir: Path, device: str) -> None:
        self.device = "cpu"

    def prepare_avatar(self, photo: np.ndarray) -> NullAvatar:
        return NullAvatar(photo.shape[1], photo.shape[0])

    def avatar_from_bytes(self, data: bytes) -> NullAvatar:
        w, h = data.decode().split("x")
        return NullAvatar(int(w), int(h))

    def plan(
        self,
        avatar: NullAvatar,
        speech_seconds: float,
        phones: list[Phone],
        fps: int,
        size: tuple[int, int],
        seed: int,
        audio: Speech | None = None,
        options: dict[str, int] | None = None,
    ) -> Plan:
        frames = math.ceil(speech_seconds * fps)
        return Plan(fps, size[0], size[1], seed, np.zeros((frames, len(CHANNELS)), np.float32))

    def render(self, avatar: NullAvatar, plan: Plan, frames: range, sink: FrameSink) -> RenderStats:
        started = time.perf_counter()
        if plan.width == self.bad_width:
            raise InvalidInput(f"injected input error: width {plan.width}")
        if self.fail_every:
            raise RuntimeError(self.fail_every)
        for start in range(frames.start, frames.stop, self.batch_size):
            idx = range(start, min(start + self.batch_size, frames.stop))
            if self.fail_frame is not None and self.fail_frame in idx:
                raise RuntimeError(f"injected renderer error at frame {self.fail_frame}")
            if self.frame_seconds:
                time.sleep(self.frame_seconds * len(idx))
            levels = np.array([frame_level(i) for i in idx], np.uint8)
            batch = np.broadcast_to(
                levels[:, None, None, None], (len(idx), plan.height, plan.width, 3)
            )
            sink.write(batch)
        return RenderStats(len(frames), time.perf_counter() - started, "cpu")
