"""Signed webhooks (Standard Webhooks): events, signing, `verify`, the SSRF guard, delivery.

An event is a row in `webhook_deliveries` (an outbox): job events are written in the
same transaction as the job's final transition, so a job that succeeded or failed
has its event on record even if the process dies right after. The `farm.notify`
task then makes the HTTP attempts; every attempt is a row in `webhook_attempts`.
The delivery id is the `webhook-id` header, the same on every attempt, so receivers
can drop the duplicates an at-least-once sender may produce.

Receivers can check a request with `verify(secret, headers, body)`. Where a webhook
may be sent (the SSRF guard) and the pinned HTTP connection are farm/webhook_targets.py.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import random
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from hashlib import sha256
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.orm import Session

from farm import extras, queries, states
from farm.config import Settings
from farm.context import Context
from farm.db import Job, WebhookAttempt, WebhookDelivery, utcnow
from farm.errors import FarmError, InvalidInput, RetryableError
from farm.webhook_targets import (
    Allowlist,
    Response,
    checked_addresses,
    parse_target,
    post,
)

log = logging.getLogger("farm.webhooks")

JOB_SUCCEEDED = "job.succeeded"
JOB_FAILED = "job.failed"
BATCH_COMPLETED = "batch.completed"

# Delivery states. `pending` covers "queued" and "waiting for a retry".
PENDING, DELIVERED, FAILED, DISABLED = "pending", "delivered", "failed", "disabled"

SECRET_PREFIX = "whsec_"
JITTER = 0.2  # each retry waits its scheduled delay plus up to 20 %: never earlier
USER_AGENT = "farm-webhooks/1"


class VerificationError(FarmError):
    """A webhook request whose signature or timestamp does not check out."""


# --- secrets and signing ----------------------------------------------------


def new_secret() -> str:
    """A fresh signing secret in the Standard Webhooks format."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key inside `whsec_<base64>`; InvalidInput says what is wrong."""
    if not secret:
        raise InvalidInput(
            "FARM_WEBHOOK_SECRET is not set: webhooks are signed, so set it to a secret "
            "from 'farm webhooks secret' (whsec_ followed by base64) before using one"
        )
    if not secret.startswith(SECRET_PREFIX):
        raise InvalidInput(
            "FARM_WEBHOOK_SECRET must start with 'whsec_' (see 'farm webhooks secret')"
        )
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput("FARM_WEBHOOK_SECRET is not valid base64 after 'whsec_'") from exc
    if not 24 <= len(key) <= 64:  # the spec's bounds: 192 to 512 bits
        raise InvalidInput(f"FARM_WEBHOOK_SECRET decodes to {len(key)} bytes; use 24 to 64")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    mac = hmac.new(secret_key(secret), signed, sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


def verify(
    secret: str,
    headers: Mapping[str, str] | Any,
    body: bytes | str,
    tolerance: int = 300,
    now: float | None = None,
) -> dict[str, Any]:
    """Check a received webhook; return its JSON payload or raise VerificationError.

    `headers` is any mapping with `.items()` (a dict, http.server's, a framework's);
    names are matched case-insensitively. Timestamps further than `tolerance` seconds
    from now are refused, so a captured request cannot be replayed later.
    """
    raw = body.encode() if isinstance(body, str) else bytes(body)
    given = {str(k).lower(): str(v) for k, v in headers.items()}
    msg_id = given.get("webhook-id")
    stamp = given.get("webhook-timestamp")
    signatures = given.get("webhook-signature")
    if not (msg_id and stamp and signatures):
        raise VerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(stamp)
    except ValueError as exc:
        raise VerificationError(f"bad webhook-timestamp {stamp[:40]!r}") from exc
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        raise VerificationError("webhook-timestamp is outside the tolerance (replayed or skewed)")
    expected = sign(secret, msg_id, timestamp, raw).encode()
    # Several space-separated signatures may be sent while a secret is rotated.
    for candidate in signatures.split():
        if hmac.compare_digest(candidate.encode(), expected):
            return json.loads(raw)
    raise VerificationError("no webhook-signature matches")


# --- retry schedule ---------------------------------------------------------


def parse_schedule(text: str) -> tuple[float, ...]:
    """'5,300,1800' -> (5.0, 300.0, 1800.0): the delay before each retry."""
    try:
        delays = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise InvalidInput(
            f"FARM_WEBHOOK_RETRY_SCHEDULE must be comma-separated seconds, got {text!r}"
        ) from exc
    if any(d < 0 for d in delays):
        raise InvalidInput(f"FARM_WEBHOOK_RETRY_SCHEDULE has a negative delay: {text!r}")
    return delays


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date. None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or utcnow())).total_seconds())


def retry_delay(
    schedule: tuple[float, ...],
    retries_done: int,
    retry_after: float | None = None,
    cap: float | None = None,
    rng: Callable[[], float] = random.random,
) -> float | None:
    """Seconds until the next attempt, or None when the schedule is spent.

    Jitter only lengthens a delay, so retries are never earlier than configured but
    many failing deliveries do not retry in lock step. A longer Retry-After wins.
    """
    if retries_done >= len(schedule):
        return None
    delay = schedule[retries_done] * (1 + JITTER * rng())
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    return min(delay, cap) if cap is not None else delay


def max_delay(settings: Settings) -> float:
    # A Redis-held countdown longer than the visibility timeout is handed to a second
    # worker (celery#5935), so no wait may reach it, whatever Retry-After asks for.
    return max(1.0, settings.visibility_timeout * 0.9)


# --- targets (the SSRF guard itself is farm/webhook_targets.py) ---------------


def check_target(url: str, settings: Settings) -> str:
    """Submit-time check of a webhook URL (and that webhooks can be signed and retried)."""
    secret_key(settings.webhook_secret)
    parse_schedule(settings.webhook_retry_schedule)
    target = parse_target(url)
    try:
        checked_addresses(target, Allowlist.parse(settings.webhook_allowlist))
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidInput(f"webhook host {target.host!r} does not resolve: {exc}") from exc
    return url


def send_request(settings: Settings, url: str, msg_id: str, body: bytes) -> Response:
    """One signed attempt: check the target again (names may now resolve elsewhere),
    sign with a fresh timestamp, POST to a checked address."""
    try:
        headers = signed_headers(settings.webhook_secret, msg_id, int(time.time()), body)
        target = parse_target(url)
        addresses = checked_addresses(target, Allowlist.parse(settings.webhook_allowlist))
    except InvalidInput as exc:
        return Response(error=str(exc), permanent=True)
    except (socket.gaierror, UnicodeError) as exc:  # DNS trouble is often transient
        return Response(error=f"cannot resolve {urlsplit(url).hostname}: {exc}")
    return post(target, addresses, headers, body, settings.webhook_timeout)


# --- events -----------------------------------------------------------------


def iso(when: datetime | None) -> str | None:
    return None if when is None else when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def payload(event_type: str, data: dict[str, Any], when: datetime | None = None) -> str:
    """The body, serialised once and stored: every attempt sends the same bytes."""
    body = {"type": event_type, "timestamp": iso(when or utcnow()), "data": data}
    return json.dumps(body, separators=(",", ":"), default=str)


def output_url(ctx: Context, key: str) -> str:
    """Presigned when the store is S3; a file:// URL for the local store."""
    url = ctx.store.url(key)
    if "://" in url:
        return url
    from pathlib import Path

    return Path(url).resolve().as_uri()


def job_event_data(ctx: Context, job: Job) -> dict[str, Any]:
    duration = None
    if job.finished_at is not None:
        duration = round((job.finished_at - job.created_at).total_seconds(), 3)
    data: dict[str, Any] = {
        "job_id": job.id,
        "status": job.state,
        "avatar": job.avatar,
        "duration": duration,
        "created_at": iso(job.created_at),
        "finished_at": iso(job.finished_at),
        "output_url": output_url(ctx, job.output_key) if job.output_key else None,
        # captions, poster and preview (farm/extras.py): None where the job has none
        **extras.artifact_urls(job, lambda key: output_url(ctx, key)),
    }
    if job.state == states.FAILED:
        data["error"] = job.error
    batch_id = getattr(job, "batch_id", None)  # set on jobs submitted in a batch
    if batch_id:
        data["batch_id"] = batch_id
    return data


def record_event(
    session: Session,
    event_type: str,
    data: dict[str, Any],
    url: str,
    *,
    job_id: str | None = None,
    batch_id: str | None = None,
) -> WebhookDelivery:
    """Write a delivery in the caller's transaction (the outbox); `dispatch` it after
    the commit. A URL that answered 410 Gone gets a `disabled` row and no attempt."""
    delivery = queries.insert_delivery(
        session,
        id=f"msg_{uuid.uuid4().hex}",
        job_id=job_id,
        batch_id=batch_id,
        event_type=event_type,
        url=url,
        payload=payload(event_type, data),
    )
    endpoint = queries.disabled_endpoint(session, url)
    if endpoint is not None:
        queries.finish_delivery(session, delivery.id, DISABLED, error=_disabled_note(endpoint))
        session.refresh(delivery)
    return delivery


def record_job_event(session: Session, ctx: Context, job_id: str) -> WebhookDelivery | None:
    """The job.succeeded / job.failed event of a job that just reached that state.
    Callers call this only when their guarded transition moved the job, which is
    what makes it one event per job however often a task is redelivered."""
    session.flush()  # keep the caller's pending changes (timings) before reloading
    job = queries.get_job(session, job_id)
    session.refresh(job)  # the transition was a Core UPDATE; reload what it wrote
    if not job.webhook_url or job.state not in (states.SUCCEEDED, states.FAILED):
        return None
    event = JOB_SUCCEEDED if job.state == states.SUCCEEDED else JOB_FAILED
    return record_event(session, event, job_event_data(ctx, job), job.webhook_url, job_id=job.id)


def queue_first_attempt(ctx: Context, delivery: WebhookDelivery | None) -> None:
    """Queue the first attempt of a recorded delivery. A broker error is recorded on
    the delivery, not raised: the job's own outcome must not depend on its webhook,
    and `farm webhooks redeliver` can send it later."""
    if delivery is None or delivery.state != PENDING:
        return
    try:
        ctx.dispatch.deliver(delivery.id, delivery.attempts + 1)
    except Exception as exc:
        log.warning("could not queue webhook %s: %s", delivery.id, exc)
        with ctx.session() as s:
            queries.note_delivery_error(s, delivery.id, f"not queued: {exc}"[:500])


def enqueue_event(
    ctx: Context,
    event_type: str,
    data: dict[str, Any],
    url: str | None,
    *,
    job_id: str | None = None,
    batch_id: str | None = None,
) -> str | None:
    """Record an event for `url` and queue its delivery; the delivery id, or None
    when there is no URL. For events outside a job's transition (batch.completed)."""
    if not url:
        return None
    with ctx.session() as s:
        delivery = record_event(s, event_type, data, url, job_id=job_id, batch_id=batch_id)
    queue_first_attempt(ctx, delivery)
    return delivery.id


def job_webhook(settings: Settings, explicit: str | None, avatar_webhook: str | None) -> str | None:
    """The URL a new job notifies (--webhook, else its avatar's, else FARM_WEBHOOK_URL),
    checked now so a bad one is refused before the job exists."""
    url = explicit or avatar_webhook or settings.webhook_url
    return check_target(url, settings) if url else None


# --- delivery ---------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    state: str  # delivered | pending (a retry is due) | failed | disabled | skipped
    attempt: int = 0
    retry_in: float | None = None
    status: int | None = None
    error: str | None = None


SKIPPED = "skipped"


def attempt_delivery(
    ctx: Context, delivery_id: str, attempt: int, retries_done: int = 0
) -> Outcome:
    """Make attempt number `attempt` of a delivery and record it. A message for an
    attempt that is no longer the next one (a duplicate, or a retry overtaken by a
    redelivery) changes nothing."""
    claimed = _claim(ctx, delivery_id, attempt)
    if isinstance(claimed, Outcome):
        return claimed
    url, body, attempt_id = claimed
    response = send_request(ctx.settings, url, delivery_id, body.encode())
    outcome = _decide(ctx.settings, attempt, retries_done, response)
    _record(ctx, delivery_id, url, attempt_id, outcome)
    log.info(
        "webhook %s attempt %d to %s: %s %s",
        delivery_id,
        attempt,
        url,
        outcome.status or outcome.error,
        outcome.state,
    )
    return outcome


def _claim(ctx: Context, delivery_id: str, attempt: int) -> tuple[str, str, int] | Outcome:
    with ctx.session() as s:
        d = queries.get_delivery(s, delivery_id)
        if d.state != PENDING:
            return Outcome(SKIPPED)
        endpoint = queries.disabled_endpoint(s, d.url)
        if endpoint is not None:
            queries.finish_delivery(s, d.id, DISABLED, error=_disabled_note(endpoint))
            return Outcome(DISABLED)
        if d.attempts == attempt - 1 and queries.claim_attempt(s, d.id, attempt):
            return d.url, d.payload, queries.insert_attempt(s, d.id, attempt)
        # The same message again after a worker died mid-attempt: finish that attempt.
        resumed = queries.unfinished_attempt(s, d.id, attempt)
        if resumed is not None:
            return d.url, d.payload, resumed
        return Outcome(SKIPPED)


def _decide(settings: Settings, attempt: int, retries_done: int, response: Response) -> Outcome:
    status, error = response.status, response.error
    if status is not None and 200 <= status < 300:
        return Outcome(DELIVERED, attempt, status=status)
    if status == 410:
        return Outcome(DISABLED, attempt, status=status, error="410 Gone: endpoint disabled")
    if status is not None:
        error = f"HTTP {status}"
    if response.permanent:
        return Outcome(FAILED, attempt, status=status, error=error)
    try:
        schedule = parse_schedule(settings.webhook_retry_schedule)
    except InvalidInput as exc:
        return Outcome(FAILED, attempt, status=status, error=f"{error}; no retry: {exc}")
    delay = retry_delay(
        schedule, retries_done, parse_retry_after(response.retry_after), cap=max_delay(settings)
    )
    if delay is None:
        return Outcome(FAILED, attempt, status=status, error=error)
    return Outcome(PENDING, attempt, retry_in=delay, status=status, error=error)


def _record(ctx: Context, delivery_id: str, url: str, attempt_id: int, outcome: Outcome) -> None:
    next_at = None
    if outcome.retry_in is not None:
        next_at = utcnow() + timedelta(seconds=outcome.retry_in)
    with ctx.session() as s:
        queries.finish_attempt(s, attempt_id, outcome.status, outcome.error, next_at)
        queries.finish_delivery(
            s,
            delivery_id,
            outcome.state,
            status=outcome.status,
            error=outcome.error,
            next_attempt_at=next_at,
        )
        if outcome.state == DISABLED:
            queries.disable_endpoint(s, url, f"410 Gone on delivery {delivery_id}")


def _disabled_note(endpoint: Any) -> str:
    return f"endpoint disabled since {iso(endpoint.disabled_at)}: {endpoint.disabled_reason}"


# --- operations: list, redeliver, enable --------------------------------------


@dataclass(frozen=True)
class DeliveryView:
    delivery: WebhookDelivery
    attempts: list[WebhookAttempt]


def deliveries_of_job(ctx: Context, job_prefix: str) -> tuple[str, list[DeliveryView]]:
    with ctx.session() as s:
        job = queries.find_job_by_prefix(s, job_prefix)
        deliveries = queries.list_deliveries(s, job_id=job.id)
        attempts = queries.list_attempts(s, [d.id for d in deliveries])
    by_delivery: dict[str, list[WebhookAttempt]] = {d.id: [] for d in deliveries}
    for a in attempts:
        by_delivery[a.delivery_id].append(a)
    return job.id, [DeliveryView(d, by_delivery[d.id]) for d in deliveries]


def redeliver(ctx: Context, delivery_prefix: str) -> WebhookDelivery:
    """Queue a fresh attempt (and a fresh retry schedule) of a delivery: same id,
    same body, a new timestamp and signature."""
    with ctx.session() as s:
        d = queries.find_delivery_by_prefix(s, delivery_prefix)
        endpoint = queries.disabled_endpoint(s, d.url)
        if endpoint is not None:
            raise InvalidInput(
                f"{_disabled_note(endpoint)}; re-enable it with 'farm webhooks enable {d.url}'"
            )
        queries.reopen_delivery(s, d.id)
        attempt = d.attempts + 1
    try:
        ctx.dispatch.deliver(d.id, attempt)
    except Exception as exc:
        raise RetryableError(f"could not queue the delivery: {exc}") from exc
    return d


def enable_endpoint(ctx: Context, url: str) -> bool:
    with ctx.session() as s:
        return queries.enable_endpoint(s, url)
