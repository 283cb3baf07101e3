"""`farm doctor`: is this machine and this configuration able to run farm work?

One small result per line: ok or not, what was seen, and the fix. A result is `needed`
when the configuration depends on it, so only those make the doctor fail: NVENC refused
under FARM_VIDEO_ENCODER=auto, no GPU under FARM_DEVICE=auto or no TensorRT are facts
about the machine, not faults.

The doctor only looks: it never starts the embedded runtime, never migrates, and never
imports torch here (farm/ must not: CUDA must not be initialised before a worker forks);
torch, CUDA and TensorRT are asked about in a child Python. Every check runs at once in
its own thread, each network call has a short timeout, and the whole run a deadline, so
a host that drops packets costs one line, not minutes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from farm.config import Settings, mask_url, redact
from farm.errors import FarmError

NET_TIMEOUT = 3  # seconds to connect to (and hear from) a broker or database
TORCH_TIMEOUT = 10  # a cold `import torch` takes a few seconds
DEADLINE = 12  # the whole run: a check still going then is reported as hung


@dataclass(frozen=True)
class Result:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    needed: bool = True  # the configuration depends on it: not ok means broken

    @property
    def broken(self) -> bool:
        return self.needed and not self.ok


class Unhealthy(FarmError):
    """Something the configuration needs is broken (the lines above say what)."""


Check = Callable[[Settings], list[Result]]
T = TypeVar("T")


def _error(exc: BaseException, settings: Settings) -> str:
    """An exception as one line, with the configuration's secrets and URL passwords masked."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return redact(text, settings.secret_values())


def _ms(start: float) -> str:
    return f"{(time.monotonic() - start) * 1000:.0f} ms"


# --- this machine -------------------------------------------------------------


def check_python(settings: Settings) -> list[Result]:
    version = sys.version.split()[0]
    return [Result("python", True, f"{version} ({sys.executable})")]


# Run in a child Python: importing torch here would initialise CUDA in the CLI.
_TORCH_PROBE = """
import json
out = {}
try:
    import torch
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
    raise SystemExit
out["torch"] = torch.__version__
out["cuda_build"] = torch.version.cuda
out["devices"] = []
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out["devices"].append([p.name, p.total_memory, f"{p.major}.{p.minor}"])
try:
    import tensorrt
    out["tensorrt"] = tensorrt.__version__
except ImportError:
    out["tensorrt"] = None
except Exception as exc:
    out["tensorrt_error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def torch_info() -> dict:
    """What a worker's Python sees: torch's version, CUDA devices, TensorRT."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _TORCH_PROBE],
            capture_output=True,
            text=True,
            timeout=TORCH_TIMEOUT,
        )
    except subprocess.TimeoutExpired:  # a busy machine, not a broken install
        return {"error": f"importing torch took over {TORCH_TIMEOUT} s: not checked", "slow": 1}
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the torch probe failed: {tail}"}


def check_torch(settings: Settings) -> list[Result]:
    info = torch_info()
    if "error" in info:
        fix = "pip install -e . (torch is a worker dependency)"
        needed = settings.renderer != "null" and "slow" not in info
        return [Result("torch", False, info["error"], fix, needed)]
    return [
        Result("torch", True, info["torch"]),
        cuda_result(info, settings.device),
        tensorrt_result(info),
    ]


def cuda_result(info: dict, device: str) -> Result:
    """The CUDA devices torch sees; none is fine unless FARM_DEVICE asks for CUDA."""
    devices = [
        f"cuda:{i} {n}, {m / 2**30:.0f} GiB, sm {c}" for i, (n, m, c) in enumerate(info["devices"])
    ]
    if devices:
        return Result("cuda", True, "; ".join(devices))
    why = "" if info.get("cuda_build") else f" (torch {info['torch']} is a CPU-only build)"
    fix = "install a CUDA build of torch and the NVIDIA driver, or set FARM_DEVICE=auto"
    wanted = device.startswith("cuda")
    return Result("cuda", not wanted, f"no CUDA device visible to PyTorch{why}", fix, wanted)


def tensorrt_result(info: dict) -> Result:
    """TensorRT is optional (the farm[tensorrt] extra): never a failure."""
    if info.get("tensorrt"):
        return Result("tensorrt", True, info["tensorrt"], needed=False)
    if "tensorrt_error" in info:
        return Result("tensorrt", False, f"does not import: {info['tensorrt_error']}", needed=False)
    return Result(
        "tensorrt", True, "not installed: pip install 'farm[tensorrt]' on GPU workers", needed=False
    )


def check_nvidia_smi(settings: Settings) -> list[Result]:
    """The driver's view of the GPUs (name, memory, driver version), when there is one."""
    exe = shutil.which("nvidia-smi")
    wanted = settings.device.startswith("cuda")
    if exe is None:
        fix = "install the NVIDIA driver"
        return [Result("nvidia-smi", not wanted, "not found: no NVIDIA driver here", fix, wanted)]
    query = [exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        proc = subprocess.run(query, capture_output=True, text=True, timeout=NET_TIMEOUT * 2)
    except (OSError, subprocess.SubprocessError) as exc:
        return [Result("nvidia-smi", False, f"{exe}: {exc}", "check the NVIDIA driver", wanted)]
    gpus = [_gpu_line(line) for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not gpus:
        said = " ".join((proc.stderr or proc.stdout).split()) or f"exit status {proc.returncode}"
        return [Result("nvidia-smi", False, f"{exe}: {said}", "check the NVIDIA driver", wanted)]
    return [Result("nvidia-smi", True, "; ".join(gpus), needed=wanted)]


def _gpu_line(csv_line: str) -> str:
    """'NVIDIA H200, 143771 MiB, 580.95.05' -> 'NVIDIA H200, 143771 MiB, driver 580.95.05'."""
    *head, driver = [f.strip() for f in csv_line.split(",")]
    return ", ".join([*head, f"driver {driver}"])


def check_ffmpeg(settings: Settings) -> list[Result]:
    from farm.media import ffmpeg_exe

    fix = "install ffmpeg, or pip install imageio-ffmpeg"
    try:
        exe = ffmpeg_exe()
        proc = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=10)
    except Exception as exc:
        return [Result("ffmpeg", False, f"cannot run: {_error(exc, settings)}", fix)]
    first = (proc.stdout.splitlines() or ["no output"])[0].split(" Copyright")[0]
    return [Result("ffmpeg", proc.returncode == 0, f"{exe}: {first}", fix)]


ENCODER_FIXES = {
    "h264_nvenc": "set FARM_VIDEO_ENCODER=auto (or libx264)",
    "libx264": "install an ffmpeg with libx264 (pip install imageio-ffmpeg)",
}


def check_encoders(settings: Settings) -> list[Result]:
    """Each encoder by a real test encode (farm/encoders.py), then the one workers pick.
    A refused encoder matters only when FARM_VIDEO_ENCODER names it."""
    from farm import encoders

    results = []
    for codec in encoders.ENCODERS:
        probe = encoders.probe(codec)
        needed = settings.video_encoder == codec
        detail = "works" if probe.ok else f"not usable here: {probe.reason}"
        fix = ENCODER_FIXES[codec] if needed else ""
        results.append(Result(codec, probe.ok, detail, fix, needed))
    try:
        choice = encoders.choose(settings.video_encoder)
    except encoders.EncoderError as exc:
        fix = "set FARM_VIDEO_ENCODER=auto, and install an ffmpeg with libx264"
        return [*results, Result("video encoder", False, _error(exc, settings), fix)]
    return [*results, Result("video encoder", True, choice.reason)]


def check_model_dir(settings: Settings) -> list[Result]:
    """Workers download weights there and write caches: it must take a file."""
    path = settings.model_dir
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-") as fh:
            fh.write(b"ok")
            fh.flush()
    except OSError as exc:
        fix = "make it writable, or point FARM_MODEL_DIR elsewhere"
        return [Result("model dir", False, f"{path} is not writable: {exc}", fix)]
    return [Result("model dir", True, f"{path} is writable")]


# --- the configured services ---------------------------------------------------


def check_broker(settings: Settings) -> list[Result]:
    import kombu  # noqa: F401 - imported before the clock starts
    import redis  # noqa: F401

    if settings.embedded:
        return [embedded_broker(settings)]
    url = settings.broker_url
    shown = mask_url(url)
    redis_like = url.startswith(("redis://", "rediss://", "redis+socket://"))
    fix = "start Redis" if redis_like else "start the broker"
    fix += " or correct FARM_BROKER_URL"
    start = time.monotonic()
    try:
        ping_redis(url) if redis_like else ping_kombu(url)
    except Exception as exc:
        return [Result("broker", False, f"{shown}: {_error(exc, settings)}", fix)]
    return [Result("broker", True, f"{shown} answered in {_ms(start)}")]


def embedded_broker(settings: Settings) -> Result:
    """The embedded Redis is farm's own: not running is fine (never started here)."""
    from farm import embedded

    pid = embedded.running_pid(settings)
    if pid is None:
        detail = "embedded Redis not running: farm starts it on the next submit"
        return Result("broker", True, detail)
    url = settings.effective_broker_url
    try:
        ping_redis(url)
    except Exception as exc:
        detail = f"embedded runtime (pid {pid}) does not answer on {url}: {_error(exc, settings)}"
        return Result("broker", False, detail, "farm stop, then submit again")
    return Result("broker", True, f"embedded Redis running (pid {pid}) on {url}")


def ping_redis(url: str) -> None:
    import redis

    if url.startswith("redis+socket://"):
        url = "unix://" + url.removeprefix("redis+socket://")
    client = redis.Redis.from_url(
        url, socket_connect_timeout=NET_TIMEOUT, socket_timeout=NET_TIMEOUT
    )
    try:
        client.ping()
    finally:
        client.close()


def ping_kombu(url: str) -> None:
    """AMQP brokers: one connection attempt, then one retry."""
    import kombu

    with kombu.Connection(url, connect_timeout=NET_TIMEOUT) as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=NET_TIMEOUT)


def engine(settings: Settings) -> Any:
    """The configured database with a short connect timeout (the workers' is 10 s)."""
    import sqlalchemy as sa

    from farm.db import make_engine

    url = settings.effective_database_url
    if url.startswith("postgresql") and "connect_timeout=" not in url:
        return sa.create_engine(url, connect_args={"connect_timeout": NET_TIMEOUT})
    return make_engine(url)


def with_database(settings: Settings, use: Callable[[Any], T]) -> T:
    """`use(engine)` on the configured database, the engine disposed afterwards."""
    db = engine(settings)
    try:
        return use(db)
    finally:
        db.dispose()


def _sqlite_missing(settings: Settings) -> bool:
    """The embedded default's database file is made on first use; asking would make it."""
    return not settings.database_url and not (settings.home / "farm.db").exists()


def _db_error(exc: Exception, settings: Settings) -> str:
    """The driver's own words (SQLAlchemy's wrapper adds a link and the statement)."""
    return _error(getattr(exc, "orig", None) or exc, settings)


def check_database(settings: Settings) -> list[Result]:
    import sqlalchemy as sa

    from farm import migrate

    url = settings.effective_database_url
    shown = mask_url(url)
    if _sqlite_missing(settings):
        return [
            Result("database", True, f"{shown} not created yet: farm makes it on first use"),
            Result("schema", True, "no tables yet: farm creates them on first use"),
        ]
    start = time.monotonic()

    def ask(db: Any) -> tuple[str, bool]:
        with db.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return _ms(start), migrate.is_current(db, url)

    try:
        elapsed, current = with_database(settings, ask)
    except Exception as exc:
        fix = "start the database or correct FARM_DATABASE_URL"
        return [Result("database", False, f"{shown}: {_db_error(exc, settings)}", fix)]
    answered = Result("database", True, f"{shown} answered in {elapsed}")
    return [answered, schema_result(current, settings)]


def schema_result(current: bool, settings: Settings) -> Result:
    if current:
        return Result("schema", True, "at the newest migration")
    if not settings.database_url:  # farm upgrades its own SQLite file on first use
        return Result("schema", True, "behind: farm upgrades it on the next command")
    return Result("schema", False, "behind the newest migration", "run 'farm db upgrade'")


def check_store(settings: Settings) -> list[Result]:
    from farm.stores import open_store

    shown = mask_url(settings.effective_store_url)
    fix = "create the bucket or correct FARM_STORE_URL"
    if settings.store_url.startswith("s3://"):
        fix += ", FARM_S3_ENDPOINT_URL and the credentials"
    start = time.monotonic()
    try:
        open_store(settings).check()
    except Exception as exc:
        return [Result("store", False, f"{shown}: {_error(exc, settings)}", fix)]
    return [Result("store", True, f"{shown} answered in {_ms(start)}")]


def check_avatars(settings: Settings) -> list[Result]:
    """Every registered avatar's artifact is in the store; `demo` is built in. Lines
    that only repeat a database or store failure are not `needed` (counted once)."""
    from sqlalchemy.orm import Session

    from farm import queries
    from farm.jobs import BUILTIN_AVATARS
    from farm.stores import open_store

    def listed(db: Any) -> list[tuple[str, str]]:
        with Session(db) as session:
            return [(a.name, a.artifact_key) for a in queries.list_avatars(session)]

    rows = []
    if not _sqlite_missing(settings):
        try:
            rows = with_database(settings, listed)
        except Exception as exc:
            why = _db_error(exc, settings)
            return [Result("avatars", False, f"not listed: {why}", needed=False)]
    results = [
        Result("avatar", True, f"{n}: built in") for n in BUILTIN_AVATARS if n not in dict(rows)
    ]
    if not rows:
        return results
    try:
        store = open_store(settings)
    except Exception as exc:  # the store line says why
        return [*results, Result("avatars", False, f"not checked: {exc}", needed=False)]
    return results + [_avatar_result(store, name, key, settings) for name, key in rows]


def _avatar_result(store: Any, name: str, key: str, settings: Settings) -> Result:
    try:
        present = store.exists(key)
    except Exception as exc:
        return Result(
            "avatar", False, f"{name}: not checked: {_error(exc, settings)}", needed=False
        )
    if present:
        return Result("avatar", True, f"{name}: {key} present")
    fix = f"register it again: farm avatar add {name} --photo FILE"
    return Result("avatar", False, f"{name}: {key} is missing from the store", fix)


def check_ditto(settings: Settings) -> list[Result]:
    """Ditto's checkpoint root has every file (a quick look: `farm models check ditto`
    loads each one). Only when the configuration uses Ditto."""
    if settings.renderer != "ditto" and not settings.ditto_dir:
        return []
    from models.ditto.checkpoints import FILES  # the layout only: no torch

    root = settings.renderer_dir("ditto")
    missing = [rel for rel in FILES.values() if not (root / rel).is_file()]
    if missing:
        fix = "download Ditto's checkpoints there, or point FARM_DITTO_DIR at them"
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        return [Result("ditto checkpoints", False, f"{root}: missing {shown}", fix)]
    detail = f"{root}: all {len(FILES)} files present (farm models check ditto loads them)"
    return [Result("ditto checkpoints", True, detail)]


CHECKS: tuple[tuple[str, Check], ...] = (
    ("python", check_python),
    ("torch", check_torch),
    ("nvidia-smi", check_nvidia_smi),
    ("ffmpeg", check_ffmpeg),
    ("encoders", check_encoders),
    ("broker", check_broker),
    ("database", check_database),
    ("store", check_store),
    ("model dir", check_model_dir),
    ("avatars", check_avatars),
    ("ditto", check_ditto),
)


class _Running(threading.Thread):
    """One check in a daemon thread: one that hangs past the deadline is reported and
    left behind (the process exits without waiting for it)."""

    def __init__(self, name: str, check: Check, settings: Settings) -> None:
        super().__init__(name=f"doctor-{name}", daemon=True)
        self.label, self.check, self.settings = name, check, settings
        self.results: list[Result] | None = None
        self.start()

    def run(self) -> None:
        try:
            self.results = self.check(self.settings)
        except Exception as exc:  # a bug in a check must not hide the other lines
            detail = f"the check itself failed: {type(exc).__name__}: {_error(exc, self.settings)}"
            self.results = [Result(self.label, False, detail)]

    def collect(self, deadline: float) -> list[Result]:
        self.join(max(0.0, deadline - time.monotonic()))
        if self.results is None:
            return [Result(self.label, False, f"no answer within {DEADLINE} s", HUNG_FIX)]
        return self.results


HUNG_FIX = "a service or disk it uses does not answer: check it and the network to it"


def run(settings: Settings, checks: tuple[tuple[str, Check], ...] = CHECKS) -> list[Result]:
    """Every check, at once; the results in the order of `checks`."""
    deadline = time.monotonic() + DEADLINE
    running = [_Running(name, check, settings) for name, check in checks]
    return [r for t in running for r in t.collect(deadline)]


def broken(results: list[Result]) -> list[Result]:
    return [r for r in results if r.broken]


def status(result: Result) -> str:
    """ok, FAILED (the configuration needs it), or info (a fact, not a fault)."""
    if result.ok:
        return "ok"
    return "FAILED" if result.needed else "info"


def line(result: Result, clean: Callable[[str], str] = str) -> str:
    """STATUS  NAME  detail — fix: ..., the detail and fix passed through `clean` (the
    CLI's: one printable line, secrets masked)."""
    text = f"{status(result):8}{result.name:15}{clean(result.detail)}"
    return text + (f" — fix: {clean(result.fix)}" if result.fix and not result.ok else "")
