"""
The PostgreSQL database named by C{[storage] dsn}, used through a pool of
connections (psycopg_pool) served by a thread pool of the same size.

psycopg 3 blocks, so no call runs on the reactor thread: L{PostgresDatabase}
has the shape of L{smtpplus.storage.database.Database} (C{run},
C{transaction}, C{write}, C{migrate}, C{probe}, C{run_sync}), and the
stores written for it take the same place in the daemon as the SQLite ones.
Each call is one transaction on one pooled connection: it commits when the
function returns, and only then does its Deferred fire, so a caller that
answers 250 afterwards answers it for committed rows: every connection
sets C{synchronous_commit} on, whatever the server or the role defaults to,
so a commit has reached the server's disk (or its synchronous standby).

A broken connection or an unreachable server makes calls fail with
L{StoreUnavailable}, at once for as long as the outage lasts; it is logged
once, and the reactor tries a new pool every L{RECONNECT_RETRY} seconds
until one connects (logged too).  The stores need no new object.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from smtpplus.storage.database import StorageUnavailable
from smtpplus.storage.migrations import Migration, postgresql_steps

log = Logger()
# The pool logs every failed connection attempt; an outage is logged once,
# by this module, instead.
logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)

T = TypeVar("T")

# Connections per pool: enough for a group commit, the scheduler's reads
# and the admin API at once.
POOL_SIZE = 4
# How long a call waits for a connection before it fails (server down).
CONNECT_TIMEOUT = 5.0
# Between attempts to reconnect after an outage.
RECONNECT_RETRY = 2.0

_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component text PRIMARY KEY,
    version integer NOT NULL
)
"""
# Several nodes may start at once: one migrates, the others wait for it.
_MIGRATION_LOCK = 0x736D7470  # "smtp"


class StoreUnavailable(psycopg.OperationalError, StorageUnavailable):
    """PostgreSQL cannot be reached (or the connection broke); the pool keeps reconnecting."""


def redact_dsn(dsn: str) -> str:
    """C{dsn} with any password replaced by C{***}, fit for a log line."""
    dsn = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn, flags=re.IGNORECASE)


def apply_migrations(conn: psycopg.Connection[Any], component: str, migrations: Sequence[Migration]) -> int:
    """
    Run the PostgreSQL side of the steps of C{component} this database has
    not seen yet, in one transaction (PostgreSQL's DDL is transactional: all
    or none), under an advisory lock so that nodes starting together do not
    race.  Returns the resulting version.
    """
    steps = postgresql_steps(list(migrations))
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(_BOOKKEEPING)
        row = conn.execute("SELECT version FROM schema_migrations WHERE component = %s", (component,)).fetchone()
        current = row[0] if row else 0
        if current > len(steps):
            raise RuntimeError(
                f"database schema of {component!r} is version {current}, newer than this release knows ({len(steps)})"
            )
        for version in range(current + 1, len(steps) + 1):
            with conn.transaction():
                if steps[version - 1].strip():
                    conn.execute(steps[version - 1])
                conn.execute(
                    "INSERT INTO schema_migrations (component, version) VALUES (%s, %s) "
                    "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                    (component, version),
                )
    return len(steps)


class PostgresDatabase:
    """
    A pool of connections to one PostgreSQL database, each call on a thread
    of its own pool.

    @ivar lost: True from a broken connection until a new pool is connected.
    """

    def __init__(
        self,
        reactor: Any,
        dsn: str,
        size: int = POOL_SIZE,
        timeout: float = CONNECT_TIMEOUT,
        retry: float = RECONNECT_RETRY,
        name: str = "smtpplus-pg",
    ) -> None:
        self._reactor = reactor
        self.dsn = dsn
        self._size = size
        self._timeout = timeout
        self._retry = retry
        self._name = name
        self._threads = ThreadPool(minthreads=1, maxthreads=size, name=name)
        self._pool = self._new_pool()
        self._stopped = False
        self.lost = False

    def _new_pool(self) -> psycopg_pool.ConnectionPool[Any]:
        return psycopg_pool.ConnectionPool(
            self.dsn,
            min_size=1,
            max_size=self._size,
            open=False,
            timeout=self._timeout,
            kwargs={"connect_timeout": max(1, round(self._timeout))},
            configure=_durable,
            name=self._name,
        )

    def open(self) -> None:
        """Open the pool; synchronous.  Fails with L{StoreUnavailable} when the server cannot be reached."""
        if self._pool.closed:
            _connect(self._pool, self._timeout, self.dsn)

    def start(self) -> None:
        """Open the pool if needed and start the threads."""
        self.open()
        self._stopped = False
        if not self._threads.started:
            self._threads.start()

    def stop(self) -> None:
        """Finish queued work, stop the threads and close the connections."""
        self._stopped = True
        if self._threads.started:
            self._threads.stop()
        self._pool.close()

    def migrate(self, component: str, migrations: Sequence[Migration]) -> int:
        """Bring C{component}'s tables up to date; synchronous, at start-up."""
        return self.run_sync(apply_migrations, component, migrations)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Call C{fn(connection, *args, **kwargs)} on a database thread, in one transaction."""
        if not self._threads.started:
            self.start()
        return deferToThreadPool(self._reactor, self._threads, self._call, fn, *args, **kwargs)

    # One call is one transaction either way; the names say what the caller means.
    transaction = run
    write = run

    def probe(self) -> Deferred[None]:
        """Fires once the server answered a query; fails when it cannot serve.  For the health check."""
        return self.run(_read_bookkeeping)

    def run_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """
        Call C{fn} on the calling thread, in one transaction on a connection
        of its own: only for start-up and tools, never the reactor.  The
        pool and its threads start only with L{start}, after twistd forked.
        """
        try:
            conn = psycopg.connect(self.dsn, connect_timeout=max(1, round(self._timeout)))
        except psycopg.OperationalError as e:
            raise StoreUnavailable(f"cannot connect to PostgreSQL at {redact_dsn(self.dsn)}: {_reason(e)}") from None
        with conn:
            _durable(conn)
            return fn(conn, *args, **kwargs)

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        # During an outage calls fail at once (new mail gets its 451
        # without waiting) while the reactor reconnects.
        if self.lost:
            raise StoreUnavailable(f"PostgreSQL at {redact_dsn(self.dsn)} is unavailable; reconnecting")
        try:
            # The pool commits when fn returns and rolls back when it raises.
            with self._pool.connection() as conn:
                return fn(conn, *args, **kwargs)
        except (psycopg_pool.PoolTimeout, psycopg.OperationalError) as e:
            if isinstance(e, psycopg_pool.PoolTimeout) or _broken(e):
                self._went_down(e)
                raise StoreUnavailable(f"PostgreSQL is unavailable: {_reason(e)}") from e
            raise

    def _went_down(self, error: BaseException) -> None:
        """Database thread: the first broken call of an outage starts the reconnection."""
        if not self.lost:
            self.lost = True
            self._reactor.callFromThread(self._handle_lost, _reason(error))

    def _handle_lost(self, error: str) -> None:
        log.error(
            "PostgreSQL at {dsn} is unavailable ({error}): new mail is refused with 451 until it is back; "
            "reconnecting every {seconds} s",
            dsn=redact_dsn(self.dsn),
            error=error,
            seconds=self._retry,
        )
        self._reconnect()

    def _reconnect(self) -> None:
        if self._stopped:
            return

        def connected(_: object) -> None:
            self.lost = False
            log.warn("PostgreSQL at {dsn} is reachable again", dsn=redact_dsn(self.dsn))

        def failed(_: object) -> None:
            self._reactor.callLater(self._retry, self._reconnect)

        deferToThreadPool(self._reactor, self._threads, self._swap).addCallbacks(connected, failed)

    def _swap(self) -> None:
        """Database thread: connect a new pool, then close the old one with its broken connections."""
        pool = self._new_pool()
        _connect(pool, self._timeout, self.dsn)
        old, self._pool = self._pool, pool
        old.close(timeout=0)


def _connect(pool: psycopg_pool.ConnectionPool[Any], timeout: float, dsn: str) -> None:
    pool.open()
    try:
        pool.wait(timeout)
    except psycopg_pool.PoolTimeout:
        pool.close(timeout=0)
        raise StoreUnavailable(f"cannot connect to PostgreSQL at {redact_dsn(dsn)}") from None


def _durable(conn: psycopg.Connection[Any]) -> None:
    """Make the connection's commits wait for the disk (the 250 depends on it); leaves it idle."""
    conn.execute("SET synchronous_commit = on")
    conn.commit()


def _reason(error: BaseException) -> str:
    """The first line of libpq's message: the rest repeats hints (and never the password)."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _broken(error: psycopg.OperationalError) -> bool:
    """Whether C{error} means the connection or the server is gone, rather than a bad statement."""
    return isinstance(error, psycopg.errors.AdminShutdown | psycopg.errors.CannotConnectNow) or error.sqlstate in (
        None,
        "08000",
        "08003",
        "08006",
        "08001",
        "08004",
        "57P01",
        "57P02",
        "57P03",
    )


def _read_bookkeeping(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()

