"""Bad input: one clear line on stderr, a non-zero exit, and no job row left behind.
Validation happens before any worker is involved, so these run in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from farm.cli import main
from tests.conftest import job_rows


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FARM_MAX_SCRIPT_CHARS", "500")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


SCRIPT_CASES = [
    ("empty", b"", [], "empty"),
    ("whitespace", b"  \n\n\t ", [], "empty"),
    ("not utf-8", b"caf\xe9 au lait", [], "not valid UTF-8"),
    ("binary", b"\x89PNG\r\n\x1a\n\x00\x00", [], "binary"),
    ("too long", b"word " * 200, [], "limit is 500"),
    ("unknown avatar", b"Hello.", ["--avatar", "nobody"], "unknown avatar 'nobody'"),
    ("path in avatar", b"Hello.", ["--avatar", "../x"], "invalid avatar name"),
    ("unknown voice", b"Hello.", ["--voice", "robot"], "unknown voice"),
    ("bad size", b"Hello.", ["--size", "513"], "invalid size"),
    ("bad fps", b"Hello.", ["--fps", "0"], "fps must be"),
]


@pytest.mark.parametrize(
    "label, data, extra, message", SCRIPT_CASES, ids=[c[0] for c in SCRIPT_CASES]
)
def test_bad_submissions(env, label, data, extra, message):
    script = _write(env / "s.txt", data)
    result = CliRunner().invoke(main, ["submit", script, *extra])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("farm: error:"), result.stderr
    assert message in lines[0]
    assert job_rows(env / "home") == 0


def test_missing_script_file(env):
    result = CliRunner().invoke(main, ["submit", str(env / "nope.txt")])
    assert result.exit_code == 1 and "no such script file" in result.stderr


@pytest.mark.parametrize(
    "name, photo, message",
    [
        ("../x", b"", "invalid avatar name"),
        ("ok", b"this is not an image", "not a readable image"),
        ("ok", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a readable image"),
    ],
)
def test_bad_avatar_add(env, name, photo, message):
    path = _write(env / "photo.png", photo)
    result = CliRunner().invoke(main, ["avatar", "add", name, "--photo", path])
    assert result.exit_code == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (env / "home" / "artifacts" / "avatars").exists()


def test_real_process_exit_code_and_single_stderr_line(env):
    proc = subprocess.run(
        [sys.executable, "-m", "farm.cli", "submit", "-"],
        input=b"   ",
        capture_output=True,
        env={**os.environ},
        timeout=60,
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.decode().strip() == "farm: error: the script is empty: it has no words to speak"
    )
    assert proc.stdout == b""
