"""OutputSpec (farm/output.py): parsing, every validation rule, sizes and frame rates
with an aspect and for drafts, the stored JSON (old rows included), the configuration
defaults, manifest columns, and idempotency keys that tell a draft from a final run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from farm import manifest, output
from farm.config import Settings
from farm.errors import InvalidInput
from farm.manifest import Defaults, RawRow
from farm.media import ffmpeg_exe
from farm.output import Background, OutputSpec, build, frame_size, job_fps


def png(path: Path, size: tuple[int, int] = (32, 24)) -> Path:
    Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(path)
    return path


def clip(path: Path) -> Path:
    argv = [ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=s=64x48:d=0.5"]
    subprocess.run([*argv, "-pix_fmt", "yuv420p", "-y", str(path)], check=True)
    return path


# --- colours and backgrounds ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rgb"),
    [
        ("#00ff80", (0, 255, 128)),
        ("#0F8", (0, 255, 136)),
        ("white", (255, 255, 255)),
        ("Green", (0, 128, 0)),
        (" navy ", (0, 0, 128)),
    ],
)
def test_colours(text, rgb):
    assert output.parse_color(text) == rgb
    assert output.parse_background(text) == Background("color", rgb)


@pytest.mark.parametrize("text", ["#12345", "#ggg", "purpel", "#"])
def test_an_unknown_colour_is_refused(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidInput, match="unknown colour"):
        output.parse_background(text)


def test_background_files_are_decoded_to_decide_image_or_video(tmp_path):
    image = output.parse_background(str(png(tmp_path / "bg.png")))
    assert image.kind == "image" and image.path and image.sha256 and image.key is None
    video = output.parse_background(str(clip(tmp_path / "bg.mp4")))
    assert video.kind == "video"
    # a file named .png that is not an image, and not a video either
    (tmp_path / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 100)
    with pytest.raises(InvalidInput, match="does not decode"):
        output.parse_background(str(tmp_path / "fake.png"))
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(InvalidInput, match="empty"):
        output.parse_background(str(tmp_path / "empty.jpg"))
    with pytest.raises(InvalidInput, match="no such background file"):
        output.parse_background(str(tmp_path / "missing.png"))
    with pytest.raises(InvalidInput, match="not a regular file"):
        output.parse_background(str(tmp_path))


# --- combinations -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"format": "webm-alpha", "background": "white"}, "transparent"),
        ({"format": "mov-prores", "background": "#000"}, "transparent"),
        ({"format": "webm-alpha", "captions": "burn"}, "captions burn"),
        ({"format": "mov-prores", "captions": "burn"}, "captions burn"),
        ({"format": "gif"}, "unknown format"),
        ({"aspect": "3:2"}, "unknown aspect"),
        ({"aspect": "9:16", "fit": "stretch"}, "unknown fit"),
        ({"fit": "cover"}, "--fit needs --aspect"),
        ({"captions": "loud"}, "unknown captions"),
        ({"poster_at": "-1"}, "poster-at"),
        ({"poster_at": "soon"}, "number of seconds"),
        ({"draft": "maybe"}, "true or false"),
    ],
)
def test_bad_values_and_combinations_are_refused(values, message):
    with pytest.raises(InvalidInput, match=message):
        build(**values)


def test_good_combinations():
    spec = build(format="WebM-Alpha", aspect="9:16", fit="cover", captions="file", draft="yes")
    assert spec == OutputSpec("webm-alpha", "9:16", "cover", None, "file", None, True)
    assert spec.alpha and spec.suffix == ".webm"
    assert build(format="mov-prores").suffix == ".mov" and build().suffix == ".mp4"
    assert not build(format="webm").alpha
    mp4 = build(background="#102030", captions="burn", aspect="1:1", poster_at=2)
    assert mp4.background == Background("color", (16, 32, 48)) and mp4.poster_at == 2.0
    # over defaults: only what is given changes; "none" clears a default
    base = OutputSpec(format="webm", aspect="16:9", background=Background("color", (0, 0, 0)))
    assert build(defaults=base, draft=True) == OutputSpec(
        "webm", "16:9", background=Background("color", (0, 0, 0)), draft=True
    )
    assert build(defaults=base, aspect="none", background="none").aspect is None
    # a default background and an alpha format given later: refused as a combination
    with pytest.raises(InvalidInput, match="transparent"):
        build(defaults=base, format="webm-alpha")


# --- sizes and frame rates ------------------------------------------------------------


@pytest.mark.parametrize(
    ("aspect", "size", "expected"),
    [
        (None, (640, 360), (640, 360)),
        ("16:9", (512, 512), (910, 512)),
        ("9:16", (512, 512), (512, 910)),
        ("1:1", (512, 512), (512, 512)),
        ("4:5", (512, 512), (512, 640)),
        ("9:16", (1080, 1920), (1080, 1920)),
        ("16:9", (1280, 720), (1280, 720)),
        ("16:9", (1274, 720), (1274, 720)),  # within 1 %
    ],
)
def test_sizes_with_an_aspect(aspect, size, expected):
    spec = OutputSpec(aspect=aspect)
    assert frame_size(size, spec) == expected
    w, h = frame_size(size, OutputSpec(aspect=aspect, draft=True))
    assert (w, h) == (expected[0] // 4 * 2, expected[1] // 4 * 2)
    assert w % 2 == h % 2 == 0


@pytest.mark.parametrize(
    ("aspect", "size", "message"),
    [
        ("16:9", (640, 480), "is not 16:9"),
        ("9:16", (1280, 720), "is not 9:16"),
        ("16:9", (1440, 1440), "within 64..1920"),
        ("16:9", (0, 0), "photo cannot take --aspect"),
    ],
)
def test_sizes_an_aspect_cannot_have_are_refused(aspect, size, message):
    with pytest.raises(InvalidInput, match=message):
        frame_size(size, OutputSpec(aspect=aspect))


def test_drafts_halve_the_size_and_the_frame_rate():
    draft = OutputSpec(draft=True)
    assert frame_size((512, 512), draft) == (256, 256)
    assert frame_size((130, 98), draft) == (64, 48)
    assert frame_size((0, 0), draft) == (0, 0)  # the photo: the plan halves it
    assert [job_fps(f, draft) for f in (25, 30, 20, 12, 10, 6)] == [12, 15, 10, 10, 10, 6]
    assert job_fps(25, OutputSpec()) == 25


# --- stored JSON ----------------------------------------------------------------------


def test_json_round_trip_and_old_rows():
    spec = OutputSpec("mov-prores", "4:5", "cover", None, "off", 1.5, True)
    assert OutputSpec.from_json(spec.to_json()) == spec
    bg = OutputSpec(background=Background("image", key="jobs/x/background.png", sha256="ab"))
    assert OutputSpec.from_json(bg.to_json()) == bg
    assert OutputSpec.from_json(None) == OutputSpec()
    old = OutputSpec.from_json({"captions": "burn", "poster_at": 2})
    assert old == OutputSpec(captions="burn", poster_at=2.0)
    # the local path never goes into the row
    assert "path" not in str(OutputSpec(background=Background("image", path="/x.png")).to_json())


def test_upload_puts_the_file_under_the_job_and_keeps_its_key(tmp_path):
    from farm.stores.local import LocalStore

    store = LocalStore(tmp_path / "store")
    spec = build(background=str(png(tmp_path / "Sky.PNG")))
    sent = output.upload_background(store, "abc", spec)
    assert sent.background is not None
    assert sent.background.key == "jobs/abc/background.png" and sent.background.path is None
    assert store.exists("jobs/abc/background.png")
    assert output.upload_background(store, "abc", build(background="red")) == build(
        background="red"
    )


# --- configuration defaults -------------------------------------------------------------


def test_configuration_defaults(tmp_path):
    env = {"FARM_HOME": str(tmp_path), "FARM_OUTPUT_FORMAT": "webm", "FARM_ASPECT": "9:16"}
    settings = Settings.from_env(env, dotenv=tmp_path / ".env")
    assert output.defaults_from(settings) == OutputSpec(format="webm", aspect="9:16")
    for bad, message in (
        ({"FARM_OUTPUT_FORMAT": "avi"}, "FARM_OUTPUT_FORMAT"),
        ({"FARM_ASPECT": "2:1"}, "FARM_ASPECT"),
        ({"FARM_FIT": "fill"}, "FARM_FIT"),
        ({"FARM_CAPTIONS": "yes"}, "FARM_CAPTIONS"),
        ({"FARM_OUTPUT_FORMAT": "mov-prores", "FARM_CAPTIONS": "burn"}, "transparent"),
    ):
        with pytest.raises(InvalidInput, match=message):
            Settings.from_env({"FARM_HOME": str(tmp_path), **bad}, dotenv=tmp_path / ".env")


# --- manifest columns and idempotency keys ------------------------------------------------


def _check(tmp_path: Path, values: dict, defaults: Defaults | None = None) -> manifest.Row:
    return manifest.check_row(
        RawRow("line 2", {"text": "Hello there.", **values}, 2),
        tmp_path,
        defaults or Defaults(),
        20_000,
        lambda avatar, voice, webhook: webhook,
    )


def test_manifest_columns_make_the_row_spec(tmp_path):
    png(tmp_path / "bg.png")
    row = _check(tmp_path, {"format": "webm", "aspect": "9:16", "background": "bg.png"})
    assert row.spec.format == "webm" and row.spec.aspect == "9:16"
    assert row.spec.background is not None and row.spec.background.kind == "image"
    assert row.output.endswith(".webm")  # the default output key takes the suffix
    row = _check(tmp_path, {"format": "mov-prores", "draft": "true", "poster_at": "0.5"})
    assert row.spec.draft and row.spec.poster_at == 0.5 and row.output.endswith(".mov")
    # JSON Lines values: a real bool and a number
    assert _check(tmp_path, {"draft": True, "poster_at": 1}).spec.draft
    # empty cells take the defaults (the batch's options)
    defaults = Defaults(spec=OutputSpec(format="webm", captions="off"))
    row = _check(tmp_path, {"format": None, "draft": ""}, defaults)
    assert row.spec == OutputSpec(format="webm", captions="off")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"format": "webm", "output": "a.mp4"}, "must end with .webm"),
        ({"format": "webm-alpha", "background": "white"}, "transparent"),
        ({"background": "../outside.png"}, "leads outside"),
        ({"background": "nothere.png"}, "no such background file"),
        ({"background": "purpel"}, "unknown colour"),
        ({"background": "notes.txt"}, "does not decode"),
        ({"aspect": "16:9", "fit": "squash"}, "unknown fit"),
        ({"draft": "perhaps"}, "true or false"),
    ],
)
def test_bad_manifest_columns_are_the_rows_problem(tmp_path, values, message):
    (tmp_path / "notes.txt").write_text("not a picture")
    png(tmp_path.parent / "outside.png")
    with pytest.raises(InvalidInput, match=message):
        _check(tmp_path, values)


def test_a_row_aspect_the_batch_size_cannot_have_is_refused(tmp_path):
    defaults = Defaults(size=(640, 480))
    with pytest.raises(InvalidInput, match="is not 16:9"):
        _check(tmp_path, {"aspect": "16:9"}, defaults)
    assert _check(tmp_path, {"aspect": "4:5"}, Defaults(size=(512, 512))).spec.aspect == "4:5"


def test_idempotency_keys_cover_the_whole_spec(tmp_path):
    parts = (25, [512, 512], 100, None)
    final = _check(tmp_path, {})
    draft = _check(tmp_path, {"draft": "yes"})
    webm = _check(tmp_path, {"format": "webm", "output": final.output.replace(".mp4", ".webm")})
    keys = {manifest.row_key("b", r, parts) for r in (final, draft, webm)}
    assert len(keys) == 3
    assert manifest.row_key("b", draft, parts) == manifest.row_key(
        "b", _check(tmp_path, {"draft": "1"}), parts
    )
    # a default spec keeps the key an earlier version gave the row (no duplicate jobs)
    import hashlib
    import json

    content = ["b", final.script, final.avatar, final.voice, final.webhook, final.output, *parts]
    blob = json.dumps(content, ensure_ascii=False, separators=(",", ":"), default=str)
    assert manifest.row_key("b", final, parts) == "b1:" + hashlib.sha256(blob.encode()).hexdigest()
    # a background image is keyed by its content: a new picture is a new job
    png(tmp_path / "bg.png")
    one = manifest.row_key("b", _check(tmp_path, {"background": "bg.png"}), parts)
    png(tmp_path / "bg.png", (40, 30))
    assert manifest.row_key("b", _check(tmp_path, {"background": "bg.png"}), parts) != one


def test_output_names_follow_the_format():
    webm, mp4 = OutputSpec(format="webm"), OutputSpec()
    output.check_output_name("a/b.webm", webm)
    output.check_output_name("clip-1", mp4)  # an MP4 key without a suffix, as before
    output.check_output_name("x.MP4", mp4)
    for name, spec in (("clip-1", webm), ("a.mp4", webm), ("a.webm", mp4), ("a.mov", mp4)):
        with pytest.raises(InvalidInput, match="must end with"):
            output.check_output_name(name, spec)


# --- the encoders each format uses (farm/media.py argv, pure) ---------------------------


def _final(target: str, draft: bool = False, codec: str = "libx264") -> list[str]:
    from farm.media import VideoFormat, final_argv

    fmt = VideoFormat.delivery(64, 48, 10, codec, target, draft)
    return final_argv("ffmpeg", fmt, Path("a.wav"), Path(f"o{OutputSpec(target).suffix}"))


def _has(argv: list[str], *pairs: str) -> bool:
    """Every `-flag value` pair given appears in argv, each as two adjacent tokens."""
    flags = list(zip(argv, argv[1:], strict=False))
    return all((f, v) in flags for f, v in zip(pairs[::2], pairs[1::2], strict=True))


def _input(argv: list[str]) -> list[str]:
    return argv[: argv.index("pipe:")]


def test_each_format_has_its_encoder_pixels_and_audio():
    mp4 = _final("mp4")
    assert _has(mp4, "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-acodec", "aac")
    assert _has(mp4, "-preset", "veryfast", "-crf", "20", "-movflags", "+faststart")
    assert _has(_final("mp4", codec="h264_nvenc"), "-vcodec", "h264_nvenc")
    webm = _final("webm")
    assert _has(webm, "-vcodec", "libvpx-vp9", "-pix_fmt", "yuv420p", "-acodec", "libopus")
    assert _has(webm, "-deadline", "good", "-cpu-used", "5", "-row-mt", "1", "-b:v", "0")
    assert "-movflags" not in webm
    assert _has(_final("webm-alpha"), "-pix_fmt", "yuva420p")
    # the worker's H.264 encoder is for MP4 only
    assert _has(_final("webm-alpha", codec="h264_nvenc"), "-vcodec", "libvpx-vp9")
    mov = _final("mov-prores")
    assert _has(mov, "-vcodec", "prores_ks", "-profile:v", "4", "-pix_fmt", "yuva444p10le")
    assert _has(mov, "-acodec", "pcm_s16le")
    # alpha formats read raw RGBA from the chunks; the others YUV 4:2:0
    assert _has(_input(mov), "-pix_fmt", "rgba") and _has(_input(mp4), "-pix_fmt", "yuv420p")
    assert _has(_input(_final("webm")), "-pix_fmt", "yuv420p")


def test_drafts_take_the_fastest_settings():
    assert _has(_final("mp4", True), "-preset", "ultrafast", "-crf", "30")
    assert _has(_final("webm", True), "-deadline", "realtime", "-cpu-used", "8")
    assert "drawtext" not in " ".join(_final("mp4", True))  # the mux stage adds the font


def test_alpha_chunks_are_ffv1_in_matroska():
    from farm.media import VideoFormat, encode_argv

    fmt = VideoFormat.chunk(64, 48, 10, "h264_nvenc", alpha=True)
    argv = encode_argv("ffmpeg", Path("c.mp4"), fmt, 10)
    assert _has(_input(argv), "-pix_fmt", "rgba")
    assert _has(argv, "-vcodec", "ffv1", "-pix_fmt", "bgra", "-f", "matroska")
    assert fmt.chunk_suffix == ".mkv"
    plain = VideoFormat.chunk(64, 48, 10, "libx264")
    assert not plain.alpha and plain == VideoFormat.chunk(64, 48, 10, "libx264", alpha=False)
