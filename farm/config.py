"""One frozen Settings object, read from FARM_* variables (and a .env file) at start-up.

Unset service URLs mean the embedded default: SQLite, an embedded Redis on a unix
socket, and a local artifact directory, all under FARM_HOME.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

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
    device: str = "auto"  # auto | cpu | cuda
    fps: int = 25
    size: int = 512
    chunk_frames: int = 100
    render_batch: int = 16
    render_threads: int = 1  # torch threads per render process
    render_concurrency: int = 2  # render processes the embedded runtime starts
    cpu_concurrency: int = 2
    max_script_chars: int = 20_000
    max_segment_chars: int = 400
    max_audio_seconds: float = 600.0  # longest input of `farm submit --audio`
    segment_pause_ms: int = 350
    task_max_retries: int = 3
    visibility_timeout: int = 12 * 3600  # above the longest task + queue wait (celery#5935)
    embedded_idle_seconds: int = 120
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
        return cls(**kwargs)

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

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def as_env(self) -> dict[str, str]:
        """The settings as FARM_* variables, for child processes."""
        return {f"FARM_{f.name.upper()}": str(getattr(self, f.name)) for f in fields(self)}


def mask_url(value: str) -> str:
    """scheme://user:secret@host -> scheme://user:***@host; other text unchanged."""
    return re.sub(r"(://[^/:@\s]*:)[^@/\s]+@", r"\1***@", value)


def _coerce(name: str, type_: Any, raw: str) -> Any:
    kind = type_ if isinstance(type_, str) else getattr(type_, "__name__", str(type_))
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


def _read_dotenv(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip().removeprefix("export ").strip()] = value.strip().strip("'\"")
    return values
