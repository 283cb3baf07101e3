"""The renderer interface and the data that crosses it.

Everything here is plain numpy so the planning side can be unit-tested without
torch. A frame is a pure function of (avatar, plan, frame index): the plan holds
every time-dependent value, so chunks render anywhere, in any order.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

# The motion track: one row per frame, one column per channel.
# Ranges: [0, 1] for the face controls, [-1, 1] for head rotation and gaze.
CHANNELS: tuple[str, ...] = (
    "jaw_open",  # mouth opening driven by the jaw
    "lip_spread",  # wide lips: i, e
    "lip_round",  # pucker: o, u, w
    "lip_press",  # lips pressed shut: p, b, m
    "lower_lip_tuck",  # lower lip under the upper teeth: f, v
    "upper_lip_raise",  # upper lip up, teeth showing
    "tongue_tip",  # tongue tip behind the upper teeth: l, t, d, n, th
    "blink_left",
    "blink_right",
    "brow_raise",
    "head_yaw",
    "head_pitch",
    "head_roll",
    "gaze_x",
    "gaze_y",
)
CHANNEL_INDEX = {name: i for i, name in enumerate(CHANNELS)}


@dataclass(frozen=True)
class Phone:
    """One phoneme (IPA) with its span in seconds on the job's audio timeline."""

    symbol: str
    start: float
    end: float
    stress: int = 0  # 0 none, 1 secondary, 2 primary (from the phonemizer's marks)
    emphasis: bool = False  # inside <emphasis> of a marked-up script (farm/markup.py)


@dataclass(frozen=True)
class Word:
    """One spoken word with its span in seconds: a recogniser's (models/asr.py), or a
    script's spread over its phones; what captions are timed by (farm/captions.py)."""

    text: str
    start: float
    end: float


@dataclass
class Speech:
    """Synthesised (or decoded) speech: mono int16 samples and phoneme timings."""

    samples: np.ndarray  # int16, shape (n,)
    sample_rate: int
    phones: list[Phone] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return len(self.samples) / float(self.sample_rate)


@dataclass(frozen=True)
class Plan:
    """The motion of a whole job, computed once, sequentially, by the plan stage: one
    row per frame, one column per channel. The portrait renderer's channels are
    CHANNELS; another backend names its own (Ditto: the driving keypoints). `arrays`
    holds what is not one row per frame (GaussianTalker: the audio features at 50 Hz,
    cut into each frame's window at render)."""

    fps: int
    width: int
    height: int
    seed: int
    track: np.ndarray  # float32, (frame_count, len(channels))
    channels: tuple[str, ...] = CHANNELS
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def frame_count(self) -> int:
        return int(self.track.shape[0])

    def channel(self, name: str) -> np.ndarray:
        return self.track[:, self.channels.index(name)]

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            track=self.track.astype(np.float32),
            meta=np.array([self.fps, self.width, self.height, self.seed], dtype=np.int64),
            channels=np.array(self.channels),
            **{f"array_{k}": v for k, v in self.arrays.items()},
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Plan:
        with np.load(io.BytesIO(data)) as z:
            channels = tuple(str(c) for c in z["channels"])
            if z["track"].ndim != 2 or z["track"].shape[1] != len(channels):
                raise ValueError("plan track and channel names disagree")
            fps, width, height, seed = (int(v) for v in z["meta"])
            arrays = {k.removeprefix("array_"): z[k] for k in z.files if k.startswith("array_")}
            return cls(fps, width, height, seed, z["track"], channels, arrays)


@dataclass(frozen=True)
class RenderStats:
    frames: int
    seconds: float
    device: str


class FrameSink(Protocol):
    """Takes rendered frames in order. `write` may raise to stop the render
    (for example when the job was cancelled): renderers check nothing else."""

    def write(self, frames: np.ndarray) -> None:  # uint8, (batch, height, width, 3), RGB
        ...


class AvatarArtifact(Protocol):
    """What registration produces; cached in the store as bytes."""

    def to_bytes(self) -> bytes: ...


class WholePhotoAvatar(AvatarArtifact, Protocol):
    """An avatar whose renderer can output its whole photo: a plan of `photo_size`
    renders it (`--size photo`, and composed output: farm/layout.py). portrait, ditto
    and gaussiantalker avatars are."""

    @property
    def photo_size(self) -> tuple[int, int]:
        """(width, height) of whole-photo output."""
        ...

    @property
    def face_box(self) -> tuple[int, int, int]:
        """(x0, y0, side): the square around the face in whole-photo output pixels (it
        may overhang the frame), for placing the face on a delivered aspect ratio."""
        ...


class Renderer(Protocol):
    name: str

    def load(self, model_dir: Path, device: str) -> None:
        """Once per worker process, in the child (never before a fork)."""

    def prepare_avatar(self, photo: np.ndarray) -> AvatarArtifact:
        """Registration from an RGB uint8 photo; raises PermanentError when unusable."""

    def avatar_from_bytes(self, data: bytes) -> AvatarArtifact: ...

    def plan(
        self,
        avatar: AvatarArtifact,
        speech_seconds: float,
        phones: list[Phone],
        fps: int,
        size: tuple[int, int],
        seed: int,
        audio: Speech | None = None,
        options: dict[str, int] | None = None,
    ) -> Plan:
        """Sequential: the whole job's motion, from its phones or (a backend driven by
        the sound itself) its audio on the job's timeline. `options`: the job's own
        (models/registry.py RENDERER_OPTIONS), checked at submit."""

    def render(
        self, avatar: AvatarArtifact, plan: Plan, frames: range, sink: FrameSink
    ) -> RenderStats:
        """Frames [start, stop) of the plan, written to the sink in order."""
