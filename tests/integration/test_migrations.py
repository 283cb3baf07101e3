"""`alembic upgrade head` must produce exactly the tables the models describe, and
`downgrade base` must remove them, on SQLite and on real Postgres."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from farm import migrate
from farm.db import Base, make_engine


def _diff(url: str) -> list:
    engine = make_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    return diff


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    names = set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    engine.dispose()
    return names


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'm.db'}"
    return request.getfixturevalue("postgres_url")


def test_upgrade_head_matches_the_models_and_downgrade_removes_all(database_url):
    migrate.upgrade(database_url)
    assert _diff(database_url) == []
    assert _tables(database_url) == set(Base.metadata.tables)
    engine = make_engine(database_url)
    assert migrate.is_current(engine, database_url)
    engine.dispose()
    migrate.downgrade(database_url, "base")
    assert _tables(database_url) == set()
    migrate.upgrade(database_url)  # and back up again
    assert _diff(database_url) == []
