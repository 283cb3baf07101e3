"""What a hostile-input run found, fixed at the function that owns each concept: report
cells a spreadsheet would run, output keys that collide as file and folder, writes to
the user's paths, photos of any bit depth, and settings that cannot work."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import pytest

from farm import batches, manifest
from farm.config import Settings, check_cron
from farm.errors import InvalidInput
from farm.stores import LocalStore, write_user_file

# --- formula injection ----------------------------------------------------------------


@pytest.mark.parametrize("text", ["=1+1.txt", "+SUM(A1)", "-2+3", "@cmd", "\tx", "\r=y"])
def test_report_cells_that_start_a_formula_are_shown_as_text(text: str) -> None:
    assert batches.csv_cell(text) == "'" + text


@pytest.mark.parametrize("value", ["plain.mp4", "a=b", "", 3.5, -1.0, 0])
def test_other_cells_are_unchanged(value: object) -> None:
    assert batches.csv_cell(value) == value


def test_the_csv_report_escapes_every_text_column() -> None:
    report = {
        "jobs": [
            {
                "row": "=1+1.txt",
                "output": "=1+1.mp4",
                "job_id": "abc",
                "state": "failed",
                "output_url": None,
                "captions_srt_url": "=HYPERLINK(1)",
                "captions_vtt_url": None,
                "poster_url": "+poster",
                "preview_url": None,
                "duration": -0.5,
                "error": "@SUM(1)",
            }
        ],
        "invalid_rows": [{"row": "+line 3", "reason": "-bad"}],
    }
    rows = list(csv.DictReader(io.StringIO(batches.report_csv(report))))
    assert rows[0]["row"] == "'=1+1.txt" and rows[0]["output"] == "'=1+1.mp4"
    assert rows[0]["error"] == "'@SUM(1)" and rows[0]["duration"] == "-0.5"
    assert rows[0]["output_url"] == "" and rows[0]["captions_vtt_url"] == ""
    assert rows[0]["captions_srt_url"] == "'=HYPERLINK(1)" and rows[0]["poster_url"] == "'+poster"
    assert rows[1]["row"] == "'+line 3" and rows[1]["error"] == "'-bad"


# --- output keys that collide as file and folder ----------------------------------------


@pytest.mark.parametrize(
    "first, second, problem",
    [
        ("x", "x/y.mp4", "needs 'x' as a folder, but that is the output of line 2"),
        ("x/y.mp4", "x", "is a folder of the output of line 2"),
        ("a/b/c.mp4", "a", "is a folder of the output of line 2"),
        ("a.mp4", "a.mp4/b.mp4", "needs 'a.mp4' as a folder"),
        ("a.mp4", "a.mp4", "already used by line 2"),
    ],
)
def test_output_keys_that_collide(first: str, second: str, problem: str) -> None:
    keys = manifest.OutputKeys()
    assert keys.clash(first) is None
    keys.add(first, "line 2")
    clash = keys.clash(second)
    assert clash is not None and problem in clash


@pytest.mark.parametrize("first, second", [("x/a.mp4", "x/b.mp4"), ("xy", "x/y"), ("x", "xy/z")])
def test_output_keys_that_share_a_folder_or_a_prefix_do_not_collide(
    first: str, second: str
) -> None:
    keys = manifest.OutputKeys()
    keys.add(first, "line 2")
    assert keys.clash(second) is None


# --- files the user names ------------------------------------------------------------------


def test_missing_folders_are_created(tmp_path: Path) -> None:
    dest = tmp_path / "new" / "sub" / "x.txt"
    write_user_file(dest, lambda p: p.write_text("hi"))
    assert dest.read_text() == "hi"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_device_is_one_error_and_stays_a_device() -> None:
    with pytest.raises(InvalidInput, match="cannot write /dev/full: No space left on device"):
        write_user_file(Path("/dev/full"), lambda p: p.write_bytes(b"x" * 100_000))
    assert Path("/dev/full").is_char_device()


def test_a_failed_copy_leaves_no_partial_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    dest = tmp_path / "out.mp4"
    with pytest.raises(Exception, match="missing from the store"):
        write_user_file(dest, lambda p: (p.write_bytes(b"half"), store.get_file("nope", p)))
    assert not dest.exists()


def test_a_folder_in_the_way_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidInput, match="cannot write .*file/x.mp4"):
        write_user_file(tmp_path / "file" / "x.mp4", lambda p: p.write_bytes(b"x"))
    with pytest.raises(InvalidInput, match="is a directory"):
        write_user_file(tmp_path, lambda p: p.write_bytes(b"x"))


# --- photos of any bit depth ---------------------------------------------------------------


def _png(pixels: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    (Image.fromarray(pixels, mode) if mode else Image.fromarray(pixels)).save(buf, "PNG")
    return buf.getvalue()


def test_a_16_bit_greyscale_photo_decodes_like_its_8_bit_copy() -> None:
    from PIL import Image

    from farm.avatars import photo_rgb

    grey8 = np.linspace(0, 255, 64 * 64).reshape(64, 64).astype(np.uint8)
    data16 = _png(grey8.astype(np.uint16) * 257)
    assert Image.open(io.BytesIO(data16)).mode.startswith("I")
    rgb16, rgb8 = photo_rgb(data16, 10**6), photo_rgb(_png(grey8), 10**6)
    assert rgb16.shape == (64, 64, 3) and rgb16.dtype == np.uint8
    assert np.array_equal(rgb16, rgb8)


def test_an_rgba_photo_keeps_its_colours() -> None:
    from farm.avatars import photo_rgb

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgb = photo_rgb(_png(rgba), 10**6)
    assert rgb.shape == (8, 8, 3) and (rgb[..., 0] == 200).all()


# --- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["0 2 * * *", "*/15 0-5,22 1 * *", "30 1 * jan-mar mon-fri", "0 0 1 12 7"]
)
def test_crontabs_beat_can_run(text: str) -> None:
    check_cron(text)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("99 * * * *", "'99' is not a valid minute (0-59)"),
        ("0 24 * * *", "'24' is not a valid hour"),
        ("0 0 0 * *", "'0' is not a valid day of month"),
        ("0 0 * 13 *", "'13' is not a valid month"),
        ("0 0 * * 8", "'8' is not a valid day of week"),
        ("*/0 * * * *", "'*/0' is not a valid minute"),
        ("1-2-3 * * * *", "is not a valid minute"),
        ("x * * * *", "'x' is not a valid minute"),
        ("0 2 * *", "must have 5 fields"),
    ],
)
def test_crontabs_that_cannot_run(text: str, problem: str) -> None:
    with pytest.raises(InvalidInput, match="FARM_NIGHTLY_CRON") as err:
        check_cron(text)
    assert problem in str(err.value)


@pytest.mark.parametrize(
    "env, problem",
    [
        ({"FARM_RENDERER": "bogus"}, "FARM_RENDERER 'bogus' is not a renderer"),
        ({"FARM_DEVICE": "tpu"}, "FARM_DEVICE 'tpu'"),
        ({"FARM_DEVICE": "cuda:x"}, "FARM_DEVICE 'cuda:x'"),
        ({"FARM_VISIBILITY_TIMEOUT": "0"}, "FARM_VISIBILITY_TIMEOUT must be positive"),
        ({"FARM_RENDER_BATCH": "-4"}, "FARM_RENDER_BATCH must be positive"),
        ({"FARM_STALL_SECONDS": "-1"}, "FARM_STALL_SECONDS must be 0 or more"),
        ({"FARM_BROKER_URL": "localhost:6379"}, "is not a broker URL"),
        # kombu needs a master_name transport option that farm never passes
        ({"FARM_BROKER_URL": "sentinel://127.0.0.1:26379"}, "is not a broker URL"),
        ({"FARM_NIGHTLY_CRON": "99 * * * *"}, "FARM_NIGHTLY_CRON"),
    ],
)
def test_settings_that_cannot_work_are_refused_at_start_up(
    tmp_path: Path, env: dict[str, str], problem: str
) -> None:
    with pytest.raises(InvalidInput, match=problem):
        Settings.from_env({"FARM_HOME": str(tmp_path), **env}, dotenv=tmp_path / ".env")


@pytest.mark.parametrize(
    "env",
    [
        {"FARM_DEVICE": "cuda:1"},
        {"FARM_RENDERER": "null"},
        {"FARM_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//"},
        {"FARM_STALL_SECONDS": "0"},
    ],
)
def test_settings_that_work_are_accepted(tmp_path: Path, env: dict[str, str]) -> None:
    Settings.from_env({"FARM_HOME": str(tmp_path), **env}, dotenv=tmp_path / ".env")


def test_a_dotenv_that_is_not_utf8_names_its_line_and_does_not_break_redaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from farm.config import known_secrets

    (tmp_path / ".env").write_bytes(b"# ok\nFARM_WEBHOOK_SECRET=whsec_abc\nX=\xff\n")
    with pytest.raises(InvalidInput, match=r"\.env is not valid UTF-8 \(line 3\)"):
        Settings.from_env({}, dotenv=tmp_path / ".env")
    monkeypatch.chdir(tmp_path)
    assert "whsec_abc" in known_secrets({})
