"""
This node's heartbeat: with C{[storage] backend = "postgresql"}, its row in
C{nodes} (name, SMTP processes, start, last seen) is written at start and
then every L{beat_interval} seconds, so that the other nodes can tell a
live node from a dead one (whose messages they take over after
C{lease_seconds}) and C{GET /api/v1/nodes} can list them.

A beat that fails (PostgreSQL down) is tried again at the next interval:
beating resumes by itself once the database is back.  The database logs
an outage once; a beat failing for another reason is logged once until a
beat succeeds again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from smtpplus.storage.database import StorageUnavailable

log = Logger()

_UPSERT = (
    "INSERT INTO nodes (name, workers, started_at, last_seen) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (name) DO UPDATE SET workers = excluded.workers, started_at = excluded.started_at, "
    "last_seen = excluded.last_seen"
)


def beat_interval(lease_seconds: float) -> float:
    """Seconds between beats: three beats per lease, so that one lost beat does not make the node look dead."""
    return max(1.0, lease_seconds / 3)


def write_beat(conn: Any, name: str, workers: int, started_at: float, last_seen: float) -> None:
    """Database thread: insert or refresh this node's row."""
    conn.execute(_UPSERT, (name, workers, started_at, last_seen))


def forget_node(conn: Any, name: str) -> None:
    """Database thread: remove this node's row (a clean stop)."""
    conn.execute("DELETE FROM nodes WHERE name = %s", (name,))


class NodeNameInUse(Exception):
    """Another node with this node's name is running: two nodes of one name would deliver each other's mail."""


def check_node_name(database: Any, node: str, lease_seconds: float, now: float) -> None:
    """
    At start (synchronous): fail with L{NodeNameInUse} when a node of this
    name wrote its heartbeat within the lease.  Both would take the same
    messages for their own; a node restarting after a crash starts once its
    old lease has run out (the service manager tries again).
    """
    row = database.run_sync(lambda conn: conn.execute("SELECT last_seen FROM nodes WHERE name = %s", (node,)).fetchone())
    if row is not None and now - row[0] < lease_seconds:
        raise NodeNameInUse(
            f"a node named {node} wrote its heartbeat {max(0.0, now - row[0]):.1f} s ago (lease_seconds = "
            f"{lease_seconds:g}): give each node its own [server] node_name; after a crash this node starts "
            "once that lease has run out"
        )


class Heartbeat(Service):
    """
    Writes this node's row in C{nodes} at start and every C{interval}
    seconds of C{clock}, through C{database.write} (off the reactor).

    @ivar last_beat: C{clock}'s seconds at the last beat written, or None.
    @ivar steady_since: C{clock}'s seconds at the first of the beats written
        since the last that failed (or since the start), or None while
        beats fail.
    @ivar on_beat: callables each called with C{clock}'s seconds after
        every beat written (the takeover of dead nodes' messages hangs
        here); what they raise, or their Deferred fails with, is logged.
    """

    name = "heartbeat"

    def __init__(
        self,
        database: Any,
        clock: IReactorTime,
        node: str,
        workers: int,
        started_at: float,
        interval: float,
    ) -> None:
        self._database = database
        self._clock = clock
        self.node = node
        self.workers = workers
        self.started_at = started_at
        self.interval = interval
        self.last_beat: float | None = None
        self.steady_since: float | None = None
        self.on_beat: list[Callable[[float], object]] = []
        self._failing = False
        # Whether this run of failures was logged here (not an outage the database logged).
        self._logged = False
        self._beating: Deferred[None] = succeed(None)
        self._loop = LoopingCall(self._beat)
        self._loop.clock = clock

    def startService(self) -> None:
        Service.startService(self)
        self._loop.start(self.interval, now=True)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if self._loop.running:
            self._loop.stop()
        # The beat in flight finishes before the database closes; then the
        # node leaves the nodes table: a clean stop hands its unfinished
        # messages to the other nodes at once (no lease to wait out), and
        # the node may start again under its name right away.
        done: Deferred[None] = Deferred()

        def left(_: object) -> None:
            log.info("node {node} left: the other nodes take over its unfinished messages", node=self.node)

        def not_left(failure: Failure) -> None:
            log.warn(
                "node {node} could not leave the nodes table ({error}): its messages wait for its lease to run out",
                node=self.node,
                error=failure.value,
            )

        def leave(result: object) -> object:
            d = self._database.write(forget_node, self.node)
            d.addCallbacks(left, not_left).addBoth(lambda _: done.callback(None))
            return result

        self._beating.addBoth(leave)
        return done

    def _beat(self) -> Deferred[None]:
        # Never fails: a failed LoopingCall would stop beating for good.
        now = self._clock.seconds()
        d = self._database.write(write_beat, self.node, self.workers, self.started_at, now)
        self._beating = d.addCallbacks(lambda _: self._beaten(now), self._failed)
        return self._beating

    def _beaten(self, now: float) -> None:
        self.last_beat = now
        if self.steady_since is None:
            self.steady_since = now
        if self._logged:
            log.info("the heartbeat of node {node} is written again", node=self.node)
        self._failing = self._logged = False
        for hook in list(self.on_beat):
            maybeDeferred(hook, now).addErrback(
                lambda f, hook=hook: log.failure("after the heartbeat, {hook} failed", f, hook=hook)
            )

    def _failed(self, failure: Failure) -> None:
        self.steady_since = None
        if self._failing:
            return
        self._failing = True
        # An outage is logged by the database, once; anything else here.
        if not failure.check(StorageUnavailable):
            self._logged = True
            log.failure("the heartbeat of node {node} failed; trying again every {interval} s", failure,
                        node=self.node, interval=self.interval)


def take_over_when_steady(heartbeat: Heartbeat, lease_seconds: float, take_over: Callable[[float], object]) -> None:
    """
    After each beat, C{take_over(silent_since)} the messages of nodes
    silent for C{lease_seconds} -- but only once this node's own beats have
    been written for a whole lease.  After a database outage every node's
    heartbeat is old; each gets a lease to beat again before any takes
    over another's messages, which would then be delivered twice.
    """

    def beaten(now: float) -> object:
        if heartbeat.steady_since is None or now - heartbeat.steady_since < lease_seconds:
            return None
        return take_over(now - lease_seconds)

    heartbeat.on_beat.append(beaten)
