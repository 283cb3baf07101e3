"""docker-compose.yml and the Dockerfile, checked where no Docker engine runs.

Two halves. First the file's shape: the services, their start order, the GPU
reservation, one-shot setup steps, exactly one beat, an image target for every build.
Then every service built from our image has its command run here, as a subprocess,
with the compose environment translated to this machine: redis -> Redis on 127.0.0.1
(database 9), postgres -> a fresh Postgres database, minio -> moto's S3 server on
loopback with the bucket created, FARM_HOME and FARM_MODEL_DIR -> temporary dirs.
The one-shot migration must exit 0 and create the schema; workers must answer a
Celery ping with the queues and concurrency the compose command asks for; Flower must
serve its dashboard; beat must start and stay up; each must exit 0 on SIGTERM, which
is what `docker compose stop` sends (through tini, `init: true`).

The GPU worker's command runs too. Where no NVIDIA GPU is visible (this development
machine) it must refuse with one line and exit 1 rather than idle; where one is
visible, the same test starts it and checks one pinned worker process per GPU.
What is not checked here: that the images build and the containers reach each other.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import sqlalchemy as sa
import yaml

from tests.conftest import need_service
from tests.services import REDIS_URL, free_port, fresh_redis_db, moto_s3, redis_up

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

INFRA = {"redis", "postgres", "minio", "minio-init"}
FARM_SERVICES = {"migrate", "flower", "worker-cpu", "worker-gpu", "beat"}
LONG_RUNNING = ["worker-cpu", "flower", "beat"]
REDIS_DB = 9
READY_TIMEOUT = 90.0  # a cold Celery start on two shared cores takes ~5 s
STOP_TIMEOUT = 60.0


# --- reading the files ----------------------------------------------------------------

_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\})")


def interpolate(text: str) -> str:
    """Compose's ${VAR:-default} with the defaults as shipped (not this shell's
    environment, so the test reads the file every user gets); $$ is a literal $."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        assert m.group(2), f"{m.group(0)} has no default: the file must work without a .env"
        return m.group(3)

    return _VAR.sub(sub, text)


def _interpolated(node: Any) -> Any:
    if isinstance(node, str):
        return interpolate(node)
    if isinstance(node, list):
        return [_interpolated(v) for v in node]
    if isinstance(node, dict):
        return {k: _interpolated(v) for k, v in node.items()}
    return node


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    return _interpolated(raw)


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command")
    assert cmd, "a service on our image must name its command (the image's is --help)"
    return shlex.split(cmd) if isinstance(cmd, str) else [str(a) for a in cmd]


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def depends_on(svc: dict[str, Any]) -> dict[str, str]:
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def ours(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run our image: built here or tagged farm:*."""
    return {
        name: svc
        for name, svc in services(compose).items()
        if "build" in svc or str(svc.get("image", "")).startswith("farm:")
    }


def duration_seconds(text: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"bad duration {text!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


@dataclass
class Stage:
    name: str
    base: str
    body: str


def dockerfile_stages() -> dict[str, Stage]:
    text = DOCKERFILE.read_text(encoding="utf-8")
    head, *blocks = re.split(r"^(?=FROM\s)", text, flags=re.M)
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", head, flags=re.M))
    stages: dict[str, Stage] = {}
    for block in blocks:
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", block, flags=re.I)
        assert m and m.group(2), f"unnamed stage: {block.splitlines()[0]}"
        base = re.sub(r"\$\{(\w+)\}", lambda a: args[a.group(1)], m.group(1))
        stages[m.group(2)] = Stage(m.group(2), base, block)
    return stages


# --- the file's shape -----------------------------------------------------------------


def test_compose_spec_layout(raw: dict[str, Any]) -> None:
    assert "version" not in raw, "the compose spec dropped `version:`; compose warns on it"
    assert INFRA | FARM_SERVICES <= set(raw["services"])
    assert set(ours(raw)) == FARM_SERVICES  # nothing else may be built from our Dockerfile


def test_infrastructure_services(compose: dict[str, Any]) -> None:
    svc = services(compose)
    assert svc["redis"]["image"] == "redis:7"
    assert svc["postgres"]["image"] == "postgres:16"
    for name in ("redis", "postgres", "minio"):
        assert svc[name]["healthcheck"]["test"], f"{name} needs a healthcheck to be waited on"
        assert svc[name].get("volumes"), f"{name} would lose its data with the container"
    pg = environment(svc["postgres"])
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"} <= set(pg)

    minio = svc["minio"]
    assert minio["image"].startswith("minio/minio")
    assert command(minio)[0] == "server" and "--console-address" in command(minio)

    init = svc["minio-init"]
    assert init["image"].startswith("minio/mc")
    assert init.get("restart") == "no"
    assert depends_on(init) == {"minio": "service_healthy"}
    bucket = urlparse(environment(svc["migrate"])["FARM_STORE_URL"]).netloc
    script = " ".join(command(init))
    assert re.search(rf"\bmc mb\b[^&;]*\s\S+/{re.escape(bucket)}(\s|$)", script), script


def test_shared_environment_is_consistent(compose: dict[str, Any]) -> None:
    from farm.config import Settings

    svc = services(compose)
    envs = {name: environment(s) for name, s in ours(compose).items()}
    first = envs["migrate"]
    for name, env in envs.items():
        farm_vars = {k: v for k, v in env.items() if k.startswith(("FARM_", "AWS_"))}
        assert farm_vars == {k: v for k, v in first.items() if k.startswith(("FARM_", "AWS_"))}, (
            f"{name} does not share the x-farm environment"
        )
    # A misspelt FARM_ variable is silently ignored by Settings: catch it here.
    fields = {f"FARM_{f.upper()}" for f in Settings.__dataclass_fields__}
    assert {k for k in first if k.startswith("FARM_")} <= fields

    broker = urlparse(first["FARM_BROKER_URL"])
    assert (broker.scheme, broker.hostname, broker.port) == ("redis", "redis", 6379)

    db = sa.engine.make_url(first["FARM_DATABASE_URL"])
    pg = environment(svc["postgres"])
    assert (db.drivername, db.host, db.port) == ("postgresql+psycopg", "postgres", 5432)
    assert (db.username, db.password, db.database) == (
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        pg["POSTGRES_DB"],
    )

    assert urlparse(first["FARM_STORE_URL"]).scheme == "s3"
    endpoint = urlparse(first["FARM_S3_ENDPOINT_URL"])
    assert (endpoint.hostname, endpoint.port) == ("minio", 9000)
    minio = environment(svc["minio"])
    assert first["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert first["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]

    # Workers keep weights, TensorRT engines and avatar caches on a volume.
    for name in ("worker-cpu", "worker-gpu"):
        mounts = dict(reversed(v.split(":")[:2]) for v in svc[name]["volumes"])
        assert mounts.get(envs[name]["FARM_MODEL_DIR"]) in compose["volumes"], name


def test_migrate_is_one_shot_and_everything_waits_for_it(compose: dict[str, Any]) -> None:
    svc = services(compose)
    migrate = svc["migrate"]
    assert command(migrate) == ["farm", "db", "upgrade"]
    assert migrate.get("restart") == "no"
    assert depends_on(migrate) == {"postgres": "service_healthy"}
    for name in FARM_SERVICES - {"migrate"}:
        deps = depends_on(svc[name])
        assert deps.get("migrate") == "service_completed_successfully", name
        assert deps.get("redis") == "service_healthy", name
        assert deps.get("minio-init") == "service_completed_successfully", name
        assert svc[name].get("restart") in ("unless-stopped", "always"), name


def test_gpu_worker_reserves_every_nvidia_gpu(compose: dict[str, Any]) -> None:
    stages = dockerfile_stages()
    gpu = services(compose)["worker-gpu"]
    assert command(gpu) == ["farm", "worker", "-Q", "render", "--gpus", "all"]
    assert gpu["build"]["target"] == "gpu" and stages["gpu"].base.startswith("nvidia/cuda:")
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    # Docker's default 10 s would kill a chunk mid-render; its message then waits out
    # the 12 h visibility timeout before another worker gets it.
    assert duration_seconds(gpu["stop_grace_period"]) >= 5 * 60
    assert duration_seconds(services(compose)["worker-cpu"]["stop_grace_period"]) >= 60


def test_exactly_one_beat(compose: dict[str, Any]) -> None:
    beats = {
        name: svc
        for name, svc in services(compose).items()
        if "command" in svc and "beat" in command(svc)
    }
    assert list(beats) == ["beat"], "a second beat enqueues every periodic task twice"
    beat = beats["beat"]
    assert command(beat) == ["celery", "-A", "workers.app", "beat", "--loglevel", "INFO"]
    assert beat.get("deploy", {}).get("replicas", 1) == 1 and "scale" not in beat
    # beat writes celerybeat-schedule to its working directory: it must be writable
    # and survive a restart, so it is a volume.
    mounts = [v.split(":")[1] for v in beat.get("volumes", [])]
    assert beat.get("working_dir") in mounts


def test_every_service_on_our_image_runs_a_real_command(compose: dict[str, Any]) -> None:
    import click

    from farm.cli import main

    for name, svc in ours(compose).items():
        argv = command(svc)
        assert "entrypoint" not in svc, f"{name}: argv[0] must be what runs"
        # tini as PID 1 passes `docker compose stop`'s SIGTERM on; the stop checks
        # below send it straight to the process, as tini would.
        assert svc.get("init") is True, name
        assert argv[0] in ("farm", "celery"), f"{name}: {argv}"
        if argv[0] == "celery":
            assert argv[1:3] == ["-A", "workers.app"], f"{name}: {argv}"
            continue
        # Resolve the click command and parse its options without running it, so a
        # renamed command or option fails here even for the GPU worker, which cannot
        # run on this machine.
        cmd: click.Command = main
        args = argv[1:]
        while isinstance(cmd, click.Group):
            sub = cmd.get_command(click.Context(cmd), args[0])
            assert sub is not None, f"{name}: no command {args[0]!r} in {argv}"
            cmd, args = sub, args[1:]
        try:
            cmd.make_context(argv[0], list(args))
        except click.ClickException as exc:
            pytest.fail(f"{name}: {shlex.join(argv)}: {exc.format_message()}")


def test_dockerfile_targets_match_compose(compose: dict[str, Any]) -> None:
    stages = dockerfile_stages()
    for name, svc in ours(compose).items():
        assert svc["build"]["target"] in stages, name
        assert svc["image"] == f"farm:{svc['build']['target']}", name
    assert stages["cpu"].base.startswith("python:3.11-slim")

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    deps = project["dependencies"]
    (torch_pin,) = [d.split("==")[1] for d in deps if d.startswith("torch==")]
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(torch_pin)}$", dockerfile, flags=re.M)
    assert "download.pytorch.org/whl/cpu" in stages["cpu"].body
    assert ".[tensorrt]" in stages["gpu"].body
    for stage in stages.values():
        # The compose URL names psycopg; the image must carry it.
        assert any(d.startswith("psycopg") for d in deps) or "psycopg" in stage.body
        assert re.search(r"^USER\s+(?!root\b)\S+", stage.body, flags=re.M), stage.name

    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert ".env" in ignored and ".git" in ignored


# --- running the commands here --------------------------------------------------------


@dataclass
class Local:
    """This machine's stand-ins for the compose network's services."""

    broker_url: str
    database_url: str
    s3_endpoint: str
    home: Path
    model_dir: Path
    logs: Path

    def env_for(self, compose: dict[str, Any], svc: dict[str, Any]) -> dict[str, str]:
        translate = {
            "FARM_BROKER_URL": self.broker_url,
            "FARM_RESULT_BACKEND": self.broker_url,
            "FARM_DATABASE_URL": self.database_url,
            "FARM_S3_ENDPOINT_URL": self.s3_endpoint,
            "FARM_HOME": str(self.home),
            "FARM_MODEL_DIR": str(self.model_dir),
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        # Nothing from this shell may leak in: the container sees only what compose
        # gives it (and no GPU pinning, which is the GPU worker's own business).
        prefixes = ("FARM_", "AWS_", "CELERY_", "FLOWER_", "CUDA_VISIBLE_DEVICES")
        env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
        for key, value in environment(svc).items():
            env[key] = translate.get(key, value)
            host = urlparse(env[key]).hostname if "://" in env[key] else None
            assert host not in services(compose), f"{key}={env[key]} names a compose host"
        return env


@pytest.fixture
def local(compose: dict[str, Any], postgres_url: str, tmp_path: Path) -> Iterator[Local]:
    need_service(redis_up(), f"Redis at {REDIS_URL}")
    home, models, logs = tmp_path / "home", tmp_path / "models", tmp_path / "logs"
    for d in (home, models, logs):
        d.mkdir()
    # The bucket minio-init creates (test_infrastructure_services checks they agree).
    bucket = urlparse(environment(services(compose)["migrate"])["FARM_STORE_URL"]).netloc
    with moto_s3(bucket) as endpoint:
        broker = fresh_redis_db(REDIS_DB)
        try:
            yield Local(broker, postgres_url, endpoint, home, models, logs)
        finally:
            fresh_redis_db(REDIS_DB)  # leave no queues or pidbox keys behind


def executable(argv: list[str]) -> list[str]:
    """argv with argv[0] resolved as the image's PATH would: this interpreter's scripts."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    exe = shutil.which(argv[0], path=search)
    assert exe, f"{argv[0]} is not installed next to {sys.executable}"
    return [exe, *argv[1:]]


def override(argv: list[str], option: str, value: str) -> list[str]:
    """Replace an option's value (`--opt V` or `--opt=V`); the option must be there."""
    out, found, i = [], False, 0
    while i < len(argv):
        if argv[i] == option:
            out += [option, value]
            found, i = True, i + 2
            continue
        if argv[i].startswith(option + "="):
            out.append(f"{option}={value}")
            found = True
        else:
            out.append(argv[i])
        i += 1
    assert found, f"{option} not in {argv}"
    return out


@contextmanager
def started(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> Iterator[Any]:
    """A service process in its own process group; whatever happens, the group is gone
    at the end."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            executable(argv),
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


def stop(proc: subprocess.Popen, log: Path) -> None:
    """What `docker compose stop` does: SIGTERM to the main process, then wait. The
    process must exit 0, and take its pool children with it."""
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {STOP_TIMEOUT:.0f}s after SIGTERM:\n{tail(log)}")
    assert code == 0, f"exit status {code} after SIGTERM:\n{tail(log)}"
    deadline = time.monotonic() + 10
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"children outlived the main process:\n{tail(log)}"
        time.sleep(0.2)


def tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def wait_for(what: str, check: Any, proc: subprocess.Popen, log: Path) -> Any:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        assert proc.poll() is None, f"{what}: exited with {proc.returncode}:\n{tail(log)}"
        time.sleep(0.5)
    pytest.fail(f"{what}: not ready after {READY_TIMEOUT:.0f}s:\n{tail(log)}")


def assert_clean_log(log: Path, broker_url: str) -> None:
    """No errors, and the process names the broker it was given: an unset or ignored
    FARM_BROKER_URL would fall back to the embedded default's unix socket."""
    text = log.read_text(encoding="utf-8", errors="replace")
    for bad in ("Traceback", "Cannot connect to", "Failed to capture events", "ERROR/"):
        assert bad not in text, f"{bad!r} in the log:\n{tail(log)}"
    broker = urlparse(broker_url)
    assert f"{broker.netloc}{broker.path}" in text, f"{broker_url} not in the log:\n{tail(log)}"


def run_migrate(compose: dict[str, Any], local: Local) -> subprocess.CompletedProcess[str]:
    svc = services(compose)["migrate"]
    return subprocess.run(
        executable(command(svc)),
        env=local.env_for(compose, svc),
        cwd=local.home,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_migrate_creates_the_schema_and_is_repeatable(
    compose: dict[str, Any], local: Local
) -> None:
    from farm.db import Base

    first = run_migrate(compose, local)
    assert first.returncode == 0, first.stderr
    assert "database at head" in first.stdout and "Traceback" not in first.stderr
    engine = sa.create_engine(local.database_url)
    try:
        tables = set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert set(Base.metadata.tables) | {"alembic_version"} <= tables
    # `docker compose up` runs the one-shot again each time: at head it must succeed.
    again = run_migrate(compose, local)
    assert again.returncode == 0, again.stderr


def _celery_app(env: dict[str, str]) -> Any:
    from farm.config import Settings
    from workers.app import make_app

    return make_app(Settings.from_env(env, dotenv=Path("/nonexistent")))


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_service_starts_and_stops(
    compose: dict[str, Any], local: Local, name: str
) -> None:
    migrated = run_migrate(compose, local)  # depends_on: migrate completed successfully
    assert migrated.returncode == 0, migrated.stderr
    svc = services(compose)[name]
    argv = command(svc)
    env = local.env_for(compose, svc)
    log = local.logs / f"{name}.log"
    port = free_port()
    if name == "flower":
        # Published as 0.0.0.0:5555 in the container; here loopback and a free port.
        argv = override(override(argv, "--address", "127.0.0.1"), "--port", str(port))

    with started(argv, env, local.home, log) as proc:
        if name == "worker-cpu":
            app = _celery_app(env)
            try:
                replies = wait_for("worker ping", lambda: app.control.ping(timeout=1.0), proc, log)
                (worker,) = [n for r in replies for n in r]
                assert worker.startswith("cpu@"), worker
                inspect = app.control.inspect(destination=[worker], timeout=5.0)
                queues = inspect.active_queues()[worker]
                # -Q cpu: the cpu queue and, after it, its bulk lane (batches)
                assert [q["name"] for q in queues] == ["cpu", "cpu_bulk"]
                stats = inspect.stats()[worker]
                assert stats["pool"]["max-concurrency"] == 2  # -c 2
            finally:
                app.close()
        elif name == "flower":
            url = f"http://127.0.0.1:{port}/"
            wait_for("flower HTTP 200", lambda: _http_ok(url), proc, log)
            # Flower follows the workers through the broker's event stream.
            wait_for("flower on the broker", lambda: "Connected to" in log.read_text(), proc, log)
        else:  # beat: no schedule yet, so it starts, waits and must not fall over
            wait_for("beat: Starting", lambda: "beat: Starting" in log.read_text(), proc, log)
            time.sleep(3)
            assert proc.poll() is None, tail(log)
            assert list(local.home.glob("celerybeat-schedule*")), "no schedule state written"
        assert_clean_log(log, local.broker_url)
        stop(proc, log)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _visible_gpus(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from farm.gpus import visible_gpus

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # as in the container
    return visible_gpus()


def test_gpu_worker_command(
    compose: dict[str, Any], local: Local, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = services(compose)["worker-gpu"]
    argv = command(svc)
    env = local.env_for(compose, svc)
    gpus = _visible_gpus(monkeypatch)
    if not gpus:
        # This development machine: the worker must say why it will not start, once,
        # and exit non-zero (compose then shows the service as failed).
        proc = subprocess.run(
            executable(argv),
            env=env,
            cwd=local.home,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1, proc.stderr
        assert proc.stdout == ""
        lines = proc.stderr.splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith("farm: error: ") and "no NVIDIA GPU is visible" in lines[0]
        return

    # A machine with NVIDIA GPUs: one worker process per GPU, each with concurrency 1.
    migrated = run_migrate(compose, local)
    assert migrated.returncode == 0, migrated.stderr
    log = local.logs / "worker-gpu.log"
    with started(argv, env, local.home, log) as proc:
        app = _celery_app(env)
        try:

            def all_up() -> list[str]:
                names = [n for r in app.control.ping(timeout=1.0) or [] for n in r]
                return names if len(names) == len(gpus) else []

            workers = wait_for("a worker per GPU", all_up, proc, log)
            assert sorted(n.split("@")[0] for n in workers) == sorted(
                f"render-gpu{g}" for g in gpus
            )
            stats = app.control.inspect(destination=workers, timeout=5.0).stats()
            assert all(stats[w]["pool"]["max-concurrency"] == 1 for w in workers)
        finally:
            app.close()
        stop(proc, log)


def test_translation_leaves_no_compose_hostname(compose: dict[str, Any], tmp_path: Path) -> None:
    """The translation itself can fail: an untranslated service URL is caught."""
    loopback = "http://127.0.0.1:1"
    local = Local("redis://127.0.0.1:6379/9", "sqlite://", loopback, tmp_path, tmp_path, tmp_path)
    svc = dict(services(compose)["worker-cpu"])
    svc["environment"] = {**environment(svc), "FARM_EXTRA_URL": "http://minio:9000/x"}
    with pytest.raises(AssertionError, match="names a compose host"):
        local.env_for(compose, svc)
