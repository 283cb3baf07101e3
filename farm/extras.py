"""What a job delivers beside its video: captions (SRT, WebVTT), a poster JPEG and a
short animated preview, all under jobs/{id}/ in the store (so cancel and delete remove
them with the rest), and the rules that choose the poster's frame.

The job's `delivery` column holds what was asked at submission: its OutputSpec
(farm/output.py), whose "captions" ("off"|"file"|"burn") and "poster_at" (seconds or
None) are read here. A succeeded job with a delivery has every artifact here (captions
unless "off"); a job from before has none. Light: no numpy, no torch (the CLI imports
this).
"""

from __future__ import annotations

import io
import math
import wave
from typing import Any

from farm import states
from farm.errors import InvalidInput
from farm.stores import job_key

CAPTION_MODES: tuple[str, ...] = ("off", "file", "burn")
WORDS = "words.json"  # the job's word timings, written by the plan stage
CAPTIONS_SRT = "captions.srt"
CAPTIONS_VTT = "captions.vtt"
POSTER = "poster.jpg"
PREVIEW = "preview.webp"

# The poster: the first frame at or after POSTER_AFTER_S whose eyes are open (both blink
# channels of the plan below EYES_OPEN_BELOW; 0 open, 1 closed).
POSTER_AFTER_S = 1.0
EYES_OPEN_BELOW = 0.2
# The preview: PREVIEW_SECONDS from the poster's time (earlier if the video ends
# sooner), PREVIEW_WIDTH pixels wide, PREVIEW_FPS frames a second, looping WebP.
PREVIEW_SECONDS = 3.0
PREVIEW_WIDTH = 320
PREVIEW_FPS = 10


def check_delivery(captions: str, poster_at: float | None, audio_wav: bytes | None = None) -> None:
    """Refuse delivery options that cannot work, before any row exists."""
    if captions not in CAPTION_MODES:
        choices = ", ".join(CAPTION_MODES)
        raise InvalidInput(f"unknown captions {captions!r}; choose one of {choices}")
    if poster_at is None:
        return
    if not math.isfinite(poster_at) or poster_at < 0:
        raise InvalidInput(f"--poster-at must be a time in seconds from 0, got {poster_at}")
    if audio_wav is not None:
        check_poster_at(poster_at, wav_seconds(audio_wav))


def wav_seconds(data: bytes) -> float:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnframes() / float(w.getframerate())


def check_poster_at(poster_at: float | None, seconds: float) -> None:
    """The plan stage, once the spoken length is known: a poster time past the end fails
    the job before anything renders."""
    if poster_at is not None and poster_at >= seconds:
        raise InvalidInput(
            f"--poster-at {poster_at:g} s is beyond the video ({seconds:.2f} s long)"
        )


def poster_frame(
    frame_count: int, fps: int, poster_at: float | None, eyes_closed: Any = None
) -> int:
    """The poster's frame: `poster_at`'s, else the first at or after POSTER_AFTER_S whose
    eyes are open (`eyes_closed`: per frame, the larger of the two blink weights; None:
    a backend without blink channels), else the frame at POSTER_AFTER_S."""
    last = max(frame_count - 1, 0)
    if poster_at is not None:
        return min(int(math.floor(poster_at * fps + 1e-6)), last)
    first = min(int(math.ceil(POSTER_AFTER_S * fps - 1e-6)), last)
    if eyes_closed is not None:
        for i in range(first, frame_count):
            if float(eyes_closed[i]) < EYES_OPEN_BELOW:
                return i
    return first


def preview_start(poster_s: float, seconds: float) -> float:
    """The preview starts at the poster, earlier when fewer than PREVIEW_SECONDS follow."""
    return max(0.0, min(poster_s, seconds - PREVIEW_SECONDS))


def preview_width(width: int) -> int:
    """PREVIEW_WIDTH, or the video's own width when it is narrower (never upscaled)."""
    return min(PREVIEW_WIDTH, width) // 2 * 2


def artifact_keys(job: Any) -> dict[str, str]:
    """The extra artifacts of a succeeded job, by name (empty for any other job)."""
    delivery = getattr(job, "delivery", None)
    if job.state != states.SUCCEEDED or not delivery or getattr(job, "expired_at", None):
        return {}  # an expired job's artifacts were deleted (farm/retention.py)
    keys = {}
    if delivery.get("captions", "file") != "off":
        keys["captions_srt"] = job_key(job.id, CAPTIONS_SRT)
        keys["captions_vtt"] = job_key(job.id, CAPTIONS_VTT)
    keys["poster"] = job_key(job.id, POSTER)
    keys["preview"] = job_key(job.id, PREVIEW)
    return keys


def artifact_urls(job: Any, url: Any) -> dict[str, str | None]:
    """`{captions_srt_url, captions_vtt_url, poster_url, preview_url}`, each None when
    the job has no such artifact; `url(key)` makes one URL (as the output's is made)."""
    keys = artifact_keys(job)
    return {f"{name}_url": url(keys[name]) if name in keys else None for name in _NAMES}


_NAMES = ("captions_srt", "captions_vtt", "poster", "preview")
URL_FIELDS: tuple[str, ...] = tuple(f"{name}_url" for name in _NAMES)
