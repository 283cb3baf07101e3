"""GPU workers on the fake H200 of tests/fakegpu.py, with real Redis: an explicit
FARM_VIDEO_ENCODER that cannot encode stops `farm worker` at start-up, with ffmpeg's
reason, instead of failing every chunk it would take; `--per-gpu` starts that many
pinned processes per GPU."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from tests.conftest import need_service
from tests.fakegpu import fake_gpu, path_with
from tests.services import farm_argv, fresh_redis_db, redis_up


def _worker(tmp_path, encoder: str, nvenc: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "FARM_HOME": str(tmp_path / "home"),
        "FARM_BROKER_URL": fresh_redis_db(9),
        "FARM_DATABASE_URL": f"sqlite:///{tmp_path / 'farm.db'}",
        "FARM_VIDEO_ENCODER": encoder,
        "PATH": path_with(fake_gpu(tmp_path / "bin", nvenc)),
    }
    env.pop("CUDA_VISIBLE_DEVICES", None)
    # A worker that did start would run until the timeout: the test would fail.
    return subprocess.run(
        farm_argv("worker", "-Q", "render", "-n", "encoder-test"),
        capture_output=True,
        env=env,
        timeout=60,
    )


def test_an_explicit_nvenc_that_cannot_open_stops_the_worker(tmp_path):
    need_service(redis_up(), "Redis at 127.0.0.1:6379")
    proc = _worker(tmp_path, "h264_nvenc", "refused")
    err = proc.stderr.decode()
    assert proc.returncode == 3, err[-2000:]
    assert (
        "farm worker: cannot start: no usable video encoder (FARM_VIDEO_ENCODER=h264_nvenc)" in err
    )
    assert "required nvenc API version" in err


def test_per_gpu_starts_that_many_pinned_workers(tmp_path):
    need_service(redis_up(), "Redis at 127.0.0.1:6379")
    from farm.config import Settings
    from workers.app import make_app

    broker = fresh_redis_db(9)
    env = {
        **os.environ,
        "FARM_HOME": str(tmp_path / "home"),
        "FARM_BROKER_URL": broker,
        "FARM_DATABASE_URL": f"sqlite:///{tmp_path / 'farm.db'}",
        "PATH": path_with(fake_gpu(tmp_path / "bin", "works")),
    }
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.Popen(
        farm_argv("worker", "-Q", "render", "--gpus", "all", "--per-gpu", "2"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    app = make_app(Settings(broker_url=broker))
    seen: set[str] = set()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(seen) < 2:
            seen |= {name for reply in app.control.ping(timeout=1.0) or [] for name in reply}
    finally:
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1].decode()
        app.close()
    assert {name.split("@")[0] for name in seen} == {"render-gpu0-0", "render-gpu0-1"}, err
