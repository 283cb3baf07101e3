"""Jobs from an AMQP queue (`farm intake`): messages in, jobs out, results back.

A message is JSON, one of

    {"type": "text",  "data": "Hello.", "session_id": "s-1", "timestamp": "2024-01-01T00:00:00Z"}
    {"type": "audio", "data": "<base64>", "format": "wav", "session_id": "s-1", "timestamp": "..."}

and may name an "avatar" and a "voice" (default: the consumer's). The rules:

- **At most one job per message.** Its idempotency key comes from the message's
  `message_id` property, else a hash of its body, scoped by the queue; a redelivered
  message finds the job the first delivery made (the jobs table's unique key settles
  two consumers racing on one message).
- **Acknowledged only after the job row is committed** (and its first stage queued):
  a consumer or broker that dies in between has the message delivered again, and the
  key makes that delivery a no-op.
- **Invalid messages are dead-lettered, never lost and never fatal:** the original
  body and properties are published (with publisher confirms) to the dead-letter
  queue, `x-farm-reason` in the headers, and only then is the message acknowledged.
- **Outages are waited out:** a database, store or job broker that fails leaves the
  message unacknowledged; it is requeued after a growing pause. A lost connection to
  the AMQP broker is re-opened with backoff, and the queues declared again.
- **Results:** when a job this consumer created ends, a result message (job id,
  state, output URL, error) goes to the message's `reply_to`, or to the result queue.

Pure functions (`parse`, `idempotency_key`, `audio_bytes`, `check_queue_name`) hold the
rules; `Consumer` is the loop over kombu.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import random
import signal
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from farm import jobs
from farm.config import check_queue_name, mask_url
from farm.context import Context
from farm.db import utcnow
from farm.errors import FarmError, InvalidInput, PermanentError
from farm.script import check_frames, check_script_frames, clean_script

log = logging.getLogger("farm.intake")

TYPES = ("text", "audio")
# Audio containers a message may declare, with how their first bytes look.
AUDIO_FORMATS = ("wav", "mp3", "m4a", "aac", "ogg", "flac", "webm")
REASON_HEADER = "x-farm-reason"
KEY_PREFIX = "q1:"  # idempotency keys of intake jobs (batches use "b1:")
_MAX_FIELD = 256  # session_id, timestamp, avatar, voice
_MAX_REASON = 1000
# A message that keeps failing in farm's own code (not an outage) is dead-lettered
# after this many tries, instead of coming back for ever.
_MAX_INTERNAL_FAILURES = 3


def dead_letter_name(queue: str) -> str:
    return f"{queue}.dead"


# --- the message: pure checks ---------------------------------------------------


@dataclass(frozen=True)
class Message:
    """A message that passed the structural checks (what `on_job` is given)."""

    kind: str  # "text" | "audio"
    data: str  # the text, or the base64 of the audio
    format: str | None  # audio: one of AUDIO_FORMATS
    session_id: str | None
    timestamp: str | None
    avatar: str | None  # None: the consumer's default
    voice: str | None
    key: str  # the idempotency key
    message_id: str | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
    received: float | None = None  # time.time() when the consumer took it


def idempotency_key(queue: str, message_id: str | None, body: bytes) -> str:
    """The message's job key: its message_id, else a hash of its body, in the queue's
    scope (the same id on two queues is two messages)."""
    if message_id:
        what = ["id", message_id]
    else:
        what = ["body", hashlib.sha256(body).hexdigest()]
    blob = json.dumps([queue, *what], ensure_ascii=False, separators=(",", ":"))
    return KEY_PREFIX + hashlib.sha256(blob.encode()).hexdigest()


def parse(
    body: bytes, max_bytes: int, key: str = "", properties: dict[str, Any] | None = None
) -> Message:
    """The structural checks, cheap and without decoding the audio: size, JSON, type,
    fields. InvalidInput says what is wrong, in one line."""
    props = properties or {}
    if len(body) > max_bytes:
        raise InvalidInput(
            f"the message has {len(body)} bytes; the limit is {max_bytes} (FARM_INTAKE_MAX_BYTES)"
        )
    try:
        doc = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"the message is not UTF-8 (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"the message is not JSON ({exc.msg} at {exc.pos})") from exc
    except RecursionError as exc:
        raise InvalidInput("the message is not JSON (nested too deeply)") from exc
    if not isinstance(doc, dict):
        raise InvalidInput(f"the message is a JSON {type(doc).__name__}, not an object")
    kind = doc.get("type")
    if kind not in TYPES:
        raise InvalidInput(f"unknown message type {_show(kind)}; use one of {', '.join(TYPES)}")
    data = doc.get("data")
    if not isinstance(data, str) or not data.strip():
        raise InvalidInput(f"a {kind} message needs a non-empty string 'data'")
    fmt = None
    if kind == "audio":
        fmt = doc.get("format")
        if not isinstance(fmt, str) or fmt.lower() not in AUDIO_FORMATS:
            raise InvalidInput(
                f"unsupported audio format {_show(fmt)}; use one of {', '.join(AUDIO_FORMATS)}"
            )
        fmt = fmt.lower()
    fields = {
        name: _optional_str(doc, name) for name in ("session_id", "timestamp", "avatar", "voice")
    }
    if fields["timestamp"] is not None:
        try:
            datetime.fromisoformat(fields["timestamp"])
        except ValueError as exc:
            raise InvalidInput(f"timestamp {_show(fields['timestamp'])} is not ISO 8601") from exc
    return Message(
        kind=kind,
        data=data,
        format=fmt,
        key=key,
        message_id=_prop(props, "message_id"),
        reply_to=_prop(props, "reply_to"),
        correlation_id=_prop(props, "correlation_id"),
        **fields,
    )


def _optional_str(doc: dict[str, Any], name: str) -> str | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > _MAX_FIELD:
        raise InvalidInput(f"'{name}' must be a string of at most {_MAX_FIELD} characters")
    return value


def _prop(props: dict[str, Any], name: str) -> str | None:
    value = props.get(name)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value) if value else None


def _show(value: Any) -> str:
    return repr(value)[:60]


# First bytes of each format (offset, bytes); any of a format's signatures will do.
_MAGIC: dict[str, tuple[tuple[int, bytes], ...]] = {
    "wav": ((0, b"RIFF"), (0, b"RF64")),
    "flac": ((0, b"fLaC"),),
    "ogg": ((0, b"OggS"),),
    "webm": ((0, b"\x1a\x45\xdf\xa3"),),
    "m4a": ((4, b"ftyp"),),
    "mp3": ((0, b"ID3"), (0, b"\xff\xfb"), (0, b"\xff\xf3"), (0, b"\xff\xf2"), (0, b"\xff\xfa")),
    "aac": ((0, b"\xff\xf1"), (0, b"\xff\xf9"), (0, b"ADIF")),
}


def audio_bytes(data: str, fmt: str) -> bytes:
    """The audio of a message: strict base64 (no stray characters) of a file whose first
    bytes are those of its declared format. ffmpeg then decodes it (farm/audio.py)."""
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"the audio is not valid base64 ({exc})") from exc
    if not raw:
        raise InvalidInput("the audio is empty")
    if not any(raw[at : at + len(magic)] == magic for at, magic in _MAGIC[fmt]):
        raise InvalidInput(f"the audio is not a {fmt} file (its first bytes are {raw[:8]!r})")
    return raw


def seed_of(key: str) -> int:
    """A message's motion seed, from its key: a redelivery would render the same."""
    return int(key[len(KEY_PREFIX) : len(KEY_PREFIX) + 8], 16) % 2**31


def to_request(
    ctx: Context,
    msg: Message,
    avatar: str,
    voice: str,
    fps: int | None = None,
    size: tuple[int, int] | None = None,
) -> jobs.JobRequest:
    """The job a valid message asks for, every limit of `farm submit` checked: text length
    and frames; base64, format, decodability, silence and length of the audio. `fps` and
    `size` default to the settings' (a live channel passes its own)."""
    settings = ctx.settings
    fps = fps or settings.fps
    text, wav = "", None
    if msg.kind == "text":
        if len(msg.data) > settings.max_script_chars * 4:  # do not normalise a huge text
            raise InvalidInput(
                f"the text has more than {settings.max_script_chars} characters; the limit "
                "is FARM_MAX_SCRIPT_CHARS"
            )
        text = clean_script(msg.data, settings.max_script_chars)
        check_script_frames(text, fps, settings, sum(jobs.padding(False)))
    else:
        from farm import audio  # numpy and ffmpeg: only for audio messages

        assert msg.format is not None
        raw = audio_bytes(msg.data, msg.format)
        with tempfile.TemporaryDirectory(prefix="farm-intake-") as tmp:
            path = Path(tmp) / f"message.{msg.format}"
            path.write_bytes(raw)
            samples = audio.decode(path, settings.max_audio_seconds)
        seconds = samples.size / audio.SAMPLE_RATE + sum(jobs.padding(True))
        check_frames(seconds, fps, settings.max_job_frames, "the audio", estimate=False)
        wav = audio.to_wav(samples)
    return jobs.JobRequest(
        script=text,
        audio_wav=wav,
        avatar=msg.avatar or avatar,
        voice=msg.voice or voice,
        fps=fps,
        size=size or (settings.size, settings.size),
        chunk_frames=settings.chunk_frames,
        seed=seed_of(msg.key),
    )


def result_body(ctx: Context, job: Any, msg: Pending) -> dict[str, Any]:
    """The result message of an ended job."""
    from farm.webhooks import output_url

    return {
        "job_id": job.id,
        "state": job.state,
        "output_url": output_url(ctx, job.output_key) if job.output_key else None,
        "error": job.error,
        "session_id": msg.session_id,
        "message_id": msg.message_id,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


# --- the consumer ---------------------------------------------------------------


@dataclass(frozen=True)
class Pending:
    """A job this consumer created whose result is still to be published."""

    reply_to: str  # a queue name (the message's reply_to, else the result queue)
    correlation_id: str | None
    message_id: str | None
    session_id: str | None


class Consumer:
    """Take messages from `queue` on the AMQP broker at `url` and make jobs of them,
    until `stop()`. `on_job(job_id, message)` is called once per job this consumer
    resolved a message to (also for a redelivery whose job an earlier delivery made).

    Results of ended jobs are published from the same loop, about every
    `poll_seconds`; jobs still running when the consumer stops get no result from it."""

    def __init__(
        self,
        ctx: Context,
        url: str,
        queue: str,
        *,
        avatar: str = "demo",
        voice: str = "joe",
        results: str | None = None,
        dead_letter: str | None = None,
        on_job: Callable[[str, Message], None] | None = None,
        say: Callable[[str], None] | None = None,
        poll_seconds: float = 1.0,
        heartbeat: int = 60,
        fps: int | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        scheme = url.partition("://")[0]
        if "://" not in url or scheme not in ("amqp", "amqps", "pyamqp"):
            raise InvalidInput(
                f"{mask_url(url)!r} is not an AMQP URL (amqp://user@host:5672/vhost)"
            )
        self.ctx, self.url, self.queue = ctx, url, check_queue_name(queue, "--queue")
        self.avatar, self.voice = avatar, voice
        self.fps, self.size = fps, size  # of every job; None: the settings'
        results = results or ctx.settings.intake_results or None
        self.results = check_queue_name(results, "--results") if results else None
        dead = dead_letter or ctx.settings.intake_dead_letter or dead_letter_name(queue)
        self.dead_letter = check_queue_name(dead, "the dead-letter queue")
        if self.dead_letter == self.queue:
            raise InvalidInput("the dead-letter queue cannot be the queue itself")
        self.on_job = on_job
        self.say = say or log.info
        self.poll_seconds = poll_seconds
        self.heartbeat = heartbeat
        self.stats: Counter[str] = Counter()  # created, duplicate, dead, requeued, results
        self.connected = threading.Event()  # set while consuming
        self._stop = threading.Event()
        self._inbox: deque[Any] = deque()
        self._pending: dict[str, Pending] = {}
        self._seen: set[str] = set()  # jobs given to on_job
        self._failures: Counter[str] = Counter()  # internal failures by key
        self._outage_pause = 0.0

    def check_defaults(self) -> None:
        """Refuse, at start-up, a default avatar or voice no message could use."""
        s = self.ctx.settings
        size = self.size or (s.size, s.size)
        req = jobs.JobRequest("", self.avatar, self.voice, self.fps or s.fps, size, s.chunk_frames)
        jobs.validate(self.ctx, req)
        self.ctx.store.check()  # a store that refuses would dead-letter every message

    def stop(self) -> None:
        self._stop.set()

    # --- connection ------------------------------------------------------------

    def run(self) -> None:
        """Consume until stop(); reconnect, with backoff, whenever the broker goes."""
        pause = 1.0
        while not self._stop.is_set():
            conn = self._connection()
            try:
                conn.connect()
                pause = 1.0
                self._serve(conn)
            except (*conn.connection_errors, *conn.channel_errors) as exc:
                if _refused_login(exc):
                    raise FarmError(f"the broker refused the login: {exc}") from exc
                if self._stop.is_set():
                    break
                self.say(
                    f"broker {mask_url(self.url)} unavailable ({exc or type(exc).__name__}); "
                    f"reconnecting in {pause:.0f} s"
                )
                self._stop.wait(pause)
                pause = min(pause * 2, 30.0)
            finally:
                self.connected.clear()
                self._inbox.clear()  # unacknowledged: the broker delivers them again
                _close(conn)

    def _connection(self) -> Any:
        import kombu

        return kombu.Connection(
            self.url,
            heartbeat=self.heartbeat,
            connect_timeout=10,
            # basic_publish waits for the broker's confirm: a dead letter or a result
            # is on the broker before the message is acknowledged or forgotten.
            transport_options={"confirm_publish": True},
        )

    def _serve(self, conn: Any) -> None:
        import kombu

        self._declare(conn, self.queue)
        self._declare(conn, self.dead_letter)
        if self.results:
            self._declare(conn, self.results)
        producer = kombu.Producer(conn.channel())
        consumer = kombu.Consumer(
            conn.channel(),
            queues=[kombu.Queue(self.queue, no_declare=True)],
            on_message=self._inbox.append,
            prefetch_count=1,
        )
        consumer.consume()
        self.connected.set()
        self.say(f"consuming {self.queue} on {mask_url(self.url)}")
        last_poll = 0.0
        while not self._stop.is_set():
            try:
                conn.drain_events(timeout=self.poll_seconds)
            except TimeoutError:
                pass
            conn.heartbeat_check()  # sends ours when due; a silent broker is a lost one
            while self._inbox and not self._stop.is_set():
                self._handle(producer, self._inbox.popleft())
            if time.monotonic() - last_poll >= self.poll_seconds:
                last_poll = time.monotonic()
                self._publish_results(producer)
        _close(consumer, "cancel")

    def _declare(self, conn: Any, name: str) -> None:
        """Use the queue as it is if it exists (whatever its arguments); else declare it
        durable. A passive declare of a missing queue closes its channel: a fresh one
        declares it."""
        from amqp.exceptions import NotFound

        channel = conn.channel()
        try:
            channel.queue_declare(queue=name, passive=True)
        except NotFound:
            channel = conn.channel()
            channel.queue_declare(queue=name, durable=True, auto_delete=False)
        _close(channel)

    # --- one message -----------------------------------------------------------

    def _handle(self, producer: Any, delivery: Any) -> None:
        received = time.time()
        body = delivery.body if isinstance(delivery.body, bytes) else bytes(delivery.body)
        props = dict(delivery.properties)
        key = idempotency_key(self.queue, _prop(props, "message_id"), body)
        try:
            msg = parse(body, self.ctx.settings.intake_max_bytes, key, props)
            msg = replace(msg, received=received)
            job_id = self._job_for(msg)
        except PermanentError as exc:
            self._dead_letter(producer, delivery, body, key, str(exc))
            return
        except Exception as exc:  # an outage, or farm's own fault: not the message's
            self._not_now(producer, delivery, body, key, exc)
            return
        self._outage_pause = 0.0
        self._failures.pop(key, None)
        delivery.ack()  # the job row is committed and its first stage queued
        self._resolved(job_id, msg)

    def _job_for(self, msg: Message) -> str:
        existing = jobs.by_idempotency_key(self.ctx, msg.key)
        if existing is not None:
            self.stats["duplicate"] += 1
            self.say(f"message {msg.message_id or msg.key} again: job {existing} already made")
            return existing
        request = to_request(self.ctx, msg, self.avatar, self.voice, self.fps, self.size)
        job_id, created = jobs.submit_once(self.ctx, request, msg.key)
        self.stats["created" if created else "duplicate"] += 1
        if created:
            self.say(f"job {job_id} from message {msg.message_id or msg.key} ({msg.kind})")
        return job_id

    def _resolved(self, job_id: str, msg: Message) -> None:
        destination = msg.reply_to or self.results
        if destination and job_id not in self._pending and job_id not in self._seen:
            self._pending[job_id] = Pending(
                destination, msg.correlation_id or msg.message_id, msg.message_id, msg.session_id
            )
        if job_id in self._seen:
            return
        self._seen.add(job_id)
        if self.on_job is not None:
            try:
                self.on_job(job_id, msg)
            except Exception:  # the hook's fault is its own: the job stands
                log.exception("on_job hook failed for job %s", job_id)

    def _dead_letter(
        self, producer: Any, delivery: Any, body: bytes, key: str, reason: str
    ) -> None:
        """Publish the message as it came, the reason in its headers, then ack it."""
        props = dict(delivery.properties)
        headers = dict(props.pop("application_headers", None) or delivery.headers or {})
        headers.update(
            {
                REASON_HEADER: reason[:_MAX_REASON],
                "x-farm-queue": self.queue,
                "x-farm-idempotency-key": key,
                "x-farm-dead-at": utcnow().astimezone(UTC).isoformat(),
            }
        )
        keep = ("message_id", "correlation_id", "reply_to", "timestamp", "type", "app_id")
        producer.publish(
            body,
            exchange="",
            routing_key=self.dead_letter,
            headers=headers,
            content_type=props.get("content_type") or "application/octet-stream",
            content_encoding=props.get("content_encoding") or "binary",
            delivery_mode=2,
            **{k: props[k] for k in keep if props.get(k)},
        )
        delivery.ack()
        self.stats["dead"] += 1
        self.say(f"message {_prop(props, 'message_id') or key} dead-lettered: {reason}")

    def _not_now(self, producer: Any, delivery: Any, body: bytes, key: str, exc: Exception) -> None:
        """Requeue after a pause that grows while failures go on. An error that is not an
        outage (farm's own bug) dead-letters the message after a few tries."""
        from farm.db import OUTAGE_ERRORS
        from farm.errors import BrokerUnavailable, RetryableError

        outage = isinstance(exc, (RetryableError, BrokerUnavailable, OSError, *OUTAGE_ERRORS))
        if not outage:
            self._failures[key] += 1
            log.error("message %s failed", key, exc_info=exc)
            if self._failures[key] >= _MAX_INTERNAL_FAILURES:
                self._failures.pop(key, None)
                reason = f"internal error after {_MAX_INTERNAL_FAILURES} tries: {exc!r}"
                self._dead_letter(producer, delivery, body, key, reason)
                return
        self._outage_pause = min(max(self._outage_pause * 2, 1.0), 30.0)
        pause = self._outage_pause * random.uniform(0.8, 1.2)
        self.say(f"could not take message {key} now ({exc}); requeued, waiting {pause:.0f} s")
        self.stats["requeued"] += 1
        delivery.requeue()
        self._stop.wait(pause)

    # --- results ---------------------------------------------------------------

    def _publish_results(self, producer: Any) -> None:
        if not self._pending:
            return
        try:
            ended = jobs.ended(self.ctx, list(self._pending))
        except Exception as exc:  # the database is away: ask again next round
            log.warning("could not read job states: %s", exc)
            return
        for job in ended:
            msg = self._pending[job.id]
            body = json.dumps(result_body(self.ctx, job, msg), separators=(",", ":"))
            producer.publish(
                body.encode(),
                exchange="",
                routing_key=msg.reply_to,
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=2,
                message_id=f"result-{job.id}",  # the same on a repeat: receivers dedupe
                correlation_id=msg.correlation_id,
                headers={"x-farm-job-id": job.id, "x-farm-state": job.state},
            )
            del self._pending[job.id]
            self.stats["results"] += 1
            self.say(f"job {job.id} {job.state}: result sent to {msg.reply_to}")

    def pending_results(self) -> list[str]:
        return list(self._pending)


def _refused_login(exc: BaseException) -> bool:
    from amqp.exceptions import AccessRefused

    return isinstance(exc, AccessRefused)


def _close(thing: Any, method: str = "close") -> None:
    try:
        getattr(thing, method)()
    except Exception:  # already gone with its connection
        pass


def stop_on_signals(consumer: Consumer) -> None:
    """SIGINT and SIGTERM stop the consumer after the message in hand (main thread only)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: consumer.stop())
