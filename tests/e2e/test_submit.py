"""The whole graph on the embedded default: `farm submit --wait` as a subprocess,
real worker processes, real TTS and renderer, and the MP4 probed independently."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.probe import mouth_box, probe, speech_mask

SCRIPT = (
    "Hello there. My name is Ada, and I speak from a single photo.\n\n"
    "Papa bought a big blue balloon at the market."
)


def farm(home: Path, *args: str, stdin: bytes | None = None, timeout: float = 600):
    env = {**os.environ, "FARM_HOME": str(home), "FARM_EMBEDDED_IDLE_SECONDS": "600"}
    return subprocess.run(
        [sys.executable, "-m", "farm.cli", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("farm-home")
    yield home
    farm(home, "stop")


@pytest.fixture(scope="module")
def rendered(home, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "hello.mp4"
    script = home / "script.txt"
    script.write_text(SCRIPT)
    proc = farm(
        home,
        "submit",
        str(script),
        "--avatar",
        "demo",
        "--chunk-frames",
        "40",
        "--seed",
        "7",
        "--wait",
        "--output",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().split()
    return lines[0], out, proc


def test_submit_prints_job_id_then_the_output_path(rendered):
    job_id, out, proc = rendered
    assert len(job_id) == 32 and proc.stdout.decode().split()[-1] == str(out)
    assert "rendering" in proc.stderr.decode()  # progress went to stderr
    assert out.stat().st_size > 10_000


def test_mp4_streams_frame_count_and_durations(rendered):
    _, out, _ = rendered
    p = probe(out)
    assert p.video_codec == "h264" and p.audio_codec == "aac"
    assert (p.width, p.height) == (512, 512) and p.fps == 25
    assert 3.0 < p.audio_seconds < 20.0
    assert abs(p.frame_count - math.ceil(p.audio_seconds * 25)) <= 1
    assert abs(p.video_seconds - p.audio_seconds) <= 1 / 25 + 0.03  # AAC priming slack


def test_mouth_moves_more_during_speech_than_silence(rendered):
    _, out, _ = rendered
    p = probe(out)
    speaking = speech_mask(p)
    assert speaking.sum() > 25 and (~speaking).sum() > 10, "need both speech and silence"
    x0, y0, x1, y1 = mouth_box(p.frames[0])
    mouth = p.frames[:, y0:y1, x0:x1].astype(np.float32)
    motion = np.abs(np.diff(mouth, axis=0)).mean(axis=(1, 2, 3))
    moving_in_speech = motion[speaking[1:]].mean()
    moving_in_silence = motion[~speaking[1:]].mean()
    assert moving_in_speech > 2.0 * moving_in_silence, (moving_in_speech, moving_in_silence)


def test_status_and_jobs_show_the_finished_job(home, rendered):
    job_id, _, _ = rendered
    status = farm(home, "status", job_id[:8])
    text = status.stdout.decode()
    assert status.returncode == 0 and "succeeded" in text and "final.mp4" in text
    assert "chunks    " in text and "timings" in text
    listing = farm(home, "jobs").stdout.decode()
    assert job_id[:12] in listing and "succeeded" in listing


def test_submit_without_wait_returns_at_once_and_cancel_stops_it(home):
    proc = farm(home, "submit", "-", "--chunk-frames", "10", stdin=b"Cancel me. " * 30)
    assert proc.returncode == 0, proc.stderr.decode()
    job_id = proc.stdout.decode().strip()
    cancel = farm(home, "cancel", job_id)
    assert cancel.returncode == 0, cancel.stderr.decode()
    status = farm(home, "status", job_id).stdout.decode()
    assert "cancelled" in status
    again = farm(home, "cancel", job_id)
    assert again.returncode == 1 and "already cancelled" in again.stderr.decode()


def test_avatar_add_registers_a_photo_and_refuses_one_without_a_face(home, tmp_path):
    from PIL import Image
    from skimage.data import astronaut

    photo = tmp_path / "ada.jpg"
    Image.fromarray(astronaut()).save(photo)
    added = farm(home, "avatar", "add", "ada", "--photo", str(photo))
    assert added.returncode == 0, added.stderr.decode()
    shown = farm(home, "avatar", "show", "ada").stdout.decode()
    assert "portrait" in shown and "512x512" in shown

    blank = tmp_path / "wall.png"
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(blank)
    refused = farm(home, "avatar", "add", "wall", "--photo", str(blank))
    assert refused.returncode == 1
    assert refused.stderr.decode().strip().splitlines() == [
        "farm: error: no face found in the photo"
    ]
    assert "wall" not in farm(home, "avatar", "list").stdout.decode()
    assert not (home / "artifacts" / "avatars" / "wall").exists() or not any(
        (home / "artifacts" / "avatars" / "wall").rglob("*.*")
    )


def test_fetch_creates_folders_and_a_write_that_fails_is_one_line(home, rendered, tmp_path):
    """One rule for every path the user names: missing folders are created (as with
    `submit --output`); a write that fails is one line, and the job keeps its video."""
    job_id, out, _ = rendered
    nested = tmp_path / "new" / "dir" / "x.mp4"
    fetched = farm(home, "fetch", job_id, str(nested))
    assert fetched.returncode == 0, fetched.stderr.decode()
    assert nested.read_bytes() == out.read_bytes()
    for dest in ("/dev/full", str(out / "inside-a-file.mp4")):
        failed = farm(home, "fetch", job_id, dest)
        lines = failed.stderr.decode().splitlines()
        assert failed.returncode == 1 and failed.stdout == b"", lines
        assert len(lines) == 1 and lines[0].startswith(f"farm: error: cannot write {dest}: ")
        assert f"the video is kept: farm fetch {job_id} PATH" in lines[0]
    assert Path("/dev/full").is_char_device()


def test_submit_wait_output_to_a_full_disk_is_one_line_and_the_job_succeeds(home):
    proc = farm(home, "submit", "-", "--wait", "--output", "/dev/full", stdin=b"Hi.")
    lines = proc.stderr.decode().splitlines()
    assert proc.returncode == 1, lines
    assert lines[-1].startswith("farm: error: cannot write /dev/full: No space left on device")
    job_id = proc.stdout.decode().split()[0]
    assert "succeeded" in farm(home, "status", job_id).stdout.decode()


def test_a_16_bit_greyscale_photo_registers_like_its_8_bit_copy(home, tmp_path):
    from PIL import Image
    from skimage.data import astronaut

    grey = np.asarray(Image.fromarray(astronaut()).convert("L"))
    photo = tmp_path / "grey16.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(photo)
    assert Image.open(photo).mode.startswith("I")
    added = farm(home, "avatar", "add", "grey16", "--photo", str(photo))
    assert added.returncode == 0, added.stderr.decode()
    assert "512x512" in farm(home, "avatar", "show", "grey16").stdout.decode()
