"""The beat schedule: the sweep for lost work (every FARM_SWEEP_SECONDS, farm/sweep.py;
it also runs the retention pass, farm/retention.py), and the nightly batch when
FARM_NIGHTLY_INBOX names an inbox.

Beat must run as exactly one process (`celery -A workers.app beat`): two would fire
every entry twice. The nightly task is idempotent, so a double firing submits nothing
twice, but one beat is still the rule. Crontabs are in UTC (app.conf.timezone).
"""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

from farm.config import Settings, check_cron
from farm.dispatch import NIGHTLY_TASK, SWEEP_TASK
from farm.errors import InvalidInput

_FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")


def parse_cron(text: str) -> crontab:
    """'0 2 * * *' (minute hour day-of-month month day-of-week) to a celery crontab;
    the text was checked with the settings (farm.config.check_cron)."""
    check_cron(text)
    try:
        return crontab(**dict(zip(_FIELDS, text.split(), strict=True)))
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"FARM_NIGHTLY_CRON {text!r} is not a valid crontab: {exc}") from exc


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    schedule: dict[str, dict[str, Any]] = {
        "farm-sweep": {
            "task": SWEEP_TASK,
            "schedule": float(settings.sweep_seconds),
            # A sweep still queued when the next one fires is not needed twice.
            "options": {"expires": float(settings.sweep_seconds)},
        }
    }
    if not settings.nightly_inbox:
        return schedule
    return {
        **schedule,
        "farm-nightly": {
            "task": NIGHTLY_TASK,
            "schedule": parse_cron(settings.nightly_cron),
            # A firing nobody picked up within the hour is dropped; the next one
            # finds the same inbox anyway.
            "options": {"expires": 3600},
        },
    }
