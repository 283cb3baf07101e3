"""Webhook signing, verification, the SSRF classification and the retry schedule.
No request leaves the process: these are pure functions (DNS only for 'localhost')."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import socket
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from farm import webhook_targets, webhooks
from farm.config import Settings
from farm.errors import InvalidInput
from farm.webhook_targets import Allowlist
from farm.webhooks import VerificationError

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


def _independent_signature(secret: str, msg_id: str, ts: int, body: bytes) -> str:
    key = base64.b64decode(secret.split("_", 1)[1])
    digest = hmac.new(key, msg_id.encode() + b"." + str(ts).encode() + b"." + body, "sha256")
    return "v1," + base64.b64encode(digest.digest()).decode()


# --- signing ----------------------------------------------------------------


def test_signature_is_the_standard_webhooks_hmac_of_id_timestamp_body():
    body = b'{"type":"job.succeeded","data":{"job_id":"abc"}}'
    got = webhooks.sign(SECRET, "msg_1", 1_700_000_000, body)
    assert got == _independent_signature(SECRET, "msg_1", 1_700_000_000, body)
    # hashlib spelled differently, to rule out sharing a mistake with the helper above
    key = bytes(range(32))
    mac = hmac.new(key, b"msg_1.1700000000." + body, hashlib.sha256).digest()
    assert got == "v1," + base64.b64encode(mac).decode()


def test_signature_matches_the_published_standard_webhooks_example():
    # The example in the Standard Webhooks / Svix documentation.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    got = webhooks.sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert got == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signed_headers_carry_id_timestamp_and_signature():
    h = webhooks.signed_headers(SECRET, "msg_2", 1234, b"{}")
    assert h["webhook-id"] == "msg_2" and h["webhook-timestamp"] == "1234"
    assert h["webhook-signature"] == _independent_signature(SECRET, "msg_2", 1234, b"{}")
    assert h["content-type"] == "application/json"


@pytest.mark.parametrize(
    "secret, message",
    [
        ("", "FARM_WEBHOOK_SECRET is not set"),
        ("abc", "must start with 'whsec_'"),
        ("whsec_!!!not-base64!!!", "not valid base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "decodes to 5 bytes"),
    ],
)
def test_bad_secrets_are_refused_with_a_clear_message(secret, message):
    with pytest.raises(InvalidInput, match=message):
        webhooks.secret_key(secret)


def test_new_secrets_are_valid_and_distinct():
    a, b = webhooks.new_secret(), webhooks.new_secret()
    assert a != b and len(webhooks.secret_key(a)) == 32


# --- verify -----------------------------------------------------------------


def _request(body: bytes, ts: int | None = None, secret: str = SECRET) -> dict[str, str]:
    return webhooks.signed_headers(secret, "msg_v", int(time.time()) if ts is None else ts, body)


def test_verify_accepts_a_good_request_and_returns_the_payload():
    body = json.dumps({"type": "job.failed", "timestamp": "x", "data": {"job_id": "j"}}).encode()
    headers = {k.title(): v for k, v in _request(body).items()}  # header case does not matter
    assert webhooks.verify(SECRET, headers, body)["data"]["job_id"] == "j"
    assert webhooks.verify(SECRET, headers, body.decode())["type"] == "job.failed"


def test_verify_accepts_any_of_several_signatures_during_rotation():
    body = b'{"a":1}'
    headers = _request(body)
    headers["webhook-signature"] = "v1,b2xkc2lnbmF0dXJl " + headers["webhook-signature"]
    assert webhooks.verify(SECRET, headers, body) == {"a": 1}


def test_verify_rejects_a_tampered_body():
    headers = _request(b'{"amount":1}')
    with pytest.raises(VerificationError, match="no webhook-signature matches"):
        webhooks.verify(SECRET, headers, b'{"amount":9}')


def test_verify_rejects_the_wrong_secret():
    headers = _request(b"{}")
    with pytest.raises(VerificationError):
        webhooks.verify(webhooks.new_secret(), headers, b"{}")


def test_verify_rejects_a_changed_id():
    headers = _request(b"{}")
    headers["webhook-id"] = "msg_other"
    with pytest.raises(VerificationError):
        webhooks.verify(SECRET, headers, b"{}")


@pytest.mark.parametrize("skew", [-301, 301, -3600])
def test_verify_rejects_timestamps_outside_the_tolerance(skew):
    now = 1_700_000_000
    headers = _request(b"{}", ts=now + skew)
    with pytest.raises(VerificationError, match="tolerance"):
        webhooks.verify(SECRET, headers, b"{}", now=now)
    assert webhooks.verify(SECRET, _request(b"{}", ts=now - 299), b"{}", now=now) == {}


def test_verify_rejects_missing_headers_and_bad_timestamps():
    with pytest.raises(VerificationError, match="missing"):
        webhooks.verify(SECRET, {}, b"{}")
    headers = _request(b"{}")
    headers["webhook-timestamp"] = "yesterday"
    with pytest.raises(VerificationError, match="bad webhook-timestamp"):
        webhooks.verify(SECRET, headers, b"{}")


# --- SSRF -------------------------------------------------------------------


@pytest.mark.parametrize(
    "address, reason",
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.254", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("100.64.0.1", "non-public"),  # carrier-grade NAT
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "private"),  # reserved; Python counts it private first
        ("255.255.255.255", "broadcast"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fd00::1", "private"),
        ("fd00:ec2::254", "cloud metadata"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback (inside IPv6)"),
        ("::ffff:10.0.0.1", "private (inside IPv6)"),
        ("2002:7f00:1::", "loopback (inside IPv6)"),  # 6to4 wrapping 127.0.0.1
    ],
)
def test_internal_addresses_are_refused(address, reason):
    assert webhook_targets.refusal(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass_the_classification(address):
    assert webhook_targets.refusal(ipaddress.ip_address(address)) is None


def _settings(allowlist: str = "") -> Settings:
    return Settings(webhook_secret=SECRET, webhook_allowlist=allowlist)


@pytest.mark.parametrize(
    "url, message",
    [
        ("http://127.0.0.1:8080/hook", "127.0.0.1, a loopback address"),
        ("http://10.0.0.7/hook", "private"),
        ("https://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("http://[::1]/hook", "loopback"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback (inside IPv6)"),
        ("http://[fd00::1]/hook", "private"),
        ("http://0.0.0.0/hook", "unspecified"),
        ("http://localhost:9/hook", "loopback"),  # a name: resolved, then checked
        ("http://2130706433/hook", "loopback"),  # 127.0.0.1 as one decimal number
        ("ftp://93.184.216.34/hook", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("gopher://example.com/", "only http and https"),
        ("http:///no-host", "has no host"),
        ("http://user:pw@93.184.216.34/", "credentials"),
        ("http://93.184.216.34:99999/", "not a valid URL"),
    ],
)
def test_check_target_refuses_internal_targets_and_other_schemes(url, message):
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        webhooks.check_target(url, _settings())


def test_a_public_ip_target_is_accepted_without_a_request():
    assert webhooks.check_target("https://93.184.216.34/hook", _settings()) == (
        "https://93.184.216.34/hook"
    )


def test_check_target_needs_the_secret():
    with pytest.raises(InvalidInput, match="FARM_WEBHOOK_SECRET is not set"):
        webhooks.check_target("https://93.184.216.34/hook", Settings())


def test_the_allowlist_names_ips_cidrs_and_hosts():
    allow = Allowlist.parse("127.0.0.1, 10.20.0.0/16, hooks.internal, [fd00::1]")
    ip = ipaddress.ip_address
    assert allow.allows("x", ip("127.0.0.1"))
    assert allow.allows("x", ip("::ffff:127.0.0.1"))
    assert not allow.allows("x", ip("127.0.0.2"))
    assert allow.allows("x", ip("10.20.99.1")) and not allow.allows("x", ip("10.21.0.1"))
    assert allow.allows("HOOKS.internal.", ip("10.9.9.9"))
    assert allow.allows("x", ip("fd00::1")) and not allow.allows("x", ip("fd00::2"))
    assert not allow.allows("x", ip("169.254.169.254"))


def test_allowlisted_targets_pass_and_others_still_do_not():
    settings = _settings("127.0.0.1")
    assert webhooks.check_target("http://127.0.0.1:9/hook", settings)
    with pytest.raises(InvalidInput, match="metadata"):
        webhooks.check_target("http://169.254.169.254/", settings)
    with pytest.raises(InvalidInput, match="loopback"):
        webhooks.check_target("http://127.0.0.2/", settings)


def test_every_resolved_address_must_pass(monkeypatch):
    answers = [(2, 1, 6, "", ("93.184.216.34", 80)), (2, 1, 6, "", ("10.0.0.1", 80))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: answers)
    with pytest.raises(InvalidInput, match="10.0.0.1, a private address"):
        webhooks.check_target("http://mixed.example/hook", _settings())


# --- retry schedule ---------------------------------------------------------


def test_the_default_schedule_is_the_specs():
    assert webhooks.parse_schedule(Settings().webhook_retry_schedule) == (
        5,
        300,
        1800,
        7200,
        18000,
        36000,
        36000,
    )
    assert webhooks.parse_schedule("1, 1,2") == (1, 1, 2)
    for bad in ("1,x", "-1"):
        with pytest.raises(InvalidInput, match="FARM_WEBHOOK_RETRY_SCHEDULE"):
            webhooks.parse_schedule(bad)


def test_retry_delays_follow_the_schedule_with_bounded_jitter():
    schedule = (5.0, 300.0, 1800.0)
    assert webhooks.retry_delay(schedule, 0, rng=lambda: 0.0) == 5.0
    assert webhooks.retry_delay(schedule, 1, rng=lambda: 1.0) == pytest.approx(360.0)
    for retries_done, base in enumerate(schedule):
        seen = [webhooks.retry_delay(schedule, retries_done) for _ in range(200)]
        assert all(base <= d <= base * (1 + webhooks.JITTER) for d in seen)
        assert len(set(seen)) > 1  # there is jitter
    assert webhooks.retry_delay(schedule, 3) is None  # spent


def test_a_longer_retry_after_wins_and_a_shorter_one_does_not():
    assert webhooks.retry_delay((5.0,), 0, retry_after=60, rng=lambda: 0.0) == 60
    assert webhooks.retry_delay((5.0,), 0, retry_after=2, rng=lambda: 0.0) == 5.0
    assert webhooks.retry_delay((5.0,), 0, retry_after=10**6, cap=3600) == 3600
    assert webhooks.retry_delay((5.0,), 1, retry_after=60) is None  # no retry left


def test_retry_after_in_seconds_or_as_an_http_date():
    now = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
    assert webhooks.parse_retry_after("120", now) == 120
    assert webhooks.parse_retry_after(" 7 ", now) == 7
    later = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert webhooks.parse_retry_after(later, now) == pytest.approx(90)
    earlier = format_datetime(now - timedelta(hours=1), usegmt=True)
    assert webhooks.parse_retry_after(earlier, now) == 0
    for bad in (None, "", "soon", "-5", "1.5e3"):
        assert webhooks.parse_retry_after(bad, now) is None


def test_no_wait_reaches_the_redis_visibility_timeout():
    assert webhooks.max_delay(Settings(visibility_timeout=43200)) < 43200


# --- payload and settings ---------------------------------------------------


def test_payload_has_type_iso_timestamp_and_data():
    when = datetime(2026, 11, 23, 12, 0, 1, tzinfo=UTC)
    body = json.loads(webhooks.payload("job.succeeded", {"job_id": "j"}, when))
    assert body == {
        "type": "job.succeeded",
        "timestamp": "2026-11-23T12:00:01Z",
        "data": {"job_id": "j"},
    }
    assert datetime.fromisoformat(body["timestamp"]) == when


def test_webhook_settings_from_env_and_the_secret_is_masked():
    s = Settings.from_env(
        {
            "FARM_WEBHOOK_SECRET": SECRET,
            "FARM_WEBHOOK_TIMEOUT": "2.5",
            "FARM_WEBHOOK_RETRY_SCHEDULE": "1,1,2",
            "FARM_WEBHOOK_ALLOWLIST": "127.0.0.1",
        }
    )
    assert s.webhook_timeout == 2.5 and s.webhook_retry_schedule == "1,1,2"
    assert SECRET not in " ".join(s.describe().values())
    with pytest.raises(InvalidInput, match="FARM_WEBHOOK_TIMEOUT must be a number"):
        Settings.from_env({"FARM_WEBHOOK_TIMEOUT": "ten"})
