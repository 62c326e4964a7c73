"""
The nodes of one store: this node's heartbeat (L{smtpplus.nodes.heartbeat})
on a fake database driven by a L{Clock} and on the tests' PostgreSQL
server, and what C{GET /api/v1/nodes} lists (L{smtpplus.nodes.listing}) on
SQLite and on PostgreSQL.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from smtpplus.delivery import queue
from smtpplus.delivery.postgres import PostgresQueueStore
from smtpplus.delivery.queue import FinishAttempt, MarkSending, NewMessage, RecipientUpdate, SQLiteQueueStore
from smtpplus.interfaces import INodeList
from smtpplus.nodes.heartbeat import Heartbeat, beat_interval, take_over_when_steady, write_beat
from smtpplus.nodes.listing import PostgresNodes, SingleNode
from smtpplus.storage.database import Database, StorageUnavailable
from tests.harness.postgres import make_postgres_database

# 2024-05-01T12:00:00Z
NOON = 1714564800.0


class FakeDatabase:
    """
    C{write} runs the function on a recording connection at once; C{error}
    makes every call fail with it, and C{hold} leaves calls unanswered.
    """

    def __init__(self) -> None:
        self.statements: list[tuple[str, tuple[Any, ...]]] = []
        self.error: Exception | None = None
        self.hold = False
        self.held: list[Deferred[None]] = []

    def execute(self, sql: str, params: tuple[Any, ...]) -> None:
        self.statements.append((sql, params))

    def write(self, fn: Any, *args: Any) -> Deferred[Any]:
        if self.error is not None:
            return fail(self.error)
        if self.hold:
            d: Deferred[None] = Deferred()
            self.held.append(d)
            return d.addCallback(lambda _: fn(self, *args))
        return succeed(fn(self, *args))

    @property
    def beats(self) -> list[tuple[Any, ...]]:
        """The parameters of every upsert of C{nodes}: (name, workers, started_at, last_seen)."""
        return [params for sql, params in self.statements if "INSERT INTO nodes" in sql]


class HeartbeatTests(TestCase):
    """The heartbeat service on a fake database and a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOON)
        self.database = FakeDatabase()
        self.heartbeat = Heartbeat(self.database, self.clock, "node-a", 3, NOON - 60, 10.0)

    def stop(self) -> None:
        if self.heartbeat.running:
            self.heartbeat.stopService()

    def test_interval(self) -> None:
        """Three beats per lease, but never more often than once a second."""
        self.assertEqual(beat_interval(30), 10.0)
        self.assertEqual(beat_interval(5), 5 / 3)
        self.assertEqual(beat_interval(2), 1.0)

    def test_beats_at_start_and_every_interval(self) -> None:
        """The row is written at start, then every interval, with the clock's time as last_seen."""
        self.heartbeat.startService()
        self.addCleanup(self.stop)
        self.assertEqual(self.database.beats, [("node-a", 3, NOON - 60, NOON)])
        self.assertEqual(self.heartbeat.last_beat, NOON)
        self.clock.advance(9.9)
        self.assertEqual(len(self.database.beats), 1)
        self.clock.advance(0.1)
        self.clock.advance(10)
        self.assertEqual(self.database.beats[1:], [("node-a", 3, NOON - 60, NOON + 10), ("node-a", 3, NOON - 60, NOON + 20)])
        self.assertEqual(self.heartbeat.last_beat, NOON + 20)

    def test_outage_is_not_logged_again_and_beating_resumes(self) -> None:
        """
        While the store is unavailable beats fail quietly (the database logs
        the outage) and last_beat stays; the next beat after it is written.
        """
        self.heartbeat.startService()
        self.addCleanup(self.stop)
        self.database.error = StorageUnavailable("PostgreSQL is unavailable")
        with capturedLogs() as events:
            self.clock.advance(10)
            self.clock.advance(10)
            self.assertEqual(self.heartbeat.last_beat, NOON)
            self.database.error = None
            self.clock.advance(10)
        self.assertEqual(self.heartbeat.last_beat, NOON + 30)
        self.assertEqual([beat[3] for beat in self.database.beats], [NOON, NOON + 30])
        self.assertEqual([e for e in events if e["log_namespace"] == "smtpplus.nodes.heartbeat"], [])

    def test_other_failure_is_logged_once(self) -> None:
        """A beat failing for another reason is logged once for the whole run of failures."""
        self.heartbeat.startService()
        self.addCleanup(self.stop)
        self.database.error = RuntimeError("no such table: nodes")
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.database.error = None
        with capturedLogs() as events:
            self.clock.advance(10)
        self.assertEqual([e["log_format"] for e in events], ["the heartbeat of node {node} is written again"])
        self.database.error = RuntimeError("again")
        self.clock.advance(10)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_hooks_after_each_beat(self) -> None:
        """Each hook gets the beat's time after a beat written, none after a failed one; one failing is logged."""
        seen: list[float] = []

        def broken(now: float) -> None:
            raise ValueError("scan failed")

        self.heartbeat.on_beat.extend([broken, seen.append])
        self.heartbeat.startService()
        self.addCleanup(self.stop)
        self.database.error = StorageUnavailable("down")
        self.clock.advance(10)
        self.database.error = None
        self.clock.advance(10)
        self.assertEqual(seen, [NOON, NOON + 20])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)

    def test_stop_waits_for_the_beat_in_flight(self) -> None:
        """
        Stopping waits for the beat being written (the database closes
        after it), then removes the node's row (a clean stop: the others
        take its messages at once), then beats no more.
        """
        self.database.hold = True
        self.heartbeat.startService()
        stopped = self.heartbeat.stopService()
        self.assertNoResult(stopped)
        self.database.held[0].callback(None)
        self.assertNoResult(stopped)
        self.assertEqual(len(self.database.held), 2)
        self.database.held[1].callback(None)
        self.successResultOf(stopped)
        self.assertEqual(self.database.statements[-1], ("DELETE FROM nodes WHERE name = %s", ("node-a",)))
        self.clock.advance(100)
        self.assertEqual(len(self.database.beats), 1)

    def test_stop_when_the_row_cannot_be_removed(self) -> None:
        """A store that cannot remove the row does not keep the stop from finishing; it is logged."""
        self.heartbeat.startService()
        self.database.error = StorageUnavailable("PostgreSQL is unavailable")
        with capturedLogs() as events:
            self.successResultOf(self.heartbeat.stopService())
        self.assertIn("could not leave the nodes table", " ".join(e["log_format"] for e in events))


class TakeOverWhenSteadyTests(TestCase):
    """The takeover scan runs only once this node's own beats have been written for a whole lease."""

    def test_waits_a_lease_after_start_and_after_an_outage(self) -> None:
        """
        No takeover in the first lease after the start, nor in the first
        lease after an outage (every node's heartbeat is old then); after
        that, every beat scans with silent_since = now - lease.
        """
        clock = Clock()
        clock.advance(NOON)
        database = FakeDatabase()
        heartbeat = Heartbeat(database, clock, "node-a", 1, NOON, 10.0)
        scans: list[float] = []
        take_over_when_steady(heartbeat, 30.0, scans.append)
        heartbeat.startService()
        self.addCleanup(heartbeat.stopService)
        for _ in range(3):
            clock.advance(10)
        self.assertEqual(scans, [NOON])
        database.error = StorageUnavailable("PostgreSQL is unavailable")
        clock.advance(10)
        database.error = None
        for _ in range(3):
            clock.advance(10)
        self.assertEqual(scans, [NOON])
        clock.advance(10)
        self.assertEqual(scans, [NOON, NOON + 50])


class PostgresHeartbeatTests(TestCase):
    """The heartbeat's row in the real PostgreSQL C{nodes} table."""

    @inlineCallbacks
    def test_upserts_the_row(self) -> Any:
        """The first beat inserts the node's row, the next ones update it in place."""
        database = make_postgres_database(self)
        PostgresQueueStore(database).migrate()
        clock = Clock()
        clock.advance(NOON)
        heartbeat = Heartbeat(database, clock, "node-a", 2, NOON, 10.0)
        beats: list[Deferred[float]] = [Deferred(), Deferred()]
        # Fired on the next turn of the reactor: the hook runs before the
        # loop schedules the next beat, which the clock must then reach.
        heartbeat.on_beat.append(lambda now: reactor.callLater(0, beats.pop(0).callback, now) if beats else None)
        first, second = beats
        heartbeat.startService()
        self.addCleanup(heartbeat.stopService)
        self.assertEqual((yield first), NOON)
        clock.advance(10)
        self.assertEqual((yield second), NOON + 10)
        rows = yield database.run(lambda conn: conn.execute("SELECT * FROM nodes").fetchall())
        self.assertEqual(rows, [("node-a", 2, NOON, NOON + 10)])


def _message(message_id: str, **changes: Any) -> NewMessage:
    fields: dict[str, Any] = {
        "id": message_id,
        "user": "u",
        "mail_from": "a@b.c",
        "header_from": "a@b.c",
        "subject": "s",
        "priority": 3,
        "recipients": ("x@y.z",),
        "campaign_name": None,
        "campaign_code": None,
        "schedule_at": None,
        "size": 9,
        "internal": False,
        "created_at": NOON,
    }
    fields.update(changes)
    return NewMessage(**fields)


@inlineCallbacks
def fill_queue(store: Any) -> Any:
    """
    One message in each status: Q queued, S scheduled, D deferred, X
    sending, F sent (final).  Queued counts 3, sending 1.
    """
    messages = [_message("Q"), _message("S", schedule_at=NOON + 3600), _message("D"), _message("X"), _message("F")]
    yield store.insert(messages)
    rows = {m.id: queue.as_row(m) for m in messages}
    yield store.write_state(
        [
            FinishAttempt(rows["D"], "deferred", NOON + 600, [RecipientUpdate(0, "deferred", 1, "451 later", NOON + 600)],
                          False, NOON),
            FinishAttempt(rows["F"], "sent", None, [RecipientUpdate(0, "sent", 1, "250 ok", None)], False, NOON),
            MarkSending("X", NOON),
        ]
    )


class SingleNodeTests(TestCase):
    """An SQLite store has one node: this one."""

    @inlineCallbacks
    def test_lists_this_node_with_its_queue(self) -> Any:
        """One entry: the name, SMTP processes, start, now as last_seen, waiting and sending messages."""
        database = Database(reactor, os.path.abspath(self.mktemp()))
        self.addCleanup(database.stop)
        store = SQLiteQueueStore(database)
        store.migrate()
        yield fill_queue(store)
        clock = Clock()
        clock.advance(NOON + 90)
        listing = SingleNode(clock, "relay-1", 4, NOON, store.count_active)
        self.assertTrue(verifyObject(INodeList, listing))
        nodes = yield listing.nodes()
        self.assertEqual(
            nodes,
            [
                {
                    "name": "relay-1",
                    "workers": 4,
                    "started_at": "2024-05-01T12:00:00Z",
                    "last_seen": "2024-05-01T12:01:30Z",
                    "queued": 3,
                    "sending": 1,
                }
            ],
        )


class PostgresNodesTests(TestCase):
    """With PostgreSQL, every node's heartbeat row, with the messages it claims."""

    @inlineCallbacks
    def test_lists_every_node_with_its_claims(self) -> Any:
        """Nodes by name; queued and sending counted per claimed_by; final and unclaimed messages not counted."""
        database = make_postgres_database(self)
        store = PostgresQueueStore(database)
        store.migrate()
        yield fill_queue(store)
        yield store.insert([_message("Q2"), _message("Q3"), _message("U")])

        def claim(conn: Any) -> None:
            for node, ids in (("node-b", ["Q", "S", "D", "X", "F"]), ("node-a", ["Q2"]), ("gone", ["Q3"])):
                conn.execute("UPDATE queue_messages SET claimed_by = %s WHERE id = ANY(%s)", (node, ids))
            write_beat(conn, "node-b", 2, NOON, NOON + 5)
            write_beat(conn, "node-a", 1, NOON - 100, NOON + 7)
            write_beat(conn, "node-c", 8, NOON, NOON + 3)

        yield database.write(claim)
        listing = PostgresNodes(database)
        self.assertTrue(verifyObject(INodeList, listing))
        nodes = yield listing.nodes()
        self.assertEqual(
            nodes,
            [
                {"name": "node-a", "workers": 1, "started_at": "2024-05-01T11:58:20Z",
                 "last_seen": "2024-05-01T12:00:07Z", "queued": 1, "sending": 0},
                {"name": "node-b", "workers": 2, "started_at": "2024-05-01T12:00:00Z",
                 "last_seen": "2024-05-01T12:00:05Z", "queued": 3, "sending": 1},
                {"name": "node-c", "workers": 8, "started_at": "2024-05-01T12:00:00Z",
                 "last_seen": "2024-05-01T12:00:03Z", "queued": 0, "sending": 0},
            ],
        )

    @inlineCallbacks
    def test_no_nodes(self) -> Any:
        """Before any heartbeat the list is empty."""
        database = make_postgres_database(self)
        PostgresQueueStore(database).migrate()
        self.assertEqual((yield PostgresNodes(database).nodes()), [])
