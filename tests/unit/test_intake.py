"""The rules of `farm intake` that need no broker: message checks, idempotency keys,
audio bytes, queue names and settings (farm/intake.py, farm/config.py)."""

from __future__ import annotations

import base64
import json

import pytest

from farm import intake
from farm.config import Settings, check_queue_name
from farm.errors import InvalidInput

TEXT = {"type": "text", "data": "Hello, this is a test message.", "session_id": "s-1"}
WAV_HEAD = b"RIFF\x24\x00\x00\x00WAVEfmt "


def body(doc: object) -> bytes:
    return json.dumps(doc).encode()


def test_the_prototypes_messages_parse():
    msg = intake.parse(body({**TEXT, "timestamp": "2024-01-01T00:00:00Z"}), 10_000, "k")
    assert (msg.kind, msg.data, msg.session_id, msg.key) == ("text", TEXT["data"], "s-1", "k")
    audio = {"type": "audio", "data": "UklGRg==", "format": "WAV", "session_id": "s-1"}
    msg = intake.parse(body(audio), 10_000, properties={"message_id": "m-1", "reply_to": "r"})
    assert (msg.kind, msg.format, msg.message_id, msg.reply_to) == ("audio", "wav", "m-1", "r")


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"{not json", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (body([1, 2]), "JSON list, not an object"),
        (body({"data": "hi"}), "unknown message type None"),
        (body({"type": "video", "data": "hi"}), "unknown message type 'video'"),
        (body({"type": "text"}), "non-empty string 'data'"),
        (body({"type": "text", "data": "   "}), "non-empty string 'data'"),
        (body({"type": "text", "data": 5}), "non-empty string 'data'"),
        (body({"type": "audio", "data": "AAAA"}), "unsupported audio format None"),
        (body({"type": "audio", "data": "AAAA", "format": "exe"}), "unsupported audio format"),
        (body({**TEXT, "session_id": "s" * 300}), "'session_id' must be a string"),
        (body({**TEXT, "session_id": 7}), "'session_id' must be a string"),
        (body({**TEXT, "timestamp": "yesterday"}), "not ISO 8601"),
        (body({**TEXT, "avatar": ["x"]}), "'avatar' must be a string"),
    ],
)
def test_bad_messages_are_refused_with_a_reason(raw, reason):
    with pytest.raises(InvalidInput, match=reason.replace("(", r"\(")):
        intake.parse(raw, 10_000_000)


def test_the_size_limit_is_checked_before_anything_is_parsed():
    with pytest.raises(InvalidInput, match="the limit is 100 .FARM_INTAKE_MAX_BYTES"):
        intake.parse(b"{" + b" " * 200 + b"}", 100)


def test_the_key_comes_from_the_message_id_else_the_body_and_is_scoped_by_queue():
    k = intake.idempotency_key
    assert k("q", "m-1", b"a") == k("q", "m-1", b"b")  # a redelivery: same id
    assert k("q", "m-1", b"a") != k("other", "m-1", b"a")
    assert k("q", None, b"a") == k("q", "", b"a") != k("q", None, b"b")
    assert k("q", None, b"a") != k("q", "a", b"a")
    key = k("q", "m-1", b"")
    assert key.startswith(intake.KEY_PREFIX) and len(key) <= 128  # the column's width
    assert 0 <= intake.seed_of(key) < 2**31


def test_audio_must_be_strict_base64_of_its_declared_format():
    good = base64.b64encode(WAV_HEAD + b"\0" * 16).decode()
    assert intake.audio_bytes(good, "wav").startswith(b"RIFF")
    assert intake.audio_bytes(good[:8] + "\n" + good[8:], "wav")  # line breaks are fine
    with pytest.raises(InvalidInput, match="not valid base64"):
        intake.audio_bytes("!!!!" + good, "wav")
    with pytest.raises(InvalidInput, match="not valid base64"):
        intake.audio_bytes("abc", "wav")  # bad padding
    with pytest.raises(InvalidInput, match="is not a mp3 file"):
        intake.audio_bytes(good, "mp3")
    with pytest.raises(InvalidInput, match="not a wav file"):
        intake.audio_bytes(base64.b64encode(b"hello world").decode(), "wav")


@pytest.mark.parametrize("name", ["", "amq.gen-1", "a\nb", "x" * 256])
def test_queue_names_farm_declares_are_checked(name):
    with pytest.raises(InvalidInput):
        check_queue_name(name, "--queue")


def test_intake_settings_are_read_and_checked():
    s = Settings.from_env({"FARM_INTAKE_RESULTS": "done", "FARM_INTAKE_MAX_BYTES": "10"})
    assert (s.intake_results, s.intake_max_bytes, s.intake_dead_letter) == ("done", 10, "")
    with pytest.raises(InvalidInput, match="FARM_INTAKE_MAX_BYTES must be positive"):
        Settings.from_env({"FARM_INTAKE_MAX_BYTES": "0"})
    with pytest.raises(InvalidInput, match="FARM_INTAKE_DEAD_LETTER"):
        Settings.from_env({"FARM_INTAKE_DEAD_LETTER": "amq.x"})


def test_a_consumer_refuses_what_cannot_work(tmp_path):
    from farm.context import Context

    ctx = Context(Settings(home=tmp_path))
    with pytest.raises(InvalidInput, match="not an AMQP URL"):
        intake.Consumer(ctx, "redis://h:6379", "q")
    with pytest.raises(InvalidInput, match="not an AMQP URL") as refused:
        intake.Consumer(ctx, "http://u:secret@h", "q")
    assert "secret" not in str(refused.value)
    with pytest.raises(InvalidInput, match="cannot be the queue itself"):
        intake.Consumer(ctx, "amqp://u:secret@h//", "q", dead_letter="q")
    consumer = intake.Consumer(ctx, "amqp://u:secret@h//", "jobs")
    assert (consumer.dead_letter, consumer.results) == ("jobs.dead", None)
