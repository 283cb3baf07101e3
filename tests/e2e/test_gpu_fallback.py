"""A job on a GPU box whose ffmpeg lists NVENC but cannot open it (an H200 with driver
580, measured), and on one whose NVENC dies in the middle of a chunk: fake
`nvidia-smi` and `ffmpeg` first on PATH (tests/fakegpu.py), the embedded default's
real worker processes, and the MP4 probed independently."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakegpu import fake_gpu, path_with
from tests.probe import probe


def farm(home: Path, path: str, *args: str, stdin: bytes | None = None):
    env = {
        **os.environ,
        "FARM_HOME": str(home),
        "FARM_EMBEDDED_IDLE_SECONDS": "600",
        "PATH": path,
    }
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run(
        [sys.executable, "-m", "farm.cli", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=600,
    )


def worker_logs(home: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (home / "logs").glob("*.log"))


@pytest.mark.parametrize("nvenc", ["refused", "dies"])
def test_a_job_succeeds_on_a_gpu_box_with_a_broken_nvenc(tmp_path, nvenc):
    home = tmp_path / "home"
    path = path_with(fake_gpu(tmp_path / "bin", nvenc))
    out = tmp_path / "out.mp4"
    try:
        proc = farm(
            home,
            path,
            "submit",
            "-",
            "--chunk-frames",
            "20",
            "--seed",
            "3",
            "--wait",
            "--output",
            str(out),
            stdin=b"Hello from a machine without NVENC.",
        )
        logs = worker_logs(home)
    finally:
        farm(home, path, "stop")
    assert proc.returncode == 0, proc.stderr.decode() + logs[-3000:]
    info = probe(out)
    assert info.video_codec == "h264" and info.audio_codec == "aac"
    assert abs(info.frame_count - round(info.audio_seconds * 25)) <= 1
    if nvenc == "refused":
        assert "video encoder: libx264 (h264_nvenc refused: " in logs
        assert "required nvenc API version" in logs
    else:
        assert "video encoder: h264_nvenc" in logs  # its probe passed
        assert "h264_nvenc died during an encode" in logs
        assert "the retry encodes with libx264" in logs
