"""Scheduling through the real task graph on the embedded default: real Redis, real
worker processes, real TTS and ffmpeg. The renderer is the `null` one (this test is
about scheduling, not rendering): each frame's grey level encodes its index, so the
joined video proves every frame arrived exactly once and in order."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import sqlalchemy as sa

from models.null import frame_level
from tests.probe import probe


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("farm-null")
    env = {
        **os.environ,
        "FARM_HOME": str(home),
        "FARM_RENDERER": "null",
        "FARM_EMBEDDED_IDLE_SECONDS": "600",
        "FARM_NULL_FRAME_MS": "4",
    }
    yield home, env
    subprocess.run([sys.executable, "-m", "farm", "stop"], env=env, timeout=180)


def _chunks(home):
    engine = sa.create_engine(f"sqlite:///{home / 'farm.db'}")
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT idx, start_frame, stop_frame, state, attempts FROM chunks ORDER BY idx")
        ).all()
    engine.dispose()
    return rows


def test_many_chunks_join_into_every_frame_once_in_order(home, tmp_path):
    home, env = home
    out = tmp_path / "null.mp4"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "farm",
            "submit",
            "-",
            "--chunk-frames",
            "7",
            "--size",
            "64",
            "--wait",
            "--output",
            str(out),
        ],
        input=b"One short line. And a second one, to make a few seconds of audio.",
        capture_output=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    p = probe(out)
    levels = p.frames[:, 32, 32, 0].astype(int)
    expected = np.array([frame_level(i) for i in range(p.frame_count)])
    assert np.abs(levels - expected).max() <= 3  # H.264 rounding only
    chunks = _chunks(home)
    assert len(chunks) == -(-p.frame_count // 7) > 5
    assert all(state == "done" and attempts == 1 for _, _, _, state, attempts in chunks)
    assert [c[1] for c in chunks] == list(range(0, p.frame_count, 7))
