"""The compositor (workers/compositor.py), the person segmenter (models/segment.py) and the
face boxes the layout places by (models/base.py WholePhotoAvatar), as plain functions
on real frames: the demo photo, mediapipe's real segmentation, a real ffmpeg."""

from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from farm import layout
from farm.errors import PermanentError
from farm.media import ffmpeg_exe
from models.portrait import demo_photo
from models.segment import PersonSegmenter
from workers.compositor import Compositor, Looping, Still, cover


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return cv2.resize(demo_photo(), (256, 256), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def segmenter() -> PersonSegmenter:
    return PersonSegmenter()


def test_the_person_mask_is_soft_deterministic_and_finds_the_astronaut(photo, segmenter):
    mask = segmenter.mask(photo)
    assert mask.shape == (256, 256) and mask.dtype == np.float32
    assert 0.0 <= mask.min() and mask.max() <= 1.0
    # her face (centre of the upper half) is person, the top corners are not
    assert mask[35:60, 105:135].min() > 0.95
    assert mask[:20, :20].max() < 0.05 and mask[:20, -20:].max() < 0.05
    # soft edges: some values in between, along the border only
    between = (mask > 0.05) & (mask < 0.95)
    assert 0 < between.mean() < 0.1
    # a fresh graph gives the same mask: chunks rendered anywhere agree
    assert np.array_equal(PersonSegmenter().mask(photo), mask)
    # scaled to the size asked, and a big frame is segmented at most MAX_SIDE across
    big = cv2.resize(photo, (1080, 1080))
    assert segmenter.mask(big, (300, 200)).shape == (200, 300)


def test_an_aspect_alone_places_the_render_on_black_without_segmentation(photo):
    lay = layout.compute((180, 320), (256, 256), (100, 40, 60), "contain", "9:16")
    comp = Compositor(lay)
    assert comp.segmenter is None
    out = comp.compose(photo[None])
    assert out.shape == (1, 320, 180, 3)
    rows, cols, _, _ = lay.window()
    scaled = cv2.resize(photo, lay.scaled, interpolation=cv2.INTER_AREA)
    assert np.array_equal(out[0, rows, cols], scaled)
    outside = np.ones((320, 180), bool)
    outside[rows, cols] = False
    assert out[0][outside].max() == 0


def test_a_colour_shows_around_the_person_and_alpha_is_the_person(photo, segmenter):
    lay = layout.compute((256, 256), (256, 256), (100, 40, 60), "contain", "1:1")
    mask = segmenter.mask(photo)
    person, around = mask == 1.0, mask == 0.0  # the mask is clipped: both are large
    assert person.mean() > 0.2 and around.mean() > 0.2
    out = Compositor(lay, Still.colour((0, 200, 0), (256, 256))).compose(photo[None])[0]
    assert np.array_equal(out[person], photo[person])
    assert np.abs(out[around].astype(int) - (0, 200, 0)).max() <= 1

    rgba = Compositor(lay, alpha=True).compose(photo[None])[0]
    assert rgba.shape == (256, 256, 4)
    assert np.array_equal(rgba[..., :3], photo)  # straight alpha: the colours untouched
    assert (rgba[..., 3][person] == 255).all() and (rgba[..., 3][around] == 0).all()

    # alpha is 0 outside the placed render too (a pillarboxed 9:16)
    tall = layout.compute((144, 256), (256, 256), (100, 40, 60), "contain", "9:16")
    rgba = Compositor(tall, alpha=True).compose(photo[None])[0]
    rows, cols, _, _ = tall.window()
    outside = np.ones((256, 144), bool)
    outside[rows, cols] = False
    assert rgba[..., 3][outside].max() == 0 and rgba[..., 3][rows, cols].max() == 255


def test_an_image_is_fitted_to_cover_the_canvas(tmp_path: Path):
    picture = np.zeros((100, 300, 3), np.uint8)
    picture[:, 150:] = 255  # left half black, right half white
    canvas = cover(picture, (100, 200))  # taller than the picture: the sides are cut
    assert canvas.shape == (200, 100, 3)
    assert canvas[:, :40].max() == 0 and canvas[:, 60:].min() == 255
    path = tmp_path / "bg.png"
    cv2.imwrite(str(path), picture)
    still = Still.image(path, (100, 200))
    assert still.take(3).shape == (3, 200, 100, 3)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(PermanentError, match="does not decode"):
        Still.image(tmp_path / "bad.png", (100, 200))


def test_a_looping_video_is_the_same_sequence_from_any_start(tmp_path: Path):
    period, fps = 5, 10
    frames = np.stack([np.full((48, 64, 3), 30 + 40 * i, np.uint8) for i in range(period)])
    clip = tmp_path / "bg.mp4"
    argv = [ffmpeg_exe(), "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24"]
    argv += ["-s", "64x48", "-r", str(fps), "-i", "pipe:", "-c:v", "libx264", "-qp", "0"]
    argv += ["-pix_fmt", "yuv444p", "-y", str(clip)]
    subprocess.run(argv, input=frames.tobytes(), check=True)

    whole = Looping(clip, (32, 24), fps, 0)
    assert whole.period == period
    run = whole.take(13)
    whole.close()
    levels = run.reshape(13, -1).mean(axis=1)
    assert np.abs(levels - [30 + 40 * (k % period) for k in range(13)]).max() < 3
    # chunks of 4 starting where the last ended: exactly the frames of one run
    parts = []
    for start in range(0, 13, 4):
        part = Looping(clip, (32, 24), fps, start)
        parts.append(part.take(min(4, 13 - start)))
        part.close()
    assert np.array_equal(np.concatenate(parts), run)

    (tmp_path / "bad.mp4").write_bytes(b"\0" * 100)
    with pytest.raises(PermanentError, match="does not decode"):
        Looping(tmp_path / "bad.mp4", (32, 24), fps, 0)


def test_portrait_face_box_is_the_face_in_whole_photo_pixels():
    from models.portrait import PortraitRenderer

    padded = np.pad(demo_photo(), ((40, 60), (150, 120), (0, 0)), mode="edge")
    avatar = PortraitRenderer().prepare_avatar(padded)
    x0, y0, side = avatar.face_box
    w, h = avatar.photo_size
    assert (w, h) == (782, 612)
    # the astronaut's face in the demo photo is centred near (226, 123) (512 px, measured
    # by eye on the photo); padded by (150, 40): near (376, 163), the box in the photo
    cx, cy = x0 + side / 2, y0 + side / 2
    assert abs(cx - 376) < 25 and abs(cy - 163) < 25, (cx, cy)
    assert 80 < side < 200 and x0 >= 0 and y0 >= 0 and x0 + side <= w and y0 + side <= h
    # a 512x512 photo renders as the crop: the box is in the crop's pixels then
    square = PortraitRenderer().prepare_avatar(demo_photo())
    bx, by, bside = square.face_box
    assert 0 <= bx and 0 <= by and bx + bside <= 512 and by + bside <= 512


def test_ditto_face_box_maps_the_crop_back_to_the_photo():
    from models.ditto.renderer import CROP, FACE_CROP_SCALE, FACE_CROP_VY, DittoAvatar

    # a crop that is the photo's square (100, 50)..(300, 250), scaled 512/200
    m_c2o = np.array([[200 / CROP, 0, 100], [0, 200 / CROP, 50], [0, 0, 1]], np.float64)
    none = np.zeros(1, np.float32)
    avatar = DittoAvatar(np.zeros((400, 640, 3), np.uint8), m_c2o, none, {}, none, none, none)
    x0, y0, side = avatar.face_box
    assert side == round(200 / FACE_CROP_SCALE)
    assert abs(x0 + side / 2 - 200) <= 1  # centred across
    assert abs(y0 + side / 2 - (150 - FACE_CROP_VY * 200)) <= 1  # the face below the middle


def test_gaussiantalker_face_box_is_its_head_projected_into_the_frame(tmp_path: Path):
    from models.gaussiantalker.archive import pack
    from models.gaussiantalker.renderer import GaussianTalkerAvatar, _head_box
    from tests.gaussiantalker_fixture import write_synthetic_model

    model_dir, data_dir = write_synthetic_model(tmp_path, audio_dim=44, size=(64, 64))
    pack(model_dir, data_dir, tmp_path / "model.tar")
    avatar = GaussianTalkerAvatar((tmp_path / "model.tar").read_bytes())
    x0, y0, side = avatar.face_box
    # the synthetic head sits in front of the camera, about the frame's middle
    assert 4 <= side <= 64
    assert 16 <= x0 + side / 2 <= 48 and 16 <= y0 + side / 2 <= 48
    # no source frame to project by: the frame's centre
    import dataclasses

    box = _head_box(dataclasses.replace(avatar.model, frames=()))
    assert box == (16, 16, 32)
