"""The built-in `portrait` backend: one photo in, a talking head out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from farm.errors import PermanentError
from models.base import FrameSink, Phone, Plan, RenderStats, Speech
from models.engines import backend_choice
from models.frames import FrameWriter

from .avatar import CROP_SIZE, PortraitAvatar, prepare_avatar
from .export import TensorRTBackend
from .net import PortraitNet
from .render import build_rig

log = logging.getLogger(__name__)

# Width of the paste-back's blend ramp, as a fraction of the crop's side.
FEATHER = 0.05
# The largest crop rendered at full size in full-photo output; see PasteBack.of.
MAX_NET_SIZE = 1024


class PortraitRenderer:
    """Warps the avatar photo per frame by the plan's motion track.

    Output is plan.width x plan.height. A plan of the avatar's `photo_size` renders
    the whole photo, the animated crop pasted back with a feathered border; 512x512
    is always the face crop (also for a photo of exactly that size). Any other size is
    letterboxed: the face renders at min(width, height) pixels, centred on black.
    """

    name = "portrait"

    def __init__(self, batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.batch_size = batch_size
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.backend = "cpu"  # "tensorrt" | "cuda" | "cpu", see models/engines.py
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
        audio: Speech | None = None,
        options: dict[str, int] | None = None,
    ) -> Plan:
        from models.motion import build_track  # written beside this backend; import late

        timeline = None if audio is None else (audio.samples, audio.sample_rate)
        track = build_track(phones, speech_seconds, fps, seed, timeline)
        width, height = size
        return Plan(fps=fps, width=width, height=height, seed=seed, track=track)

    def idle_plan(self, avatar: PortraitAvatar, fps: int, size: tuple[int, int], seed: int) -> Plan:
        """A live channel's idle loop (models/motion.py idle_track): seamless, at the rest
        pose at every cut point (`arrays["cuts"]`), where a job's plan starts and ends.
        After the loop's `arrays["loop"]` frames come its exits (`idle_exits`), one after
        the other: exit i leaves the loop after frame `arrays["exit_from"][i]`, takes
        `arrays["exit_frames"]` frames and ends at the rest pose."""
        from models.motion import idle_beat_frames, idle_exits, idle_track

        track = idle_track(fps, seed)
        cuts = np.arange(0, track.shape[0], idle_beat_frames(fps), dtype=np.int64)
        exits = idle_exits(track, fps)
        arrays = {
            "cuts": cuts,
            "loop": np.array([track.shape[0]], np.int64),
            "exit_from": np.array([j for j, _ in exits], np.int64),
            "exit_frames": np.array([len(exits[0][1]) if exits else 0], np.int64),
        }
        track = np.concatenate([track, *(part for _, part in exits)])
        width, height = size
        return Plan(fps, width, height, seed, track, arrays=arrays)

    def render(
        self, avatar: PortraitAvatar, plan: Plan, frames: range, sink: FrameSink
    ) -> RenderStats:
        if frames.step != 1 or frames.start < 0 or frames.stop > plan.frame_count:
            raise ValueError(f"frames {frames} are not a range inside 0..{plan.frame_count}")
        started = time.perf_counter()
        track = torch.from_numpy(np.ascontiguousarray(plan.track, dtype=np.float32))
        track = track[frames.start : frames.stop].to(self.device)
        draw = self.drawer(avatar, plan.width, plan.height)
        # uint8 frames, letterbox and paste-back are made on the device; the writer
        # copies and encodes batch k while batch k+1 renders (models/frames.py).
        writer = FrameWriter(sink, self.device)
        try:
            for first in range(0, len(frames), self.batch_size):
                writer.put(draw(track[first : first + self.batch_size]))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        seconds = time.perf_counter() - started
        return RenderStats(frames=len(frames), seconds=seconds, device=str(self.device))

    def drawer(
        self, avatar: PortraitAvatar, width: int, height: int
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """Motion rows on the device -> (N, height, width, 3) uint8 frames on the device:
        the whole photo with the face pasted back, or the face letterboxed."""
        if self.full_photo(avatar, width, height):
            paste = self.paste_back(avatar)
            network = self.network(avatar, paste.net_size)
            return lambda rows: paste(network(rows))
        network = self.network(avatar, min(width, height))
        return lambda rows: _letterbox(network(rows), width, height)

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

    @staticmethod
    def full_photo(avatar: PortraitAvatar, width: int, height: int) -> bool:
        if avatar.photo is None or (width, height) == (CROP_SIZE, CROP_SIZE):
            return False
        return (width, height) == avatar.photo_size

    def paste_back(self, avatar: PortraitAvatar) -> PasteBack:
        key = ("paste", str(self.device))
        if key not in avatar.cache:
            avatar.cache[key] = PasteBack.of(avatar, self.device)
        return avatar.cache[key]

    def rig(self, avatar: PortraitAvatar, size: int) -> PortraitNet:
        """The avatar's precomputed tensors for this size and device, built once."""
        key = (size, str(self.device), self.dtype)
        if key not in avatar.cache:
            avatar.cache[key] = build_rig(avatar, size, self.device, self.dtype)
        return avatar.cache[key]


class PasteBack:
    """Full-photo frames: the rendered crop blended into the photo over its square.

    The blend weight ramps from 0 at the crop's border to 1 at FEATHER of its side
    inside (smoothstep, so its slope is 0 at both ends and no edge is visible); the
    crop's border shows the photo itself, which is what the crop's still margin
    resamples anyway. Elementwise per frame, so frames stay independent of batching.
    """

    def __init__(
        self,
        photo: torch.Tensor,
        alpha: torch.Tensor,
        net_size: int,
        side: int,
        crop: tuple[slice, slice],
        target: tuple[slice, slice],
    ) -> None:
        self.photo = photo  # (H, W, 3) uint8 on the device
        self.alpha = alpha  # (h, w, 1) float32: the blend weight over `target`
        self.net_size = net_size
        self.side = side
        self.crop = crop  # rows, columns of the (side x side) crop that lie in the photo
        self.target = target  # where those land in the photo

    @classmethod
    def of(cls, avatar: PortraitAvatar, device: torch.device) -> PasteBack:
        assert avatar.photo is not None and avatar.crop_box is not None
        x0, y0, side = avatar.crop_box
        height, width = avatar.photo.shape[:2]
        cols = slice(max(0, -x0), min(side, width - x0))
        rows = slice(max(0, -y0), min(side, height - y0))
        if cols.stop <= cols.start or rows.stop <= rows.start:
            raise PermanentError("the avatar's face crop lies outside its photo; add it again")
        ramp = max(FEATHER * side, 1.0)
        centres = torch.arange(side, dtype=torch.float32) + 0.5
        edge = torch.minimum(centres, side - centres)  # distance to the nearer border
        t = (edge / ramp).clamp(0, 1)
        weight = t * t * (3 - 2 * t)
        alpha = torch.minimum(weight[:, None], weight[None, :])[rows, cols, None]
        target = (slice(y0 + rows.start, y0 + rows.stop), slice(x0 + cols.start, x0 + cols.stop))
        photo = torch.from_numpy(avatar.photo).to(device)
        # A huge crop (a face filling a large photo) renders at MAX_NET_SIZE and is
        # upsampled: the crop holds only 512 pixels of detail, and the fields' memory
        # grows with the square of the size.
        net_size = min(side, MAX_NET_SIZE)
        return cls(photo, alpha.to(device), net_size, side, (rows, cols), target)

    def __call__(self, squares: torch.Tensor) -> torch.Tensor:
        """(N, S, S, 3) uint8 rendered crops -> (N, H, W, 3) uint8 full photos."""
        crop = squares.float()
        if squares.shape[1] != self.side:
            crop = F.interpolate(
                crop.permute(0, 3, 1, 2),
                size=(self.side, self.side),
                mode="bilinear",
                align_corners=False,
            ).permute(0, 2, 3, 1)
        crop = crop[:, self.crop[0], self.crop[1]]
        under = self.photo[self.target].float()
        blended = torch.lerp(under.expand_as(crop), crop, self.alpha)
        out = self.photo.expand(squares.shape[0], -1, -1, -1).clone()
        out[:, self.target[0], self.target[1]] = blended.round_().clamp_(0, 255).to(torch.uint8)
        return out


def _letterbox(square: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(N, S, S, 3) uint8 faces centred on black (N, height, width, 3), on their device."""
    side = square.shape[1]
    if width == height == side:
        return square
    out = square.new_zeros((square.shape[0], height, width, 3))
    top, left = (height - side) // 2, (width - side) // 2
    out[:, top : top + side, left : left + side] = square
    return out
