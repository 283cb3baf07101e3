"""`farm doctor`, run as a real `python -m farm.cli doctor` process with an explicit
environment: the embedded default on a fresh FARM_HOME, a dead broker, a missing S3
bucket (moto on loopback), registered avatars, and a fake H200 whose NVENC is refused
(tests/fakegpu.py). Network only to 127.0.0.1."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from farm import doctor, migrate, queries
from farm.config import Settings
from farm.context import Context
from farm.embedded import pid_file
from tests.conftest import need_service
from tests.fakegpu import DRIVER, GPU_NAME, fake_gpu, path_with
from tests.services import REDIS_URL, aws_test_env, free_port, moto_s3, redis_up

pytestmark = pytest.mark.integration

# The doctor promises an answer within ~15 s with everything down.
WITHIN_S = 15.0
CHECK_NAMES = (
    "python",
    "torch",
    "cuda",
    "tensorrt",
    "nvidia-smi",
    "ffmpeg",
    "h264_nvenc",
    "libx264",
    "video encoder",
    "broker",
    "database",
    "schema",
    "store",
    "model dir",
    "avatar",
)


@dataclass
class Run:
    rc: int
    out: str
    err: str
    seconds: float

    def lines(self, name: str) -> list[tuple[str, str]]:
        """(status, detail) of every line of check `name`."""
        found = [
            (ln[:8].strip(), ln[23:]) for ln in self.out.splitlines() if ln[8:23].strip() == name
        ]
        assert found, f"no {name!r} line in:\n{self.out}"
        return found

    def line(self, name: str) -> tuple[str, str]:
        (only,) = self.lines(name)
        return only


def doctor_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The embedded default under tmp_path: no FARM_* or AWS_* of the developer's, no
    CUDA_VISIBLE_DEVICES (it would hide a fake GPU), moto-style credentials."""
    drop = ("FARM_", "AWS_", "CUDA_VISIBLE_DEVICES")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(aws_test_env())
    env.update(FARM_HOME=str(tmp_path / "home"), FARM_MODEL_DIR=str(tmp_path / "models"))
    env.update(extra)
    return env


def run_doctor(tmp_path: Path, env: dict[str, str]) -> Run:
    """From tmp_path, so no .env file of the checkout is read."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "farm.cli", "doctor"],
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)


def test_embedded_default_on_a_fresh_home(tmp_path: Path) -> None:
    env = doctor_env(tmp_path)
    run = run_doctor(tmp_path, env)
    assert run.rc == 0, run.out + run.err
    for name in CHECK_NAMES:
        run.lines(name)
    assert run.line("libx264") == ("ok", "works")
    assert run.line("video encoder")[0] == "ok"
    assert run.line("broker") == (
        "ok",
        "embedded Redis not running: farm starts it on the next submit",
    )
    assert run.line("tensorrt")[0] == "ok"
    assert ("ok", "demo: built in") in run.lines("avatar")
    assert "Traceback" not in run.err
    # It only looked: no runtime started, no database made.
    settings = Settings.from_env(env, dotenv=tmp_path / "none")
    assert not pid_file(settings).exists()
    assert not (tmp_path / "home" / "farm.db").exists()


def test_a_dead_broker_fails_and_its_password_is_masked(tmp_path: Path) -> None:
    env = doctor_env(tmp_path, FARM_BROKER_URL="redis://:hunter2-secret@127.0.0.1:1/0")
    run = run_doctor(tmp_path, env)
    assert run.rc == 1, run.out + run.err
    status, detail = run.line("broker")
    assert status == "FAILED"
    assert "redis://:***@127.0.0.1:1/0" in detail
    assert "fix: start Redis or correct FARM_BROKER_URL" in detail
    assert "hunter2-secret" not in run.out + run.err
    assert run.err.strip() == "farm: error: 1 needed check(s) failed: broker"


def test_everything_down_answers_within_seconds(tmp_path: Path) -> None:
    env = doctor_env(
        tmp_path,
        FARM_BROKER_URL="amqp://guest:guest@127.0.0.1:1//",
        FARM_DATABASE_URL="postgresql+psycopg://farm:pw@127.0.0.1:1/farm",
        FARM_STORE_URL="s3://farm-down",
        FARM_S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
    )
    run = run_doctor(tmp_path, env)
    assert run.rc == 1, run.out + run.err
    assert run.seconds < WITHIN_S, run.out
    for name in ("broker", "database", "store"):
        assert run.line(name)[0] == "FAILED", run.out
    assert run.line("avatars")[0] == "info"  # the database line already counts it
    assert "Traceback" not in run.err


def test_a_redis_broker_that_answers(tmp_path: Path) -> None:
    need_service(redis_up(), f"Redis at {REDIS_URL}")
    run = run_doctor(tmp_path, doctor_env(tmp_path, FARM_BROKER_URL=f"{REDIS_URL}/0"))
    assert run.rc == 0, run.out + run.err
    status, detail = run.line("broker")
    assert status == "ok" and "answered in" in detail


def test_a_missing_bucket_is_named(tmp_path: Path) -> None:
    need_service(importlib.util.find_spec("moto") is not None, "moto[server]")
    with moto_s3("farm-doctor-present") as endpoint:
        env = doctor_env(
            tmp_path,
            FARM_STORE_URL="s3://no-such-bucket/farm",
            FARM_S3_ENDPOINT_URL=endpoint,
            FARM_S3_REGION="us-east-1",
        )
        run = run_doctor(tmp_path, env)
    assert run.rc == 1, run.out + run.err
    status, detail = run.line("store")
    assert status == "FAILED"
    assert "the S3 bucket 'no-such-bucket' does not exist" in detail
    assert "fix: create the bucket" in detail


def test_registered_avatars_are_found_in_the_store(tmp_path: Path) -> None:
    env = doctor_env(tmp_path)
    ctx = Context(Settings.from_env(env, dotenv=tmp_path / "none"))
    migrate.upgrade(ctx.settings.effective_database_url)
    with ctx.session() as s:
        for name in ("alice", "bob"):
            key = f"avatars/{name}/avatar.npz"
            queries.upsert_avatar(
                s, name=name, renderer="null", artifact_key=key, source_key=key, width=8, height=8
            )
    ctx.store.put_bytes("avatars/alice/avatar.npz", b"x")
    ctx.engine.dispose()
    run = run_doctor(tmp_path, env)
    assert run.rc == 1, run.out + run.err
    avatars = run.lines("avatar")
    assert ("ok", "alice: avatars/alice/avatar.npz present") in avatars
    assert ("ok", "demo: built in") in avatars
    (bob,) = [detail for status, detail in avatars if status == "FAILED"]
    assert bob.startswith("bob: avatars/bob/avatar.npz is missing from the store")
    assert "fix: register it again: farm avatar add bob --photo FILE" in bob
    assert run.line("schema") == ("ok", "at the newest migration")


def test_a_fake_h200_whose_nvenc_is_refused(tmp_path: Path) -> None:
    env = doctor_env(tmp_path, PATH=path_with(fake_gpu(tmp_path / "bin", "refused")))
    run = run_doctor(tmp_path, env)
    assert run.rc == 0, run.out + run.err
    assert run.line("nvidia-smi") == ("ok", f"{GPU_NAME}, 143771 MiB, driver {DRIVER}")
    status, detail = run.line("h264_nvenc")
    assert status == "info"
    assert "required nvenc API version" in detail
    status, detail = run.line("video encoder")
    assert status == "ok" and detail.split()[0] == "libx264"


def test_an_explicit_nvenc_that_is_refused_fails(tmp_path: Path) -> None:
    env = doctor_env(
        tmp_path,
        PATH=path_with(fake_gpu(tmp_path / "bin", "refused")),
        FARM_VIDEO_ENCODER="h264_nvenc",
    )
    run = run_doctor(tmp_path, env)
    assert run.rc == 1, run.out + run.err
    assert run.line("h264_nvenc")[0] == "FAILED"
    status, detail = run.line("video encoder")
    assert status == "FAILED" and "fix: set FARM_VIDEO_ENCODER=auto" in detail
    assert "video encoder" in run.err


# --- the library, in this process ----------------------------------------------------

CPU_TORCH = {"torch": "2.13.0+cpu", "cuda_build": None, "devices": []}


def test_no_cuda_device_matters_only_when_farm_device_asks_for_cuda() -> None:
    assert not doctor.cuda_result(CPU_TORCH, "auto").broken
    assert not doctor.cuda_result(CPU_TORCH, "cpu").broken
    wanted = doctor.cuda_result(CPU_TORCH, "cuda:1")
    assert wanted.broken and wanted.detail.startswith("no CUDA device visible to PyTorch")
    gpu = {**CPU_TORCH, "cuda_build": "12.8", "devices": [["NVIDIA H200", 150 * 2**30, "9.0"]]}
    assert doctor.cuda_result(gpu, "cuda").detail == "cuda:0 NVIDIA H200, 150 GiB, sm 9.0"


def test_tensorrt_is_never_a_failure() -> None:
    missing = doctor.tensorrt_result({**CPU_TORCH, "tensorrt": None})
    assert missing.ok and "pip install 'farm[tensorrt]'" in missing.detail
    broken = doctor.tensorrt_result({**CPU_TORCH, "tensorrt_error": "OSError: libnvinfer"})
    assert doctor.status(broken) == "info" and not broken.broken


def test_a_hung_or_crashing_check_costs_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "DEADLINE", 0.5)

    def hangs(_settings: Settings) -> list[doctor.Result]:
        time.sleep(30)
        return []

    def crashes(_settings: Settings) -> list[doctor.Result]:
        raise RuntimeError("boom")

    def fine(_settings: Settings) -> list[doctor.Result]:
        return [doctor.Result("fine", True, "yes")]

    start = time.monotonic()
    results = doctor.run(Settings(), (("hangs", hangs), ("crashes", crashes), ("fine", fine)))
    assert time.monotonic() - start < 5
    assert [(r.name, doctor.status(r)) for r in results] == [
        ("hangs", "FAILED"),
        ("crashes", "FAILED"),
        ("fine", "ok"),
    ]
    assert results[0].detail == "no answer within 0.5 s"
    assert "RuntimeError: boom" in results[1].detail
