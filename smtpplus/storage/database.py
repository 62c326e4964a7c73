"""
The SQLite database under C{state_dir}, used through one dedicated thread.

SQLite connections are cheap but a writer holds the whole file, so every
statement goes through one thread: callers get Deferreds, the reactor never
waits on the disk, and no two writers contend for the lock.  Each concern
(users, queue, events, statistics) owns a named list of migrations; the
database records how many of each it has applied, so a database made by one
release opens in the next.

The file and its C{-wal}/C{-shm} companions are the daemon user's alone
(0600).  A file removed or replaced under the running daemon is noticed at
the next write batch: writes fail (new mail gets a temporary refusal) until
a fresh file is open and migrated, and then whoever keeps state elsewhere
(the spool) is told to rebuild its rows.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from smtpplus.storage.migrations import Migration, sqlite_steps

log = Logger()

T = TypeVar("T")

FILE_MODE = 0o600
# After a failed attempt to reopen a lost database file.
REOPEN_RETRY = 5.0


class StorageUnavailable(Exception):
    """The configured database cannot be reached (a server backend: PostgreSQL)."""


class DatabaseLost(sqlite3.OperationalError):
    """The database file was removed or replaced while the daemon had it open."""

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


def secure_files(path: str) -> None:
    """Create C{path} if needed and make it and its WAL companions mode 0600."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE))
    for name in (path, path + "-wal", path + "-shm"):
        try:
            os.chmod(name, FILE_MODE)
        except FileNotFoundError:
            pass


def connect(path: str) -> sqlite3.Connection:
    """
    Open C{path} with the settings every component relies on: WAL (readers do
    not block the writer), FULL sync (a committed row survives power loss),
    foreign keys on.  SQLite gives the WAL files the mode of the database
    file, so creating that one 0600 first covers all three.
    """
    secure_files(path)
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

    def __init__(self, reactor: Any, path: str) -> None:
        self._reactor = reactor
        self.path = path
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="smtpplus-db")
        self._conn: sqlite3.Connection | None = None
        # (device, inode) of the open file, to notice it being replaced.
        self._identity: tuple[int, int] | None = None
        self._migrations: dict[str, Sequence[str]] = {}
        # Set from the database thread when the file is found gone; cleared
        # once a new one is open.
        self.lost = False
        self._reopen_listeners: list[Callable[[], object]] = []

    def open(self) -> None:
        """Open the file; synchronous.  Safe before twistd forks: no thread yet."""
        if self._conn is None:
            self._conn = connect(self.path)
            st = os.stat(self.path)
            self._identity = (st.st_dev, st.st_ino)

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

    def migrate(self, component: str, migrations: Sequence[Migration]) -> int:
        """Bring C{component}'s tables up to date with the SQLite side of C{migrations}; synchronous, at start-up."""
        self.open()
        assert self._conn is not None
        steps = sqlite_steps(list(migrations))
        self._migrations[component] = steps
        return apply_migrations(self._conn, component, steps)

    def on_reopen(self, listener: Callable[[], object]) -> None:
        """Call C{listener()} on the reactor after a lost file was replaced by a new one."""
        self._reopen_listeners.append(listener)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Call C{fn(connection, *args, **kwargs)} on the database thread."""
        if not self._pool.started:
            self.start()
        return deferToThreadPool(self._reactor, self._pool, self._call, fn, *args, **kwargs)

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        # The connection is looked up on the database thread: after a
        # reopen, work queued before it goes to the new one.
        conn = self._conn
        if conn is None:
            raise DatabaseLost(f"database {self.path} is not open")
        return fn(conn, *args, **kwargs)

    def transaction(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Like L{write}, inside one transaction that commits if C{fn} returns."""
        return self.write(_in_transaction, fn, *args, **kwargs)

    def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """
        Like L{run}, for a batch of writes: first checks that the open file
        is still the one at L{path}, else fails with L{DatabaseLost}.
        """
        return self.run(self._checked, fn, *args, **kwargs)

    def probe(self) -> Deferred[None]:
        """
        Fires once the database thread has read from the file, checked first
        as a write batch is (still the file at L{path}); fails when the store
        cannot serve.  For the health check.
        """
        return self.write(_read_bookkeeping)

    def _checked(self, conn: sqlite3.Connection, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        # One stat() per write batch: the cheap way to notice that the
        # rows would go into a file nobody will open again.
        if self.lost:
            raise DatabaseLost(f"database {self.path} was removed or replaced; reopening")
        try:
            st = os.stat(self.path)
            found: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            found = None
        if found != self._identity:
            self.lost = True
            self._reactor.callFromThread(self._handle_lost, found is None)
            raise DatabaseLost(f"database {self.path} was removed or replaced; reopening")
        return fn(conn, *args, **kwargs)

    def _handle_lost(self, removed: bool) -> None:
        log.error(
            "database file {path} was {what} while the daemon had it open: new mail is refused with 451 "
            "until a new one is open and the queue is rebuilt from the spool",
            path=self.path,
            what="removed" if removed else "replaced",
        )
        self._reopen()

    def _reopen(self, attempt: int = 1) -> None:
        def reopened(_: object) -> None:
            self.lost = False
            log.warn("database {path} reopened; rebuilding the queue from the spool", path=self.path)
            for listener in self._reopen_listeners:
                listener()

        def failed(failure: Any) -> None:
            if attempt == 1:
                log.error(
                    "cannot reopen database {path}: {error}; retrying every {seconds} s",
                    path=self.path,
                    error=failure.value,
                    seconds=REOPEN_RETRY,
                )
            self._reactor.callLater(REOPEN_RETRY, self._reopen, attempt + 1)

        deferToThreadPool(self._reactor, self._pool, self._swap).addCallbacks(reopened, failed)

    def _swap(self) -> None:
        """Close the lost file (SQLite checkpoints into it, and removes its WAL), open a new one (database thread)."""
        old, self._conn = self._conn, None
        if old is not None:
            try:
                old.close()
            except sqlite3.Error as e:
                log.warn("closing the lost database: {error}", error=e)
        conn = connect(self.path)
        try:
            for component, migrations in self._migrations.items():
                apply_migrations(conn, component, migrations)
            st = os.stat(self.path)
        except BaseException:
            conn.close()
            raise
        self._identity = (st.st_dev, st.st_ino)
        self._conn = conn

    def run_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call C{fn} on the calling thread: only for start-up and tools, never the reactor."""
        assert self._conn is not None
        return fn(self._conn, *args, **kwargs)


def _read_bookkeeping(conn: sqlite3.Connection) -> None:
    conn.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()


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
    Starts the database's threads with the reactor (after twistd has forked
    and dropped privileges) and closes it last on the way down: the SQLite
    file's L{Database} or a L{smtpplus.storage.postgres.PostgresDatabase}.
    """

    name = "database"

    def __init__(self, database: Database | Any) -> None:
        self.database = database

    def startService(self) -> None:
        self.database.start()
        Service.startService(self)

    def stopService(self) -> None:
        Service.stopService(self)
        self.database.stop()
