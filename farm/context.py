"""What a process needs to do farm work: settings, a database, the store and a
dispatcher (farm/dispatch.py) to queue work with.

Made once per process at start-up by its entry point (the CLI, the embedded
supervisor; in a Celery worker: in the child, after the fork, on first use) and
passed down; nothing here runs at import.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from farm.config import Settings
from farm.db import make_engine, make_sessionmaker
from farm.dispatch import Dispatcher
from farm.errors import FarmError
from farm.stores import Store, open_store


@dataclass(eq=False)  # hashed by identity: one per process, a cache key
class Context:
    settings: Settings
    dispatcher: Dispatcher | None = None  # wired by the entry point

    @property
    def dispatch(self) -> Dispatcher:
        if self.dispatcher is None:
            raise FarmError("this process was started without a dispatcher: nothing to queue with")
        return self.dispatcher

    @cached_property
    def engine(self) -> Engine:
        return make_engine(self.settings.effective_database_url)

    @cached_property
    def sessions(self) -> sessionmaker:
        return make_sessionmaker(self.engine)

    @cached_property
    def store(self) -> Store:
        return open_store(self.settings)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: committed on success, rolled back on error."""
        with self.sessions() as session, session.begin():
            yield session
