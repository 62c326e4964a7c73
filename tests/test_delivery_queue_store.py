"""
The queue store contract: one mixin of tests run against the SQLite store
and the in-memory one, so that the fake the unit tests use cannot drift
from the store the daemon uses.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.trial import unittest
from twisted.trial.unittest import SkipTest
from zope.interface.verify import verifyObject

from smtpplus.delivery import queue
from smtpplus.delivery.interfaces import Duplicate, IQueueStore, MessageFilter
from smtpplus.delivery.memory import MemoryQueueStore
from smtpplus.delivery.postgres import PostgresQueueStore
from smtpplus.delivery.queue import FinishAttempt, MarkSending, NewMessage, RecipientUpdate, SQLiteQueueStore
from smtpplus.storage.database import Database
from tests.harness.polling import wait_until
from tests.harness.postgres import make_postgres_database


def _message(message_id: str, user: str = "u", recipients: tuple[str, ...] = ("x@y.z", "w@y.z"), **changes: Any) -> NewMessage:
    fields: dict[str, Any] = {
        "id": message_id,
        "user": user,
        "mail_from": "a@b.c",
        "header_from": "A <a@b.c>",
        "subject": "Grüße",
        "priority": 2,
        "recipients": recipients,
        "campaign_name": "n",
        "campaign_code": "c",
        "schedule_at": None,
        "size": 9,
        "internal": False,
        "created_at": 5.0,
    }
    fields.update(changes)
    return NewMessage(**fields)


class QueueStoreContract:
    """What every L{IQueueStore} does; mixed into a TestCase with L{make_store} and L{lose_rows}."""

    def make_store(self) -> Any:
        raise NotImplementedError

    def lose_rows(self, store: Any) -> Deferred[None]:
        """Make C{store} lose every row, as a replaced database file does."""
        raise NotImplementedError

    def setUp(self) -> None:
        self.store = self.make_store()

    def test_provides_interface(self) -> None:
        """The store provides IQueueStore with the declared signatures."""
        self.assertTrue(verifyObject(IQueueStore, self.store))

    @inlineCallbacks
    def test_insert_then_load(self) -> Any:
        """Inserted messages get rising sequence numbers and load back as queue.as_row describes them."""
        first, second = _message("M1"), _message("M2", internal=True, schedule_at=50.0)
        seqs = yield self.store.insert([first, second])
        self.assertEqual(len(seqs), 2)
        self.assertLess(seqs[0], seqs[1])
        loaded = yield self.store.load_message("M1")
        self.assertEqual(loaded, {**queue.as_row(first), "seq": seqs[0]})
        loaded = yield self.store.load_message("M2")
        self.assertEqual(loaded, {**queue.as_row(second), "seq": seqs[1]})
        self.assertEqual(loaded["status"], "scheduled")
        missing = yield self.store.load_message("NONE")
        self.assertIsNone(missing)

    @inlineCallbacks
    def test_load_for_attempts(self) -> Any:
        """The messages of one node load for their attempts in one call, by id; an id without a row is left out."""
        first, second = _message("M1"), _message("M2", recipients=("a@b.c",))
        seqs = yield self.store.insert([first, second])
        loaded = yield self.store.load_for_attempts(["M2", "NONE", "M1"])
        self.assertEqual(
            loaded, {"M1": {**queue.as_row(first), "seq": seqs[0]}, "M2": {**queue.as_row(second), "seq": seqs[1]}}
        )
        self.assertEqual((yield self.store.load_for_attempts([])), {})

    @inlineCallbacks
    def test_sandbox_flag_round_trip(self) -> Any:
        """A sandbox user's message loads back with its flag set, and a rebuilt row keeps it."""
        yield self.store.insert([_message("M1", sandbox=True), _message("M2")])
        loaded = yield self.store.load_message("M1")
        self.assertEqual(loaded, {**queue.as_row(_message("M1", sandbox=True)), "seq": loaded["seq"]})
        self.assertEqual((loaded["sandbox"], (yield self.store.load_message("M2"))["sandbox"]), (1, 0))
        # A row lost while its attempt ran is rebuilt from what the attempt knew.
        lost = {**queue.as_row(_message("M3", sandbox=True)), "seq": None}
        update = RecipientUpdate(0, "sandboxed", 0, "250 sandboxed", None)
        errors = yield self.store.write_state([FinishAttempt(lost, "sandboxed", None, [update], False, 9.0)])
        self.assertEqual(errors, [None])
        rebuilt = yield self.store.load_message("M3")
        self.assertEqual(
            (rebuilt["sandbox"], rebuilt["status"], rebuilt["recipients"][0]["status"]), (1, "sandboxed", "sandboxed")
        )

    @inlineCallbacks
    def test_count_urgent(self) -> Any:
        """
        The priority budget's count: one user's own messages at priority 1
        created from the given time on, not the daemon's own (bounces),
        not other priorities, not other users'.
        """
        yield self.store.insert(
            [
                _message("M1", priority=1, created_at=100.0),
                _message("M2", priority=1, created_at=200.0),
                _message("M3", priority=1, created_at=300.0),
                _message("M4", priority=2, created_at=300.0),
                _message("M5", priority=1, created_at=300.0, internal=True),
                _message("M6", priority=1, created_at=300.0, user="other"),
            ]
        )
        self.assertEqual((yield self.store.count_urgent("u", 0.0)), 3)
        self.assertEqual((yield self.store.count_urgent("u", 200.0)), 2)
        self.assertEqual((yield self.store.count_urgent("u", 300.5)), 0)
        self.assertEqual((yield self.store.count_urgent("nobody", 0.0)), 0)

    @inlineCallbacks
    def test_insert_is_all_or_none(self) -> Any:
        """A batch holding an id that is queued already is refused as a whole."""
        yield self.store.insert([_message("M1")])
        d = self.store.insert([_message("M2"), _message("M1")])
        yield self.assertFailure(d, Exception)
        found = yield self.store.statuses(["M1", "M2"])
        self.assertEqual(found, {"M1": "queued"})

    @inlineCallbacks
    def test_statuses(self) -> Any:
        """statuses() names the status of each known id and leaves unknown ones out."""
        yield self.store.insert([_message("M1"), _message("M2", schedule_at=60.0)])
        found = yield self.store.statuses(["M1", "M2", "M3"])
        self.assertEqual(found, {"M1": "queued", "M2": "scheduled"})

    @inlineCallbacks
    def test_list_messages(self) -> Any:
        """Messages are listed newest first, filtered by user and status, cut at the limit."""
        yield self.store.insert([_message("M1", "ann"), _message("M2", "bob"), _message("M3", "ann")])
        yield self.store.write_state([MarkSending("M3", 6.0)])
        everything = yield self.store.list_messages(MessageFilter(), 10)
        self.assertEqual([m["id"] for m in everything], ["M3", "M2", "M1"])
        self.assertEqual(len(everything[0]["recipients"]), 2)
        anns = yield self.store.list_messages(MessageFilter(user="ann"), 10)
        self.assertEqual([m["id"] for m in anns], ["M3", "M1"])
        sending = yield self.store.list_messages(MessageFilter(status="sending"), 10)
        self.assertEqual([m["id"] for m in sending], ["M3"])
        limited = yield self.store.list_messages(MessageFilter(), 1)
        self.assertEqual([m["id"] for m in limited], ["M3"])

    @inlineCallbacks
    def test_list_filters(self) -> Any:
        """
        recipient (ASCII letters in any case), campaign_code, since
        (inclusive), until (exclusive) and before (arrival number) each
        narrow the listing, and combine.
        """
        yield self.store.insert(
            [
                _message("M1", recipients=("Bob@Example.org",), created_at=100.0, campaign_code="spring"),
                _message("M2", recipients=("ann@example.org", "bob@example.org"), created_at=200.0),
                _message("M3", recipients=("carl@example.org",), created_at=300.0, campaign_code="spring"),
            ]
        )

        def ids(**filters: Any) -> Deferred[list[str]]:
            d = self.store.list_messages(MessageFilter(**filters), 10)
            return d.addCallback(lambda rows: [row["id"] for row in rows])

        self.assertEqual((yield ids(recipient="bob@EXAMPLE.org")), ["M2", "M1"])
        self.assertEqual((yield ids(recipient="bob@example")), [])
        self.assertEqual((yield ids(campaign_code="spring")), ["M3", "M1"])
        self.assertEqual((yield ids(since=200.0)), ["M3", "M2"])
        self.assertEqual((yield ids(until=200.0)), ["M1"])
        self.assertEqual((yield ids(since=100.0, until=300.0)), ["M2", "M1"])
        everything = yield self.store.list_messages(MessageFilter(), 10)
        m2_seq = everything[1]["seq"]
        self.assertEqual((yield ids(before=m2_seq)), ["M1"])
        self.assertEqual((yield ids(recipient="bob@example.org", before=m2_seq + 1, campaign_code="spring")), ["M1"])

    @inlineCallbacks
    def test_retry_message(self) -> Any:
        """
        retry_message makes a deferred message and its deferred recipients
        due now, turns a scheduled one queued, leaves any other alone, and
        names the status each had.
        """
        yield self.store.insert([_message("D"), _message("S", schedule_at=900.0), _message("F"), _message("Q")])
        updates = [RecipientUpdate(0, "sent", 1, "250 ok", None), RecipientUpdate(1, "deferred", 1, "451 later", 700.0)]
        yield self.store.write_state(
            [
                FinishAttempt(queue.as_row(_message("D")), "deferred", 700.0, updates, False, 10.0),
                FinishAttempt(queue.as_row(_message("F")), "sent", None, [], False, 10.0),
            ]
        )
        before, row = yield self.store.retry_message("D", 20.0)
        self.assertEqual((before, row["status"], row["next_attempt"], row["updated_at"]), ("deferred", "deferred", 20.0, 20.0))
        self.assertEqual([r["next_attempt"] for r in row["recipients"]], [None, 20.0])
        self.assertEqual(row, (yield self.store.load_message("D")))
        before, row = yield self.store.retry_message("S", 21.0)
        self.assertEqual((before, row["status"], row["next_attempt"]), ("scheduled", "queued", 21.0))
        for message_id, status in (("F", "sent"), ("Q", "queued")):
            stored = yield self.store.load_message(message_id)
            self.assertEqual((yield self.store.retry_message(message_id, 22.0)), (status, stored))
        self.assertIsNone((yield self.store.retry_message("NONE", 22.0)))

    @inlineCallbacks
    def test_delete_message(self) -> Any:
        """
        delete_message marks a queued, scheduled or deferred message deleted
        with no next attempt, and its recipients not yet sent or bounced;
        a message being sent or final is left alone.
        """
        yield self.store.insert([_message(i, schedule_at=900.0 if i == "S" else None) for i in ("Q", "S", "D", "B", "F")])
        updates = [RecipientUpdate(0, "sent", 1, "250 ok", None), RecipientUpdate(1, "deferred", 1, "451 later", 700.0)]
        yield self.store.write_state(
            [
                FinishAttempt(queue.as_row(_message("D")), "deferred", 700.0, updates, False, 10.0),
                MarkSending("B", 10.0),
                FinishAttempt(queue.as_row(_message("F")), "bounced", None, [], False, 10.0),
            ]
        )
        for message_id, status in (("Q", "queued"), ("S", "scheduled"), ("D", "deferred")):
            before, row = yield self.store.delete_message(message_id, 30.0)
            self.assertEqual((before, row["status"], row["next_attempt"], row["updated_at"]), (status, "deleted", None, 30.0))
            self.assertEqual(row, (yield self.store.load_message(message_id)))
        deferred = yield self.store.load_message("D")
        self.assertEqual([(r["status"], r["next_attempt"]) for r in deferred["recipients"]], [("sent", None), ("deleted", None)])
        queued = yield self.store.load_message("Q")
        self.assertEqual([r["status"] for r in queued["recipients"]], ["deleted", "deleted"])
        for message_id, status in (("B", "sending"), ("F", "bounced"), ("Q", "deleted")):
            stored = yield self.store.load_message(message_id)
            self.assertEqual((yield self.store.delete_message(message_id, 31.0)), (status, stored))
        self.assertIsNone((yield self.store.delete_message("NONE", 31.0)))
        # Deleted messages are not active: only the one being sent is recovered.
        self.assertEqual([row["id"] for row in self.store.recover(40.0)], ["B"])

    @inlineCallbacks
    def test_mark_sending(self) -> Any:
        """An attempt's start marks the message and its unfinished recipients sending; finished ones stay."""
        yield self.store.insert([_message("M1")])
        done = RecipientUpdate(0, "sent", 1, "250 ok", None)
        later = RecipientUpdate(1, "deferred", 1, "451 later", 100.0)
        yield self.store.write_state([FinishAttempt(queue.as_row(_message("M1")), "deferred", 100.0, [done, later], False, 7.0)])
        errors = yield self.store.write_state([MarkSending("M1", 8.0), MarkSending("UNKNOWN", 8.0)])
        self.assertEqual(errors, [None, None])
        loaded = yield self.store.load_message("M1")
        self.assertEqual((loaded["status"], loaded["updated_at"]), ("sending", 8.0))
        self.assertEqual([r["status"] for r in loaded["recipients"]], ["sent", "sending"])

    @inlineCallbacks
    def test_finish_attempt(self) -> Any:
        """An attempt's outcome sets the message status, next attempt, recipients and the delay flag for good."""
        yield self.store.insert([_message("M1")])
        row = queue.as_row(_message("M1"))
        updates = [RecipientUpdate(0, "sent", 1, "250 ok", None), RecipientUpdate(1, "deferred", 1, "451 later", 70.0)]
        yield self.store.write_state([FinishAttempt(row, "deferred", 70.0, updates, True, 10.0)])
        yield self.store.write_state([FinishAttempt(row, "deferred", 90.0, updates[1:], False, 11.0)])
        loaded = yield self.store.load_message("M1")
        self.assertEqual(
            (loaded["status"], loaded["next_attempt"], loaded["delay_notified"], loaded["updated_at"]),
            ("deferred", 90.0, 1, 11.0),
        )
        self.assertEqual(
            [(r["status"], r["attempts"], r["last_response"], r["next_attempt"]) for r in loaded["recipients"]],
            [("sent", 1, "250 ok", None), ("deferred", 1, "451 later", 70.0)],
        )

    @inlineCallbacks
    def test_finish_attempt_recreates_a_lost_row(self) -> Any:
        """An attempt that ends after its queue row vanished (database lost) stores its result as a new row."""
        row = queue.as_row(_message("M1", user="alice"))
        updates = [RecipientUpdate(0, "sent", 1, "250 ok", None), RecipientUpdate(1, "deferred", 1, "451 later", 2000.0)]
        errors = yield self.store.write_state([FinishAttempt(row, "deferred", 2000.0, updates, False, 1500.0)])
        self.assertEqual(errors, [None])
        stored = yield self.store.load_message("M1")
        self.assertEqual((stored["status"], stored["user"], stored["priority"]), ("deferred", "alice", 2))
        self.assertEqual((stored["created_at"], stored["updated_at"], stored["subject"]), (5.0, 1500.0, "Grüße"))
        self.assertEqual([r["status"] for r in stored["recipients"]], ["sent", "deferred"])
        found = yield self.store.statuses(["M1"])
        self.assertEqual(found, {"M1": "deferred"})

    @inlineCallbacks
    def test_failing_change_alone_is_undone(self) -> Any:
        """A change that fails is undone by itself and reported; the others of its batch are written."""
        yield self.store.insert([_message("M1"), _message("M3")])
        broken = queue.as_row(_message("M2"))
        # Two recipients with one index cannot be stored.
        broken["recipients"][1]["idx"] = 0
        errors = yield self.store.write_state(
            [MarkSending("M1", 1.0), FinishAttempt(broken, "sent", None, [], False, 1.0), MarkSending("M3", 1.0)]
        )
        self.assertIsNone(errors[0])
        self.assertIsInstance(errors[1], Exception)
        self.assertIsNone(errors[2])
        found = yield self.store.statuses(["M1", "M2", "M3"])
        self.assertEqual(found, {"M1": "sending", "M3": "sending"})

    @inlineCallbacks
    def test_recover(self) -> Any:
        """
        recover() puts sending messages back to queued, their recipients to
        queued (or deferred after attempts), and lists the active messages
        in arrival order with their scheduling data.
        """
        yield self.store.insert([_message("M1"), _message("M2", schedule_at=80.0), _message("M3")])
        row = queue.as_row(_message("M1"))
        yield self.store.write_state(
            [
                FinishAttempt(row, "deferred", 60.0, [RecipientUpdate(1, "deferred", 1, "451 x", 60.0)], False, 6.0),
                MarkSending("M1", 7.0),
                FinishAttempt(queue.as_row(_message("M3")), "sent", None, [], False, 7.0),
            ]
        )
        rows = self.store.recover(9.0)
        self.assertEqual([r["id"] for r in rows], ["M1", "M2"])
        self.assertEqual(rows[1], {"id": "M2", "seq": rows[1]["seq"], "user": "u", "priority": 2, "next_attempt": 80.0})
        self.assertEqual((rows[0]["next_attempt"], rows[0]["seq"] < rows[1]["seq"]), (None, True))
        loaded = yield self.store.load_message("M1")
        self.assertEqual((loaded["status"], loaded["updated_at"]), ("queued", 9.0))
        self.assertEqual([r["status"] for r in loaded["recipients"]], ["queued", "deferred"])

    @inlineCallbacks
    def test_reset_tells_listeners(self) -> Any:
        """When the store loses its rows, each on_reset listener is told, and the store answers empty."""
        yield self.store.insert([_message("M1")])
        told: list[bool] = []
        self.store.on_reset(lambda: told.append(True))
        yield self.lose_rows(self.store)
        yield wait_until(lambda: told)
        self.assertEqual(told, [True])
        loaded = yield self.store.load_message("M1")
        self.assertIsNone(loaded)
        yield self.store.insert([_message("M1")])

    @inlineCallbacks
    def test_dedup_answers_the_first_id(self) -> Any:
        """
        Within the window, a message of the same user, Message-ID and
        recipient set (case and order aside) is not inserted: its answer is
        a Duplicate of the first, whose duplicates count grows.
        """
        first = _message("M1", header_message_id="<a@b>", recipients=("X@y.z", "w@y.z"))
        again = _message("M2", header_message_id="<a@b>", recipients=("w@Y.Z", "x@y.z"), created_at=100.0)
        results = yield self.store.insert([first], 3600)
        self.assertIsInstance(results[0], int)
        results = yield self.store.insert([again], 3600)
        self.assertEqual(results, [Duplicate("M1")])
        self.assertIsNone((yield self.store.load_message("M2")))
        loaded = yield self.store.load_message("M1")
        self.assertEqual(loaded["duplicates"], 1)

    @inlineCallbacks
    def test_dedup_within_one_batch(self) -> Any:
        """Two copies committed in one batch: the second is the first's duplicate."""
        results = yield self.store.insert(
            [_message("M1", header_message_id="<a@b>"), _message("M2", header_message_id="<a@b>")], 60
        )
        self.assertIsInstance(results[0], int)
        self.assertEqual(results[1], Duplicate("M1"))

    @inlineCallbacks
    def test_dedup_keys(self) -> Any:
        """
        Another user, Message-ID or recipient set, no Message-ID, the
        daemon's own mail, a copy past the window, or a window of 0: each
        is inserted as a new message.
        """
        yield self.store.insert([_message("M0", header_message_id="<a@b>")], 60)
        candidates = [
            _message("M1", "other", header_message_id="<a@b>"),
            _message("M2", header_message_id="<c@d>"),
            _message("M3", header_message_id="<a@b>", recipients=("x@y.z",)),
            _message("M4"),
            _message("M5", header_message_id="<a@b>", internal=True),
        ]
        results = yield self.store.insert(candidates, 60)
        self.assertTrue(all(isinstance(r, int) for r in results), results)
        results = yield self.store.insert([_message("M6", header_message_id="<a@b>")], 0)
        self.assertIsInstance(results[0], int)
        results = yield self.store.insert([_message("M7", header_message_id="<a@b>", created_at=66.0)], 60)
        self.assertIsInstance(results[0], int)
        loaded = yield self.store.load_message("M0")
        self.assertEqual(loaded["duplicates"], 0)

    @inlineCallbacks
    def test_prune_dedup(self) -> Any:
        """Pruning forgets records older than the cut-off, oldest first and at most the limit."""
        yield self.store.insert(
            [_message(f"M{i}", header_message_id=f"<{i}@b>", created_at=float(i)) for i in range(5)], 3600
        )
        removed = yield self.store.prune_dedup(3.0, 2)
        self.assertEqual(removed, 2)
        removed = yield self.store.prune_dedup(3.0, 10)
        self.assertEqual(removed, 1)
        # M0 is forgotten: a copy now is new; M4 is still known.
        results = yield self.store.insert(
            [_message("N0", header_message_id="<0@b>", created_at=10.0), _message("N4", header_message_id="<4@b>", created_at=10.0)],
            3600,
        )
        self.assertIsInstance(results[0], int)
        self.assertEqual(results[1], Duplicate("M4"))


class SQLiteQueueStoreTests(QueueStoreContract, unittest.TestCase):
    def make_store(self) -> SQLiteQueueStore:
        self.database = Database(reactor, os.path.abspath(self.mktemp()))
        self.addCleanup(self.database.stop)
        store = SQLiteQueueStore(self.database)
        store.migrate()
        return store

    def lose_rows(self, store: SQLiteQueueStore) -> Deferred[None]:
        os.unlink(self.database.path)
        # The next write notices the file is gone and opens a new one.
        return self.assertFailure(store.write_state([]), Exception).addCallback(lambda _: None)


class MemoryQueueStoreTests(QueueStoreContract, unittest.TestCase):
    def make_store(self) -> MemoryQueueStore:
        return MemoryQueueStore()

    def lose_rows(self, store: MemoryQueueStore) -> Deferred[None]:
        store.reset()
        return succeed(None)


class PostgresQueueStoreTests(QueueStoreContract, unittest.TestCase):
    """The contract against the PostgreSQL store on the tests' private server, and its message contents."""

    def make_store(self) -> PostgresQueueStore:
        self.database = make_postgres_database(self)
        store = PostgresQueueStore(self.database)
        store.migrate()
        return store

    def test_reset_tells_listeners(self) -> None:
        """Not for PostgreSQL: its rows live in the server, no file can be replaced under the daemon."""
        raise SkipTest("a PostgreSQL store cannot lose its rows to a replaced file")

    @inlineCallbacks
    def test_failing_change_undone_alone(self) -> Any:
        """
        In a batch of state changes one that fails (a lost row rebuilt
        without its sender, which the schema refuses) gets its error; the
        changes before and after it are applied.
        """
        yield self.store.insert([_message("M1"), _message("M2")])
        broken = {**queue.as_row(_message("GONE")), "mail_from": None}
        errors = yield self.store.write_state(
            [
                MarkSending("M1", 8.0),
                FinishAttempt(broken, "deferred", 100.0, [], False, 8.0),
                MarkSending("M2", 8.0),
            ]
        )
        self.assertIsNone(errors[0])
        self.assertIsInstance(errors[1], Exception)
        self.assertIsNone(errors[2])
        self.assertEqual((yield self.store.statuses(["M1", "M2", "GONE"])), {"M1": "sending", "M2": "sending"})

    @inlineCallbacks
    def test_content_round_trip(self) -> Any:
        """A message inserted with its content loads back byte for byte; one without content has none."""
        content = b"Subject: x\r\n\r\n" + bytes(range(256)) * 40
        seqs = yield self.store.insert_with_content([(_message("M1"), content), (_message("M2"), b"")])
        self.assertEqual(len(seqs), 2)
        self.assertEqual((yield self.store.load_content("M1")), content)
        self.assertEqual((yield self.store.load_content("M2")), b"")
        yield self.store.insert([_message("M3")])
        self.assertIsNone((yield self.store.load_content("M3")))
        yield self.store.store_content("M3", b"late")
        self.assertEqual((yield self.store.load_content("M3")), b"late")
        loaded = yield self.store.load_message("M1")
        self.assertEqual(loaded, {**queue.as_row(_message("M1")), "seq": seqs[0]})

    @inlineCallbacks
    def test_content_insert_is_all_or_none(self) -> Any:
        """A batch that fails (a duplicate id) leaves neither rows nor contents behind."""
        yield self.store.insert_with_content([(_message("M1"), b"one")])
        yield self.assertFailure(
            self.store.insert_with_content([(_message("M2"), b"two"), (_message("M1"), b"again")]), Exception
        )
        self.assertIsNone((yield self.store.load_message("M2")))
        self.assertIsNone((yield self.store.load_content("M2")))
        self.assertEqual((yield self.store.load_content("M1")), b"one")

    @inlineCallbacks
    def test_claim_columns_and_nodes_table(self) -> Any:
        """The schema has room for the nodes: the claim column on the queue rows (unset here) and an empty nodes table."""
        yield self.store.insert([_message("M1")])
        row = yield self.database.run(
            lambda conn: conn.execute(
                "SELECT claimed_by, (SELECT COUNT(*) FROM nodes) FROM queue_messages WHERE id = 'M1'"
            ).fetchone()
        )
        self.assertEqual(row, (None, 0))

