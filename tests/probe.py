"""Independent checks of rendered output: PyAV (its own ffmpeg libraries) decodes the
MP4; nothing here trusts farm's own bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Probe:
    video_codec: str
    audio_codec: str | None
    width: int
    height: int
    fps: float
    frames: np.ndarray  # (n, h, w, 3) uint8
    video_seconds: float
    audio: np.ndarray  # mono float32
    sample_rate: int
    audio_duration: float = 0.0  # the container's (edit-list aware) audio duration

    @property
    def frame_count(self) -> int:
        return len(self.frames)

    @property
    def audio_seconds(self) -> float:
        """The container's duration: decoded AAC carries up to two frames (2048 samples)
        of encoder priming and padding beyond the real audio."""
        if self.audio_duration:
            return self.audio_duration
        return len(self.audio) / self.sample_rate if self.sample_rate else 0.0


def probe(path: Path) -> Probe:
    import av

    with av.open(str(path)) as container:
        vstream = container.streams.video[0]
        astreams = container.streams.audio
        fps = float(vstream.average_rate)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        video_seconds = float(vstream.duration * vstream.time_base) if vstream.duration else 0.0
        vcodec, width, height = vstream.codec_context.name, vstream.width, vstream.height
    audio = np.zeros(0, np.float32)
    rate, acodec, audio_duration = 0, None, 0.0
    if astreams:
        with av.open(str(path)) as container:
            astream = container.streams.audio[0]
            acodec, rate = astream.codec_context.name, astream.rate
            if astream.duration:
                audio_duration = float(astream.duration * astream.time_base)
            chunks = [f.to_ndarray().astype(np.float32) for f in container.decode(audio=0)]
        audio = np.concatenate([c.mean(axis=0) if c.ndim == 2 else c for c in chunks])
    return Probe(
        vcodec,
        acodec,
        width,
        height,
        fps,
        np.stack(frames),
        video_seconds,
        audio,
        rate,
        audio_duration,
    )


def speech_mask(p: Probe, threshold_db: float = -35.0) -> np.ndarray:
    """Per video frame: is there speech in the audio under it (RMS above threshold)?"""
    n = p.frame_count
    per = p.sample_rate / p.fps
    rms = np.zeros(n)
    for i in range(n):
        seg = p.audio[int(i * per) : int((i + 1) * per)]
        rms[i] = np.sqrt(np.mean(seg**2)) if len(seg) else 0.0
    ref = rms.max() or 1.0
    return 20 * np.log10(np.maximum(rms / ref, 1e-9)) > threshold_db


def mouth_box(frame: np.ndarray) -> tuple[int, int, int, int]:
    """The lips' bounding box (x0, y0, x1, y1) found by mediapipe on a frame, padded."""
    import mediapipe as mp

    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1) as mesh:
        result = mesh.process(frame)
    assert result.multi_face_landmarks, "no face found in the rendered frame"
    lips = {i for pair in mp.solutions.face_mesh.FACEMESH_LIPS for i in pair}
    h, w = frame.shape[:2]
    pts = np.array(
        [
            (lm.x * w, lm.y * h)
            for i, lm in enumerate(result.multi_face_landmarks[0].landmark)
            if i in lips
        ]
    )
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)
    pad = 0.25 * (x1 - x0)
    return int(x0 - pad), int(y0 - pad / 2), int(x1 + pad), int(y1 + pad)
