"""The ditto backend end to end on random weights written at test time in the official
checkpoint layout (tests/ditto_checkpoints.py: reduced widths, stand-in ONNX detector,
landmark and HuBERT models with upstream's inputs and outputs). The backend loads them
with exactly the code that loads real checkpoints. The pictures are noise: random
weights draw nothing; what is checked is the pipeline, its seeding, its purity and the
video it produces."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import pytest

from models.ditto.renderer import X_D, DittoAvatar, DittoRenderer
from models.portrait import demo_photo
from models.tts import synthesize
from tests.doubles import ListSink
from tests.probe import probe
from tests.services import run_farm


@pytest.fixture(scope="module")
def renderer(ditto_dir: Path) -> DittoRenderer:
    r = DittoRenderer(batch_size=4)
    r.load(ditto_dir, "cpu")
    return r


@pytest.fixture(scope="module")
def avatar(renderer: DittoRenderer) -> DittoAvatar:
    return renderer.prepare_avatar(demo_photo())


@pytest.fixture(scope="module")
def speech():
    return synthesize("Hello there, this is Ditto speaking.", "espeak")


def plan(renderer, avatar, speech, seed: int, fps: int = 25, size=(512, 512)):
    return renderer.plan(avatar, speech.seconds, speech.phones, fps, size, seed, audio=speech)


def test_the_avatar_holds_what_render_needs_and_survives_the_store(avatar):
    assert avatar.f_s.dtype == np.float16 and avatar.f_s.ndim == 4
    assert avatar.x_s.shape == (21, 3) and np.isfinite(avatar.x_s).all()
    assert avatar.eye_open.shape == (2,) and avatar.eye_ball.shape == (6,)
    # The crop's matrix maps the crop's centre into the photo, near the stand-in face.
    centre = avatar.m_c2o @ [256, 256, 1]
    assert 150 < centre[0] < 360 and 120 < centre[1] < 400
    again = DittoAvatar.from_bytes(avatar.to_bytes())
    assert np.array_equal(again.f_s, avatar.f_s) and np.array_equal(again.x_s, avatar.x_s)
    assert {k: v.tolist() for k, v in again.source.items()} == {
        k: v.tolist() for k, v in avatar.source.items()
    }


def test_a_photo_without_a_face_is_refused(renderer, ditto_dir, tmp_path):
    from farm.errors import PermanentError
    from tests.ditto_checkpoints import write_detector

    blind = DittoRenderer()
    blind.load(ditto_dir, "cpu")
    faceless = tmp_path / "det_10g.onnx"
    write_detector(faceless, face=False)
    from models.ditto import aux

    blind._aux["detector"] = aux.FaceDetector(faceless, device="cpu")
    with pytest.raises(PermanentError, match="no face"):
        blind.prepare_avatar(demo_photo())


def test_the_plan_is_seeded_and_shares_no_noise_between_jobs(renderer, avatar, speech):
    a = plan(renderer, avatar, speech, seed=3)
    assert a.channels == X_D and a.frame_count == math.ceil(speech.seconds * 25)
    assert np.array_equal(a.track, plan(renderer, avatar, speech, seed=3).track)
    b = plan(renderer, avatar, speech, seed=4)
    assert not np.allclose(a.track, b.track)
    # At another frame rate the same motion is resampled to that job's frame count.
    c = plan(renderer, avatar, speech, seed=3, fps=30)
    assert c.frame_count == math.ceil(speech.seconds * 30)


def test_a_job_s_steps_and_emotion_change_its_plan(renderer, avatar, speech):
    base = plan(renderer, avatar, speech, seed=3).track
    ask = renderer.plan
    fewer = ask(avatar, speech.seconds, speech.phones, 25, (512, 512), 3, speech, {"steps": 4})
    happy = ask(avatar, speech.seconds, speech.phones, 25, (512, 512), 3, speech, {"emotion": 3})
    assert fewer.frame_count == happy.frame_count == len(base)
    assert not np.allclose(fewer.track, base) and not np.allclose(happy.track, base)


def test_a_frame_is_the_same_inside_a_chunk_and_alone(renderer, avatar, speech):
    p = plan(renderer, avatar, speech, seed=5)
    chunk, alone = ListSink(), ListSink()
    renderer.render(avatar, p, range(2, 9), chunk)
    renderer.render(avatar, p, range(6, 7), alone)
    assert chunk.frames.shape == (7, 512, 512, 3) and chunk.frames.dtype == np.uint8
    assert np.array_equal(chunk.frames[4], alone.frames[0])  # bitwise, on the CPU
    assert chunk.frames.std() > 0  # something was drawn


def test_whole_photo_output_pastes_the_face_back(renderer, speech):
    photo = np.zeros((480, 640, 3), np.uint8)
    photo[:, :] = (30, 90, 160)
    face = demo_photo()
    photo[:, 64:576] = face[16:496]  # the demo face inside a wider photo
    wide = renderer.prepare_avatar(photo)
    assert wide.photo_size == (640, 480)
    p = plan(renderer, wide, speech, seed=1, size=wide.photo_size)
    out = ListSink()
    renderer.render(wide, p, range(0, 2), out)
    assert out.frames.shape == (2, 480, 640, 3)
    # Far from the face the photo is untouched.
    assert np.array_equal(out.frames[0, :4, :4], photo[:4, :4])


def test_a_letterboxed_size_keeps_the_face_square(renderer, avatar, speech):
    p = plan(renderer, avatar, speech, seed=1, size=(640, 360))
    out = ListSink()
    renderer.render(avatar, dataclasses.replace(p, width=640, height=360), range(0, 1), out)
    assert out.frames.shape == (1, 360, 640, 3)
    assert out.frames[0, :, :100].max() == 0  # black bars beside the 360 face


def test_submit_with_a_ditto_avatar_on_the_embedded_default(ditto_dir, tmp_path):
    """`farm avatar add roman --backend ditto` then `farm submit --avatar roman --wait`
    with FARM_DITTO_DIR: an MP4 with the planned frame count and the audio's length."""
    from PIL import Image

    photo = tmp_path / "roman.png"
    Image.fromarray(demo_photo()).save(photo)
    script = tmp_path / "script.txt"
    script.write_text("Hello from Ditto.", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "AWS_"))} | {
        "FARM_HOME": str(tmp_path / "home"),
        "FARM_DITTO_DIR": str(ditto_dir),
        "FARM_DITTO_STEPS": "4",
        "FARM_CHUNK_FRAMES": "20",
        "FARM_RENDER_THREADS": "1",
    }
    try:
        added = run_farm(
            "avatar",
            "add",
            "roman",
            "--backend",
            "ditto",
            "--photo",
            str(photo),
            env=env,
            text=True,
        )
        assert added.returncode == 0, added.stderr
        out = tmp_path / "roman.mp4"
        done = run_farm(
            "submit", str(script), "--avatar", "roman", "--voice", "espeak", "--wait",
            "--ditto-steps", "3", "--emotion", "Happy", "--output", str(out), env=env, text=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        job_id = done.stdout.split()[0]
        status = run_farm("status", job_id, env=env, text=True)
        assert status.returncode == 0 and "state     succeeded" in status.stdout
        assert "renderer ditto" in status.stdout  # the avatar's backend, not the default
        video = probe(out)
        frames = int(status.stdout.split("frames ")[1].split()[0])
        assert video.frame_count == frames > 0
        assert (video.width, video.height) == (512, 512)
        assert video.video_seconds == pytest.approx(frames / 25, abs=0.05)
        assert video.audio_seconds == pytest.approx(frames / 25, abs=0.1)
    finally:
        run_farm("stop", env=env, timeout=120, text=True)


def test_models_check_loads_every_file_and_names_a_broken_one(ditto_dir, tmp_path):
    import shutil

    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    good = run_farm(
        "models", "check", "ditto", env=env | {"FARM_DITTO_DIR": str(ditto_dir)}, text=True
    )
    assert good.returncode == 0, good.stderr
    assert "every Ditto checkpoint file is present and loads" in good.stdout

    broken = tmp_path / "broken"
    shutil.copytree(ditto_dir, broken)
    decoder = broken / "ditto_pytorch" / "models" / "decoder.pth"
    decoder.write_bytes(decoder.read_bytes()[:1000])  # a download cut short
    (broken / "ditto_pytorch" / "aux_models" / "2d106det.onnx").unlink()
    bad = run_farm("models", "check", "ditto", env=env | {"FARM_DITTO_DIR": str(broken)}, text=True)
    assert bad.returncode == 1
    assert "decoder.pth" in bad.stdout and "2d106det.onnx: missing" in bad.stdout
    assert bad.stderr.strip().startswith("farm: error: ditto checkpoints at")

    doctor = run_farm(
        "doctor", env=env | {"FARM_DITTO_DIR": str(broken), "FARM_HOME": str(tmp_path)}, text=True
    )
    line = next(ln for ln in doctor.stdout.splitlines() if "ditto checkpoints" in ln)
    assert "missing ditto_pytorch/aux_models/2d106det.onnx" in line and doctor.returncode == 1


def test_bench_reports_ditto_plan_render_and_memory(ditto_dir, tmp_path):
    """`farm bench --renderer ditto` (random weights: the speed of the real shapes only
    at full size; these are the reduced ones, so only the figures' presence is checked)."""
    import json

    script = tmp_path / "bench.txt"
    script.write_text("A short line to time.", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env |= {"FARM_DITTO_DIR": str(ditto_dir), "FARM_HOME": str(tmp_path / "home")}
    figures = tmp_path / "ditto.json"
    args = ["bench", "--renderer", "ditto", "--script", str(script), "--runs", "1"]
    out = run_farm(*args, "--frames", "2", "--json", str(figures), env=env, text=True)
    assert out.returncode == 0, out.stderr
    assert "s per second of audio" in out.stdout and "fps  512 face" in out.stdout
    assert "1280x720 photo" in out.stdout and "peak RSS" in out.stdout
    row = json.loads(figures.read_text())["backend"]["backend"]
    assert row["frames"] == 2 and row["plan_seconds_per_audio_second"] > 0
    assert row["render_fps 512 face"] > 0 and row["render_fps 1280x720 photo"] > 0
