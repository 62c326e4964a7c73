"""
The login throttle shared by every node on one PostgreSQL database
(C{[storage] backend = "postgresql"}): the same rules as
L{smtpplus.auth.throttle.LoginThrottle} (failures per IP and per username
over ten minutes, locks for C{auth_lock_seconds}, the username lock sparing
the addresses the user logged in from within 24 hours), with the counts,
locks and known addresses in two tables so that failures on any node count
towards one limit and a lock holds on every node.

Each question is one call on the database's thread pool: L{refused} one
SELECT, L{failed} one transaction (the upsert locks the key's row, so two
nodes counting the same key at once count both failures and lock it once,
recording one C{account_block} event), L{succeeded} one transaction.  The
delay is computed here from the counts the database returns.

A known user logging in again and again from the same address costs one
round trip: when L{refused} saw no failures to forgive and the address
confirmed within L{KNOWN_REFRESH} seconds, L{succeeded} writes nothing.  The
24 hours of a known address thus run from a success at most that long
before the last one.

Times are the node's clock: the nodes' clocks are assumed to agree (NTP)
to well within the ten-minute window.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import psycopg
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from smtpplus.auth.throttle import (
    FIRST_DELAY,
    KNOWN_SECONDS,
    MAX_DELAY,
    MAX_KNOWN_PER_USER,
    WINDOW_SECONDS,
    report_locks,
)
from smtpplus.config import SecurityConfig
from smtpplus.storage.database import StorageUnavailable
from smtpplus.storage.migrations import Migration
from smtpplus.storage.postgres import PostgresDatabase

log = Logger()

Conn = psycopg.Connection[Any]

MIGRATIONS = [
    Migration(
        sqlite=None,
        postgresql="""
    CREATE TABLE auth_throttle (
        kind text NOT NULL,
        key text NOT NULL,
        failures double precision[] NOT NULL DEFAULT '{}',
        locked_until double precision,
        expires double precision NOT NULL,
        PRIMARY KEY (kind, key)
    );
    CREATE INDEX auth_throttle_expires ON auth_throttle (expires);
    CREATE TABLE auth_known (
        username text NOT NULL,
        ip text NOT NULL,
        last_success double precision NOT NULL,
        PRIMARY KEY (username, ip)
    );
    CREATE INDEX auth_known_last_success ON auth_known (last_success);
    """,
    ),
]

# A success confirmed this recently is not written again (see the module docstring).
KNOWN_REFRESH = 300.0
# (username, ip) pairs remembered between refused() and succeeded().
_MAX_FRESH = 10000

_STATE = """
SELECT
    (SELECT locked_until FROM auth_throttle WHERE kind = 'ip' AND key = %(ip)s),
    (SELECT locked_until FROM auth_throttle WHERE kind = 'user' AND key = %(user)s),
    (SELECT failures FROM auth_throttle WHERE kind = 'ip' AND key = %(ip)s),
    (SELECT failures FROM auth_throttle WHERE kind = 'user' AND key = %(user)s),
    (SELECT last_success FROM auth_known WHERE username = %(user)s AND ip = %(ip)s)
"""

# Append one failure, keeping the newest `limit` of the window, ascending.
_FAIL = """
INSERT INTO auth_throttle AS t (kind, key, failures, expires)
VALUES (%(kind)s, %(key)s, ARRAY[%(now)s::double precision], %(now)s + %(window)s)
ON CONFLICT (kind, key) DO UPDATE SET
    failures = (
        SELECT COALESCE(array_agg(f ORDER BY f), '{}') FROM (
            SELECT f FROM unnest(t.failures || %(now)s::double precision) AS f
            WHERE f > %(now)s - %(window)s ORDER BY f DESC LIMIT %(limit)s
        ) AS recent
    ),
    expires = GREATEST(t.expires, %(now)s + %(window)s)
RETURNING cardinality(failures), locked_until
"""

# The lock replaces the count: after it, the key starts afresh.
_LOCK = """
UPDATE auth_throttle SET locked_until = %(until)s, failures = '{}', expires = GREATEST(expires, %(until)s)
WHERE kind = %(kind)s AND key = %(key)s
"""


def _recent(failures: list[float] | None, now: float, limit: int) -> int:
    if not failures:
        return 0
    return min(limit, sum(1 for f in failures if f > now - WINDOW_SECONDS))


def _locked(until: float | None, now: float) -> bool:
    return until is not None and until > now


class _State:
    """What the database knows of one (username, IP) pair, at C{now}."""

    def __init__(self, row: tuple[Any, ...], now: float) -> None:
        ip_until, user_until, ip_failures, user_failures, last_success = row
        self.now = now
        self.ip_locked = _locked(ip_until, now)
        self.user_locked = _locked(user_until, now)
        self.ip_failures = ip_failures
        self.user_failures = user_failures
        self.last_success = last_success
        self.trusted = last_success is not None and last_success > now - KNOWN_SECONDS

    def refused(self) -> bool:
        return self.ip_locked or (self.user_locked and not self.trusted)

    def count(self, ip_limit: int, user_limit: int) -> int:
        """The recent failures that set the delay: the IP's, and the username's unless the address is known."""
        count = _recent(self.ip_failures, self.now, ip_limit)
        if not self.trusted:
            count = max(count, _recent(self.user_failures, self.now, user_limit))
        return count

    def fresh(self) -> bool:
        """Whether a success now would change nothing worth a write."""
        recent = self.last_success is not None and self.last_success > self.now - KNOWN_REFRESH
        return recent and not self.user_failures


def _read_state(conn: Conn, user: str, ip: str, now: float) -> _State:
    row = conn.execute(_STATE, {"user": user, "ip": ip}).fetchone()
    assert row is not None
    return _State(row, now)


def _fail(conn: Conn, kind: str, key: str, now: float, limit: int, lock_seconds: float) -> bool:
    """Database thread: count one failure of C{key}; True when it locks C{key} now."""
    args = {"kind": kind, "key": key, "now": now, "window": WINDOW_SECONDS, "limit": limit}
    row = conn.execute(_FAIL, args).fetchone()
    assert row is not None
    count, until = row
    if count < limit or _locked(until, now):
        return False
    conn.execute(_LOCK, {"kind": kind, "key": key, "until": now + lock_seconds})
    return True


def _failed(
    conn: Conn, user: str, ip: str, now: float, limits: tuple[int, int], lock_seconds: float
) -> tuple[int, bool, bool]:
    """Database thread: the delay's count (before this failure), and whether the IP and the username lock now."""
    ip_limit, user_limit = limits
    state = _read_state(conn, user, ip, now)
    count = state.count(ip_limit, user_limit)
    ip_locks = _fail(conn, "ip", ip, now, ip_limit, lock_seconds)
    # A failure from a known address counts for the IP only.
    user_locks = False if state.trusted else _fail(conn, "user", user, now, user_limit, lock_seconds)
    return count, ip_locks, user_locks


def _succeeded(conn: Conn, user: str, ip: str, now: float) -> None:
    conn.execute(
        "UPDATE auth_throttle SET failures = '{}' WHERE kind = 'user' AND key = %s AND failures <> '{}'", (user,)
    )
    conn.execute(
        "INSERT INTO auth_known (username, ip, last_success) VALUES (%s, %s, %s) "
        "ON CONFLICT (username, ip) DO UPDATE SET last_success = excluded.last_success",
        (user, ip, now),
    )
    # One account that logs in from everywhere keeps its newest addresses only.
    conn.execute(
        "DELETE FROM auth_known WHERE username = %s AND ip IN "
        "(SELECT ip FROM auth_known WHERE username = %s ORDER BY last_success DESC OFFSET %s)",
        (user, user, MAX_KNOWN_PER_USER),
    )


def _sweep(conn: Conn, now: float) -> int:
    swept = conn.execute("DELETE FROM auth_throttle WHERE expires <= %s", (now,)).rowcount
    swept += conn.execute("DELETE FROM auth_known WHERE last_success <= %s", (now - KNOWN_SECONDS,)).rowcount
    return swept


class PostgresThrottle:
    """
    The L{smtpplus.auth.login.Throttle} of a node sharing PostgreSQL: every
    answer is a Deferred from the database (migration component
    C{"throttle"}).

    @param events: an C{IEventRecorder} (or None) that receives an
        C{account_block} event when a known username is locked.
    """

    def __init__(
        self,
        db: PostgresDatabase,
        clock: IReactorTime,
        security: SecurityConfig,
        events: Any = None,
        first_delay: float = FIRST_DELAY,
        max_delay: float = MAX_DELAY,
    ) -> None:
        self._db = db
        self._clock = clock
        self._events = events
        self._first_delay = first_delay
        self._max_delay = max_delay
        self.reconfigure(security)
        self._fresh: OrderedDict[tuple[str, str], None] = OrderedDict()
        db.migrate("throttle", MIGRATIONS)

    def reconfigure(self, security: SecurityConfig) -> None:
        """Apply a reloaded C{[security]} to the next failures; locks in force run out."""
        self._limits = (security.auth_failures_per_ip, security.auth_failures_per_user)
        self._lock_seconds = security.auth_lock_seconds

    def refused(self, username: str, ip: str) -> Deferred[bool]:
        """Whether an attempt for C{username} from C{ip} must be refused now."""
        folded = username.casefold()
        d = self._db.run(_read_state, folded, ip, self._clock.seconds())

        def answer(state: _State) -> bool:
            if not state.fresh():
                self._fresh.pop((folded, ip), None)
            else:
                self._fresh[folded, ip] = None
                if len(self._fresh) > _MAX_FRESH:
                    self._fresh.popitem(last=False)
            return state.refused()

        return d.addCallback(answer)

    def failed(self, username: str, ip: str, known_user: bool) -> Deferred[float]:
        """
        Count one failed attempt; fire with how long to wait before
        answering it (as L{LoginThrottle.failed}).
        """
        folded = username.casefold()
        self._fresh.pop((folded, ip), None)
        d = self._db.transaction(_failed, folded, ip, self._clock.seconds(), self._limits, self._lock_seconds)
        return d.addCallback(self._counted, username, ip, known_user)

    def _counted(self, result: tuple[int, bool, bool], username: str, ip: str, known_user: bool) -> float:
        count, ip_locks, user_locks = result
        report_locks(username, ip, known_user, ip_locks, user_locks, self._lock_seconds, self._events)
        return min(self._max_delay, self._first_delay * 2**count)

    def succeeded(self, username: str, ip: str) -> Deferred[None]:
        """Forgive the username's earlier failures and make C{ip} a known address of the user."""
        folded = username.casefold()
        if (folded, ip) in self._fresh:
            del self._fresh[folded, ip]
            return succeed(None)
        d = self._db.transaction(_succeeded, folded, ip, self._clock.seconds())
        return d.addErrback(self._not_recorded, username)

    def _not_recorded(self, failure: Failure, username: str) -> None:
        # Nobody waits for this write; an outage is logged once by the database.
        if not failure.check(StorageUnavailable):
            log.failure("recording the successful login of {username!r} failed", failure, username=username)

    def sweep(self) -> Deferred[int]:
        """Delete the counts, locks and known addresses that no longer matter; fires with how many rows went."""
        return self._db.write(_sweep, self._clock.seconds())
