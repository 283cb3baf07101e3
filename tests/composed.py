"""Helpers for composed-output tests (aspect ratios, fit, backgrounds): a small avatar
whose whole photo renders (a 512x512 photo renders as the face crop, so the demo photo
is shrunk and padded), a job through the real stages in process, and a face finder that
searches the whole output, independent of where the layout says the face is."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from farm import jobs, output, queries, states
from farm.context import Context
from farm.stores import avatar_key
from tests.pipeline import run_stages

AVATAR = "wide"
SCRIPT = "Hello there, friend."
FPS = 10


def wide_photo() -> np.ndarray:
    """The demo photo at 256x256, padded to 288x256 (whole-photo output, cheap on CPU)."""
    import cv2

    from models.portrait import demo_photo

    small = cv2.resize(demo_photo(), (256, 256), interpolation=cv2.INTER_AREA)
    return np.pad(small, ((0, 0), (16, 16), (0, 0)), mode="edge")


def add_avatar(ctx: Context) -> None:
    """`wide_photo` registered as AVATAR for the portrait renderer."""
    from PIL import Image

    from workers.avatars import register_avatar

    buf = io.BytesIO()
    Image.fromarray(wide_photo()).save(buf, format="PNG")
    key = avatar_key(AVATAR, "source.png")
    ctx.store.put_bytes(key, buf.getvalue())
    register_avatar(ctx, AVATAR, key, "portrait")


def run_job(
    ctx: Context, size: tuple[int, int], chunk_frames: int = 6, **spec: Any
) -> tuple[Any, Path]:
    """Submit and run one job with the portrait renderer; (job row, delivered file)."""
    request = jobs.JobRequest(
        script=SCRIPT,
        avatar=AVATAR,
        voice="espeak",
        fps=FPS,
        size=size,
        chunk_frames=chunk_frames,
        renderer="portrait",
        seed=5,
        output=output.build(captions="off", **spec),
    )
    job_id = jobs.submit(ctx, request)
    run_stages(ctx)
    with ctx.session() as s:
        job = queries.get_job(s, job_id)
    assert job.state == states.SUCCEEDED, job.error
    return job, ctx.settings.home / "artifacts" / job.output_key


def find_face(frame: np.ndarray) -> np.ndarray | None:
    """(478, 2) FaceMesh landmarks in frame pixels, or None. FaceMesh's detector misses
    a face that is small in a tall or wide frame, so square windows along the long side
    (half overlapping) are searched too, each as its own image."""
    from farm.quality import face_landmarks

    h, w = frame.shape[:2]
    side = min(h, w)
    long = max(h, w)
    starts = sorted({*range(0, long - side + 1, max(side // 2, 1)), long - side})
    windows = [(0, 0, w, h)] + [
        (0, s, w, s + side) if h > w else (s, 0, s + side, h) for s in starts
    ]
    for x0, y0, x1, y1 in windows:
        try:
            points = face_landmarks([frame[y0:y1, x0:x1]])[0]
        except ValueError:
            continue
        return points + np.array([x0, y0], dtype=np.float64)
    return None
