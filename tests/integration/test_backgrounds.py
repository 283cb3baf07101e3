"""Backgrounds (issue 16, item 2), through the real stages in process with the portrait
renderer, measured on the decoded output (PyAV): a colour replaces the photo's
background outside the person and leaves the person as the plain render had it; an
image and a looping video fill what is not the person, and the video runs on across
chunk joins without a seam."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from farm.context import Context
from farm.media import ffmpeg_exe
from models.segment import PersonSegmenter
from tests.composed import FPS, add_avatar, find_face, run_job
from tests.probe import probe

BRAND = (20, 90, 200)


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_a_colour_replaces_the_background_and_keeps_the_person(db_ctx: Context):
    add_avatar(db_ctx)
    plain_job, plain_path = run_job(db_ctx, (256, 256), aspect="1:1", fit="cover")
    job, path = run_job(db_ctx, (256, 256), aspect="1:1", fit="cover", background="#145ac8")
    plain, branded = probe(plain_path), probe(path)
    assert (branded.width, branded.height) == (256, 256)
    assert branded.frame_count == plain.frame_count == job.frame_count

    # The person, segmented on the plain output (same seed, same layout: same render)
    segmenter = PersonSegmenter()
    for i in (0, branded.frame_count // 2, branded.frame_count - 1):
        mask = segmenter.mask(plain.frames[i])
        person, around = mask > 0.98, mask < 0.02
        assert person.mean() > 0.2 and around.mean() > 0.1, (person.mean(), around.mean())
        a = plain.frames[i].astype(int)
        b = branded.frames[i].astype(int)
        # inside the person: what the plain render shows (within the codec's error)
        assert np.abs(a - b)[person].mean() < 3
        # outside: the brand colour, which the photo's own background is not
        assert np.abs(b[around] - np.array(BRAND)).mean() < 6
        assert np.abs(a[around] - np.array(BRAND)).mean() > 40


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_an_image_background_covers_the_canvas(db_ctx: Context, tmp_path: Path):
    # Left half red, right half blue: cover-fitted to 16:9, the left edge is red.
    picture = np.zeros((90, 200, 3), np.uint8)
    picture[:, :100] = (220, 30, 30)
    picture[:, 100:] = (30, 30, 220)
    image = tmp_path / "bg.png"
    Image.fromarray(picture).save(image)
    add_avatar(db_ctx)
    job, path = run_job(db_ctx, (180, 180), aspect="16:9", fit="contain", background=str(image))
    video = probe(path)
    assert (video.width, video.height) == (320, 180)
    frame = video.frames[0].astype(int)
    # contain pillarboxes the 288x256 photo on 16:9: the bars are the image's two halves
    assert np.abs(frame[:, :8] - (220, 30, 30)).mean() < 8
    assert np.abs(frame[:, -8:] - (30, 30, 220)).mean() < 8


def _level(i: int) -> int:
    return 20 + 30 * i


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_a_video_background_loops_and_runs_on_across_chunks(db_ctx: Context, tmp_path: Path):
    # 7 frames at the job's fps, frame i a flat grey of _level(i): frame k of the job
    # must show level k mod 7, whichever chunk it was rendered in.
    period = 7
    frames = np.stack([np.full((64, 96, 3), _level(i), np.uint8) for i in range(period)])
    clip = tmp_path / "bg.mp4"
    argv = [ffmpeg_exe(), "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24"]
    argv += ["-s", "96x64", "-r", str(FPS), "-i", "pipe:", "-c:v", "libx264", "-qp", "0"]
    argv += ["-pix_fmt", "yuv444p", "-y", str(clip)]
    subprocess.run(argv, input=frames.tobytes(), check=True)
    add_avatar(db_ctx)
    job, path = run_job(
        db_ctx, (180, 180), chunk_frames=4, aspect="9:16", fit="contain", background=str(clip)
    )
    video = probe(path)
    assert (video.width, video.height) == (180, 320)
    assert video.frame_count == job.frame_count > 2 * period
    assert job.chunks_total >= 3
    # the bottom bar (contain of the 288x256 photo on 9:16) is all background
    levels = video.frames[:, -20:].reshape(video.frame_count, -1).mean(axis=1)
    expected = np.array([_level(k % period) for k in range(video.frame_count)])
    assert np.abs(levels - expected).max() < 6, np.c_[levels, expected]


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_alpha_is_the_person_on_a_composed_canvas(db_ctx: Context):
    import av

    add_avatar(db_ctx)
    job, path = run_job(db_ctx, (180, 180), aspect="9:16", fit="contain", format="mov-prores")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.pix_fmt.startswith("yuva")  # decoded with its alpha
        frames = [f.to_ndarray(format="rgba") for f in container.decode(video=0)]
    assert len(frames) == job.frame_count
    frame = frames[0]
    assert frame.shape == (320, 180, 4)
    alpha = frame[..., 3].astype(int)
    # 0 in the bars (outside the placed 288x256 photo) and in the photo's own
    # background (its top corners), opaque on the person (the face, upper third)
    assert alpha[:10].max() == 0 and alpha[-10:].max() == 0
    placed = alpha[alpha.any(axis=1)]
    assert placed[:5, :10].max() == 0 and placed[:5, -10:].max() == 0
    face = find_face(frame[..., :3].copy())
    assert face is not None
    cx, cy = face.mean(axis=0).round().astype(int)
    assert alpha[cy - 5 : cy + 5, cx - 5 : cx + 5].min() == 255
