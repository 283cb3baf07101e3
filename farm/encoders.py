"""Which H.264 encoder this process uses, chosen by a real test encode.

An ffmpeg that lists h264_nvenc may still be unable to open it: the imageio-ffmpeg
build asks for NVENC API 13.1 (driver 610 or newer), and A100, H100 and H200 have no
NVENC hardware at all. So a listing proves nothing; a few frames encoded with exactly
the options of the chunk and delivery formats do. Candidates are tried in order
(h264_nvenc where a GPU is visible, then libx264), the first that works is kept for
the life of the process, and every refusal is kept with ffmpeg's own reason line.

FARM_VIDEO_ENCODER=auto|libx264|h264_nvenc. An explicit encoder that fails its probe
is an EncoderError when the worker starts, not a failure of every chunk. An encoder
that dies in the middle of a chunk is marked broken for the process (`mark_broken`):
with `auto`, the chunk's retry takes the next candidate instead of the same encoder.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from dataclasses import dataclass
from functools import cache

import ffmpeg

from farm.config import VIDEO_ENCODERS
from farm.errors import FarmError, PermanentError, RetryableError
from farm.gpus import gpu_present
from farm.media import VideoFormat, _quiet, _tail, ffmpeg_exe

log = logging.getLogger(__name__)

SETTINGS = VIDEO_ENCODERS  # "auto", then every encoder in the order `auto` tries them
ENCODERS = SETTINGS[1:]
# NVENC refuses frames below 145x49 or so; 256x256 passes every encoder and is fast.
PROBE_WIDTH = PROBE_HEIGHT = 256
PROBE_FRAMES = 4
PROBE_TIMEOUT = 60.0


class EncoderError(PermanentError):
    """No encoder can be used as configured (FARM_VIDEO_ENCODER)."""


class EncoderDied(RetryableError):
    """The chosen encoder failed in the middle of a chunk. It is marked broken for this
    process, so the retry takes the next candidate."""


@dataclass(frozen=True)
class Probe:
    codec: str
    ok: bool
    reason: str  # why it cannot be used ('' when ok): ffmpeg's own words where it spoke


@dataclass(frozen=True)
class Choice:
    codec: str
    reason: str  # one line for the log and `farm doctor`
    probes: tuple[Probe, ...]  # every candidate tried, in order


def probe_formats(codec: str) -> tuple[tuple[VideoFormat, int | None], ...]:
    """The chunk format (lossless, closed GOP) and the delivery format, each with the
    GOP its encode uses: exactly the options real encodes pass."""
    chunk = VideoFormat(PROBE_WIDTH, PROBE_HEIGHT, 25, codec=codec, crf=0, preset="ultrafast")
    delivery = VideoFormat(PROBE_WIDTH, PROBE_HEIGHT, 25, codec=codec)
    return ((chunk, PROBE_FRAMES), (delivery, None))


def probe_argv(exe: str, fmt: VideoFormat, gop: int | None) -> list[str]:
    """Grey frames from lavfi through `fmt`'s encoder options into the null muxer:
    the encoder is opened and fed, nothing is written. Pure."""
    source = ffmpeg.input(f"color=c=gray:s={fmt.width}x{fmt.height}:r={fmt.fps}", f="lavfi")
    stream = source.output("-", f="null", vframes=PROBE_FRAMES, **fmt.codec_options(gop=gop))
    return _quiet(stream.compile(cmd=exe))


def probe(codec: str) -> Probe:
    """Encode a few frames with `codec` as chunks and as delivered videos are encoded."""
    if codec == "h264_nvenc" and not gpu_present():
        return Probe(codec, False, "no NVIDIA GPU is visible (nvidia-smi -L lists none)")
    for fmt, gop in probe_formats(codec):
        try:
            proc = subprocess.run(
                probe_argv(ffmpeg_exe(), fmt, gop), capture_output=True, timeout=PROBE_TIMEOUT
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return Probe(codec, False, f"ffmpeg could not run: {exc}")
        if proc.returncode != 0:
            return Probe(codec, False, _tail(proc.stderr.decode("utf-8", "replace")))
    return Probe(codec, True, "")


def candidates(setting: str, gpu: bool) -> tuple[str, ...]:
    """What to try, in order: an explicit encoder alone; `auto` NVENC first on a GPU."""
    if setting not in SETTINGS:
        raise EncoderError(f"FARM_VIDEO_ENCODER {setting!r} is not one of {', '.join(SETTINGS)}")
    if setting != "auto":
        return (setting,)
    return ENCODERS if gpu else ENCODERS[1:]


_lock = threading.Lock()
_broken: dict[str, str] = {}  # codec -> why it died mid-run in this process


def choose(setting: str = "auto") -> Choice:
    """The encoder for this process: probed once, then cached (until one breaks)."""
    with _lock:
        return _choose(setting, tuple(sorted(_broken.items())))


@cache
def _choose(setting: str, broken: tuple[tuple[str, str], ...]) -> Choice:
    died = dict(broken)
    probes: list[Probe] = []
    for codec in candidates(setting, gpu_present()):
        if codec in died:
            result = Probe(codec, False, f"died during an encode: {died[codec]}")
        else:
            result = probe(codec)
        probes.append(result)
        if result.ok:
            refused = [f"{p.codec} refused: {p.reason}" for p in probes if not p.ok]
            if refused:
                why = "; ".join(refused)
            elif setting != "auto":
                why = f"FARM_VIDEO_ENCODER={setting}; test encode ok"
            elif codec == "libx264":
                why = "no NVIDIA GPU visible; test encode ok"
            else:
                why = "test encode ok on the GPU"
            return Choice(codec, f"{codec} ({why})", tuple(probes))
    reasons = "; ".join(f"{p.codec}: {p.reason}" for p in probes)
    raise EncoderError(f"no usable video encoder (FARM_VIDEO_ENCODER={setting}): {reasons}")


def codec_for(setting: str) -> str:
    return choose(setting).codec


def mark_broken(codec: str, reason: str) -> None:
    """`codec` failed mid-run: the next choose() of this process skips it."""
    with _lock:
        _broken[codec] = reason
    log.warning("video encoder %s died during an encode (%s); not used again here", codec, reason)


def died(setting: str, codec: str, reason: str) -> FarmError:
    """The error for an encode that `codec` failed mid-run. The codec is marked broken;
    when `setting` leaves another candidate, the error is retryable (the retry takes
    it), else permanent, so a broken encoder is never retried forever. A format's own
    encoder (FFV1 for alpha chunks, VP9, ProRes) has no other to fall back to: permanent,
    and nothing is marked."""
    if codec not in ENCODERS:
        return EncoderError(f"{codec} failed: {reason}")
    mark_broken(codec, reason)
    others = [c for c in candidates(setting, gpu_present()) if c != codec and c not in _broken]
    if others:
        return EncoderDied(f"{codec} failed ({reason}); the retry encodes with {others[0]}")
    # An EncoderError: a PermanentError that is the worker's, not the input's (farm/health.py).
    return EncoderError(f"{codec} failed: {reason}")


def reset() -> None:
    """Forget every probe and breakage (tests; a worker never needs it)."""
    with _lock:
        _broken.clear()
        _choose.cache_clear()
        gpu_present.cache_clear()
        ffmpeg_exe.cache_clear()
