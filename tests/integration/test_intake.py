"""`farm intake` against the real RabbitMQ on 127.0.0.1:5672 (guest/guest).

Each test uses queues of its own (uuid names), deleted afterwards. Where a test is about
intake alone, jobs go to an in-memory dispatcher (nothing renders; a test ends a job by
hand to see its result published); the last test renders a real job on the embedded
default through the `farm intake` command.

Connection loss: RabbitMQ is shared with the rest of the suite, so it is not restarted.
The consumer reaches it through a TCP proxy on loopback (tests/faultproxy.py) which the
test switches to `refuse`: open connections are reset and new ones refused, exactly what
a client sees while a broker restarts, for this consumer alone. The proxy can also cut at
a chosen point of the protocol: the first basic.ack the consumer sends, so the ack of a
committed job is lost and the broker delivers that message again.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from farm import intake, jobs, migrate, queries, states
from farm.config import Settings
from farm.context import Context
from farm.db import utcnow
from farm.dispatch import InMemoryDispatcher
from tests.conftest import need_service
from tests.faultproxy import FaultProxy
from tests.services import AMQP_URL, Broker, rabbitmq_up

TEXT = "Hello, this is a test message."
# An AMQP method frame of basic.ack (class 60, method 80), as a client sends it.
BASIC_ACK = rb"\x00\x3c\x00\x50"


def wav_bytes(seconds: float = 1.0, amplitude: float = 0.3, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        frames = bytearray()
        for i in range(int(seconds * rate)):
            v = int(amplitude * 32767 * math.sin(2 * math.pi * 220 * i / rate))
            frames += v.to_bytes(2, "little", signed=True)
        w.writeframes(bytes(frames))
    return buf.getvalue()


def text_message(text: str = TEXT, **extra: object) -> bytes:
    doc = {"type": "text", "data": text, "session_id": "s-1", "timestamp": "2024-01-01T00:00:00Z"}
    return json.dumps({**doc, **extra}).encode()


def audio_message(raw: bytes, fmt: str = "wav") -> bytes:
    doc = {"type": "audio", "data": base64.b64encode(raw).decode(), "format": fmt}
    return json.dumps({**doc, "session_id": "s-2", "timestamp": "2024-01-01T00:00:01Z"}).encode()


@pytest.fixture
def broker() -> Iterator[Broker]:
    need_service(rabbitmq_up(), f"RabbitMQ at {AMQP_URL}")
    b = Broker()
    yield b
    b.close()


def make_ctx(tmp_path: Path, database_url: str = "", **settings: object) -> Context:
    s = Settings(home=tmp_path / "home", database_url=database_url, **settings)
    migrate.upgrade(s.effective_database_url)
    return Context(s, InMemoryDispatcher())


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Context]:
    c = make_ctx(tmp_path)
    yield c
    c.engine.dispose()


@contextmanager
def consuming(consumer: intake.Consumer) -> Iterator[intake.Consumer]:
    """The consumer's loop in a thread, connected; stopped (and joined) at the end."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            consumer.run()
        except BaseException as exc:  # a crash fails the test below
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert consumer.connected.wait(30), "the consumer did not connect"
    try:
        yield consumer
    finally:
        consumer.stop()
        thread.join(30)
    assert not thread.is_alive(), "the consumer did not stop"
    assert not failure, f"the consumer crashed: {failure[0]!r}"


def wait_for(what: str, check, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def all_jobs(ctx: Context) -> list:
    with ctx.session() as s:
        return list(queries.list_jobs(s, 1000))


def test_text_and_audio_messages_become_jobs(broker: Broker, ctx: Context):
    seen: list[tuple[str, intake.Message]] = []
    consumer = intake.Consumer(
        ctx, AMQP_URL, broker.queue, voice="espeak", on_job=lambda j, m: seen.append((j, m))
    )
    with consuming(consumer):
        broker.publish(text_message(), message_id="m-text")
        broker.publish(audio_message(wav_bytes()), message_id="m-audio")
        wait_for("two jobs", lambda: consumer.stats["created"] == 2)
    assert broker.counts(broker.queue)[0] == 0  # both acknowledged
    by_kind = {m.kind: (job_id, m) for job_id, m in seen}
    with ctx.session() as s:
        text_job = queries.get_job(s, by_kind["text"][0])
        audio_job = queries.get_job(s, by_kind["audio"][0])
    assert (text_job.script, text_job.voice, text_job.avatar) == (TEXT, "espeak", "demo")
    assert text_job.audio_key is None
    assert text_job.idempotency_key == intake.idempotency_key(broker.queue, "m-text", b"")
    assert audio_job.script == "" and audio_job.audio_key
    assert ctx.store.get_bytes(audio_job.audio_key)[:4] == b"RIFF"  # normalised WAV stored
    assert by_kind["audio"][1].session_id == "s-2"
    assert ctx.dispatch.tasks() == ["farm.prepare", "farm.prepare"]  # queued like submit
    assert not broker.counts(intake.dead_letter_name(broker.queue))[0]


def test_a_redelivered_message_makes_no_second_job(broker: Broker, db_ctx: Context):
    """Twice the same message_id, twice the same body without one: two jobs. On SQLite
    and Postgres."""
    consumer = intake.Consumer(db_ctx, AMQP_URL, broker.queue, voice="espeak")
    with consuming(consumer):
        for _ in range(2):
            broker.publish(text_message("First message."), message_id="m-1")
            broker.publish(text_message("Second message."))  # keyed by its body
        wait_for("four deliveries", lambda: sum(consumer.stats.values()) == 4)
    assert (consumer.stats["created"], consumer.stats["duplicate"]) == (2, 2)
    assert sorted(j.script for j in all_jobs(db_ctx)) == ["First message.", "Second message."]
    assert len(db_ctx.dispatch.tasks()) == 2


def test_two_consumers_racing_on_one_key_make_one_job(db_ctx: Context, monkeypatch):
    """The unique key settles a race neither side saw coming: the loser gets the
    winner's job, and leaves no row and no stored audio behind."""
    key = intake.idempotency_key("q", "m-race", b"")
    req = jobs.JobRequest("", "demo", "espeak", 25, (64, 64), 100, audio_wav=wav_bytes())
    first, created = jobs.submit_once(db_ctx, req, key)
    assert created
    # The second caller looks before the first committed (sees nothing), then inserts.
    monkeypatch.setattr(jobs, "by_idempotency_key", _second_call_finds(first))
    assert jobs.submit_once(db_ctx, req, key) == (first, False)
    assert [j.id for j in all_jobs(db_ctx)] == [first]
    assert db_ctx.store.list("jobs/") == [f"jobs/{first}/input.wav"]


def _second_call_finds(job_id: str):
    calls: list[int] = []

    def find(_ctx: Context, _key: str) -> str | None:
        calls.append(1)
        return None if len(calls) == 1 else job_id

    return find


def test_invalid_messages_reach_the_dead_letter_queue_with_reasons(broker: Broker, tmp_path):
    ctx = make_ctx(tmp_path, intake_max_bytes=200_000, max_script_chars=300)
    bad = [
        (b"{not json", "not JSON"),
        (b"\xff\xfe\x00", "not UTF-8"),
        (json.dumps({"type": "video", "data": "x"}).encode(), "unknown message type"),
        (json.dumps({"type": "audio", "data": "@@@@", "format": "wav"}).encode(), "base64"),
        (audio_message(wav_bytes(), fmt="midi"), "unsupported audio format 'midi'"),
        (audio_message(b"hello, not audio at all"), "not a wav file"),
        (audio_message(b"RIFF" + os.urandom(2000)), "not a readable audio file"),
        (audio_message(wav_bytes(amplitude=0.0)), "silent"),
        (audio_message(wav_bytes(seconds=8.0)), "FARM_INTAKE_MAX_BYTES"),
        (text_message("word " * 100), "FARM_MAX_SCRIPT_CHARS"),
        (text_message("Hi.", avatar="nobody"), "unknown avatar 'nobody'"),
        (text_message("Hi.", voice="robot"), "unknown voice 'robot'"),
    ]
    consumer = intake.Consumer(ctx, AMQP_URL, broker.queue, voice="espeak")
    with consuming(consumer):
        for i, (body, _) in enumerate(bad):
            broker.publish(body, message_id=f"bad-{i}", correlation_id=f"c-{i}")
        broker.publish(text_message(), message_id="good")  # the consumer is still alive
        wait_for("every message", lambda: sum(consumer.stats.values()) == len(bad) + 1, 60)
    assert (consumer.stats["dead"], consumer.stats["created"]) == (len(bad), 1)
    dead = broker.take(intake.dead_letter_name(broker.queue), len(bad))
    by_id = {m.properties["message_id"]: m for m in dead}
    for i, (body, reason) in enumerate(bad):
        m = by_id[f"bad-{i}"]
        headers = m.properties["application_headers"]
        assert reason in headers[intake.REASON_HEADER], headers
        assert headers["x-farm-queue"] == broker.queue
        assert bytes(m.body) == body  # the message as it came
        assert m.properties["correlation_id"] == f"c-{i}"
    assert [j.script for j in all_jobs(ctx)] == [TEXT]
    assert broker.counts(broker.queue)[0] == 0


def test_results_go_to_reply_to_else_the_result_queue(broker: Broker, ctx: Context):
    reply = broker.declare(broker.name("reply"))
    results = broker.name("results")
    broker.names.add(results)  # the consumer declares it
    consumer = intake.Consumer(ctx, AMQP_URL, broker.queue, voice="espeak", results=results)
    made: dict[str, str] = {}
    consumer.on_job = lambda job_id, m: made.setdefault(m.message_id or "", job_id)
    with consuming(consumer):
        broker.publish(text_message("One."), message_id="a", reply_to=reply, correlation_id="ca")
        broker.publish(text_message("Two."), message_id="b")
        broker.publish(text_message("Three."), message_id="c", reply_to=reply)
        wait_for("three jobs", lambda: len(made) == 3)
        with ctx.session() as s:  # a ends with a video, b fails, c goes on running
            done = {"state": states.SUCCEEDED, "finished_at": utcnow()}
            queries.set_job_fields(s, made["a"], output_key="jobs/a/final.mp4", **done)
        jobs.fail(ctx, made["b"], "the renderer broke")
        (to_reply,) = broker.take(reply, 1)
        (to_results,) = broker.take(results, 1)
        time.sleep(2)  # two more rounds of polling: nothing for c
        assert consumer.pending_results() == [made["c"]]
    a = json.loads(to_reply.body)
    assert a["job_id"] == made["a"] and a["state"] == "succeeded" and a["error"] is None
    assert a["output_url"].startswith("file://") and a["output_url"].endswith("final.mp4")
    assert a["session_id"] == "s-1" and a["message_id"] == "a"
    assert to_reply.properties["correlation_id"] == "ca"
    assert to_reply.properties["message_id"] == f"result-{made['a']}"
    b = json.loads(to_results.body)
    assert (b["job_id"], b["state"], b["output_url"]) == (made["b"], "failed", None)
    assert b["error"] == "the renderer broke"
    assert broker.counts(reply)[0] == 0 and broker.counts(results)[0] == 0


def test_a_broker_outage_mid_stream_loses_nothing(broker: Broker, ctx: Context):
    """20 messages; the connection is cut at the first ack (job committed, ack lost),
    and again halfway, each time refused for a while. Every message makes exactly one
    job, the redelivered one included, and the queue ends empty."""
    n = 20
    with FaultProxy(AMQP_URL.replace("amqp://", "http://")) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}//"
        # A short heartbeat: the proxy's reset of its broker side takes effect when the
        # broker next sends (a blocked recv holds the socket open), as a heartbeat does.
        consumer = intake.Consumer(
            ctx, url, broker.queue, voice="espeak", on_job=lambda *_: time.sleep(0.05), heartbeat=2
        )
        cut = proxy.arm(BASIC_ACK, "refuse")
        with consuming(consumer):
            for i in range(n):
                broker.publish(text_message(f"Message number {i}."), message_id=f"m-{i}")
            assert cut.wait(30), "no ack was sent"
            time.sleep(1.5)  # the broker is away: connects are refused
            proxy.set_mode("pass")
            wait_for("half the jobs", lambda: consumer.stats["created"] >= n // 2, 60)
            proxy.set_mode("refuse")
            time.sleep(1.5)
            proxy.set_mode("pass")
            wait_for("every job", lambda: consumer.stats["created"] == n, 60)
            wait_for("an empty queue", lambda: broker.counts(broker.queue) == (0, 1), 30)
        assert proxy.faults["reset"] >= 2
    assert consumer.stats["duplicate"] >= 1  # the message whose ack was lost came back
    scripts = sorted(j.script for j in all_jobs(ctx))
    assert scripts == sorted(f"Message number {i}." for i in range(n))
    assert broker.counts(broker.queue)[0] == 0
    assert broker.counts(intake.dead_letter_name(broker.queue))[0] == 0


def test_farm_intake_renders_a_message_and_publishes_the_result(broker: Broker, tmp_path):
    """End to end on the embedded default: `farm intake` as a user runs it, real
    workers, TTS and renderer; the result message names the finished MP4. The embedded
    runtime stops when idle (after 2 s here); the next message starts it again."""
    from farm import embedded

    home = tmp_path / "home"
    env = {**os.environ, "FARM_HOME": str(home), "FARM_SIZE": "64", "FARM_CHUNK_FRAMES": "50"}
    env["FARM_EMBEDDED_IDLE_SECONDS"] = "2"
    for name in ("FARM_BROKER_URL", "FARM_DATABASE_URL", "FARM_STORE_URL", "FARM_RENDERER"):
        env.pop(name, None)
    settings = Settings(home=home)
    results = broker.declare(broker.name("results"))
    broker.declare(intake.dead_letter_name(broker.queue))
    log = open(tmp_path / "intake.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm", "intake", AMQP_URL, "--queue", broker.queue]
        + ["--voice", "espeak", "--results", results],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        broker.publish(text_message("Hello there."), message_id="e2e")
        broker.publish(b"not json", message_id="e2e-bad")
        (result,) = broker.take(results, 1, timeout=300)
        (dead,) = broker.take(intake.dead_letter_name(broker.queue), 1, timeout=10)
        wait_for("the idle runtime to stop", lambda: not embedded.running_pid(settings), 120)
        broker.publish(text_message("Hello again."), message_id="e2e-2")
        (again,) = broker.take(results, 1, timeout=300)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        subprocess.run([sys.executable, "-m", "farm", "stop"], env=env, timeout=180)
    out = (tmp_path / "intake.log").read_text()
    body = json.loads(result.body)
    assert body["state"] == "succeeded", (body, out)
    mp4 = Path(body["output_url"].removeprefix("file://"))
    assert mp4.read_bytes()[4:8] == b"ftyp"
    assert "not JSON" in dead.properties["application_headers"][intake.REASON_HEADER]
    assert f"job {body['job_id']} from message e2e" in out
    assert json.loads(again.body)["state"] == "succeeded", out
    assert "guest:guest" not in out  # the password is masked in every line
