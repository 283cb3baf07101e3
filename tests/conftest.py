"""Shared fixtures. Services: tests that need Redis/Postgres/S3 skip locally when the
service is absent, but fail under CI=true (a missing service there is a CI bug)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from farm import migrate
from farm.config import Settings
from farm.context import Context
from farm.dispatch import InMemoryDispatcher
from tests.services import fresh_redis_db, redis_up, scheduling_env

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def job_rows(home: Path, table: str = "jobs") -> int:
    """Rows of `table` in an embedded default's SQLite database (0 if it was never made)."""
    import sqlalchemy as sa

    db = home / "farm.db"
    if not db.exists():
        return 0
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        n = conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar() or 0
    engine.dispose()
    return n


def need_service(ok: bool, what: str) -> None:
    if ok:
        return
    if IN_CI:
        pytest.fail(f"{what} is not available, and CI=true requires it")
    pytest.skip(f"{what} is not available")


PG_ADMIN_URL = os.environ.get(
    "FARM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def _postgres_up() -> bool:
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture
def postgres_url():
    """A fresh, empty Postgres database for one test, dropped afterwards."""
    import uuid

    import sqlalchemy as sa

    need_service(_postgres_up(), f"Postgres at {PG_ADMIN_URL}")
    name = f"farm_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_ctx(request, tmp_path: Path) -> Context:
    """A Context on a fresh, migrated database: SQLite, then real Postgres; what it
    queues stays in its in-memory dispatcher (tests/pipeline.py runs the stages)."""
    url = ""
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    settings = Settings(home=tmp_path / "home", database_url=url)
    migrate.upgrade(settings.effective_database_url)
    ctx = Context(settings, InMemoryDispatcher())
    yield ctx
    ctx.engine.dispose()


@pytest.fixture
def farm_env(request: pytest.FixtureRequest, postgres_url: str, tmp_path: Path):
    """The environment of farm processes for a test about scheduling (scheduling_env):
    real Redis and a fresh, migrated Postgres. The test module names its own Redis
    database in REDIS_DB (flushed before and after: no module sees another's queues)
    and may add settings in FARM_ENV."""
    need_service(redis_up(), "Redis at 127.0.0.1:6379")
    redis_db = request.module.REDIS_DB
    migrate.upgrade(postgres_url)
    extra = getattr(request.module, "FARM_ENV", {})
    yield scheduling_env(tmp_path, fresh_redis_db(redis_db), postgres_url, **extra)
    fresh_redis_db(redis_db)


@pytest.fixture(scope="session")
def ditto_dir(tmp_path_factory) -> Path:
    """Ditto's checkpoint root with random weights at reduced widths, in the official
    layout (tests/ditto_checkpoints.py); written once per session, only read by tests."""
    from tests.ditto_checkpoints import write_random_checkpoints  # imports torch

    return write_random_checkpoints(tmp_path_factory.mktemp("ditto"), reduced=True, seed=0)
