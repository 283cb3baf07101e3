"""The error hierarchy. The CLI maps every FarmError to one line and exit code 1."""

from __future__ import annotations


class FarmError(Exception):
    """Root of every error farm raises on purpose."""


class PermanentError(FarmError):
    """Retrying will not help: bad input, unknown avatar, a face that is not there."""


class RetryableError(FarmError):
    """A transient outage: broker, database, store or webhook target. Retry with backoff."""


class InvalidInput(PermanentError):
    """The user's input (script, name, photo, option) is not acceptable."""


class NotFound(PermanentError):
    """A job, avatar or artifact that does not exist."""


class Cancelled(FarmError):
    """The job was cancelled while this work was in progress."""


class MissingDependency(PermanentError):
    """An optional backend is not installed; the message names the extra."""


class BrokerUnavailable(FarmError):
    """The broker could not take a message. Not a RetryableError: a task that could not
    queue its next step leaves it to the sweep (farm/sweep.py) instead of retrying."""
