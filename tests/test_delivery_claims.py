"""
Queue claims in a PostgreSQL store shared by nodes (contract section 5):
each node attempts only the messages it claims, recovers only its own,
and takes over those of a node whose heartbeat is older than the lease.
Against the tests' private PostgreSQL server.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from smtpplus.delivery.interfaces import ISharedQueueStore
from smtpplus.delivery.postgres import PostgresQueueStore
from smtpplus.delivery.queue import MarkSending
from tests.harness.postgres import fresh_database
from tests.test_delivery_queue_store import _message


class ClaimTests(unittest.TestCase):
    """Stores of nodes A, B and C on one database."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        from smtpplus.storage.postgres import PostgresDatabase

        dsn = fresh_database(self)
        self.stores = {}
        for name in ("A", "B", "C"):
            database = PostgresDatabase(reactor, dsn)
            database.start()
            self.addCleanup(database.stop)
            store = PostgresQueueStore(database, node=name)
            store.migrate()
            self.stores[name] = store
        self.database = self.stores["A"]._database

    def beat(self, **last_seen: float) -> Any:
        """Set the nodes' heartbeats."""

        def write(conn: Any) -> None:
            for name, seen in last_seen.items():
                conn.execute(
                    "INSERT INTO nodes (name, workers, started_at, last_seen) VALUES (%s, 1, 0, %s) "
                    "ON CONFLICT (name) DO UPDATE SET last_seen = excluded.last_seen",
                    (name, seen),
                )

        return self.database.write(write)

    def claimant(self, message_id: str) -> Any:
        return self.database.run(
            lambda conn: conn.execute("SELECT claimed_by FROM queue_messages WHERE id = %s", (message_id,)).fetchone()[0]
        )

    def test_interface(self) -> None:
        """The PostgreSQL queue store is a shared one."""
        self.assertTrue(verifyObject(ISharedQueueStore, self.stores["A"]))

    @inlineCallbacks
    def test_accepting_node_claims(self) -> Any:
        """A message belongs to the node that inserted it: only that node recovers it and may attempt it."""
        yield self.stores["A"].insert_with_content([(_message("M1"), b"one")])
        self.assertEqual((yield self.claimant("M1")), "A")
        self.assertEqual([row["id"] for row in self.stores["A"].recover(10.0)], ["M1"])
        self.assertEqual(self.stores["B"].recover(10.0), [])
        self.assertEqual(list((yield self.stores["A"].load_for_attempts(["M1"]))), ["M1"])
        self.assertEqual((yield self.stores["B"].load_for_attempts(["M1"])), {})
        # Any node reads it (the admin API, the content for a DSN).
        self.assertEqual((yield self.stores["B"].load_message("M1"))["id"], "M1")
        self.assertEqual((yield self.stores["B"].load_content("M1")), b"one")

    @inlineCallbacks
    def test_recover_puts_own_interrupted_attempts_back(self) -> Any:
        """At restart a node puts its own 'sending' messages back in the queue, not another node's."""
        yield self.stores["A"].insert([_message("MA")])
        yield self.stores["B"].insert([_message("MB")])
        yield self.stores["A"].write_state([MarkSending("MA", 6.0)])
        yield self.stores["B"].write_state([MarkSending("MB", 6.0)])
        self.stores["A"].recover(10.0)
        self.assertEqual((yield self.stores["A"].load_message("MA"))["status"], "queued")
        self.assertEqual((yield self.stores["A"].load_message("MB"))["status"], "sending")

    @inlineCallbacks
    def test_take_over_silent_node(self) -> Any:
        """
        B takes A's unfinished messages once A's heartbeat is older than the
        lease, priority first, with interrupted attempts put back; finished
        ones stay; A may no longer attempt them; nothing is taken twice.
        """
        yield self.stores["A"].insert(
            [_message("BULK"), _message("URGENT", priority=1), _message("SENDING", priority=3)]
        )
        yield self.stores["A"].write_state([MarkSending("SENDING", 6.0)])
        yield self.beat(A=100.0, B=200.0)
        self.assertEqual((yield self.stores["B"].take_over(silent_since=50.0, now=200.0)), [])
        rows = yield self.stores["B"].take_over(silent_since=150.0, now=200.0)
        self.assertEqual([row["id"] for row in rows], ["URGENT", "BULK", "SENDING"])
        self.assertEqual({row["previous"] for row in rows}, {"A"})
        self.assertIsNone(rows[2]["next_attempt"])
        sending = yield self.stores["B"].load_message("SENDING")
        self.assertEqual(sending["status"], "queued")
        self.assertEqual({r["status"] for r in sending["recipients"]}, {"queued"})
        self.assertEqual((yield self.stores["A"].load_for_attempts(["BULK", "URGENT"])), {})
        taken = yield self.stores["B"].load_for_attempts(["BULK", "URGENT", "GONE"])
        self.assertEqual(sorted(taken), ["BULK", "URGENT"])
        self.assertEqual(taken["BULK"]["id"], "BULK")
        self.assertEqual((yield self.stores["B"].take_over(silent_since=150.0, now=201.0)), [])

    @inlineCallbacks
    def test_take_over_node_that_left(self) -> Any:
        """The messages of a node without a row (it stopped cleanly) are taken at once, whatever the lease."""
        yield self.stores["A"].insert([_message("M1")])
        yield self.beat(B=200.0)
        rows = yield self.stores["B"].take_over(silent_since=150.0, now=200.0)
        self.assertEqual([(row["id"], row["previous"]) for row in rows], [("M1", "A")])
        self.assertEqual((yield self.stores["C"].take_over(silent_since=150.0, now=200.0)), [])

    @inlineCallbacks
    def test_two_takers_share_without_overlap(self) -> Any:
        """B and C taking over A's messages at once each get some, none twice, all taken."""
        messages = [_message(f"M{n}") for n in range(60)]
        yield self.stores["A"].insert(messages)
        yield self.beat(A=100.0, B=200.0, C=200.0)
        taken = yield gatherResults(
            [self.stores[name].take_over(silent_since=150.0, now=200.0, limit=10) for name in ("B", "C") for _ in range(4)]
        )
        ids = [row["id"] for rows in taken for row in rows]
        self.assertEqual(len(ids), len(set(ids)))
        more = yield self.stores["B"].take_over(silent_since=150.0, now=200.0)
        ids += [row["id"] for row in more]
        self.assertEqual(sorted(ids), sorted(m.id for m in messages))

    @inlineCallbacks
    def test_retry_moves_claim_to_asking_node(self) -> Any:
        """A retry through B's admin API makes the waiting message B's to attempt."""
        yield self.stores["A"].insert([_message("M1", schedule_at=100.0)])
        result = yield self.stores["B"].retry_message("M1", 7.0)
        self.assertIsNotNone(result)
        self.assertEqual((yield self.claimant("M1")), "B")
        self.assertEqual((yield self.stores["A"].load_for_attempts(["M1"])), {})
