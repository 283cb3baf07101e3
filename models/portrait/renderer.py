"""The built-in `portrait` backend: one photo in, a talking head out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from models.base import FrameSink, Phone, Plan, RenderStats

from .avatar import PortraitAvatar, prepare_avatar
from .export import TensorRTBackend, backend_choice
from .net import PortraitNet
from .render import build_rig

log = logging.getLogger(__name__)


class PortraitRenderer:
    """Warps the avatar photo per frame by the plan's motion track.

    Output is plan.width x plan.height. The avatar is square, so a non-square size
    is letterboxed: the face renders at min(width, height) pixels, centred on black.
    """

    name = "portrait"

    def __init__(self, batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.batch_size = batch_size
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.backend = "cpu"  # "tensorrt" | "cuda" | "cpu", see export.backend_choice
        self.model_dir: Path | None = None

    def load(self, model_dir: Path, device: str = "auto") -> None:
        """Picks the path (TensorRT, PyTorch CUDA or CPU) and says which, once per worker
        process. TensorRT engines are cached under `model_dir`/engines."""
        choice = backend_choice(device)
        self.backend = choice.path
        self.device = torch.device(choice.device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model_dir = Path(model_dir)
        log.info("portrait renderer: using %s (%s)", choice.path, choice.reason)

    def prepare_avatar(self, photo: np.ndarray) -> PortraitAvatar:
        return prepare_avatar(photo)

    def avatar_from_bytes(self, data: bytes) -> PortraitAvatar:
        return PortraitAvatar.from_bytes(data)

    def plan(
        self,
        avatar: PortraitAvatar,
        speech_seconds: float,
        phones: list[Phone],
        fps: int,
        size: tuple[int, int],
        seed: int,
    ) -> Plan:
        from models.motion import build_track  # written beside this backend; import late

        track = build_track(phones, speech_seconds, fps, seed)
        width, height = size
        return Plan(fps=fps, width=width, height=height, seed=seed, track=track)

    def render(
        self, avatar: PortraitAvatar, plan: Plan, frames: range, sink: FrameSink
    ) -> RenderStats:
        if frames.step != 1 or frames.start < 0 or frames.stop > plan.frame_count:
            raise ValueError(f"frames {frames} are not a range inside 0..{plan.frame_count}")
        started = time.perf_counter()
        network = self.network(avatar, min(plan.width, plan.height))
        track = torch.from_numpy(np.ascontiguousarray(plan.track, dtype=np.float32))
        for start in range(frames.start, frames.stop, self.batch_size):
            rows = track[start : min(start + self.batch_size, frames.stop)]
            square = network(rows.to(self.device)).cpu().numpy()
            sink.write(_letterbox(square, plan.width, plan.height))
        seconds = time.perf_counter() - started
        return RenderStats(frames=len(frames), seconds=seconds, device=str(self.device))

    def network(self, avatar: PortraitAvatar, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """What renders this avatar at this size on the chosen path, built once."""
        if self.backend != "tensorrt":
            return self.rig(avatar, size)
        key = ("tensorrt", size, str(self.device), self.batch_size)
        if key not in avatar.cache:
            engines = (self.model_dir or Path(".")) / "engines"
            try:
                avatar.cache[key] = TensorRTBackend.for_avatar(self, avatar, size, engines)
            except Exception as exc:
                # TensorRT is an accelerator, not a requirement: a graph one version
                # cannot build must not fail every job on the worker.
                log.warning("portrait renderer: TensorRT failed (%s); using PyTorch CUDA", exc)
                avatar.cache[key] = self.rig(avatar, size)
        return avatar.cache[key]

    def rig(self, avatar: PortraitAvatar, size: int) -> PortraitNet:
        """The avatar's precomputed tensors for this size and device, built once."""
        key = (size, str(self.device), self.dtype)
        if key not in avatar.cache:
            avatar.cache[key] = build_rig(avatar, size, self.device, self.dtype)
        return avatar.cache[key]


def _letterbox(square: np.ndarray, width: int, height: int) -> np.ndarray:
    side = square.shape[1]
    if width == height == side:
        return square
    out = np.zeros((square.shape[0], height, width, 3), dtype=np.uint8)
    top, left = (height - side) // 2, (width - side) // 2
    out[:, top : top + side, left : left + side] = square
    return out
