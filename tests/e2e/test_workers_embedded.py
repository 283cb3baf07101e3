"""`farm workers` on the embedded default: the CLI starts the runtime (its embedded
Redis and worker processes) and lists the workers that answer; `resume` names them in
full or by their first part, and an unknown name is one line."""

from __future__ import annotations

import os

from tests.services import run_farm


def test_farm_workers_lists_the_embedded_workers(tmp_path):
    env = {
        **os.environ,
        "FARM_HOME": str(tmp_path / "home"),
        "FARM_RENDERER": "null",
        "FARM_EMBEDDED_IDLE_SECONDS": "60",
    }
    for name in ("FARM_BROKER_URL", "FARM_DATABASE_URL", "FARM_STORE_URL"):
        env.pop(name, None)
    try:
        listed = run_farm("workers", env=env, text=True, timeout=180)
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert lines[0].split()[:3] == ["WORKER", "RENDER", "WORK"]
        rows = {line.split()[0]: line for line in lines[1:] if not line.startswith(" ")}
        assert set(rows) == {"cpu@embedded", "render@embedded"}, listed.stdout
        assert rows["render@embedded"].split()[1:3] == ["yes", "0/3"]
        assert "render,render_bulk" in rows["render@embedded"]
        assert "- (no render queue)" in rows["cpu@embedded"]
        assert "libx264" in rows["render@embedded"]

        resumed = run_farm("workers", "resume", "render", env=env, text=True, timeout=60)
        assert resumed.returncode == 0, resumed.stderr
        assert resumed.stdout == (
            "render@embedded was taking render work; its failure count starts from 0\n"
        )
        unknown = run_farm("workers", "resume", "gpu7", env=env, text=True, timeout=60)
        assert unknown.returncode == 1 and unknown.stdout == ""
        assert unknown.stderr == (
            "farm: error: no worker named 'gpu7' answered "
            "(answering: cpu@embedded, render@embedded)\n"
        )
    finally:
        run_farm("stop", env=env, timeout=180)
