"""
The SQLite database under C{state_dir}, used through one dedicated thread.

SQLite connections are cheap but a writer holds the whole file, so every
statement goes through one thread: callers get Deferreds, the reactor never
waits on the disk, and no two writers contend for the lock.  Each concern
(users, queue, events, statistics) owns a named list of migrations; the
database records how many of each it has applied, so a database made by one
release opens in the next.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component TEXT PRIMARY KEY,
    version INTEGER NOT NULL
)
"""


def apply_migrations(conn: sqlite3.Connection, component: str, migrations: Sequence[str]) -> int:
    """
    Run the migrations of C{component} that this database has not seen yet,
    each in its own transaction.  Returns the resulting version.
    """
    conn.execute(_BOOKKEEPING)
    row = conn.execute("SELECT version FROM schema_migrations WHERE component = ?", (component,)).fetchone()
    current = row[0] if row else 0
    if current > len(migrations):
        raise RuntimeError(
            f"database schema of {component!r} is version {current}, newer than this release knows ({len(migrations)})"
        )
    for version in range(current + 1, len(migrations) + 1):
        with conn:
            conn.executescript("BEGIN;" + migrations[version - 1])
            conn.execute(
                "INSERT INTO schema_migrations (component, version) VALUES (?, ?) "
                "ON CONFLICT(component) DO UPDATE SET version = excluded.version",
                (component, version),
            )
    return len(migrations)


def connect(path: str) -> sqlite3.Connection:
    """
    Open C{path} with the settings every component relies on: WAL (readers do
    not block the writer), FULL sync (a committed row survives power loss),
    foreign keys on.
    """
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class Database:
    """
    One SQLite file served by one thread.

    @ivar path: the database file.
    """

    def __init__(self, reactor: IReactorThreads, path: str) -> None:
        self._reactor = reactor
        self.path = path
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="smtpplus-db")
        self._conn: sqlite3.Connection | None = None

    def open(self) -> None:
        """Open the file; synchronous.  Safe before twistd forks: no thread yet."""
        if self._conn is None:
            self._conn = connect(self.path)

    def start(self) -> None:
        """Open the file if needed and start the database thread."""
        self.open()
        if not self._pool.started:
            self._pool.start()

    def stop(self) -> None:
        """Finish queued work, stop the thread and close the file."""
        if self._pool.started:
            self._pool.stop()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def migrate(self, component: str, migrations: Sequence[str]) -> int:
        """Bring C{component}'s tables up to date; synchronous, at start-up."""
        self.open()
        assert self._conn is not None
        return apply_migrations(self._conn, component, migrations)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Call C{fn(connection, *args, **kwargs)} on the database thread."""
        if not self._pool.started:
            self.start()
        conn = self._conn
        assert conn is not None
        return deferToThreadPool(self._reactor, self._pool, fn, conn, *args, **kwargs)

    def transaction(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Like L{run}, inside one transaction that commits if C{fn} returns."""
        return self.run(_in_transaction, fn, *args, **kwargs)

    def run_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call C{fn} on the calling thread: only for start-up and tools, never the reactor."""
        assert self._conn is not None
        return fn(self._conn, *args, **kwargs)


def _in_transaction(conn: sqlite3.Connection, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn, *args, **kwargs)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


class DatabaseService(Service):
    """
    Starts the database thread with the reactor (after twistd has forked and
    dropped privileges) and closes the file last on the way down.
    """

    name = "database"

    def __init__(self, database: Database) -> None:
        self.database = database

    def startService(self) -> None:
        self.database.start()
        Service.startService(self)

    def stopService(self) -> None:
        Service.stopService(self)
        self.database.stop()
