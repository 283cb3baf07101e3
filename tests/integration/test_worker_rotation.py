"""A render worker that takes itself out of rotation (farm/health.py, workers/health.py),
with real worker processes on real Redis and Postgres.

The renderers are the `null` renderer's fault injection (models/null.py): this is about
scheduling, not pixels. The bad worker's renderer raises a CUDA-like RuntimeError on
every chunk (FARM_NULL_FAIL); both render workers raise InvalidInput for jobs 96 pixels
wide (FARM_NULL_BAD_WIDTH), an input error that must not count against them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import sqlalchemy as sa

from tests.conftest import need_service
from tests.fakegpu import DRIVER, GPU_NAME, fake_gpu, path_with
from tests.probe import probe
from tests.services import Workers, farm_argv, fresh_redis_db, redis_up, run_farm, submit_script

REDIS_DB = 11
FARM_ENV = {
    # No retries at all: the job can only succeed if the chunks the bad worker failed
    # went back to the queue without spending one.
    "FARM_TASK_MAX_RETRIES": "0",
    "FARM_WORKER_MAX_FAILURES": "2",
    "FARM_NULL_BAD_WIDTH": "96",
}
CUDA = "CUDA error: an illegal memory access was encountered"
SCRIPT = (
    b"A bad GPU host must not sink the nightly batch. It fails its chunks, leaves the "
    b"rotation, and the healthy worker renders every chunk of this job."
)


def _job(url: str, job_id: str) -> tuple[str, str | None]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        row = conn.execute(
            sa.text("SELECT state, error FROM jobs WHERE id = :j"), {"j": job_id}
        ).one()
    engine.dispose()
    return row[0], row[1]


def _chunk_workers(url: str, job_id: str) -> set[str]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT worker FROM chunks WHERE job_id = :j"), {"j": job_id}
        ).all()
    engine.dispose()
    return {r[0].split("@")[0] for r in rows}


def _wait_final(url: str, job_id: str, timeout: float = 60) -> tuple[str, str | None]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, error = _job(url, job_id)
        if state in ("succeeded", "failed", "cancelled"):
            return state, error
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end")


def _submit(env: dict[str, str], script: bytes, *args: str) -> str:
    out, err = submit_script(env, script, *args).communicate(timeout=60)
    assert out.strip(), err.decode()
    return out.decode().split()[0]


def _listing(env: dict[str, str]) -> dict[str, str]:
    """`farm workers`: each worker's line and the lines indented under it."""
    proc = run_farm("workers", "--timeout", "1", env=env, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    blocks: dict[str, str] = {}
    name = ""
    for line in proc.stdout.splitlines()[1:]:
        if line.startswith(" "):
            blocks[name] += "\n" + line
        else:
            name = line.split("@")[0]
            blocks[name] = line
    return blocks


def test_a_failing_worker_leaves_rotation_and_another_finishes_the_job(farm_env, tmp_path):
    env, url = farm_env, farm_env["FARM_DATABASE_URL"]
    workers = Workers(env, tmp_path)
    workers.start("cpu", "cpu", concurrency=2)
    workers.start("good", "render", FARM_NULL_FRAME_MS="40")
    workers.start("bad", "render", FARM_NULL_FAIL=CUDA)
    try:
        workers.wait_ready()

        # Input errors, wherever they land, count against no worker: three one-chunk
        # jobs on two workers put two on one of them, the limit.
        inputs = [_submit(env, b"Hi.", "--size", "96", "--chunk-frames", "100") for _ in "abc"]
        for job_id in inputs:
            state, error = _wait_final(url, job_id)
            assert state == "failed" and "injected input error" in (error or ""), error
        listed = _listing(env)
        assert " yes " in listed["bad"] and " 0/2 " in listed["bad"], listed
        assert " yes " in listed["good"] and " 0/2 " in listed["good"], listed

        out = tmp_path / "out.mp4"
        proc = submit_script(
            env, SCRIPT, "--fps", "10", "--chunk-frames", "4", "--wait", "--output", str(out)
        )
        stdout, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
        job_id = stdout.decode().split()[0]
        assert _chunk_workers(url, job_id) == {"good"}
        video = probe(out)
        assert video.width == 64 and video.frame_count > 40 and video.audio_seconds > 3

        listed = _listing(env)
        assert "NO (out of rotation)" in listed["bad"] and " 2/2 " in listed["bad"], listed
        assert f"last error: RuntimeError: {CUDA}" in listed["bad"]
        assert re.search(
            r"out of rotation since [-0-9: ]+ UTC: 2 render failures in a row", listed["bad"]
        )
        assert re.search(r" 2/2 +- ", listed["bad"]), listed["bad"]  # consumes no queue
        assert " yes " in listed["good"] and "null on cpu" in listed["good"], listed
        assert "libx264" in listed["good"]

        resumed = run_farm("workers", "resume", "bad", env=env, text=True, timeout=60)
        assert resumed.returncode == 0, resumed.stderr
        assert "takes render work again (render, render_bulk)" in resumed.stdout
        listed = _listing(env)
        assert " yes " in listed["bad"] and " 0/2 " in listed["bad"], listed
        assert "render,render_bulk" in listed["bad"]

        # It consumes again: alone, it takes the next job's chunk (and, with no other
        # worker to take it and no retries, the job fails with its error).
        workers.stop_one("good")
        job_id = _submit(env, b"Hi.", "--chunk-frames", "100")
        state, error = _wait_final(url, job_id)
        assert state == "failed" and CUDA in (error or ""), error
        assert _chunk_workers(url, job_id) == {"bad"}
    finally:
        workers.stop()


def test_farm_workers_shows_a_gpu_workers_gpu_render_path_and_encoder(tmp_path):
    """On the fake H200 of tests/fakegpu.py (its NVENC 'works'): the GPU a pinned worker
    sees, with nvidia-smi's name, and the encoder its test encode chose."""
    need_service(redis_up(), "Redis at 127.0.0.1:6379")
    env = {
        **os.environ,
        "FARM_HOME": str(tmp_path / "home"),
        "FARM_BROKER_URL": fresh_redis_db(REDIS_DB),
        "FARM_DATABASE_URL": f"sqlite:///{tmp_path / 'farm.db'}",
        "FARM_RENDERER": "null",
        "PATH": path_with(fake_gpu(tmp_path / "bin", "works")),
    }
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.Popen(
        farm_argv("worker", "-Q", "render", "--gpus", "all", "-n", "render"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        listed = run_farm("workers", env=env, text=True, timeout=60)
        while listed.returncode != 0 and time.monotonic() < deadline:
            listed = run_farm("workers", env=env, text=True, timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1].decode()
    gone = run_farm("workers", "--timeout", "0.5", env=env, text=True, timeout=60)
    fresh_redis_db(REDIS_DB)
    assert listed.returncode == 0, listed.stderr + err[-2000:]
    (row,) = listed.stdout.splitlines()[1:]
    assert row.startswith("render-gpu0@") and " yes " in row, row
    assert f"GPU 0: {GPU_NAME}, 143771 MiB, driver {DRIVER}" in row
    assert "null, not loaded yet (FARM_DEVICE=cuda)" in row and row.endswith("h264_nvenc")
    assert gone.returncode == 1  # stopped: nobody answers, in one line
    assert gone.stderr == "farm: error: no worker answered within 0.5 s\n"
