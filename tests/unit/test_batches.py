"""Batch manifests without services: parsing (CSV, JSON Lines, a directory), the
validation table, idempotency keys, the queue lanes and the nightly schedule."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from farm import manifest
from farm.errors import InvalidInput
from farm.manifest import Defaults, RawRow, Row

MAX = 1000


def check_job(avatar: str, voice: str, webhook: str | None) -> str | None:
    """Stands in for jobs.validate + the webhook check, which need a database."""
    if avatar not in ("demo", "roman"):
        raise InvalidInput(f"unknown avatar {avatar!r}")
    if voice not in ("joe", "espeak"):
        raise InvalidInput(f"unknown voice {voice!r}")
    if webhook is not None and not webhook.startswith("https://"):
        raise InvalidInput(f"webhook URL {webhook!r}: only http and https are allowed")
    return webhook


def checked(base: Path, rows: list[RawRow], defaults: Defaults | None = None) -> manifest.Checked:
    return manifest.check_rows(rows, base, defaults or Defaults(), MAX, check_job)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --- parsing ----------------------------------------------------------------


def test_csv_rows_are_numbered_by_the_line_they_start_on(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", "Hello from a file.")
    m = write(
        tmp_path / "m.csv",
        "script,text,avatar,voice,webhook,output_key\n"
        "a.txt,,roman,espeak,https://example.com/h,out/a.mp4\n"
        "\n"
        ',"Two lines\nof inline text.",,,,\n'
        ",Third.,,,,c.mp4\n",
    )
    base, raw = manifest.read(m)
    assert base == tmp_path
    assert [(r.where, r.line) for r in raw] == [("line 2", 2), ("line 4", 4), ("line 6", 6)]
    assert raw[0].values == {
        "script": "a.txt",
        "text": None,
        "avatar": "roman",
        "voice": "espeak",
        "webhook": "https://example.com/h",
        "output": "out/a.mp4",  # output_key is an alias of output
    }
    result = checked(base, raw)
    assert result.problems == []
    a, two, third = result.rows
    assert (a.script, a.source, a.avatar, a.voice, a.output) == (
        "Hello from a file.",
        "a.txt",
        "roman",
        "espeak",
        "out/a.mp4",
    )
    assert two.script == "Two lines\nof inline text." and two.source == ""
    assert (two.avatar, two.voice, two.webhook) == ("demo", "joe", None)  # the defaults
    assert two.output.startswith("text-") and two.output.endswith(".mp4")
    assert third.output == "c.mp4"


def test_jsonl_rows_keep_their_line_numbers_and_types(tmp_path: Path) -> None:
    m = write(
        tmp_path / "m.jsonl",
        '{"text": "One.", "output": "1.mp4"}\n'
        "\n"
        '{"text": "Two.", "avatar": 7}\n'
        "not json\n"
        '["a list"]\n'
        '{"text": "Six.", "colour": "red"}\n',
    )
    base, raw = manifest.read(m)
    result = checked(base, raw)
    assert [r.where for r in result.rows] == ["line 1"]
    assert [(p.where, p.line) for p in result.problems] == [
        ("line 3", 3),
        ("line 4", 4),
        ("line 5", 5),
        ("line 6", 6),
    ]
    reasons = [p.reason for p in result.problems]
    assert reasons[0] == "avatar must be a string, got int"
    assert reasons[1].startswith("not valid JSON")
    assert reasons[2] == "must be a JSON object, got list"
    assert reasons[3].startswith("unknown field 'colour'")


def test_a_directory_is_a_row_per_txt_file(tmp_path: Path) -> None:
    write(tmp_path / "b.txt", "Bee.")
    write(tmp_path / "a.txt", "Ay.")
    write(tmp_path / "notes.md", "not a script")
    write(tmp_path / ".hidden.txt", "skipped")
    write(tmp_path / "sub" / "c.txt", "not at the top level")
    base, raw = manifest.read(tmp_path)
    result = checked(base, raw, Defaults(avatar="roman", voice="espeak"))
    assert [(r.where, r.output, r.avatar, r.voice) for r in result.rows] == [
        ("a.txt", "a.mp4", "roman", "espeak"),
        ("b.txt", "b.mp4", "roman", "espeak"),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("avatar,voice\ndemo,joe\n", "needs a 'script' or a 'text' column"),
        ("script,avtar\na.txt,demo\n", "unknown column 'avtar'"),
        ("script,output,output_key\na.txt,a,b\n", "column 'output' appears twice"),
    ],
)
def test_a_manifest_that_cannot_be_read_is_refused_whole(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        manifest.read(write(tmp_path / "m.csv", text))


def test_manifest_files_that_are_not_manifests(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no such manifest"):
        manifest.read(tmp_path / "missing.csv")
    with pytest.raises(InvalidInput, match="use a .csv or .jsonl"):
        manifest.read(write(tmp_path / "m.xlsx", "x"))
    with pytest.raises(InvalidInput, match="not valid UTF-8"):
        manifest.read(write(tmp_path / "m.csv", b"script\n\xff\xfe.txt\n"))


# --- the validation table ---------------------------------------------------


def _outside(tmp_path: Path) -> Path:
    return write(tmp_path / "outside" / "secret.txt", "Top secret.")


@pytest.fixture
def base(tmp_path: Path) -> Path:
    base = tmp_path / "manifest"
    write(base / "ok.txt", "A fine script.")
    write(base / "sub" / "deep.txt", "Deeper.")
    write(base / "binary.txt", b"abc\0def")
    write(base / "latin1.txt", "caf\xe9".encode("latin-1"))
    write(base / "long.txt", "word " * MAX)
    write(base / "blank.txt", " \n\t\n")
    (base / "adir.txt").mkdir()
    secret = _outside(tmp_path)
    os.symlink(secret, base / "link.txt")  # a file inside pointing outside
    os.symlink(secret.parent, base / "linkdir")  # a directory inside pointing outside
    os.symlink(base / "ok.txt", base / "inner-link.txt")  # stays inside: fine
    return base


CASES: list[tuple[dict[str, object], str | None]] = [
    ({"script": "ok.txt"}, None),
    ({"script": "./sub/../ok.txt", "output": "x.mp4"}, None),
    ({"script": "sub/deep.txt"}, None),
    ({"script": "inner-link.txt"}, None),
    ({"text": "Inline."}, None),
    ({}, "no script"),
    ({"script": None, "text": None}, "no script"),
    ({"script": "ok.txt", "text": "Both."}, "not both"),
    ({"script": "missing.txt"}, "no such script file"),
    ({"script": "adir.txt"}, "not a regular file"),
    ({"script": "/etc/hostname"}, "must be relative"),
    ({"script": "../outside/secret.txt"}, "outside the manifest's directory"),
    ({"script": "sub/../../outside/secret.txt"}, "outside the manifest's directory"),
    ({"script": "../no-such-file.txt"}, "outside the manifest's directory"),
    ({"script": "link.txt"}, "outside the manifest's directory"),
    ({"script": "linkdir/secret.txt"}, "outside the manifest's directory"),
    ({"script": "binary.txt"}, "binary data"),
    ({"script": "latin1.txt"}, "not valid UTF-8"),
    ({"script": "long.txt"}, "the limit is 1000"),
    ({"script": "blank.txt"}, "empty"),
    ({"text": "..."}, "empty"),
    ({"text": 42}, "text must be a string, got int"),
    ({"script": ["ok.txt"]}, "script must be a string, got list"),
    ({"text": "Hi.", "voice": True}, "voice must be a string, got bool"),
    ({"text": "Hi.", "avatar": "nobody"}, "unknown avatar 'nobody'"),
    ({"text": "Hi.", "voice": "alto"}, "unknown voice 'alto'"),
    ({"text": "Hi.", "webhook": "ftp://example.com"}, "only http and https"),
    ({"text": "Hi.", "output": "../up.mp4"}, "must not contain '..'"),
    ({"text": "Hi.", "output": "a/../b.mp4"}, "must not contain '..'"),
    ({"text": "Hi.", "output": "/abs.mp4"}, "must be relative"),
    ({"text": "Hi.", "output": "nul\0.mp4"}, "control character"),
    ({"text": "Hi.", "output": "tab\t.mp4"}, "control character"),
    ({"text": "Hi.", "output": "a//b.mp4"}, "empty or '.' path segment"),
    ({"text": "Hi.", "output": "a\\b.mp4"}, "backslash"),
    ({"text": "Hi.", "output": "x" * 201}, "the limit is 200"),
    ({"text": "Hi.", "output": "x" * 200}, None),
]


@pytest.mark.parametrize(("values", "problem"), CASES)
def test_validation_table(base: Path, values: dict[str, object], problem: str | None) -> None:
    result = checked(base, [RawRow("line 2", dict(values), 2)])
    if problem is None:
        assert result.problems == [] and len(result.rows) == 1
    else:
        assert result.rows == []
        (p,) = result.problems
        assert (p.where, p.line) == ("line 2", 2)
        assert problem in p.reason, p.reason


def test_duplicate_output_keys_name_the_first_row(base: Path) -> None:
    rows = [
        RawRow("line 2", {"script": "ok.txt"}, 2),  # ok.mp4
        RawRow("line 3", {"text": "Other.", "output": "ok.mp4"}, 3),
        RawRow("line 4", {"script": "ok.txt"}, 4),  # the same row again
        RawRow("line 5", {"script": "sub/deep.txt"}, 5),
    ]
    result = checked(base, rows)
    assert [r.where for r in result.rows] == ["line 2", "line 5"]
    assert [(p.line, p.reason) for p in result.problems] == [
        (3, "output key 'ok.mp4' is already used by line 2"),
        (4, "output key 'ok.mp4' is already used by line 2"),
    ]


def test_problems_keep_the_manifest_order_and_valid_rows_survive(base: Path) -> None:
    write(base / "m.csv", "script,output\nok.txt,\nmissing.txt,\n,\nsub/deep.txt,../x\n")
    base_dir, raw = manifest.read(base / "m.csv")
    result = checked(base_dir, raw)
    assert [r.where for r in result.rows] == ["line 2"]
    assert [str(p).split(":")[0] for p in result.problems] == ["line 3", "line 5"]
    assert "no such script file" in result.problems[0].reason
    assert "'..'" in result.problems[1].reason  # the empty line 4 is no row at all


# --- idempotency keys -------------------------------------------------------


def _row(**changes: object) -> Row:
    values: dict[str, object] = dict(
        where="line 2",
        line=2,
        script="Hello.",
        source="a.txt",
        avatar="demo",
        voice="joe",
        webhook=None,
        output="a.mp4",
    )
    values.update(changes)
    return Row(**values)  # type: ignore[arg-type]


def test_idempotency_keys_are_stable_and_depend_on_content_not_position() -> None:
    key = manifest.row_key("batch-1", _row(), (25, [512, 512], 100, None))
    assert key == manifest.row_key("batch-1", _row(), (25, [512, 512], 100, None))
    # A fixed value: the key must not change between releases, or a resubmission of
    # an old batch would render everything again.
    assert (
        key
        == "b1:"
        + __import__("hashlib")
        .sha256(
            json.dumps(
                ["batch-1", "Hello.", "demo", "joe", None, "a.mp4", 25, [512, 512], 100, None],
                separators=(",", ":"),
            ).encode()
        )
        .hexdigest()
    )
    assert len(key) <= 128  # jobs.idempotency_key is String(128)
    # Where the row sits, or which file it came from, is not part of it.
    assert manifest.row_key("batch-1", _row(where="line 9", line=9, source="b.txt")) == (
        manifest.row_key("batch-1", _row())
    )
    base = manifest.row_key("batch-1", _row())
    for changed in (
        manifest.row_key("batch-2", _row()),
        manifest.row_key("batch-1", _row(script="Hello!")),
        manifest.row_key("batch-1", _row(avatar="roman")),
        manifest.row_key("batch-1", _row(voice="espeak")),
        manifest.row_key("batch-1", _row(webhook="https://example.com/h")),
        manifest.row_key("batch-1", _row(output="b.mp4")),
        manifest.row_key("batch-1", _row(), (30,)),
    ):
        assert changed != base


def test_default_output_keys_come_from_the_path_or_the_text() -> None:
    assert manifest.default_output("scripts/intro.txt", "x") == "scripts/intro.mp4"
    a = manifest.default_output("", "Hello.")
    assert a == manifest.default_output("", "Hello.") != manifest.default_output("", "Bye.")
    assert manifest.check_output_key(a) is None


# --- lanes and the schedule -------------------------------------------------


def test_every_worker_takes_the_bulk_lane_after_its_interactive_queues() -> None:
    from farm.embedded import worker_argv, worker_queues

    assert worker_queues("cpu") == "cpu,cpu_bulk"
    assert worker_queues("render") == "render,render_bulk"
    assert worker_queues("cpu,render") == "cpu,render,cpu_bulk,render_bulk"
    assert worker_queues("render_bulk") == "render_bulk"  # a bulk-only worker
    assert worker_queues("render", bulk=False) == "render"
    argv = worker_argv("render", 1, "r@h")
    assert argv[argv.index("-Q") + 1] == "render,render_bulk"
    for bad in ("gpu", "cpu,bogus", ""):
        with pytest.raises(InvalidInput, match="unknown queue"):
            worker_queues(bad)


def test_bulk_tasks_route_to_the_bulk_queues_and_workers_drain_in_order() -> None:
    from farm.config import Settings
    from workers.app import bulk_queue, make_app

    assert bulk_queue("farm.render") == "render_bulk"
    assert bulk_queue("farm.prepare") == bulk_queue("farm.mux") == "cpu_bulk"
    conf = make_app(Settings()).conf
    assert conf.broker_transport_options["queue_order_strategy"] == "priority"
    assert conf.worker_prefetch_multiplier == 1
    assert {q.name for q in conf.task_queues} >= {"cpu", "render", "cpu_bulk", "render_bulk"}


def test_nightly_schedule_is_a_utc_crontab_only_with_an_inbox() -> None:
    from farm.config import Settings
    from workers.app import make_app
    from workers.beat import beat_schedule, parse_cron

    assert set(beat_schedule(Settings())) == {"farm-sweep"}  # the sweep runs always
    app = make_app(Settings(nightly_inbox="/srv/inbox", nightly_cron="30 1 * * 1-5"))
    entry = app.conf.beat_schedule["farm-nightly"]
    assert entry["task"] == "farm.nightly"
    cron = entry["schedule"]
    assert (cron.minute, cron.hour, cron.day_of_week) == ({30}, {1}, {1, 2, 3, 4, 5})
    assert app.conf.timezone == "UTC" and app.conf.enable_utc
    for bad in ("0 2 * *", "61 2 * * *", "every night"):
        with pytest.raises(InvalidInput, match="FARM_NIGHTLY_CRON"):
            parse_cron(bad)


def test_beat_sweeps_for_lost_work_every_sweep_seconds() -> None:
    from farm.config import Settings
    from workers.app import make_app

    entry = make_app(Settings(sweep_seconds=45)).conf.beat_schedule["farm-sweep"]
    assert entry["task"] == "farm.sweep" and entry["schedule"] == 45.0


def test_nightly_scan_takes_manifests_and_loose_scripts_once(tmp_path: Path) -> None:
    from farm.nightly import batch_name, scan

    write(tmp_path / "a.txt", "Loose.")
    write(tmp_path / "named.txt", "Named by the manifest.")
    write(tmp_path / "m.csv", "script,avatar\nnamed.txt,roman\n")
    write(tmp_path / "broken.jsonl", b"\xff")
    rows, problems = scan(tmp_path)
    assert [(r.where, r.values.get("script")) for r in rows] == [
        ("m.csv line 2", "named.txt"),
        ("a.txt", "a.txt"),
    ]
    assert [p.where for p in problems] == ["broken.jsonl"]
    from datetime import UTC, datetime

    assert batch_name(datetime(2026, 11, 22, 2, 0, tzinfo=UTC)) == "nightly-2026-11-22"
