"""The limits in configuration, and how secrets are kept out of what farm prints."""

from __future__ import annotations

import pytest

from farm.config import Settings, known_secrets, mask_url, redact, url_password
from farm.errors import InvalidInput
from farm.script import check_frames, check_script_frames, decode_script, min_seconds, split_script

LIMITS = {
    "max_script_chars": 20_000,
    "max_audio_seconds": 600.0,
    "max_photo_pixels": 40_000_000,
    "max_job_frames": 45_000,
    "max_batch_jobs": 10_000,
}


def test_limits_have_safe_defaults_and_come_from_the_environment():
    defaults = Settings.from_env({}, dotenv=None)
    assert {k: getattr(defaults, k) for k in LIMITS} == LIMITS
    env = {f"FARM_{k.upper()}": "7" for k in LIMITS}
    assert {k: getattr(Settings.from_env(env), k) for k in LIMITS} == {k: 7 for k in LIMITS}


@pytest.mark.parametrize("raw, message", [("0", "must be positive"), ("-3", "must be positive")])
def test_a_limit_must_be_positive(raw, message):
    with pytest.raises(InvalidInput, match=f"FARM_MAX_JOB_FRAMES {message}"):
        Settings.from_env({"FARM_MAX_JOB_FRAMES": raw})


def test_ten_thousand_one_character_sentences_make_few_segments():
    """Accepted once the length limit allows it: sentences are packed into segments of
    up to FARM_MAX_SEGMENT_CHARS, so 10,000 sentences are 76 TTS tasks, not 10,000."""
    text = decode_script(b"a. " * 10_000, max_chars=40_000)
    parts = split_script(text, max_chars=400, pause_ms=350)
    assert len(parts) == 76 and all(len(p) <= 400 for p, _ in parts)
    assert sum(p.count("a.") for p, _ in parts) == 10_000
    settings = Settings(max_script_chars=40_000)
    check_script_frames(text, 25, settings, padding_s=0.8)  # about 1,230 s: under 45,000


def test_ten_thousand_paragraphs_are_refused_for_their_pauses():
    text = decode_script(b"a.\n\n" * 10_000, max_chars=50_000)
    assert min_seconds(text, 400, 350) > 10_000 * 0.7 - 1  # a long pause per paragraph
    with pytest.raises(InvalidInput, match="at least .* the limit is 45000 frames"):
        check_script_frames(text, 25, Settings(), padding_s=0.8)


def test_the_script_estimate_is_below_real_speech():
    """The estimate refuses only what is surely too long: real TTS takes longer."""
    from models import tts

    text = "Hello there. My name is Ada, and I speak from a single photo."
    speech = tts.synthesize(text, "espeak")
    assert min_seconds(text, 400, 350) < len(speech.samples) / speech.sample_rate


def test_check_frames_says_whether_it_is_an_estimate():
    check_frames(4.0, 25, 100, "x", estimate=False)  # exactly the limit
    with pytest.raises(InvalidInput, match=r"^a.wav makes a video of 101 frames \(4 s"):
        check_frames(4.02, 25, 100, "a.wav", estimate=False)
    with pytest.raises(InvalidInput, match="of at least 101 frames"):
        check_frames(4.02, 25, 100, "the script", estimate=True)


# --- secrets ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, masked, password",
    [
        ("postgresql+psycopg://u:s3cret@db/farm", "postgresql+psycopg://u:***@db/farm", "s3cret"),
        # a raw '@' in the password: URL parsers split at the last '@' of the authority
        ("postgresql://farm:p@ss@db/farm", "postgresql://farm:***@db/farm", "p@ss"),
        ("redis://:pw%2Fx@cache:6379/0", "redis://:***@cache:6379/0", "pw%2Fx"),
        ("amqp://guest:guest@mq//", "amqp://guest:***@mq//", "guest"),
        ("redis://cache:6379/0", "redis://cache:6379/0", ""),
        ("http://host/a:b@c", "http://host/a:b@c", ""),  # '@' in the path is no password
        ("s3://bucket/prefix", "s3://bucket/prefix", ""),
        ("not a url", "not a url", ""),
    ],
)  # fmt: skip
def test_urls_are_masked(url, masked, password):
    assert mask_url(url) == masked
    assert url_password(url) == password


def test_redact_replaces_every_secret_in_any_form():
    env = {
        "FARM_DATABASE_URL": "postgresql://farm:p%40ss-w0rd@db/farm",
        "FARM_WEBHOOK_SECRET": "whsec_c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0",
        "AWS_SECRET_ACCESS_KEY": "aws/secret+key",
        "FARM_BROKER_URL": "redis://cache:6379/0",
    }
    secrets = known_secrets(env)
    assert set(secrets) == {
        "p%40ss-w0rd",
        "p@ss-w0rd",
        "whsec_c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0",
        "aws/secret+key",
    }
    text = (
        "login p@ss-w0rd failed for postgresql://farm:p%40ss-w0rd@db/farm; key aws/secret+key;"
        " signed with whsec_c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0; other amqp://u:pw@mq//"
    )
    out = redact(text, secrets)
    assert out == (
        "login *** failed for postgresql://farm:***@db/farm; key ***;"
        " signed with ***; other amqp://u:***@mq//"
    )


def test_describe_masks_passwords_and_the_webhook_secret():
    settings = Settings(
        database_url="postgresql://farm:p@ss@db/farm",
        broker_url="redis://:hunter2@cache:6379/0",
        webhook_secret="whsec_c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0",
    )
    shown = "\n".join(settings.describe().values())
    for secret in settings.secret_values():
        assert secret not in shown
    assert "postgresql://farm:***@db/farm" in shown and "redis://:***@cache" in shown
