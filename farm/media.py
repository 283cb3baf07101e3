"""ffmpeg: argv built by pure functions (testable without ffmpeg), run by one function
that keeps stderr for the error message.

Two encodes, as distributed encoders do it. Render workers encode each chunk as a
lossless intermediate (VideoFormat.chunk): a closed GOP of its own, so any worker can
make any chunk. The mux stage decodes the chunks in order into one pipe and encodes
the delivered video once (VideoFormat.delivery, `join_and_encode`). Joining lossy
chunks by stream copy left a seam at every chunk start: each opened on an IDR frame
that re-coded the photo's texture, about one grey level of flicker per join.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO, Any

import ffmpeg

from farm.errors import PermanentError

AUDIO_BITRATE = "128k"
OPUS_BITRATE = "96k"
# The delivered formats (farm/output.py FORMATS): video codec, pixel format, audio codec.
# mp4 uses the worker's H.264 encoder (farm/encoders.py); the others have one each.
TARGETS: dict[str, tuple[str, str, str]] = {
    "mp4": ("", "yuv420p", "aac"),
    "webm": ("libvpx-vp9", "yuv420p", "libopus"),
    "webm-alpha": ("libvpx-vp9", "yuva420p", "libopus"),
    "mov-prores": ("prores_ks", "yuva444p10le", "pcm_s16le"),
}
# A chunk with alpha: FFV1 (lossless, intra-only, so every chunk is a closed GOP) in
# Matroska, RGBA stored as BGRA: the rendered pixels exactly, alpha included.
ALPHA_CHUNK_CODEC = "ffv1"
# The draft watermark (drawtext with the captions' font): its text and where it sits.
WATERMARK = "DRAFT"


class EncodeFailed(PermanentError):
    """The video encoder itself failed (not a decoder, not the input): the caller may
    mark that encoder broken (farm/encoders.py)."""


@cache
def ffmpeg_exe() -> str:
    """The system ffmpeg when there is one, else the static build inside imageio-ffmpeg."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@dataclass(frozen=True)
class VideoFormat:
    """How one video stream is encoded. crf 0 means lossless (an intermediate)."""

    width: int
    height: int
    fps: int
    codec: str = "libx264"
    crf: int = 20
    preset: str = "veryfast"
    # Captions burnt in (the delivered video only): an ASS file (farm.captions.to_ass)
    # and the folder of its font (caption_font); "" for none.
    subtitles: str = ""
    fontsdir: str = ""
    # RGBA frames (a chunk: FFV1 BGRA; the mux pipe: raw RGBA) for a transparent output.
    alpha: bool = False
    # The delivered format (farm/output.py FORMATS); a chunk's is its intermediate's.
    target: str = "mp4"
    # A draft: the fastest settings, and WATERMARK drawn (font from `fontsdir`).
    draft: bool = False

    @classmethod
    def chunk(
        cls, width: int, height: int, fps: int, codec: str = "libx264", alpha: bool = False
    ) -> VideoFormat:
        """A render chunk: lossless, the fastest preset, with the worker's encoder
        (farm/encoders.py). Chunks of one job may come from different encoders: the mux
        stage decodes each one on its own. With `alpha`: FFV1 RGBA (the frames handed
        to FrameEncoder are then (N, H, W, 4))."""
        if alpha:
            return cls(width, height, fps, codec=ALPHA_CHUNK_CODEC, crf=0, preset="", alpha=True)
        return cls(width, height, fps, codec=codec, crf=0, preset="ultrafast")

    @classmethod
    def delivery(
        cls,
        width: int,
        height: int,
        fps: int,
        codec: str = "libx264",
        target: str = "mp4",
        draft: bool = False,
    ) -> VideoFormat:
        """The delivered video, encoded once by the mux stage: `codec` (the worker's
        H.264 encoder) for mp4, VP9 for webm, ProRes 4444 for mov-prores. A target that
        keeps alpha reads RGBA chunks (the render stage made them so)."""
        if target not in TARGETS:
            raise PermanentError(f"unknown output format {target!r}")
        own = TARGETS[target][0] or codec
        crf = (30 if own in ("libx264", "h264_nvenc") else 40) if draft else None
        if own == "libvpx-vp9" and crf is None:
            crf = 32
        return cls(
            width,
            height,
            fps,
            codec=own,
            crf=20 if crf is None else crf,
            preset="ultrafast" if draft else "veryfast",
            alpha=TARGETS[target][1].startswith("yuva"),
            target=target,
            draft=draft,
        )

    @property
    def lossless(self) -> bool:
        return self.crf == 0

    @property
    def chunk_suffix(self) -> str:
        """The file suffix of a chunk in this format (an alpha chunk is Matroska)."""
        return ".mkv" if self.codec == ALPHA_CHUNK_CODEC else ".mp4"

    @property
    def input_pix_fmt(self) -> str:
        """The raw frames FrameEncoder takes (rgba for alpha, else rgb24)."""
        return "rgba" if self.alpha else "rgb24"

    @property
    def pipe_pix_fmt(self) -> str:
        """The raw frames the mux decodes chunks to: RGBA when alpha, else YUV 4:2:0."""
        return "rgba" if self.alpha else "yuv420p"

    def codec_options(self, gop: int | None = None) -> dict[str, Any]:
        """`gop`: a closed GOP of exactly that many frames (a chunk); None: the
        encoder's own keyframe placement (the delivered video)."""
        if self.codec == ALPHA_CHUNK_CODEC:
            # Every frame a keyframe: any GOP is closed; level 3 slices in parallel.
            return {"vcodec": self.codec, "pix_fmt": "bgra", "level": 3, "g": 1}
        if self.codec == "libvpx-vp9":
            pix = TARGETS[self.target][1] if self.alpha else "yuv420p"
            speed = ("realtime", 8) if self.draft else ("good", 5)
            return {
                "vcodec": self.codec,
                "pix_fmt": pix,
                "crf": self.crf,
                "b:v": 0,
                "row-mt": 1,
                "deadline": speed[0],
                "cpu-used": speed[1],
            }
        if self.codec == "prores_ks":
            pix = "yuva444p10le" if self.alpha else "yuv444p10le"
            return {"vcodec": self.codec, "profile:v": 4, "pix_fmt": pix, "vendor": "apl0"}
        opts: dict[str, Any] = {"vcodec": self.codec, "pix_fmt": "yuv420p", "bf": 0}
        if gop is not None:
            opts["g"] = gop
        if self.codec == "h264_nvenc":
            if self.lossless:
                # Constant QP 0: lossless on every NVENC generation and ffmpeg version.
                return {**opts, "preset": "p1", "rc": "constqp", "qp": 0, "forced-idr": 1}
            return {**opts, "preset": "p4", "rc": "vbr", "cq": self.crf, "forced-idr": 1}
        opts.update(preset=self.preset, crf=self.crf)
        if gop is not None:
            opts.update(keyint_min=gop, sc_threshold=0, flags="+cgop")
        return opts


def encode_argv(exe: str, out: Path, fmt: VideoFormat, frames: int) -> list[str]:
    """Raw RGB (or RGBA) frames on stdin to one chunk of exactly `frames` frames: H.264
    in MP4, or FFV1 in Matroska when it has alpha (whatever the file's name)."""
    stream = ffmpeg.input(
        "pipe:",
        format="rawvideo",
        pix_fmt=fmt.input_pix_fmt,
        s=f"{fmt.width}x{fmt.height}",
        r=fmt.fps,
    )
    if fmt.codec == ALPHA_CHUNK_CODEC:
        container: dict[str, Any] = {"format": "matroska"}
    else:
        container = {"video_track_timescale": fmt.fps * 512, "movflags": "+faststart"}
    stream = stream.output(
        str(out), r=fmt.fps, **container, **fmt.codec_options(gop=max(frames, 1))
    )
    return _quiet(stream.compile(cmd=exe, overwrite_output=True))


def decode_argv(exe: str, part: Path, alpha: bool = False) -> list[str]:
    """One chunk's video, decoded to raw YUV 4:2:0 (RGBA with `alpha`) on stdout."""
    pix = "rgba" if alpha else "yuv420p"
    stream = ffmpeg.input(str(part)).video.output("pipe:", format="rawvideo", pix_fmt=pix)
    return _quiet(stream.compile(cmd=exe))


def watermark_filter(fontfile: str, height: int) -> dict[str, Any]:
    """drawtext's options for the draft watermark: WATERMARK in white with a dark
    outline, an eighth of the height, centred in the top quarter."""
    return {
        "fontfile": fontfile,
        "text": WATERMARK,
        "fontcolor": "white",
        "fontsize": "h/8",
        "borderw": max(1, height // 160),
        "bordercolor": "black",
        "x": "(w-text_w)/2",
        "y": "h/12",
    }


def final_argv(exe: str, fmt: VideoFormat, audio: Path, out: Path) -> list[str]:
    """Raw frames on stdin (YUV 4:2:0, or RGBA with alpha) and the job's audio to the
    delivered video: encoded once, in `fmt.target`'s container (MP4: H.264 + AAC with
    the index up front; WebM: VP9 + Opus; MOV: ProRes 4444 + PCM)."""
    video = ffmpeg.input(
        "pipe:",
        format="rawvideo",
        pix_fmt=fmt.pipe_pix_fmt,
        s=f"{fmt.width}x{fmt.height}",
        r=fmt.fps,
    ).video
    if fmt.subtitles:
        video = video.filter("subtitles", filename=fmt.subtitles, fontsdir=fmt.fontsdir)
    if fmt.draft and fmt.fontsdir:
        font = f"{fmt.fontsdir}/{CAPTION_FONT_FILE}"
        video = video.filter("drawtext", **watermark_filter(font, fmt.height))
    sound = ffmpeg.input(str(audio))
    acodec = TARGETS.get(fmt.target, TARGETS["mp4"])[2]
    if acodec == "aac":
        extra: dict[str, Any] = {"audio_bitrate": AUDIO_BITRATE}
    elif acodec == "libopus":
        extra = {"audio_bitrate": OPUS_BITRATE}
    else:
        extra = {}
    if fmt.target in ("mp4", "mov-prores"):
        extra.update(video_track_timescale=fmt.fps * 512, movflags="+faststart")
    stream = ffmpeg.output(
        video,
        sound.audio,
        str(out),
        r=fmt.fps,
        acodec=acodec,
        **extra,
        **fmt.codec_options(),
    )
    return _quiet(stream.compile(cmd=exe, overwrite_output=True))


def join_and_encode(parts: list[Path], audio: Path, out: Path, fmt: VideoFormat) -> None:
    """Decode the chunks in order into one pipe that feeds one encoder. The decoders
    write straight into the encoder's stdin (an OS pipe), so no frame passes through
    Python, and only one chunk is decoded at a time."""
    exe = ffmpeg_exe()
    read_end, write_end = os.pipe()
    with tempfile.TemporaryFile() as encoder_log:
        encoder = subprocess.Popen(
            final_argv(exe, fmt, audio, out),
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=encoder_log,
        )
        os.close(read_end)
        bad_part = ""
        try:
            for part in parts:
                dec = subprocess.run(
                    decode_argv(exe, part, fmt.alpha), stdout=write_end, stderr=subprocess.PIPE
                )
                if dec.returncode != 0:
                    bad_part = (
                        f"cannot decode {part.name}: {_tail(dec.stderr.decode('utf-8', 'replace'))}"
                    )
                    break
        finally:
            os.close(write_end)  # end of input: the encoder finishes the file
            if bad_part and encoder.poll() is None:
                encoder.kill()  # a decoder failed, not the encoder: no partial output
            code = encoder.wait()
        if code > 0:  # the encoder's own failure explains a decoder's broken pipe too
            encoder_log.seek(0)
            raise EncodeFailed(
                f"ffmpeg failed: {_tail(encoder_log.read().decode('utf-8', 'replace'))}"
            )
        if bad_part or code != 0:
            raise PermanentError(bad_part or f"the encoder was stopped ({code})")


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
        channels = 4 if self.fmt.alpha else 3
        if batch.shape[1:] != (self.fmt.height, self.fmt.width, channels):
            raise PermanentError(f"frame shape {batch.shape[1:]} does not match the output")
        try:
            self._stdin.write(batch.data)
        except BrokenPipeError as exc:
            raise EncodeFailed(f"ffmpeg stopped: {self._stderr()}") from exc
        self.written += len(batch)

    def close(self) -> None:
        self._stdin.close()
        code = self._proc.wait()
        if code != 0:
            raise EncodeFailed(f"ffmpeg failed: {self._stderr()}")
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


# --- captions font, poster, preview ------------------------------------------------------

CAPTION_FONT_FILE = "DejaVuSans.ttf"  # its family is farm.captions.FONT_NAME
_FONT_DIRS = (
    "/usr/share/fonts/truetype/dejavu",  # Debian, Ubuntu
    "/usr/share/fonts/dejavu-sans-fonts",  # Fedora
    "/usr/share/fonts/dejavu",
    "/usr/share/fonts/TTF",  # Arch
    "/usr/local/share/fonts",
    "/Library/Fonts",
)


@cache
def caption_font() -> str:
    """The folder holding DejaVu Sans for burnt-in captions: the system's, else the copy
    inside matplotlib (which mediapipe, a dependency, installs), so a fresh machine
    without fonts still burns captions. PermanentError when none is found."""
    import importlib.util

    dirs = list(_FONT_DIRS)
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.origin:
        dirs.append(str(Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"))
    for d in dirs:
        if (Path(d) / CAPTION_FONT_FILE).is_file():
            return d
    raise PermanentError(f"no {CAPTION_FONT_FILE} found for burnt-in captions (looked in {dirs})")


@cache
def _caption_face() -> Any:
    from PIL import ImageFont

    return ImageFont.truetype(str(Path(caption_font()) / CAPTION_FONT_FILE), 100)


def caption_ems(line: str) -> float:
    """A caption line's advance width in ems, measured in the burnt-in captions' font
    (for farm.captions.to_ass to size the captions so the widest line fits)."""
    return float(_caption_face().getlength(line)) / 100.0


def poster_argv(exe: str, video: Path, seconds: float, out: Path) -> list[str]:
    """One frame at `seconds` (seeking decodes up to it: frame-exact) as a JPEG."""
    return _quiet(
        [exe, "-ss", f"{seconds:.4f}", "-i", str(video), "-frames:v", "1", "-q:v", "2"]
        + ["-update", "1", "-y", str(out)]
    )


def preview_argv(
    exe: str, video: Path, start: float, seconds: float, width: int, fps: int, out: Path
) -> list[str]:
    """A looping animated WebP of `seconds` from `start`, `width` wide, `fps` a second.
    Opaque even from a transparent video: libwebp's animation encoder merges frames of
    an alpha stream that differ only a little, and a preview is looked at, not composed."""
    vf = f"fps={fps},scale={width}:-2:flags=lanczos,format=yuv420p"
    return _quiet(
        [exe, "-ss", f"{start:.4f}", "-t", f"{seconds:.4f}", "-i", str(video), "-an"]
        + ["-vf", vf, "-c:v", "libwebp_anim", "-loop", "0", "-quality", "70", "-y", str(out)]
    )


def make_poster(video: Path, seconds: float, out: Path) -> Path:
    run_ffmpeg(poster_argv(ffmpeg_exe(), video, seconds, out))
    if not out.is_file() or out.stat().st_size == 0:
        raise PermanentError(f"ffmpeg made no poster at {seconds:.3f} s")
    return out


def make_preview(
    video: Path, start: float, seconds: float, width: int, fps: int, out: Path
) -> Path:
    run_ffmpeg(preview_argv(ffmpeg_exe(), video, start, seconds, width, fps, out))
    if not out.is_file() or out.stat().st_size == 0:
        raise PermanentError("ffmpeg made no preview")
    return out
