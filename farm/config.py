"""One frozen Settings object, read from FARM_* variables (and a .env file) at start-up.

Unset service URLs mean the embedded default: SQLite, an embedded Redis on a unix
socket, and a local artifact directory, all under FARM_HOME.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from farm.errors import InvalidInput


def _default_home() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "farm"


def _default_model_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "farm" / "models"


@dataclass(frozen=True)
class Settings:
    home: Path = _default_home()
    database_url: str = ""  # empty: sqlite file under home
    broker_url: str = ""  # empty: embedded Redis under home
    result_backend: str = ""  # empty: same as the broker
    store_url: str = ""  # empty: local directory under home; or s3://bucket/prefix
    s3_endpoint_url: str = ""  # MinIO or any S3-compatible endpoint; empty: AWS
    s3_region: str = ""  # empty: boto3's usual sources
    presign_seconds: int = 7 * 24 * 3600
    model_dir: Path = _default_model_dir()
    renderer: str = "portrait"
    # --- the ditto backend (models/ditto) ---
    ditto_dir: str = ""  # Ditto's checkpoint root; empty: model_dir/ditto
    ditto_steps: int = 0  # LMDM's DDIM steps; 0: the checkpoint config's (upstream: 50)
    ditto_emotion: int = -1  # emotion class 0..7; -1: the config's (upstream: 4, neutral)
    # --- the gaussiantalker backend (models/gaussiantalker) ---
    # the audio feature extractor the user's model was trained with: a local directory
    # of transformers files (wav2vec2 XLSR esperanto for 44-wide features, HuBERT 1024)
    gaussiantalker_audio_model: str = ""
    device: str = "auto"  # auto | cpu | cuda
    video_encoder: str = "auto"  # auto | libx264 | h264_nvenc: see farm/encoders.py
    fps: int = 25
    size: int = 512
    chunk_frames: int = 100
    # --- what a job delivers by default (farm/output.py; submit flags and manifest
    # columns override them) ---
    output_format: str = "mp4"  # mp4 | webm | webm-alpha | mov-prores
    aspect: str = ""  # empty: the size as given; or 16:9 | 9:16 | 1:1 | 4:5
    fit: str = "contain"  # contain | cover (with an aspect)
    captions: str = "file"  # off | file | burn
    render_batch: int = 16
    render_threads: int = 1  # torch threads per render process
    render_concurrency: int = 2  # render processes the embedded runtime starts
    cpu_concurrency: int = 2
    # --- limits on what one submission may ask for (checked before any row exists) ---
    max_script_chars: int = 20_000
    max_segment_chars: int = 400
    max_audio_seconds: float = 600.0  # longest input of `farm submit --audio`
    max_photo_pixels: int = 40_000_000  # `farm avatar add`: refused before decoding
    max_job_frames: int = 45_000  # 30 min at 25 fps; scripts are estimated at submit
    max_batch_jobs: int = 10_000  # rows of one manifest
    segment_pause_ms: int = 350
    task_max_retries: int = 3  # a renderer error (render chunks only), then the job fails
    # A render worker whose chunks fail this many times in a row for reasons not the
    # input's leaves rotation (farm/health.py); 0: never.
    worker_max_failures: int = 3
    # An outage (the database, the store, any RetryableError) is not the job's fault: waits
    # of 1, 2, 4 ... s capped at outage_max_delay, jittered; 25 x <= 30 s is ~10 minutes.
    outage_retries: int = 25
    outage_max_delay: int = 30
    visibility_timeout: int = 12 * 3600  # above the longest task + queue wait (celery#5935)
    embedded_idle_seconds: int = 120
    # The sweep (farm/sweep.py): how often it looks for work whose message was lost,
    # and how long work must show no sign of life first (above the longest chunk).
    sweep_seconds: int = 60
    stall_seconds: int = 900
    # --- webhooks (farm/webhooks.py) ---
    webhook_url: str = ""  # default target of every job; empty: none
    webhook_secret: str = ""  # whsec_<base64>; required once any webhook is used
    # Seconds before each retry after the first attempt (the Standard Webhooks schedule).
    webhook_retry_schedule: str = "5,300,1800,7200,18000,36000,36000"
    webhook_timeout: float = 10.0  # per attempt, connect and each read
    webhook_allowlist: str = ""  # hosts, IPs, CIDRs allowed despite being private/loopback
    # --- nightly batches (farm/nightly.py, workers/beat.py) ---
    nightly_inbox: str = ""  # a directory or s3://bucket/prefix; empty: no nightly run
    nightly_cron: str = "0 2 * * *"  # UTC: minute hour day-of-month month day-of-week
    nightly_avatar: str = "demo"  # for inbox .txt scripts and rows that name none
    nightly_voice: str = "joe"
    # --- `farm live` (farm/live.py) ---
    live_queue_max: int = 16  # jobs a live channel holds pending; more are refused
    # --- farm intake (farm/intake.py): jobs from an AMQP queue ---
    intake_max_bytes: int = 32 * 1024 * 1024  # largest message body (base64 audio included)
    intake_results: str = ""  # result queue for messages without reply_to; empty: none
    intake_dead_letter: str = ""  # dead-letter queue; empty: "<queue>.dead"
    # --- retention (farm/retention.py, enforced by the sweep) ---
    retention_days: int = 0  # outputs of jobs ended longer ago are deleted; 0: kept forever
    keep_intermediates: bool = False  # keep chunk videos and segment audio after publish

    # --- derived -------------------------------------------------------------
    @property
    def embedded(self) -> bool:
        return not self.broker_url

    @property
    def redis_socket(self) -> Path:
        return self.home / "run" / "redis.sock"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'farm.db'}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or f"redis+socket://{self.redis_socket}"

    @property
    def effective_result_backend(self) -> str:
        return self.result_backend or self.effective_broker_url

    @property
    def effective_store_url(self) -> str:
        return self.store_url or f"file://{self.home / 'artifacts'}"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, dotenv: Path | None = None) -> Settings:
        """Values from FARM_* variables; a .env file fills in what the environment lacks."""
        values = _read_dotenv(dotenv if dotenv is not None else Path.cwd() / ".env")
        values.update({k: v for k, v in (os.environ if env is None else env).items()})
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            raw = values.get(f"FARM_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            kwargs[f.name] = _coerce(f.name, f.type, raw)
        settings = cls(**kwargs)
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse, at start-up, a setting that cannot work: a job would be accepted and
        then fail (an unknown renderer or device), or a worker would misbehave (a zero
        visibility timeout re-delivers every task at once)."""
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise InvalidInput(
                    f"FARM_{name.upper()} must be positive, got {getattr(self, name)!r}"
                )
        for name in _NOT_NEGATIVE:
            if getattr(self, name) < 0:
                raise InvalidInput(
                    f"FARM_{name.upper()} must be 0 or more, got {getattr(self, name)!r}"
                )
        for name in ("home", "model_dir"):
            path = getattr(self, name)
            if path.exists() and not path.is_dir():
                raise InvalidInput(f"FARM_{name.upper()} {path} exists and is not a directory")
        from models.registry import RENDERERS  # names only: no backend is imported

        if not -1 <= self.ditto_emotion <= 7:
            raise InvalidInput(
                f"FARM_DITTO_EMOTION must be -1 (the checkpoint's default) or 0..7, "
                f"got {self.ditto_emotion}"
            )
        if self.renderer not in RENDERERS:
            raise InvalidInput(
                f"FARM_RENDERER {self.renderer!r} is not a renderer; "
                f"choose one of {', '.join(RENDERERS)}"
            )
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise InvalidInput(f"FARM_DEVICE {self.device!r} is not auto, cpu, cuda or cuda:N")
        if self.broker_url:
            scheme = self.broker_url.partition("://")[0]
            if "://" not in self.broker_url or scheme not in BROKER_SCHEMES:
                raise InvalidInput(
                    f"FARM_BROKER_URL {mask_url(self.broker_url)!r} is not a broker URL; "
                    f"use one of {', '.join(s + '://' for s in BROKER_SCHEMES)}"
                )
        if self.video_encoder not in VIDEO_ENCODERS:
            raise InvalidInput(
                f"FARM_VIDEO_ENCODER {self.video_encoder!r} is not one of "
                f"{', '.join(VIDEO_ENCODERS)}"
            )
        from farm import output  # light: no numpy, no PIL until a file is decoded

        output.check_settings(self)
        check_cron(self.nightly_cron)
        if not isinstance(self.keep_intermediates, bool):
            raise InvalidInput(
                f"FARM_KEEP_INTERMEDIATES must be true or false, got {self.keep_intermediates!r}"
            )
        for name in ("intake_results", "intake_dead_letter"):
            if getattr(self, name):
                check_queue_name(getattr(self, name), f"FARM_{name.upper()}")

    def renderer_dir(self, name: str) -> Path:
        """Where a renderer's weights are: Ditto's checkpoint root, or model_dir."""
        if name == "ditto":
            return Path(self.ditto_dir) if self.ditto_dir else self.model_dir / "ditto"
        return self.model_dir

    def renderer_options(self, name: str) -> tuple[tuple[str, Any], ...]:
        """A renderer's own options, as its constructor takes them."""
        # Engines are built on the worker, so they live under FARM_MODEL_DIR, never in
        # the user's checkpoint folder (which may be read-only or shared).
        engines = ("engine_dir", str(self.model_dir / "engines"))
        if name == "ditto":
            return (("steps", self.ditto_steps), ("emotion", self.ditto_emotion), engines)
        if name == "gaussiantalker":
            return (("audio_model", self.gaussiantalker_audio_model), engines)
        return ()

    def describe(self) -> dict[str, str]:
        """Effective settings for display, with passwords in URLs masked."""
        shown = {f.name: str(getattr(self, f.name)) for f in fields(self)}
        shown.update(
            database_url=self.effective_database_url,
            broker_url=self.effective_broker_url,
            result_backend=self.effective_result_backend,
            store_url=self.effective_store_url,
        )
        if self.webhook_secret:  # a signing key is a password
            shown["webhook_secret"] = "whsec_***"
        return {k: mask_url(v) for k, v in shown.items()}

    def secret_values(self) -> list[str]:
        """Every secret these settings hold, as it could appear in a message."""
        urls = (self.database_url, self.broker_url, self.result_backend, self.store_url)
        return _secrets([self.webhook_secret, *(url_password(u) for u in urls)])

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def as_env(self) -> dict[str, str]:
        """The settings as FARM_* variables, for child processes."""
        return {f"FARM_{f.name.upper()}": str(getattr(self, f.name)) for f in fields(self)}


# Settings that only make sense above zero, and those that may also be 0.
_POSITIVE = (
    "max_script_chars",
    "max_segment_chars",
    "max_audio_seconds",
    "max_photo_pixels",
    "max_job_frames",
    "max_batch_jobs",
    "presign_seconds",
    "fps",
    "size",
    "chunk_frames",
    "render_batch",
    "render_threads",
    "render_concurrency",
    "cpu_concurrency",
    "outage_max_delay",
    "visibility_timeout",
    "embedded_idle_seconds",
    "sweep_seconds",
    "webhook_timeout",
    "intake_max_bytes",
    "live_queue_max",
)
_NOT_NEGATIVE = (
    "segment_pause_ms",
    "task_max_retries",
    "worker_max_failures",
    "outage_retries",
    "stall_seconds",
    "ditto_steps",
    "retention_days",
)
VIDEO_ENCODERS = ("auto", "h264_nvenc", "libx264")  # farm/encoders.py tries them in order
# Brokers farm runs on: Redis (the embedded default is redis+socket) and AMQP.
BROKER_SCHEMES = ("redis", "rediss", "redis+socket", "amqp", "amqps", "pyamqp")

# A crontab's five fields: (name, lowest, highest, names usable in place of numbers).
_CRON_FIELDS = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, tuple("jan feb mar apr may jun jul aug sep oct nov dec".split())),
    ("day of week", 0, 7, tuple("sun mon tue wed thu fri sat".split())),
)


def check_cron(text: str) -> None:
    """Refuse a crontab beat could not run ('99 * * * *'): five fields of '*', numbers
    in range, a-b ranges, /steps and lists; months and weekdays also by name."""
    parts = text.split()
    if len(parts) != len(_CRON_FIELDS):
        raise InvalidInput(
            f"FARM_NIGHTLY_CRON must have 5 fields (minute hour day month weekday), got {text!r}"
        )
    for part, (what, low, high, names) in zip(parts, _CRON_FIELDS, strict=True):
        for item in part.split(","):
            span, _, step = item.partition("/")
            values = [] if span == "*" else span.split("-")
            ok = len(values) <= 2 and (not step or step.isdigit() and int(step) > 0)
            for value in values:
                number = names.index(value.lower()) + low if value.lower() in names else None
                if number is None and value.isdigit():
                    number = int(value)
                ok = ok and number is not None and low <= number <= high
            if not ok:
                raise InvalidInput(
                    f"FARM_NIGHTLY_CRON {text!r}: {item!r} is not a valid {what} ({low}-{high})"
                )


def check_queue_name(name: str, what: str) -> str:
    """An AMQP queue name farm may declare: 1-255 bytes of UTF-8, printable, not in the
    broker's reserved `amq.` namespace."""
    if not name or len(name.encode()) > 255 or not name.isprintable():
        raise InvalidInput(f"{what} {name[:80]!r} is not a queue name (1-255 printable bytes)")
    if name.startswith("amq."):
        raise InvalidInput(f"{what} {name[:80]!r}: names starting with 'amq.' are the broker's")
    return name


# Credentials farm never holds itself but hands on to boto3 and the like.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _authority(value: str) -> tuple[int, int, int] | None:
    """(start, password start, end) of the `user:password@` part of a URL, if any. The
    password runs to the authority's last '@', as URL parsers read it: a raw '@' in a
    password must not leave the rest of it in view."""
    head, sep, _ = value.partition("://")
    if not sep or not head or any(c.isspace() for c in head):
        return None
    start = len(head) + 3
    stop = len(value)
    for ch in "/?#":
        at = value.find(ch, start)
        if at != -1:
            stop = min(stop, at)
    at = value.rfind("@", start, stop)
    colon = value.find(":", start, at) if at != -1 else -1
    return (start, colon + 1, at) if colon != -1 else None


def url_password(value: str) -> str:
    """The password in scheme://user:password@host..., '' when there is none."""
    span = _authority(value)
    return value[span[1] : span[2]] if span else ""


def mask_url(value: str) -> str:
    """scheme://user:secret@host -> scheme://user:***@host; other text unchanged."""
    span = _authority(value)
    if not span or span[1] == span[2]:
        return value
    return value[: span[1]] + "***" + value[span[2] :]


def _secrets(values: list[str]) -> list[str]:
    found: set[str] = set()
    for v in values:
        if v:
            found.update({v, unquote(v)})
    # Longest first, so a secret that contains another is replaced whole.
    return sorted((v for v in found if len(v) >= 3), key=len, reverse=True)


def known_secrets(env: dict[str, str] | None = None) -> list[str]:
    """The secrets of this process's configuration, read leniently: for scrubbing error
    messages even when the settings themselves do not load."""
    values = _read_dotenv(Path.cwd() / ".env", strict=False)
    values.update(os.environ if env is None else env)
    urls = ("DATABASE_URL", "BROKER_URL", "RESULT_BACKEND", "STORE_URL")
    return _secrets(
        [values.get("FARM_WEBHOOK_SECRET", "")]
        + [url_password(values.get(f"FARM_{name}", "")) for name in urls]
        + [values.get(name, "") for name in SECRET_ENV]
    )


def redact(text: str, secrets: list[str]) -> str:
    """`text` with every secret and every URL password replaced by ***."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return " ".join(mask_url(word) for word in text.split(" "))


class RedactingFilter(logging.Filter):
    """A log handler's filter that redacts secrets from every record it handles, its
    traceback included: libraries log more than farm does (botocore at DEBUG logs
    request headers, a session token among them)."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message, self.secrets)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        return True


def redact_logs(logger: logging.Logger, secrets: list[str] | None = None) -> None:
    """Redact secrets (default: this process's configuration's) in every record that
    `logger`'s handlers write, the records of child loggers included."""
    found = known_secrets() if secrets is None else secrets
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter(found))


_BOOLS = {"1": True, "true": True, "yes": True, "on": True}
_BOOLS.update({"0": False, "false": False, "no": False, "off": False})


def _coerce(name: str, type_: Any, raw: str) -> Any:
    kind = type_ if isinstance(type_, str) else getattr(type_, "__name__", str(type_))
    if kind == "bool":
        value = _BOOLS.get(raw.strip().lower())
        if value is None:
            raise InvalidInput(f"FARM_{name.upper()} must be true or false, got {raw!r}")
        return value
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw).expanduser()
    except ValueError as exc:
        what = "an integer" if kind == "int" else "a number"
        raise InvalidInput(f"FARM_{name.upper()} must be {what}, got {raw!r}") from exc
    return raw


def _read_dotenv(path: Path, strict: bool = True) -> dict[str, str]:
    """KEY=value lines of a .env file. Bytes that are not UTF-8 are an InvalidInput that
    names the line; `strict=False` reads them as U+FFFD instead (for scrubbing secrets
    from an error message, which must not fail itself)."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if strict:
            line = data[: exc.start].count(b"\n") + 1
            raise InvalidInput(f"{path} is not valid UTF-8 (line {line})") from exc
        text = data.decode("utf-8", errors="replace")
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip().removeprefix("export ").strip()] = value.strip().strip("'\"")
    return values
