"""Real stores in a fresh database under the test's directory, closed after the test."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from smtpplus.auth.store import SQLiteUserStore
from smtpplus.storage.database import Database


def make_sqlite_store(case: TestCase, clock: Any = reactor) -> SQLiteUserStore:
    """A migrated SQLite user store in a fresh temporary database, closed after the test."""
    directory = case.mktemp()
    os.makedirs(directory)
    database = Database(reactor, os.path.join(directory, "smtpplus.db"))
    case.addCleanup(database.stop)
    store = SQLiteUserStore(database, clock)
    store.migrate()
    return store
