"""The gaussiantalker backend on a synthetic model written at test time in upstream's
exact layout (tests/gaussiantalker_fixture.py: a few hundred Gaussians, three tracked
frames, random deformation weights) and a tiny random wav2vec2 extractor saved as a
user's local directory. Rendered with the pure-torch reference rasterizer on the CPU.
The pictures mean nothing (random weights); what is checked is registration, the
plan's length and seeding, purity across chunks, and the video farm delivers."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from models.gaussiantalker.archive import pack  # noqa: E402
from models.gaussiantalker.renderer import CHANNELS, GaussianTalkerRenderer  # noqa: E402
from models.tts import synthesize  # noqa: E402
from tests.doubles import ListSink  # noqa: E402
from tests.gaussiantalker_fixture import write_synthetic_model, write_tiny_wav2vec2  # noqa: E402
from tests.probe import probe
from tests.services import run_farm  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    return write_synthetic_model(tmp_path_factory.mktemp("gt"), audio_dim=44, size=(64, 64))


@pytest.fixture(scope="module")
def extractor(tmp_path_factory) -> Path:
    return write_tiny_wav2vec2(tmp_path_factory.mktemp("wav2vec2"))


@pytest.fixture(scope="module")
def renderer(extractor) -> GaussianTalkerRenderer:
    r = GaussianTalkerRenderer(batch_size=2, audio_model=str(extractor))
    r.load(Path("."), "cpu")
    return r


@pytest.fixture(scope="module")
def avatar(renderer, model, tmp_path_factory):
    archive = tmp_path_factory.mktemp("archive") / "model.tar"
    pack(model[0], model[1], archive)
    return renderer.prepare_avatar_from_source(archive.read_bytes())


@pytest.fixture(scope="module")
def speech():
    return synthesize("A synthetic head speaks the whole script.", "espeak")


def test_the_plan_covers_the_whole_audio_and_is_seeded(renderer, avatar, speech):
    size = avatar.photo_size
    plan = renderer.plan(avatar, speech.seconds, speech.phones, 25, size, 5, speech)
    frames = math.ceil(speech.seconds * 25)
    assert plan.channels == CHANNELS and plan.frame_count == frames  # never cut short
    assert plan.arrays["audio"].shape == (frames, 16, 44)
    again = renderer.plan(avatar, speech.seconds, speech.phones, 25, size, 5, speech)
    assert np.array_equal(plan.track, again.track)
    other = renderer.plan(avatar, speech.seconds, speech.phones, 25, size, 6, speech)
    assert not np.array_equal(plan.track, other.track)
    source = plan.channel("source")
    assert set(np.unique(source)) <= {0.0, 1.0, 2.0}
    assert np.abs(np.diff(source)).max() <= 1  # the tracked frames, without jumps
    assert np.all(plan.channel("eye") >= 0) and np.all(plan.channel("eye") <= 1)
    still = renderer.plan(avatar, speech.seconds, speech.phones, 25, size, 5, speech, {"eyes": 0})
    assert not still.channel("gaze_x").any() and plan.channel("gaze_x").any()


def test_blinks_come_every_few_seconds_from_the_seed():
    from models.gaussiantalker.renderer import blinks

    eye = blinks(250, 25, np.random.default_rng(3), baseline=0.1)  # 10 s
    closed = eye > 0.9
    starts = np.flatnonzero(np.diff(closed.astype(int)) == 1)
    assert 2 <= len(starts) <= 4 and eye.min() == pytest.approx(0.1)
    assert np.array_equal(eye, blinks(250, 25, np.random.default_rng(3), baseline=0.1))


def test_a_frame_is_the_same_inside_a_chunk_and_alone(renderer, avatar, speech):
    size = avatar.photo_size
    plan = renderer.plan(avatar, speech.seconds, speech.phones, 25, size, 5, speech)
    chunk, alone = ListSink(), ListSink()
    renderer.render(avatar, plan, range(1, 6), chunk)
    renderer.render(avatar, plan, range(3, 4), alone)
    assert chunk.frames.shape == (5, 64, 64, 3)
    assert np.array_equal(chunk.frames[2], alone.frames[0])
    # The head was drawn: the frames differ from the bare backdrop somewhere.
    assert chunk.frames.std() > 0


def test_registration_refuses_a_broken_layout_in_one_line(model, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(model[1], data)
    (data / "torso_imgs" / "1.png").unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env["FARM_HOME"] = str(tmp_path / "home")
    args = ["avatar", "add", "roman", "--backend", "gaussiantalker"]
    out = run_farm(*args, "--model", str(model[0]), "--data", str(data), env=env, text=True)
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("farm: error:") and "1.png" in line


def test_submit_with_a_gaussiantalker_avatar_on_the_embedded_default(model, extractor, tmp_path):
    script = tmp_path / "script.txt"
    script.write_text("Hello from a trained head.", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "AWS_"))} | {
        "FARM_HOME": str(tmp_path / "home"),
        "FARM_GAUSSIANTALKER_AUDIO_MODEL": str(extractor),
        "FARM_CHUNK_FRAMES": "20",
        "FARM_RENDER_THREADS": "1",
    }
    try:
        args = ["avatar", "add", "synthetic", "--backend", "gaussiantalker"]
        added = run_farm(
            *args, "--model", str(model[0]), "--data", str(model[1]), env=env, text=True
        )
        assert added.returncode == 0, added.stderr
        out = tmp_path / "synthetic.mp4"
        done = run_farm(
            "submit", str(script), "--avatar", "synthetic", "--voice", "espeak", "--size",
            "photo", "--wait", "--output", str(out), env=env, text=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        status = run_farm("status", done.stdout.split()[0], env=env, text=True)
        assert "renderer gaussiantalker" in status.stdout and "succeeded" in status.stdout
        frames = int(status.stdout.split("frames ")[1].split()[0])
        video = probe(out)
        assert video.frame_count == frames > 0 and (video.width, video.height) == (64, 64)
        assert video.video_seconds == pytest.approx(frames / 25, abs=0.05)
    finally:
        run_farm("stop", env=env, timeout=120, text=True)


def test_bench_reports_plan_render_and_memory(model, extractor, tmp_path):
    import json

    script = tmp_path / "bench.txt"
    script.write_text("A short line to time.", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env |= {"FARM_GAUSSIANTALKER_AUDIO_MODEL": str(extractor), "FARM_HOME": str(tmp_path / "h")}
    figures = tmp_path / "gt.json"
    args = ["bench", "--renderer", "gaussiantalker", "--model", str(model[0]), "--data"]
    args += [str(model[1]), "--script", str(script), "--runs", "1", "--frames", "2"]
    out = run_farm(*args, "--json", str(figures), env=env, text=True)
    assert out.returncode == 0, out.stderr
    assert "gaussiantalker on cpu" in out.stdout and "512 letterboxed" in out.stdout
    row = json.loads(figures.read_text())["backend"]["backend"]
    assert row["render_fps 64x64 model"] > 0 and row["plan_seconds_per_audio_second"] > 0
    refused = run_farm("bench", "--renderer", "gaussiantalker", env=env, text=True)
    assert refused.returncode == 1 and "needs --model DIR" in refused.stderr
