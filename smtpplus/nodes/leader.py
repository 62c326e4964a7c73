"""
Singleton duties of the nodes sharing one PostgreSQL database: the work
that must run once for the whole relay, not once per node, runs on the one
node holding a session-level advisory lock (C{pg_try_advisory_lock}) on a
connection of its own, outside the database's pool.

Every node tries for the lock every C{interval} seconds (the heartbeat's
interval).  The holder checks at the same pace that its connection still
answers; PostgreSQL releases the lock when that connection ends (the node
exits or dies: its socket closes; the machine vanishes: the server's TCP
keepalives, set on the connection to L{keepalive} seconds, end it), and the
next node to try becomes the leader.  So the duties move to a live node
within about a lease.  A holder whose connection fails stops its duties at
once, before another node can have taken the lock.

What is a duty (classified in README "Running several nodes"): the
notification mails (L{smtpplus.notify.shared}: summaries per coalescing
window and the hourly/daily digests, built from the shared events table)
and the sweep of the shared throttle tables.  Left on every node: webhook
POSTs of the events each node records, the statistics flush (each node
adds its own counters), the queue's dedup pruning (idempotent), the
heartbeat and the takeover scan (one new owner each by row locks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import psycopg
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from smtpplus.storage.database import StorageUnavailable
from smtpplus.storage.postgres import redact_dsn

log = Logger()

# The advisory lock's key: "dut" in ASCII; the migrations use another.
LEADER_KEY = 0x647574
CONNECT_TIMEOUT = 5


class Lock(Protocol):
    """A lock tried from a thread: L{AdvisoryLock}, or a fake in tests."""

    def try_hold(self) -> bool: ...

    def release(self) -> None: ...


class Threads(Protocol):
    """Where the lock's blocking calls run: a L{LockThread}, or the calling thread in tests."""

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]: ...

    def stop(self) -> None: ...


class Duty(Protocol):
    """Work run only while this node leads: started on winning, stopped on losing or at shutdown."""

    def start(self) -> None: ...

    def stop(self) -> Deferred[Any] | None: ...


def keepalive_options(seconds: float) -> dict[str, int]:
    """libpq keepalive options that notice a dead peer within about C{seconds}."""
    idle = max(1, int(seconds / 3))
    return {"keepalives": 1, "keepalives_idle": idle, "keepalives_interval": idle, "keepalives_count": 2}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class AdvisoryLock:
    """
    A PostgreSQL session-level advisory lock on a connection of its own.
    Every method blocks: call them from a thread, one at a time.

    @ivar held: whether this connection holds the lock.
    """

    def __init__(self, dsn: str, key: int = LEADER_KEY, keepalive: float = 15.0) -> None:
        self._dsn = dsn
        self._key = key
        self._keepalive = keepalive
        self._conn: psycopg.Connection[Any] | None = None
        self.held = False

    def try_hold(self) -> bool:
        """Take the lock if free; confirm it when held.  Any database error drops the connection (and the lock)."""
        try:
            if self._conn is None or self._conn.closed:
                self.held = False
                self._conn = self._connect()
            if self.held:
                self._conn.execute("SELECT 1")
            else:
                row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,)).fetchone()
                self.held = bool(row and row[0])
        except psycopg.Error as e:
            if self.held:
                log.warn("the connection holding the leader lock failed ({error})", error=_first_line(e))
            self.release()
        return self.held

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(
            self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT, **keepalive_options(self._keepalive)
        )
        idle = keepalive_options(self._keepalive)["keepalives_idle"]
        # The server's side: a vanished node's session (and lock) ends too.
        for setting in ("tcp_keepalives_idle", "tcp_keepalives_interval"):
            conn.execute(f"SET {setting} = {idle}")
        conn.execute("SET tcp_keepalives_count = 2")
        return conn

    def release(self) -> None:
        """Close the connection: PostgreSQL releases the lock with it."""
        conn, self._conn, self.held = self._conn, None, False
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                log.debug("closing the leader lock's connection of {dsn} failed", dsn=redact_dsn(self._dsn))


class Leadership(Service):
    """
    Tries for C{lock} every C{interval} seconds of C{clock} on C{threads};
    runs C{duties} while it holds it.

    @ivar leading: whether this node leads now.
    @ivar on_change: callables called with the new value of C{leading}.
    """

    name = "leadership"

    def __init__(
        self,
        lock: Lock,
        clock: IReactorTime,
        interval: float,
        threads: Threads,
        node: str = "",
    ) -> None:
        self._lock = lock
        self._clock = clock
        self._interval = interval
        self._threads = threads
        self._node = node
        self.duties: list[Duty] = []
        self.leading = False
        self._trying: Deferred[None] = succeed(None)
        self._loop = LoopingCall(self._try)
        self._loop.clock = clock

    def startService(self) -> None:
        Service.startService(self)
        self._loop.start(self._interval, now=True)

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        if self._loop.running:
            self._loop.stop()
        # The duties finish (a leader's collected mails go out) before the lock goes.
        d = self._trying.addCallback(lambda _: self._abdicate())
        d.addCallback(lambda _: self._threads.run(self._lock.release))
        return d.addBoth(lambda _: self._threads.stop())

    def _try(self) -> Deferred[None]:
        d = self._threads.run(self._lock.try_hold)
        d.addErrback(self._not_tried)
        self._trying = d.addCallback(self._tried)
        return self._trying

    def _not_tried(self, failure: Failure) -> bool:
        # Never fails: a failed LoopingCall would stop trying for good.
        log.failure("trying for the leader lock failed", failure)
        return False

    def _tried(self, holding: bool) -> Deferred[Any] | None:
        if not self.running:
            return None
        if holding and not self.leading:
            self.leading = True
            log.info("node {node} leads: it runs the singleton duties", node=self._node)
            for duty in self.duties:
                duty.start()
            return None
        if not holding and self.leading:
            log.warn("node {node} no longer leads: its singleton duties stop", node=self._node)
            return self._abdicate()
        return None

    def _abdicate(self) -> Deferred[Any]:
        if not self.leading:
            return succeed(None)
        self.leading = False
        stops = [maybeDeferred(duty.stop) for duty in self.duties]
        return DeferredList(stops, consumeErrors=True)


class LockThread:
    """One thread of its own for the lock's connection, started and stopped with the service tree."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._threads = ThreadPool(minthreads=1, maxthreads=1, name="smtpplus-leader")

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Call C{fn(*args)} on the thread."""
        if not self._threads.started:
            self._threads.start()
        return deferToThreadPool(self._reactor, self._threads, fn, *args)

    def stop(self) -> None:
        """Finish the queued call and stop the thread."""
        if self._threads.started:
            self._threads.stop()


class PeriodicDuty:
    """A duty that calls C{fn} every C{interval} seconds of C{clock} while this node leads; failures are logged."""

    def __init__(self, name: str, clock: IReactorTime, interval: float, fn: Callable[[], Any]) -> None:
        self._name = name
        self._fn = fn
        self._interval = interval
        self._loop = LoopingCall(self._call)
        self._loop.clock = clock

    def _call(self) -> Deferred[Any]:
        return maybeDeferred(self._fn).addErrback(self._failed)

    def _failed(self, failure: Failure) -> None:
        # An outage is logged once by the database; the next call tries again.
        if not failure.check(StorageUnavailable):
            log.failure("{duty} failed", failure, duty=self._name)

    def start(self) -> None:
        self._loop.start(self._interval, now=True)

    def stop(self) -> Deferred[Any] | None:
        if self._loop.running:
            self._loop.stop()
        return None
