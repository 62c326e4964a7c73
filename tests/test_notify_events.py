"""Tests for L{smtpplus.notify.events}: storing and listing events, one contract for the SQLite and the in-memory store."""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from smtpplus.interfaces import IEventQuery, IEventRecorder
from smtpplus.model import EventType
from smtpplus.notify.events import EventStore, MemoryEventStore
from smtpplus.notify.postgres import PostgresEventStore
from smtpplus.storage.database import Database
from smtpplus.storage.postgres import PostgresDatabase
from tests.harness.postgres import make_postgres_database


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def dispatch(self, event: dict[str, Any]) -> None:
        self.events.append(event)


class BrokenSink:
    def dispatch(self, event: dict[str, Any]) -> None:
        raise RuntimeError("notifier bug")


class EventStoreContract:
    """Behaviour every event store must have; mixed into a TestCase with C{make_store}."""

    def make_store(self, sink: RecordingSink) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1714564800)  # 2024-05-01T12:00:00Z
        self.sink = RecordingSink()
        self.store = self.make_store(self.sink)

    def test_interfaces(self) -> None:
        """The store provides the recorder and the admin query interfaces."""
        verifyObject(IEventRecorder, self.store)
        verifyObject(IEventQuery, self.store)

    @inlineCallbacks
    def test_record_returns_event(self) -> Any:
        """record() fires with the contract's event object, created_at in UTC with Z."""
        event = yield self.store.record("bounce", "alice", "msg-1", "550 no such user")
        self.assertEqual(
            {k: v for k, v in event.items() if k != "id"},
            {
                "type": "bounce",
                "user": "alice",
                "message_id": "msg-1",
                "detail": "550 no such user",
                "created_at": "2024-05-01T12:00:00Z",
            },
        )
        self.assertRegex(event["id"], r"^evt-[a-z0-9]{12}$")

    @inlineCallbacks
    def test_list_newest_first_with_filters(self) -> Any:
        """list_events returns newest first and filters by type and by user."""
        ids = []
        for type, user in [("bounce", "alice"), ("sender_domain", "bob"), ("bounce", "bob"), ("account_block", None)]:
            event = yield self.store.record(type, user, None, "x")
            ids.append(event["id"])
            self.clock.advance(1)
        everything = yield self.store.list_events(None, None, 100)
        self.assertEqual([e["id"] for e in everything], list(reversed(ids)))
        bounces = yield self.store.list_events("bounce", None, 100)
        self.assertEqual([e["id"] for e in bounces], [ids[2], ids[0]])
        bobs = yield self.store.list_events(None, "bob", 100)
        self.assertEqual([e["id"] for e in bobs], [ids[2], ids[1]])
        both = yield self.store.list_events("bounce", "bob", 100)
        self.assertEqual([e["id"] for e in both], [ids[2]])
        limited = yield self.store.list_events(None, None, 2)
        self.assertEqual([e["id"] for e in limited], [ids[3], ids[2]])
        self.assertIsNone(everything[0]["user"])
        self.assertIsNone(everything[0]["message_id"])

    @inlineCallbacks
    def test_sink_gets_stored_event(self) -> Any:
        """Each stored event is handed to the sink once, equal to what record() returned."""
        event = yield self.store.record("send_problem", None, None, "mx.example.com: connection refused")
        self.assertEqual(self.sink.events, [event])

    @inlineCallbacks
    def test_broken_sink_does_not_fail_record(self) -> Any:
        """A failing notifier never turns into a failure for the recorder's caller."""
        self.store.sink = BrokenSink()
        event = yield self.store.record("bounce", "alice", None, "x")
        self.assertEqual(event["type"], "bounce")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_unknown_type(self) -> None:
        """An event type outside the contract's list is a programming error."""
        self.assertRaises(ValueError, self.store.record, "spam", "alice", None, "x")

    @inlineCallbacks
    def test_enum_type_and_no_limit(self) -> Any:
        """An EventType is recorded as its plain string; a limit of None or 0 lists every event."""
        event = yield self.store.record(EventType.DELIVERY_DELAY, "carol", "m-9", "queued 3600 s")
        self.assertIs(type(event["type"]), str)
        yield self.store.record("bounce", "carol", None, "x")
        self.assertEqual(len((yield self.store.list_events(None, None, None))), 2)
        self.assertEqual(len((yield self.store.list_events(None, None, 0))), 2)
        self.assertEqual((yield self.store.list_events("delivery_delay", None, None)), [event])


    @inlineCallbacks
    def test_ids_unique(self) -> Any:
        """Event ids are unique across many events."""
        ids = set()
        for _ in range(50):
            event = yield self.store.record("bounce", "alice", None, "x")
            ids.add(event["id"])
        self.assertEqual(len(ids), 50)
        self.assertTrue(all(re.match(r"^evt-", i) for i in ids))


class SQLiteEventStoreTests(EventStoreContract, unittest.TestCase):
    def make_store(self, sink: RecordingSink) -> EventStore:
        self.path = self.mktemp()
        self.db = Database(reactor, self.path)
        self.addCleanup(self.db.stop)
        return EventStore(self.db, self.clock, sink)

    @inlineCallbacks
    def test_events_survive_reopen(self) -> Any:
        """Events are in the database file: a new store on the same file lists them."""
        event = yield self.store.record("delivery_delay", "carol", "m-9", "queued 3600 s")
        self.db.stop()
        db = Database(reactor, self.path)
        self.addCleanup(db.stop)
        listed = yield EventStore(db, self.clock).list_events(None, None, 10)
        self.assertEqual(listed, [event])


class MemoryEventStoreTests(EventStoreContract, unittest.TestCase):
    def make_store(self, sink: RecordingSink) -> MemoryEventStore:
        return MemoryEventStore(self.clock, sink)


class PostgresEventStoreTests(EventStoreContract, unittest.TestCase):
    """The contract against the PostgreSQL store on the tests' private server."""

    def make_store(self, sink: RecordingSink) -> PostgresEventStore:
        self.db = make_postgres_database(self)
        return PostgresEventStore(self.db, self.clock, sink)

    @inlineCallbacks
    def test_events_survive_reopen(self) -> Any:
        """Events are in the database: a store on a new pool of the same database lists them."""
        event = yield self.store.record("delivery_delay", "carol", "m-9", "queued 3600 s")
        self.db.stop()
        db = PostgresDatabase(reactor, self.db.dsn)
        self.addCleanup(db.stop)
        listed = yield PostgresEventStore(db, self.clock).list_events(None, None, 10)
        self.assertEqual(listed, [event])
