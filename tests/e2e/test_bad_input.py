"""Bad and hostile input through the CLI: one clear line on stderr (a manifest's bad
rows get one line each before it), a non-zero exit, and nothing left behind: no job
or batch row, no artifact, and no embedded runtime started. Validation happens before
anything is accepted, so these run in-process, on the embedded default's FARM_HOME."""

from __future__ import annotations

import io
import math
import os
import socket
import struct
import subprocess
import sys
import wave
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from farm import embedded
from farm.cli import main
from farm.config import Settings
from tests.conftest import job_rows

SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk="


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FARM_MAX_SCRIPT_CHARS", "500")
    monkeypatch.setenv("FARM_WEBHOOK_SECRET", SECRET)
    for name in ("FARM_WEBHOOK_URL", "FARM_WEBHOOK_ALLOWLIST", "FARM_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    embedded.stop(Settings(home=tmp_path / "home"))  # only if a case wrongly started it


# --- what a case leaves behind ---------------------------------------------------


def artifacts(home: Path) -> list[str]:
    root = home / "artifacts"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def refused(root: Path, argv: list[str], message: str, stdin: bytes = b"", code: int = 1):
    """Run `farm ARGV` and check the refusal: exit code, one printable error line (after
    one line per bad manifest row), the message, and nothing left behind."""
    result = CliRunner().invoke(main, argv, input=stdin)
    assert result.exit_code == code, (result.output, result.exception)
    assert result.stdout == ""
    lines = result.stderr.rstrip("\n").split("\n")
    assert lines[-1].startswith("farm: error:"), result.stderr
    assert all(line.isprintable() for line in lines), result.stderr
    assert all(line.startswith(f"{argv[2]}: ") for line in lines[:-1]), result.stderr
    assert message in result.stderr, result.stderr
    home = root / "home"
    assert job_rows(home) == 0 and job_rows(home, "batches") == 0
    assert artifacts(home) == []
    assert embedded.running_pid(Settings(home=home)) is None
    return lines


# --- scripts and options of `farm submit` -----------------------------------------

SENTENCES = b"a. " * 10_000  # 10,000 one-character sentences: 30,000 characters
PARAGRAPHS = b"a.\n\n" * 10_000  # each paragraph break is a segment and a pause

# label, data of s.txt, extra argv, extra env, message
SCRIPT_CASES = [
    ("empty", b"", [], {}, "empty"),
    ("whitespace", b"  \n\n\t ", [], {}, "empty"),
    ("control characters only", "\x07\x1b\x08\x7f\r\x0b\x0c\x9b".encode(), [], {}, "empty"),
    ("bidi overrides only", "\u202e\u202d\u2066".encode(), [], {}, "empty"),
    ("not utf-8", b"caf\xe9 au lait", [], {}, "not valid UTF-8"),
    # Markup (farm/markup.py): refused with the line it is on.
    (
        "markup unknown tag",
        b"Hello <emphasis>there</emphasis>.\n\n<voice name='x'>Hi</voice>",
        [],
        {},
        "script markup, line 3: unknown tag <voice>",
    ),
    (
        "markup unclosed tag",
        b"<speak>\nHello <emphasis>there.\n</speak>",
        [],
        {},
        "script markup, line 3: mismatched tag",
    ),
    (
        "markup entity declaration",
        b'<!DOCTYPE speak [<!ENTITY a "aaaaaaaa">]>\n<speak>&a;&a;</speak>',
        [],
        {},
        "script markup, line 1: declarations (<!DOCTYPE) are not allowed",
    ),
    (
        "markup break too long",
        b'Wait.\n<break time="11s"/> Go.',
        [],
        {},
        "script markup, line 2: <break time='11s'> is over the limit of 10 s",
    ),
    (
        "markup rate out of range",
        b'<prosody rate="400%">Fast.</prosody>',
        [],
        {},
        "script markup, line 1: <prosody rate='400%'>",
    ),
    ("markup bare ampersand", b"<speak>Fish & chips</speak>", [], {}, "write & as &amp;"),
    ("binary", b"\x89PNG\r\n\x1a\n\x00\x00", [], {}, "binary"),
    ("random bytes", bytes(range(256)) * 20, [], {}, "binary"),
    ("too long", b"word " * 200, [], {}, "limit is 500"),
    # Cut mid-character where reading stops: still "too long", not "not UTF-8".
    ("huge non-ascii", "é".encode() * 3_000_000, [], {}, "more than 500 characters"),
    ("huge", b"words " * 2_000_000, [], {}, "more than 500 characters"),
    (
        "10,000 one-character sentences",
        SENTENCES,
        [],
        {"FARM_MAX_SCRIPT_CHARS": "20000"},
        "the script has 30000 characters; the limit is 20000",
    ),
    (
        "10,000 one-character paragraphs",
        PARAGRAPHS,
        [],
        {"FARM_MAX_SCRIPT_CHARS": "50000"},
        "the limit is 45000 frames (FARM_MAX_JOB_FRAMES)",
    ),
    (
        "more frames than the limit",
        b"Hello there, this line takes a few seconds to say.",
        [],
        {"FARM_MAX_JOB_FRAMES": "50"},
        "makes a video of at least",
    ),
    ("unknown avatar", b"Hello.", ["--avatar", "nobody"], {}, "unknown avatar 'nobody'"),
    ("path in avatar", b"Hello.", ["--avatar", "../x"], {}, "invalid avatar name"),
    ("dot-dot avatar", b"Hello.", ["--avatar", ".."], {}, "invalid avatar name"),
    ("slash in avatar", b"Hello.", ["--avatar", "demo/x"], {}, "invalid avatar name"),
    ("newline in avatar", b"Hello.", ["--avatar", "demo\n"], {}, "invalid avatar name 'demo\\n'"),
    ("NUL in avatar", b"Hello.", ["--avatar", "demo\0"], {}, "invalid avatar name"),
    ("300-character avatar", b"Hello.", ["--avatar", "a" * 300], {}, "invalid avatar name"),
    ("empty avatar", b"Hello.", ["--avatar", ""], {}, "invalid avatar name"),
    ("unknown voice", b"Hello.", ["--voice", "robot"], {}, "unknown voice"),
    ("bad size", b"Hello.", ["--size", "513"], {}, "invalid size"),
    ("huge size", b"Hello.", ["--size", "99999999999x2"], {}, "invalid size"),
    ("bad fps", b"Hello.", ["--fps", "0"], {}, "fps must be"),
    ("seed out of range", b"Hello.", ["--seed", "9" * 30], {}, "seed must be within"),
    ("negative seed", b"Hello.", ["--seed", "-1"], {}, "seed must be within"),
    ("bad limit setting", b"Hello.", [], {"FARM_MAX_JOB_FRAMES": "0"}, "must be positive"),
    (
        "output without wait",  # nothing would stay to write it
        b"Hello.",
        ["--output", "x.mp4"],
        {},
        "--output needs --wait",
    ),
    # Settings that cannot work are refused at start-up, not when a job reaches plan.
    (
        "unknown renderer",
        b"Hello.",
        [],
        {"FARM_RENDERER": "bogus"},
        "FARM_RENDERER 'bogus' is not a renderer; choose one of portrait, null",
    ),
    ("unknown device", b"Hello.", [], {"FARM_DEVICE": "tpu"}, "FARM_DEVICE 'tpu' is not auto"),
    (
        "cron minute out of range",
        b"Hello.",
        [],
        {"FARM_NIGHTLY_CRON": "99 * * * *"},
        "'99' is not a valid minute (0-59)",
    ),
    (
        "cron with four fields",
        b"Hello.",
        [],
        {"FARM_NIGHTLY_CRON": "0 2 * *"},
        "FARM_NIGHTLY_CRON must have 5 fields",
    ),
    (
        "zero visibility timeout",
        b"Hello.",
        [],
        {"FARM_VISIBILITY_TIMEOUT": "0"},
        "FARM_VISIBILITY_TIMEOUT must be positive, got 0",
    ),
    (
        "negative retries",
        b"Hello.",
        [],
        {"FARM_TASK_MAX_RETRIES": "-1"},
        "FARM_TASK_MAX_RETRIES must be 0 or more",
    ),
    (
        "not a broker URL",
        b"Hello.",
        [],
        {"FARM_BROKER_URL": "bogus://x"},
        "FARM_BROKER_URL 'bogus://x' is not a broker URL",
    ),
]


@pytest.mark.parametrize(
    "label, data, extra, settings, message", SCRIPT_CASES, ids=[c[0] for c in SCRIPT_CASES]
)
def test_bad_submissions(env, monkeypatch, label, data, extra, settings, message):
    (env / "s.txt").write_bytes(data)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    lines = refused(env, ["submit", "s.txt", *extra], message)
    assert len(lines) == 1


def test_a_huge_script_on_stdin_is_refused_without_reading_it_all(env):
    refused(env, ["submit", "-"], "more than 500 characters", stdin=b"x" * 50_000_000)


def test_missing_script_file(env):
    refused(env, ["submit", str(env / "nope.txt")], "no such script file")


@pytest.mark.parametrize("target", ["scripts", "/dev/null"])
def test_a_script_that_is_not_a_regular_file_is_called_that(env, target):
    (env / "scripts").mkdir()
    refused(env, ["submit", target], f"script {target} is not a regular file")


def test_farm_home_that_is_a_regular_file(env, monkeypatch):
    (env / "home-file").write_bytes(b"")
    monkeypatch.setenv("FARM_HOME", str(env / "home-file"))
    (env / "s.txt").write_bytes(b"Hello.")
    refused(env, ["submit", "s.txt"], "home-file exists and is not a directory")


def test_a_dotenv_that_is_not_utf8(env):
    (env / ".env").write_bytes(b"FARM_FPS=25\nFARM_VOICE=caf\xe9\n")
    (env / "s.txt").write_bytes(b"Hello.")
    lines = refused(env, ["submit", "s.txt"], ".env is not valid UTF-8 (line 2)")
    assert len(lines) == 1


def test_a_fresh_home_with_an_unreachable_broker_names_the_broker(env, monkeypatch):
    """The default SQLite database is farm's own, so its tables are made whatever the
    broker: the error is about the broker, not 'no such table'. A real process: the
    Celery app reads its broker once, when first imported, so in this process another
    test may have fixed it already."""
    monkeypatch.setenv("FARM_BROKER_URL", "redis://127.0.0.1:9/0")
    (env / "s.txt").write_bytes(b"Hello.")
    proc = subprocess.run(
        [sys.executable, "-m", "farm", "submit", "s.txt"],
        capture_output=True,
        env={**os.environ},
        timeout=120,
    )
    lines = proc.stderr.decode().rstrip("\n").split("\n")
    assert proc.returncode == 1 and proc.stdout == b"" and len(lines) == 1, lines
    assert lines[0].startswith("farm: error: could not queue the job")
    assert "no such table" not in lines[-1] and "127.0.0.1:9" in lines[-1]
    assert job_rows(env / "home") == 0 and artifacts(env / "home") == []


def test_a_configured_database_without_tables_says_to_upgrade(env, monkeypatch):
    monkeypatch.setenv("FARM_DATABASE_URL", f"sqlite:///{env / 'empty.db'}")
    monkeypatch.setenv("FARM_BROKER_URL", "redis://127.0.0.1:9/0")
    refused(env, ["jobs"], "the database has no farm tables yet: run 'farm db upgrade' first")


def test_builtin_avatar_shows_on_a_fresh_home(env):
    result = CliRunner().invoke(main, ["avatar", "show", "demo"])
    assert result.exit_code == 0, result.output
    assert "name      demo" in result.stdout and "built in" in result.stdout
    assert job_rows(env / "home") == 0


# --- webhook targets ---------------------------------------------------------------

# label, URL, message
WEBHOOK_CASES = [
    ("metadata", "http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("metadata in IPv6", "http://[::ffff:169.254.169.254]/", "cloud metadata (inside IPv6)"),
    ("loopback", "http://127.0.0.1:8080/hook", "loopback"),
    ("loopback as one number", "http://2130706433/", "loopback"),
    ("loopback in hex", "http://0x7f000001/", "loopback"),
    ("IPv6 loopback", "http://[::1]/", "loopback"),
    ("localhost", "http://localhost/hook", "localhost is 127.0.0.1, a loopback"),
    ("private 10/8", "https://10.1.2.3/hook", "private"),
    ("private 192.168/16", "http://192.168.0.10/", "private"),
    ("link-local", "http://169.254.10.10/", "link-local"),
    ("unspecified", "http://0.0.0.0/", "0.0.0.0, an unspecified address"),
    ("broadcast", "http://255.255.255.255/", "255.255.255.255, a broadcast address"),
    ("private 172.16/12", "http://172.16.0.9/", "172.16.0.9, a private address"),
    ("file scheme", "file:///etc/passwd", "only http and https"),
    ("gopher scheme", "gopher://example.com/", "only http and https"),
    ("javascript", "javascript:alert(1)", "only http and https"),
    ("no host", "http:///hook", "has no host"),
    ("newline in host", "http://exa\nmple.com/", "whitespace or a control character"),
    ("bad port", "http://example.com:99999/", "not a valid URL"),
    ("too long", "https://example.com/" + "a" * 3000, "longer than 2000 characters"),
    ("credentials", "https://user:hunter2@example.com/", "credentials in the URL"),
]


@pytest.mark.parametrize("label, url, message", WEBHOOK_CASES, ids=[c[0] for c in WEBHOOK_CASES])
def test_bad_webhooks(env, label, url, message):
    (env / "s.txt").write_bytes(b"Hello.")
    lines = refused(env, ["submit", "s.txt", "--webhook", url], message)
    assert len(lines) == 1 and "hunter2" not in lines[0]


@pytest.mark.parametrize(
    "addresses, message",
    [
        (["169.254.169.254"], "cloud metadata"),
        (["10.0.0.7"], "private"),
        (["93.184.215.14", "127.0.0.1"], "loopback"),  # one bad address is enough
    ],
)
def test_names_that_resolve_to_internal_addresses(env, monkeypatch, addresses, message):
    """DNS answers for one made-up name; every other name resolves as usual."""
    real = socket.getaddrinfo

    def resolver(host, port, *args, **kwargs):
        if host != "hooks.attacker.test":
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    (env / "s.txt").write_bytes(b"Hello.")
    refused(env, ["submit", "s.txt", "--webhook", "http://hooks.attacker.test/x"], message)


# --- photos of `farm avatar add` ---------------------------------------------------


def png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def noise_png() -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


# label, avatar name, photo bytes (None: no such file), extra env, message
PHOTO_CASES = [
    ("path in name", "../x", b"", {}, "invalid avatar name"),
    ("slash in name", "a/b", b"", {}, "invalid avatar name"),
    ("NUL in name", "a\0b", b"", {}, "invalid avatar name"),
    ("300-character name", "a" * 300, b"", {}, "invalid avatar name"),
    ("not an image", "ok", b"this is not an image", {}, "not a readable image"),
    ("empty file", "ok", b"", {}, "not a readable image"),
    ("header only", "ok", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, {}, "not a readable image"),
    ("truncated", "ok", noise_png()[:3000], {}, "not a readable image"),
    ("decompression bomb", "ok", png(100_000, 100_000), {}, "more than 40000000 pixels"),
    ("over the limit", "ok", png(9_000, 5_000), {}, "more than 40000000 pixels"),
    (
        "over a configured limit",
        "ok",
        png(200, 200),
        {"FARM_MAX_PHOTO_PIXELS": "10000"},
        "more than 10000 pixels (FARM_MAX_PHOTO_PIXELS)",
    ),
    ("missing", "ok", None, {}, "no such photo"),
]


@pytest.mark.parametrize(
    "label, name, photo, settings, message", PHOTO_CASES, ids=[c[0] for c in PHOTO_CASES]
)
def test_bad_avatar_add(env, monkeypatch, label, name, photo, settings, message):
    if photo is not None:
        (env / "photo.png").write_bytes(photo)
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    lines = refused(env, ["avatar", "add", name, "--photo", "photo.png"], message)
    assert len(lines) == 1


def test_a_photo_over_the_size_limit_is_not_read(env):
    with open(env / "photo.png", "wb") as fh:  # sparse: 60 MiB on paper, no disk
        fh.truncate(60 * 1024 * 1024)
    refused(env, ["avatar", "add", "ok", "--photo", "photo.png"], "larger than 50 MiB")


# --- audio of `farm submit --audio` -------------------------------------------------


def tone_wav(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * 32767 * np.sin(2 * math.pi * 220 * t)).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return buf.getvalue()


# label, audio bytes, extra env, message
AUDIO_CASES = [
    ("not audio", b"just some text, no audio here", {}, "not a readable audio file"),
    ("empty", b"", {}, "is empty"),
    ("truncated header", tone_wav(1.0)[:30], {}, "not a readable audio file"),
    ("too long", tone_wav(3.0), {"FARM_MAX_AUDIO_SECONDS": "1"}, "FARM_MAX_AUDIO_SECONDS"),
    (
        "more frames than the limit",
        tone_wav(3.0),
        {"FARM_MAX_JOB_FRAMES": "50"},
        "a.wav makes a video of 75 frames (3 s at 25 fps); the limit is 50 frames",
    ),
]


@pytest.mark.parametrize(
    "label, audio, settings, message", AUDIO_CASES, ids=[c[0] for c in AUDIO_CASES]
)
def test_bad_audio(env, monkeypatch, label, audio, settings, message):
    (env / "a.wav").write_bytes(audio)
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    refused(env, ["submit", "--audio", "a.wav"], message)


# --- manifests of `farm batch submit` ------------------------------------------------


class Link(str):
    """A symlink to this target instead of a file."""


CSV_HEAD = "text,output\n"

# label, files (name -> bytes or Link), manifest argument, extra argv, extra env, message
MANIFEST_CASES = [
    ("missing", {}, "nope.csv", [], {}, "no such manifest"),
    ("not a manifest", {"m.xlsx": b"x"}, "m.xlsx", [], {}, "use a .csv or .jsonl file"),
    ("empty", {"m.csv": b""}, "m.csv", [], {}, "the manifest is empty"),
    ("header only", {"m.csv": b"text\n"}, "m.csv", [], {}, "has no valid rows"),
    ("no script column", {"m.csv": b"avatar\ndemo\n"}, "m.csv", [], {}, "needs a 'script'"),
    ("unknown column", {"m.csv": b"text,colour\nHi.,red\n"}, "m.csv", [], {}, "unknown column"),
    ("repeated column", {"m.csv": b"text,text\nHi.,Ho.\n"}, "m.csv", [], {}, "appears twice"),
    ("alias and column", {"m.csv": b"text,output,output_key\nHi.,a,b\n"}, "m.csv", [], {}, "twice"),
    ("not utf-8", {"m.csv": b"text\n\xff\xfe\n"}, "m.csv", [], {}, "not valid UTF-8"),
    ("NUL in a row", {"m.csv": b"text\nHi\0there\n"}, "m.csv", [], {}, "line 2:"),
    ("ragged row", {"m.csv": b"text,output\nHi.\n"}, "m.csv", [], {}, "has 1 fields"),
    ("empty directory", {"d/notes.md": b"x"}, "d", [], {}, "has no valid rows"),
    ("json number", {"m.jsonl": b'{"text": 5}\n'}, "m.jsonl", [], {}, "must be a string, got int"),
    ("json list", {"m.jsonl": b'{"text": ["a"]}\n'}, "m.jsonl", [], {}, "got list"),
    ("json null", {"m.jsonl": b'{"text": null}\n'}, "m.jsonl", [], {}, "no script"),
    ("json array row", {"m.jsonl": b"[1, 2]\n"}, "m.jsonl", [], {}, "must be a JSON object"),
    ("json repeated key", {"m.jsonl": b'{"text":"a","text":"b"}\n'}, "m.jsonl", [], {}, "twice"),
    ("json deep nesting", {"m.jsonl": b"[" * 100_000}, "m.jsonl", [], {}, "not valid JSON"),
    ("json huge number", {"m.jsonl": b'{"t": ' + b"9" * 5000 + b"}"}, "m.jsonl", [], {}, "JSON"),
    ("json bad", {"m.jsonl": b'{"text": "Hi.",\n'}, "m.jsonl", [], {}, "not valid JSON"),
    ("path outside", {"m.csv": b"script\n../x.txt\n"}, "m.csv", [], {}, "leads outside"),
    ("absolute path", {"m.csv": b"script\n/etc/passwd\n"}, "m.csv", [], {}, "must be relative"),
    (
        "symlink outside",
        {"m/m.csv": b"script\nlink.txt\n", "m/link.txt": Link("/etc/passwd")},
        "m/m.csv",
        [],
        {},
        "leads outside",
    ),
    (
        "symlink in a directory",
        {"d/a.txt": Link("../outside.txt"), "outside.txt": b"Secret."},
        "d",
        [],
        {},
        "leads outside",
    ),
    (
        "symlink loop",
        {"m.csv": b"script\nloop.txt\n", "loop.txt": Link("loop.txt")},
        "m.csv",
        [],
        {},
        "cannot be read",
    ),
    (
        "directory as script",
        {"m.csv": b"script\nsub\n", "sub/a.txt": b"Hi."},
        "m.csv",
        [],
        {},
        "not a regular file",
    ),
    ("binary script", {"m.csv": b"script\nb.txt\n", "b.txt": b"\0\1\2"}, "m.csv", [], {}, "binary"),
    ("output dot-dot", {"m.csv": (CSV_HEAD + "Hi.,../x.mp4\n").encode()}, "m.csv", [], {}, "'..'"),
    (
        "output absolute",
        {"m.csv": (CSV_HEAD + "Hi.,/x.mp4\n").encode()},
        "m.csv",
        [],
        {},
        "relative",
    ),
    (
        "output 300 chars",
        {"m.csv": (CSV_HEAD + "Hi.," + "x" * 300 + "\n").encode()},
        "m.csv",
        [],
        {},
        "limit is 200",
    ),
    (
        "output bidi",
        {"m.csv": (CSV_HEAD + "Hi.,a\u202egpm.exe\n").encode()},
        "m.csv",
        [],
        {},
        "control character",
    ),
    (
        "output NUL",
        {"m.jsonl": b'{"text": "Hi.", "output": "a\\u0000.mp4"}\n'},
        "m.jsonl",
        [],
        {},
        "control",
    ),
    (
        "duplicate output",
        {"m.csv": (CSV_HEAD + "Hi.,a.mp4\nHo.,a.mp4\n").encode()},
        "m.csv",
        [],
        {},
        "already used by line 2",
    ),
    (
        "output is a folder of a later output",
        {"m.csv": (CSV_HEAD + "Hello.,x\nBye.,x/y.mp4\n").encode()},
        "m.csv",
        [],
        {},
        "line 3: output key 'x/y.mp4' needs 'x' as a folder, but that is the output of line 2",
    ),
    (
        "output is a folder of an earlier output",
        {"m.csv": (CSV_HEAD + "Bye.,x/y/z.mp4\nHello.,x/y\n").encode()},
        "m.csv",
        [],
        {},
        "line 3: output key 'x/y' is a folder of the output of line 2",
    ),
    (
        "avatar dot-dot",
        {"m.csv": b"text,avatar\nHi.,../x\n"},
        "m.csv",
        [],
        {},
        "invalid avatar name",
    ),
    ("avatar slash", {"m.csv": b"text,avatar\nHi.,a/b\n"}, "m.csv", [], {}, "invalid avatar name"),
    (
        "avatar 300 chars",
        {"m.csv": ("text,avatar\nHi.," + "a" * 300 + "\n").encode()},
        "m.csv",
        [],
        {},
        "invalid avatar",
    ),
    (
        "webhook metadata",
        {"m.csv": b"text,webhook\nHi.,http://169.254.169.254/\n"},
        "m.csv",
        [],
        {},
        "cloud metadata",
    ),
    (
        "webhook scheme",
        {"m.csv": b"text,webhook\nHi.,ftp://example.com/\n"},
        "m.csv",
        [],
        {},
        "only http",
    ),
    (
        "script too long",
        {"m.csv": ("text\n" + "word " * 200 + "\n").encode()},
        "m.csv",
        [],
        {},
        "limit is 500",
    ),
    (
        "too many rows",
        {"m.csv": ("text\n" + "".join(f"Line {i}.\n" for i in range(4))).encode()},
        "m.csv",
        [],
        {"FARM_MAX_BATCH_JOBS": "3"},
        "the manifest has 4 rows; the limit is 3 jobs per batch (FARM_MAX_BATCH_JOBS)",
    ),
    (
        "too many frames",
        {"m.csv": b"text\nHello there. This line takes a few seconds to say.\n"},
        "m.csv",
        [],
        {"FARM_MAX_JOB_FRAMES": "50"},
        "FARM_MAX_JOB_FRAMES",
    ),
    (
        "batch name dot-dot",
        {"m.csv": b"text\nHi.\n"},
        "m.csv",
        ["--name", "../x"],
        {},
        "invalid batch name",
    ),
    (
        "batch name newline",
        {"m.csv": b"text\nHi.\n"},
        "m.csv",
        ["--name", "b\n"],
        {},
        "invalid batch name",
    ),
    (
        "batch name 300",
        {"m.csv": b"text\nHi.\n"},
        "m.csv",
        ["--name", "b" * 300],
        {},
        "invalid batch name",
    ),
    (
        "batch seed",
        {"m.csv": b"text\nHi.\n"},
        "m.csv",
        ["--name", "b1", "--seed", "-5"],
        {},
        "seed must be within",
    ),
    (
        "template variable missing",
        {
            "m.csv": b"template,name,city\nt.txt,Ann,\nt.txt,Bob,Rome\n",
            "t.txt": b"Hi {name} of {city}.",
        },
        "m.csv",
        [],
        {},
        "line 2: template t.txt: missing variable(s) city",
    ),
    (
        "template column unused",
        {"m.csv": b"template,name,city\nt.txt,Ann,Rome\n", "t.txt": b"Hi {name}."},
        "m.csv",
        [],
        {},
        "unused column(s) city",
    ),
    (
        "template attribute access",
        {"m.csv": b"template,name\nt.txt,Ann\n", "t.txt": b"Hi {name.__class__}."},
        "m.csv",
        [],
        {},
        "bad field {name.__class__}",
    ),
    (
        "template outside",
        {"m/m.csv": b"template,name\n../t.txt,Ann\n", "t.txt": b"Hi {name}."},
        "m/m.csv",
        [],
        {},
        "template path '../t.txt' leads outside",
    ),
    (
        "template option unclosed",
        {"m.csv": b"name\nAnn\n", "t.txt": b"Hi {name."},
        "m.csv",
        ["--name", "b1", "--template", "t.txt"],
        {},
        "template t.txt, line 1: a '{' that is not closed",
    ),
    (
        "template markup in a plain template",
        {"m.csv": b'template,name\nt.txt,"<break time=""9s""/>"\n', "t.txt": b"Hi {name}."},
        "m.csv",
        [],
        {},
        "the value holds script markup",
    ),
]


@pytest.mark.parametrize(
    "label, files, manifest, extra, settings, message",
    MANIFEST_CASES,
    ids=[c[0] for c in MANIFEST_CASES],
)
def test_bad_manifests(env, monkeypatch, label, files, manifest, extra, settings, message):
    for name, content in files.items():
        path = env / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Link):
            path.symlink_to(content)
        else:
            path.write_bytes(content)
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    argv = ["batch", "submit", manifest, *(extra or ["--name", "b1"])]
    refused(env, argv, message)


# --- usage errors and the real process ------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["submit", "s.txt", "--fps", "abc"], "Invalid value for '--fps'"),
        (["submit", "s.txt", "--bogus"], "No such option '--bogus'"),
        (["nosuch"], "No such command 'nosuch'"),
        (["avatar", "add", "x"], "Missing option '--photo'"),
        # Ids are hex: '%' and '_' would match any id in SQL's LIKE, NUL breaks Postgres.
        (["status", "%"], "'%' is not a job id"),
        (["status", ""], "'' is not a job id"),
        (["cancel", "_"], "'_' is not a job id"),
        (["retry", "../x"], "'../x' is not a job id"),
        (["fetch", "ab\0", "out.mp4"], "is not a job id"),
        (["webhooks", "list", "a%"], "is not a job id"),
        (["webhooks", "redeliver", "msg_%"], "is not a webhook delivery id"),
        (["jobs", "--limit", "9" * 20], "is not in the range 1<=x<=100000"),
        (["jobs", "--limit", "0"], "is not in the range"),
        (["jobs", "delete", "ab%"], "'ab%' is not a job id"),
        (["usage", "--by", "planet"], "Invalid value for '--by'"),
    ],
)
def test_usage_errors_are_one_line_too(env, argv, message):
    (env / "s.txt").write_bytes(b"Hello.")
    lines = refused(env, argv, message, code=2)
    assert len(lines) == 1 and lines[0].endswith("-h')")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["avatar", "show", "../x"], "invalid avatar name"),
        (["batch", "status", "a%b"], "invalid batch name"),
        (["batch", "report", "../x"], "invalid batch name"),
        (["avatar", "delete", "../x"], "invalid avatar name"),
        (["jobs", "delete", "--avatar", "../x"], "invalid avatar name"),
        (["usage", "--since", "yesterday"], "invalid --since 'yesterday'"),
    ],
)
def test_names_are_checked_before_they_are_looked_up(env, argv, message):
    assert len(refused(env, argv, message)) == 1


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


def test_real_process_escapes_terminal_control_in_the_error(env):
    """A file name is echoed back, but its escape sequences are shown, not obeyed."""
    proc = subprocess.run(
        [sys.executable, "-m", "farm", "submit", "evil\x1b[2J\x1b]0;owned\x07\u202e.txt"],
        capture_output=True,
        env={**os.environ},
        timeout=60,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 1 and proc.stdout == b""
    assert err == "farm: error: no such script file: evil\\x1b[2J\\x1b]0;owned\\x07\\u202e.txt\n"
    assert not (env / "home" / "farm.db").exists()
