"""ffmpeg: argv built by pure functions (testable without ffmpeg), run by one function
that keeps stderr for the error message.

Every chunk is encoded with identical settings and a closed GOP that starts on an
IDR frame, so chunks from different workers join by stream copy without seams.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO, Any

import ffmpeg

from farm.errors import PermanentError

AUDIO_BITRATE = "128k"


@cache
def ffmpeg_exe() -> str:
    """The system ffmpeg when there is one, else the static build inside imageio-ffmpeg."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def pick_codec(encoders: str, gpu: bool) -> str:
    """h264_nvenc when there is a GPU and this ffmpeg lists it (`ffmpeg -encoders`
    text), else libx264. Pure, so it is testable without either."""
    if gpu and re.search(r"^\s*V\S*\s+h264_nvenc\b", encoders, re.MULTILINE):
        return "h264_nvenc"
    return "libx264"


@cache
def ffmpeg_encoders() -> str:
    """`ffmpeg -encoders` of the ffmpeg at hand, asked once per process; "" on failure
    (then libx264, which every build here has)."""
    try:
        proc = subprocess.run(
            [ffmpeg_exe(), "-hide_banner", "-encoders"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout.decode("utf-8", "replace") if proc.returncode == 0 else ""


@cache
def gpu_present() -> bool:
    """An NVIDIA GPU this process may use, without importing torch (farm/ never does):
    CUDA_VISIBLE_DEVICES set to nothing hides them all; else nvidia-smi must list one."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return False
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        proc = subprocess.run([smi, "-L"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0 and b"GPU " in proc.stdout


def default_codec() -> str:
    """The codec for this machine (both checks are cached per process; ffmpeg is not
    asked at all without a GPU)."""
    gpu = gpu_present()
    return pick_codec(ffmpeg_encoders() if gpu else "", gpu)


@dataclass(frozen=True)
class VideoFormat:
    width: int
    height: int
    fps: int
    codec: str = "libx264"
    crf: int = 20
    preset: str = "veryfast"

    @classmethod
    def for_output(cls, width: int, height: int, fps: int) -> VideoFormat:
        """The format for this machine: h264_nvenc where a GPU and the encoder are there.
        The plain constructor stays libx264, so output never depends on the host unasked.
        """
        return cls(width, height, fps, codec=default_codec())

    def codec_options(self, gop: int) -> dict[str, Any]:
        common: dict[str, Any] = {"vcodec": self.codec, "pix_fmt": "yuv420p", "g": gop, "bf": 0}
        if self.codec == "h264_nvenc":
            return {**common, "preset": "p4", "rc": "vbr", "cq": self.crf, "forced-idr": 1}
        return {
            **common,
            "preset": self.preset,
            "crf": self.crf,
            "keyint_min": gop,
            "sc_threshold": 0,
            "flags": "+cgop",
        }


def encode_argv(exe: str, out: Path, fmt: VideoFormat, frames: int) -> list[str]:
    """Raw RGB frames on stdin to one H.264 segment of exactly `frames` frames."""
    stream = ffmpeg.input(
        "pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{fmt.width}x{fmt.height}", r=fmt.fps
    ).output(
        str(out),
        r=fmt.fps,
        video_track_timescale=fmt.fps * 512,
        movflags="+faststart",
        **fmt.codec_options(gop=max(frames, 1)),
    )
    return _quiet(stream.compile(cmd=exe, overwrite_output=True))


def concat_list(paths: list[Path]) -> str:
    """The concat demuxer's list file; quotes escaped as its parser expects."""
    lines = []
    for p in paths:
        escaped = str(p.resolve()).replace("'", "'\\''")
        lines.append(f"file '{escaped}'")
    return "\n".join(lines) + "\n"


def mux_argv(exe: str, list_file: Path, audio: Path, out: Path) -> list[str]:
    """Join the chunk segments by stream copy and add the job's audio once, as AAC."""
    video = ffmpeg.input(str(list_file), format="concat", safe=0)
    sound = ffmpeg.input(str(audio))
    stream = ffmpeg.output(
        video.video,
        sound.audio,
        str(out),
        vcodec="copy",
        acodec="aac",
        audio_bitrate=AUDIO_BITRATE,
        movflags="+faststart",
    )
    return _quiet(stream.compile(cmd=exe, overwrite_output=True))


def _quiet(argv: list[str]) -> list[str]:
    # Errors only: stderr is a pipe read at the end, and progress lines could fill it.
    return [argv[0], "-hide_banner", "-nostats", "-loglevel", "error", *argv[1:]]


def count_frames_argv(exe: str, path: Path) -> list[str]:
    return [exe, "-hide_banner", "-i", str(path), "-map", "0:v:0", "-c", "copy", "-f", "null", "-"]


def run_ffmpeg(argv: list[str], stdin: bytes | None = None) -> str:
    """Run ffmpeg; return its stderr (where it reports), raise with its tail on failure."""
    proc = subprocess.run(argv, input=stdin, capture_output=True)
    err = proc.stderr.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise PermanentError(f"ffmpeg failed: {_tail(err)}")
    return err


def _tail(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-3:]) if lines else "no output"


def count_frames(path: Path) -> int:
    err = run_ffmpeg(count_frames_argv(ffmpeg_exe(), path))
    found = re.findall(r"frame=\s*(\d+)", err)
    if not found:
        raise PermanentError(f"could not count the frames of {path.name}")
    return int(found[-1])


class FrameEncoder:
    """Frames in, one H.264 segment out: a pipe into ffmpeg's stdin.

    The render loop hands over each batch as a buffer view of the array, so the
    pixels are not copied again on their way to the encoder."""

    def __init__(self, out: Path, fmt: VideoFormat, frames: int) -> None:
        self.out = out
        self.fmt = fmt
        self.expected = frames
        self.written = 0
        self._proc = subprocess.Popen(
            encode_argv(ffmpeg_exe(), out, fmt, frames),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    @property
    def _stdin(self) -> IO[bytes]:
        assert self._proc.stdin is not None
        return self._proc.stdin

    def write(self, frames: Any) -> None:
        import numpy as np

        batch = np.ascontiguousarray(frames, dtype=np.uint8)
        if batch.shape[1:] != (self.fmt.height, self.fmt.width, 3):
            raise PermanentError(f"frame shape {batch.shape[1:]} does not match the output")
        try:
            self._stdin.write(batch.data)
        except BrokenPipeError as exc:
            raise PermanentError(f"ffmpeg stopped: {self._stderr()}") from exc
        self.written += len(batch)

    def close(self) -> None:
        self._stdin.close()
        code = self._proc.wait()
        if code != 0:
            raise PermanentError(f"ffmpeg failed: {self._stderr()}")
        if self.written != self.expected:
            raise PermanentError(f"encoded {self.written} frames, expected {self.expected}")

    def abort(self) -> None:
        self._proc.kill()
        self._proc.wait()
        self.out.unlink(missing_ok=True)

    def _stderr(self) -> str:
        assert self._proc.stderr is not None
        self._proc.wait()
        return _tail(self._proc.stderr.read().decode("utf-8", "replace"))
