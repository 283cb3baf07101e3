"""Shared fixtures. Services: tests that need Redis/Postgres/S3 skip locally when the
service is absent, but fail under CI=true (a missing service there is a CI bug)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from farm import migrate
from farm.config import Settings
from farm.context import Context

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need_service(ok: bool, what: str) -> None:
    if ok:
        return
    if IN_CI:
        pytest.fail(f"{what} is not available, and CI=true requires it")
    pytest.skip(f"{what} is not available")


@pytest.fixture
def sqlite_ctx(tmp_path: Path) -> Context:
    """A Context on a fresh, migrated SQLite database and a local store."""
    settings = Settings(home=tmp_path / "home")
    ctx = Context(settings)
    migrate.upgrade(settings.effective_database_url)
    return ctx
