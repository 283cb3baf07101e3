"""What a job delivers: one OutputSpec (format, aspect, fit, background, captions,
poster time, draft), parsed and checked here and only here, for `farm submit`, for
manifest rows and batch defaults, and for the FARM_* configuration defaults.

The spec is stored on the job row in the JSON column `jobs.delivery` (migration 0006;
older rows hold only {"captions", "poster_at"}, or nothing: `from_json` gives the
defaults for the rest). A background file is decoded at submission (an image with
PIL, else a video with ffmpeg) and uploaded to jobs/{id}/background{ext}, so remote
workers can read it and cancel/delete remove it with the job; the spec keeps its key.

Light: no numpy, no torch; PIL and ffmpeg only when a background file is checked.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farm import extras
from farm.errors import InvalidInput
from farm.stores import job_key

if TYPE_CHECKING:
    from farm.config import Settings
    from farm.stores import Store

FORMATS: tuple[str, ...] = ("mp4", "webm", "webm-alpha", "mov-prores")
ALPHA_FORMATS: tuple[str, ...] = ("webm-alpha", "mov-prores")
SUFFIXES: dict[str, str] = {
    "mp4": ".mp4",
    "webm": ".webm",
    "webm-alpha": ".webm",
    "mov-prores": ".mov",
}
# Suffixes that say what a file is: an output named with one must be of its format.
VIDEO_SUFFIXES: frozenset[str] = frozenset({".mp4", ".m4v", ".webm", ".mov", ".mkv"})
ASPECTS: tuple[str, ...] = ("16:9", "9:16", "1:1", "4:5")
FITS: tuple[str, ...] = ("contain", "cover")
CAPTION_MODES = extras.CAPTION_MODES
BACKGROUND_KINDS: tuple[str, ...] = ("color", "image", "video")

# Colour names a background may use (CSS's values), beside #rrggbb and #rgb.
COLORS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "grey": (128, 128, 128),
    "silver": (192, 192, 192),
    "red": (255, 0, 0),
    "maroon": (128, 0, 0),
    "orange": (255, 165, 0),
    "yellow": (255, 255, 0),
    "olive": (128, 128, 0),
    "lime": (0, 255, 0),
    "green": (0, 128, 0),
    "teal": (0, 128, 128),
    "cyan": (0, 255, 255),
    "blue": (0, 0, 255),
    "navy": (0, 0, 128),
    "purple": (128, 0, 128),
    "magenta": (255, 0, 255),
    "pink": (255, 192, 203),
    "brown": (165, 42, 42),
}
_HEX = re.compile(r"#([0-9a-fA-F]{6}|[0-9a-fA-F]{3})")
# What a colour looks like, so a misspelt one is "unknown colour", not "no such file".
_COLOR_LIKE = re.compile(r"#\w*|[A-Za-z]{2,20}")
_SUFFIX = re.compile(r"\.[a-z0-9]{1,8}")
MAX_BACKGROUND_BYTES = 512 * 1024 * 1024
MIN_SIDE, MAX_SIDE = 64, 1920  # the sides a job may ask for (jobs.parse_size)
RATIO_TOLERANCE = 0.01  # --size WxH with --aspect: within 1 % of the aspect's ratio
DRAFT_MIN_FPS = 10  # drafts halve the frame rate, but not below this (or the job's own)


@dataclass(frozen=True)
class Background:
    """What replaces the photo's background: a colour, or an uploaded image or video.
    `path`: the local file between parsing and upload (never stored); `key`: the file's
    store key once uploaded; `sha256`: its content, for idempotency keys."""

    kind: str  # "color" | "image" | "video"
    rgb: tuple[int, int, int] | None = None
    key: str | None = None
    path: str | None = None
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        if self.rgb is not None:
            d["rgb"] = list(self.rgb)
        if self.key is not None:
            d["key"] = self.key
        if self.sha256 is not None:
            d["sha256"] = self.sha256
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Background | None:
        if not d:
            return None
        rgb = d.get("rgb")
        return cls(
            kind=str(d["kind"]),
            rgb=tuple(int(c) for c in rgb) if rgb is not None else None,  # type: ignore[arg-type]
            key=d.get("key"),
            sha256=d.get("sha256"),
        )

    def describe(self) -> str:
        if self.kind == "color" and self.rgb is not None:
            r, g, b = self.rgb
            return f"#{r:02x}{g:02x}{b:02x}"
        return f"{self.kind} {self.key or self.path or '?'}"


@dataclass(frozen=True)
class OutputSpec:
    """The one description of what a job delivers. Build it with `build` (which checks
    every value and combination); the constructor alone checks nothing."""

    format: str = "mp4"
    aspect: str | None = None
    fit: str = "contain"
    background: Background | None = None
    captions: str = "file"
    poster_at: float | None = None
    draft: bool = False

    @property
    def alpha(self) -> bool:
        """The delivered video has an alpha plane (transparent where the background was)."""
        return self.format in ALPHA_FORMATS

    @property
    def suffix(self) -> str:
        return SUFFIXES[self.format]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "aspect": self.aspect,
            "fit": self.fit,
            "background": self.background.to_json() if self.background else None,
            "captions": self.captions,
            "poster_at": self.poster_at,
            "draft": self.draft,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> OutputSpec:
        """A stored spec; None (a job from before delivery options) or an older row's
        {"captions", "poster_at"} give the defaults for the rest."""
        if not d:
            return cls()
        poster_at = d.get("poster_at")
        return cls(
            format=d.get("format") or "mp4",
            aspect=d.get("aspect") or None,
            fit=d.get("fit") or "contain",
            background=Background.from_json(d.get("background")),
            captions=d.get("captions") or "file",
            poster_at=float(poster_at) if poster_at is not None else None,
            draft=bool(d.get("draft", False)),
        )

    def key_json(self) -> dict[str, Any]:
        """The spec as an idempotency key sees it: a background file by its content, not
        by where it was read from or uploaded to."""
        d = self.to_json()
        if self.background is not None:
            d["background"] = {k: v for k, v in self.background.to_json().items() if k != "key"}
        return d


# --- parsing ----------------------------------------------------------------


def parse_color(text: str) -> tuple[int, int, int] | None:
    """#rrggbb, #rgb or a name from COLORS to (r, g, b); None when it is none of them."""
    t = text.strip()
    m = _HEX.fullmatch(t)
    if m:
        h = m.group(1)
        if len(h) == 3:
            h = "".join(c * 2 for c in h)
        return (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16))
    return COLORS.get(t.lower())


def looks_like_color(text: str) -> bool:
    """Whether `text` was meant as a colour (#..., or a bare word), known or not."""
    return bool(_COLOR_LIKE.fullmatch(text.strip()))


def parse_background(text: str) -> Background:
    """A colour, or a file (an image or a video, decided by decoding it). InvalidInput
    for an unknown colour, a missing file and a file that decodes as neither."""
    t = text.strip()
    if not t:
        raise InvalidInput("--background is empty: give a colour, an image or a video")
    rgb = parse_color(t)
    if rgb is not None:
        return Background("color", rgb)
    path = Path(t)
    if not path.exists():
        if _COLOR_LIKE.fullmatch(t):
            names = ", ".join(sorted(COLORS))
            raise InvalidInput(f"unknown colour {t[:40]!r}: use #rrggbb, #rgb or one of {names}")
        raise InvalidInput(f"no such background file: {t[:200]}")
    return background_file(path)


def background_file(path: Path) -> Background:
    """An image (PIL decodes it) or a video (ffmpeg decodes a frame of it)."""
    if not path.is_file():
        raise InvalidInput(f"background {path.name} is not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise InvalidInput(f"background {path.name} is empty")
    if size > MAX_BACKGROUND_BYTES:
        raise InvalidInput(
            f"background {path.name} is larger than {MAX_BACKGROUND_BYTES >> 20} MiB"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if _decodes_as_image(path):
        kind = "image"
    elif _decodes_as_video(path):
        kind = "video"
    else:
        raise InvalidInput(f"background {path.name} does not decode as an image or a video")
    return Background(kind, path=str(path.resolve()), sha256=digest)


def _decodes_as_image(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.width > 0 and im.height > 0
    except Exception:  # PIL raises many kinds (a bomb, a truncated file, not an image)
        return False


def _decodes_as_video(path: Path) -> bool:
    from farm.media import ffmpeg_exe

    argv = [ffmpeg_exe(), "-hide_banner", "-nostats", "-loglevel", "error", "-i", str(path)]
    argv += ["-map", "0:v:0", "-frames:v", "1", "-f", "null", "-"]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def parse_bool(value: Any, what: str = "draft") -> bool:
    if isinstance(value, bool):
        return value
    t = str(value).strip().lower()
    if t in ("1", "true", "yes", "y", "on"):
        return True
    if t in ("0", "false", "no", "n", "off", ""):
        return False
    raise InvalidInput(f"{what} must be true or false, got {str(value)[:40]!r}")


def _float(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise InvalidInput(f"{what} must be a number of seconds, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{what} must be a number of seconds, got {str(value)[:40]!r}") from None


def _choice(value: Any, choices: tuple[str, ...], what: str) -> str:
    t = str(value).strip().lower()
    if t not in choices:
        raise InvalidInput(
            f"unknown {what} {str(value)[:40]!r}; choose one of {', '.join(choices)}"
        )
    return t


def build(
    *,
    defaults: OutputSpec | None = None,
    format: Any = None,
    aspect: Any = None,
    fit: Any = None,
    background: Any = None,
    captions: Any = None,
    poster_at: Any = None,
    draft: Any = None,
) -> OutputSpec:
    """The one parser: values as given (CLI strings, manifest cells, JSON values; None:
    not given) over `defaults`, then every combination checked (`check`). A background
    is a colour or a file path (a manifest resolves its relative paths first)."""
    base = defaults or OutputSpec()
    changes: dict[str, Any] = {}
    if format is not None:
        changes["format"] = _choice(format, FORMATS, "format")
    if aspect is not None:
        a = str(aspect).strip()
        changes["aspect"] = None if a.lower() in ("", "none") else _choice(a, ASPECTS, "aspect")
    if fit is not None:
        changes["fit"] = _choice(fit, FITS, "fit")
    if background is not None:
        if isinstance(background, Background):
            changes["background"] = background
        else:
            b = str(background).strip()
            changes["background"] = None if b.lower() == "none" else parse_background(b)
    if captions is not None:
        changes["captions"] = _choice(captions, CAPTION_MODES, "captions")
    if poster_at is not None:
        changes["poster_at"] = _float(poster_at, "poster_at")
    if draft is not None:
        changes["draft"] = parse_bool(draft)
    spec = replace(base, **changes)
    if fit is not None and spec.aspect is None:
        raise InvalidInput("--fit needs --aspect: without one the video keeps the size asked")
    check(spec)
    return spec


def check(spec: OutputSpec, audio_wav: bytes | None = None) -> None:
    """Refuse a spec that cannot work, with one line, before any row exists."""
    _choice(spec.format, FORMATS, "format")
    if spec.aspect is not None:
        _choice(spec.aspect, ASPECTS, "aspect")
    _choice(spec.fit, FITS, "fit")
    extras.check_delivery(spec.captions, spec.poster_at, audio_wav)
    if spec.alpha and spec.background is not None:
        raise InvalidInput(
            f"--format {spec.format} is transparent where the background was; "
            f"a --background ({spec.background.describe()}) would fill it: give one or the other"
        )
    if spec.alpha and spec.captions == "burn":
        raise InvalidInput(
            f"--captions burn cannot be drawn into a transparent --format {spec.format}; "
            "use --captions file (SRT and WebVTT beside the video)"
        )
    bg = spec.background
    if bg is not None:
        if bg.kind not in BACKGROUND_KINDS:
            raise InvalidInput(f"unknown background kind {bg.kind!r}")
        if bg.kind == "color" and bg.rgb is None:
            raise InvalidInput("a colour background needs its colour")
        if bg.kind != "color" and not (bg.key or bg.path):
            raise InvalidInput(f"an {bg.kind} background needs its file")


def defaults_from(settings: Settings) -> OutputSpec:
    """The configured defaults (FARM_OUTPUT_FORMAT, FARM_ASPECT, FARM_FIT, FARM_CAPTIONS)."""
    return OutputSpec(
        format=settings.output_format,
        aspect=settings.aspect or None,
        fit=settings.fit,
        captions=settings.captions,
    )


def check_settings(settings: Settings) -> None:
    """Settings.check's part: each default known, and the defaults work together."""
    for name, value, choices in (
        ("FARM_OUTPUT_FORMAT", settings.output_format, FORMATS),
        ("FARM_ASPECT", settings.aspect, ("", *ASPECTS)),
        ("FARM_FIT", settings.fit, FITS),
        ("FARM_CAPTIONS", settings.captions, CAPTION_MODES),
    ):
        if value not in choices:
            shown = ", ".join(c for c in choices if c)
            raise InvalidInput(f"{name} {value!r} is not one of {shown}")
    if settings.output_format in ALPHA_FORMATS and settings.captions == "burn":
        raise InvalidInput(
            f"FARM_CAPTIONS=burn cannot be drawn into a transparent "
            f"FARM_OUTPUT_FORMAT={settings.output_format}"
        )


# --- sizes and frame rates ------------------------------------------------------


def ratio(aspect: str) -> float:
    w, h = aspect.split(":")
    return int(w) / int(h)


def frame_size(size: tuple[int, int], spec: OutputSpec) -> tuple[int, int]:
    """The job's output size. Without an aspect: `size` as it is. With one: a square
    size (N, or NxN) is the short side, any other WxH must have the aspect's ratio
    (within 1 %). A draft is half of that (even sides). (0, 0), the avatar's whole
    photo, stays: the plan resolves it (and halves it for a draft)."""
    w, h = size
    if spec.aspect is not None:
        if (w, h) == (0, 0):
            raise InvalidInput(
                f"--size photo cannot take --aspect {spec.aspect}: give the short side "
                "(--size N) or WxH"
            )
        r = ratio(spec.aspect)
        if w == h:
            short = w
            w, h = (_even(short * r), short) if r >= 1 else (short, _even(short / r))
        elif abs((w / h) / r - 1) > RATIO_TOLERANCE:
            raise InvalidInput(
                f"--size {w}x{h} is not {spec.aspect} (within 1 %): give the short side "
                f"(--size N) or a size of that ratio"
            )
        for side in (w, h):
            if not MIN_SIDE <= side <= MAX_SIDE or side % 2:
                raise InvalidInput(
                    f"--aspect {spec.aspect} at {w}x{h}: sides must be even and within "
                    f"{MIN_SIDE}..{MAX_SIDE}"
                )
    if spec.draft and (w, h) != (0, 0):
        w, h = draft_side(w), draft_side(h)
    return w, h


def _even(x: float) -> int:
    return int(round(x / 2)) * 2


def draft_side(side: int) -> int:
    """Half a side, down to even (at least 16)."""
    return max(16, side // 4 * 2)


def job_fps(fps: int, spec: OutputSpec) -> int:
    """A draft's frame rate: half, but not below DRAFT_MIN_FPS (or the job's own)."""
    if not spec.draft:
        return fps
    return max(min(fps, DRAFT_MIN_FPS), fps // 2)


# --- the background file at submission ------------------------------------------------


def upload_background(store: Store, job_id: str, spec: OutputSpec) -> OutputSpec:
    """Put a background file at jobs/{id}/background{ext}; the spec then holds its key.
    A spec without a local file is returned as it is."""
    bg = spec.background
    if bg is None or bg.path is None:
        return spec
    suffix = Path(bg.path).suffix.lower()
    key = job_key(job_id, "background" + (suffix if _SUFFIX.fullmatch(suffix) else ""))
    store.put_file(key, Path(bg.path))
    return replace(spec, background=replace(bg, key=key, path=None))


def check_output_name(name: str, spec: OutputSpec, what: str = "output") -> None:
    """A file or key the video goes to must end with the format's suffix; an MP4's may
    also have none of VIDEO_SUFFIXES (as before formats existed)."""
    suffix = Path(name).suffix.lower()
    if suffix == spec.suffix or (spec.format == "mp4" and suffix not in VIDEO_SUFFIXES):
        return
    raise InvalidInput(
        f"{what} {name[:200]!r} must end with {spec.suffix} for format {spec.format}"
    )


def describe(spec: OutputSpec) -> str:
    """One line for `farm status`."""
    parts = [spec.format]
    if spec.aspect:
        parts.append(f"{spec.aspect} {spec.fit}")
    if spec.background is not None:
        parts.append(f"background {spec.background.describe()}")
    if spec.draft:
        parts.append("draft")
    return ", ".join(parts)
