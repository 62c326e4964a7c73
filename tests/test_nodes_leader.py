"""
The singleton duties of nodes sharing PostgreSQL: the leader election on a
Clock with a fake lock, the advisory lock on the tests' real server (one
holder; a dead holder's lock passes on), and the leader's mail feed from
the shared events table (one mail and one summary per window for events
recorded by two nodes; events committed out of order are not skipped).
"""

from __future__ import annotations

from typing import Any

import psycopg
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from smtpplus.nodes.leader import AdvisoryLock, Leadership, PeriodicDuty
from smtpplus.notify.dispatch import Notifier
from smtpplus.notify.postgres import PostgresEventStore
from smtpplus.notify.shared import GAP_WAIT, SharedMailFeed
from tests.harness.polling import poll
from tests.harness.postgres import fresh_database, make_postgres_database
from tests.test_notify_dispatch import START, FakeSubmit, notifier


class FakeLock:
    """Holds when the test says so; raises when the test says so."""

    def __init__(self) -> None:
        self.holding = False
        self.fail = False
        self.released = 0

    def try_hold(self) -> bool:
        if self.fail:
            raise RuntimeError("driver bug")
        return self.holding

    def release(self) -> None:
        self.released += 1
        self.holding = False


class SyncThreads:
    """Runs the lock's calls at once on the calling thread."""

    def __init__(self) -> None:
        self.stopped = False

    def run(self, fn: Any, *args: Any) -> Deferred[Any]:
        return maybeDeferred(fn, *args)

    def stop(self) -> None:
        self.stopped = True


class RecordingDuty:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def start(self) -> None:
        self.calls.append("start")

    def stop(self) -> Deferred[None]:
        self.calls.append("stop")
        return succeed(None)


class LeadershipTests(TestCase):
    """L{Leadership} on a Clock: duties run exactly while the lock is held."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.lock = FakeLock()
        self.threads = SyncThreads()
        self.leadership = Leadership(self.lock, self.clock, 10, self.threads, "A")
        self.duty = RecordingDuty()
        self.leadership.duties.append(self.duty)

    def test_follower_runs_no_duty(self) -> None:
        """While another node holds the lock, the duties never start; the node keeps trying every interval."""
        self.leadership.startService()
        self.clock.advance(100)
        self.assertFalse(self.leadership.leading)
        self.assertEqual(self.duty.calls, [])

    def test_wins_then_loses(self) -> None:
        """Winning the lock starts the duties once; holding it keeps them; losing it stops them."""
        self.leadership.startService()
        self.lock.holding = True
        self.clock.advance(9)
        self.assertEqual(self.duty.calls, [], "not before the next try")
        self.clock.advance(1)
        self.assertTrue(self.leadership.leading)
        self.clock.advance(50)
        self.assertEqual(self.duty.calls, ["start"])
        self.lock.holding = False
        self.clock.advance(10)
        self.assertFalse(self.leadership.leading)
        self.assertEqual(self.duty.calls, ["start", "stop"])
        self.lock.holding = True
        self.clock.advance(10)
        self.assertEqual(self.duty.calls, ["start", "stop", "start"])

    def test_stop_releases(self) -> None:
        """Stopping the service stops the duties, then releases the lock and stops the thread."""
        self.lock.holding = True
        self.leadership.startService()
        self.assertEqual(self.duty.calls, ["start"])
        d = self.leadership.stopService()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.duty.calls, ["start", "stop"])
        self.assertEqual(self.lock.released, 1)
        self.assertTrue(self.threads.stopped)
        self.clock.advance(100)
        self.assertEqual(self.duty.calls, ["start", "stop"])

    def test_error_counts_as_not_holding(self) -> None:
        """A try that raises is logged, stops the duties, and the node tries again at the next interval."""
        self.lock.holding = True
        self.leadership.startService()
        self.lock.fail = True
        self.clock.advance(10)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.duty.calls, ["start", "stop"])
        self.lock.fail = False
        self.clock.advance(10)
        self.assertEqual(self.duty.calls, ["start", "stop", "start"])

    def test_periodic_duty(self) -> None:
        """A periodic duty runs at once and every interval while leading, not after; its failures are logged."""
        calls: list[float] = []

        def work() -> None:
            calls.append(self.clock.seconds())
            if len(calls) == 2:
                raise ValueError("sweep failed")

        self.leadership.duties.append(PeriodicDuty("sweeping", self.clock, 60, work))
        self.lock.holding = True
        self.leadership.startService()
        self.clock.pump([10] * 13)
        self.assertEqual(calls, [0, 60, 120])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.lock.holding = False
        self.clock.pump([10] * 20)
        self.assertEqual(calls, [0, 60, 120])


class AdvisoryLockTests(TestCase):
    """L{AdvisoryLock} on the tests' PostgreSQL server."""

    def setUp(self) -> None:
        self.dsn = fresh_database(self)
        self.a = AdvisoryLock(self.dsn, keepalive=6)
        self.b = AdvisoryLock(self.dsn, keepalive=6)
        self.addCleanup(self.a.release)
        self.addCleanup(self.b.release)

    def test_one_holder(self) -> None:
        """Of two lockers one gets the lock and keeps it at every try; the other does not get it."""
        self.assertTrue(self.a.try_hold())
        self.assertFalse(self.b.try_hold())
        self.assertTrue(self.a.try_hold())
        self.assertFalse(self.b.try_hold())

    def test_released_passes_on(self) -> None:
        """A holder that releases (closes its connection) leaves the lock to the other's next try."""
        self.assertTrue(self.a.try_hold())
        self.a.release()
        self.assertTrue(self.b.try_hold())
        self.assertFalse(self.a.try_hold())

    def test_dead_holder_passes_on(self) -> None:
        """
        When the holder's connection is killed on the server (its node
        died), the other gets the lock on its next try, and the old holder
        learns at its next try that it no longer holds it.
        """
        self.assertTrue(self.a.try_hold())
        self.assertFalse(self.b.try_hold())
        with psycopg.connect(self.dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            )
        # The backend exits just after the signal: b tries until it is gone.
        self.assertTrue(poll(self.b.try_hold, 10))
        self.assertFalse(self.a.try_hold())
        self.assertFalse(self.a.try_hold())


class SharedMailFeedTests(TestCase):
    """L{SharedMailFeed}: the leader mails the events every node records in the shared table."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.db = make_postgres_database(self)
        # Two nodes' event stores on one database; neither mails what it records.
        self.node_a = PostgresEventStore(self.db, self.clock)
        self.node_b = PostgresEventStore(self.db, self.clock)
        self.submit = FakeSubmit()
        self.notifier = Notifier(notifier(self.clock, self.submit), None, mail_locally=False)
        self.node_a.sink = self.notifier
        self.feed = SharedMailFeed(self.db, self.clock, self.notifier)

    @inlineCallbacks
    def poll(self) -> Any:
        """Let the feed read once (the LoopingCall's next call) and wait for it."""
        self.clock.advance(1)
        yield self.feed._polling

    @inlineCallbacks
    def test_one_summary_for_two_nodes(self) -> Any:
        """
        Events of one user recorded on two nodes within a window: the first
        is mailed at once, the rest come in one summary; the recording node
        mails nothing itself.
        """
        yield self.node_a.record("bounce", "alice", "m-1", "550 no")
        self.assertEqual(self.submit.calls, [], "recording mails nothing")
        self.feed.start()
        self.addCleanup(self.feed.stop)
        yield self.feed._polling
        self.assertEqual(len(self.submit.calls), 1)
        for n in range(3):
            yield self.node_a.record("bounce", "alice", f"m-a{n}", "550 no")
            yield self.node_b.record("bounce", "alice", f"m-b{n}", "550 no")
            yield self.poll()
        self.assertEqual(len(self.submit.calls), 1)
        self.clock.advance(60)
        yield self.feed._polling
        self.assertEqual(self.submit.subjects()[1:], ["[smtpplus] 6 more bounce events for user alice"])

    @inlineCallbacks
    def test_new_leader_goes_on(self) -> Any:
        """A feed started after another stopped mails only the events the first had not read."""
        self.feed.start()
        yield self.feed._polling
        yield self.node_a.record("bounce", "alice", "m-1", "550 no")
        yield self.poll()
        yield self.feed.stop()
        yield self.node_b.record("send_problem", "bob", "m-2", "refused")
        self.assertEqual(len(self.submit.calls), 1)
        second = FakeSubmit()
        feed = SharedMailFeed(self.db, self.clock, Notifier(notifier(self.clock, second), None, mail_locally=False))
        feed.start()
        self.addCleanup(feed.stop)
        yield feed._polling
        self.assertEqual(second.subjects(), ["[smtpplus] Delivery problem: refused"])

    @inlineCallbacks
    def test_waits_for_insert_in_flight(self) -> Any:
        """An event number seen before a lower one commits is held back until the lower one is in, then both go in order."""
        self.feed.start()
        self.addCleanup(self.feed.stop)
        yield self.feed._polling
        slow = psycopg.connect(self.db.dsn)
        self.addCleanup(slow.close)
        slow.execute(
            'INSERT INTO events (id, type, "user", message_id, detail, created_at) '
            "VALUES ('evt-slow', 'bounce', 'early', NULL, 'first', '2024-05-01T12:00:00Z')"
        )
        yield self.node_b.record("bounce", "late", "m-2", "second")
        yield self.poll()
        self.assertEqual(self.submit.calls, [])
        slow.commit()
        yield self.poll()
        self.assertEqual(
            self.submit.subjects(), ["[smtpplus] Bounce for user early", "[smtpplus] Bounce for user late"]
        )

    @inlineCallbacks
    def test_skips_rolled_back_number(self) -> Any:
        """A number whose insert rolled back is passed over after GAP_WAIT seconds."""
        self.feed.start()
        self.addCleanup(self.feed.stop)
        yield self.feed._polling
        with psycopg.connect(self.db.dsn) as conn:
            conn.execute(
                'INSERT INTO events (id, type, "user", message_id, detail, created_at) '
                "VALUES ('evt-gone', 'bounce', 'ghost', NULL, 'x', '2024-05-01T12:00:00Z')"
            )
            conn.rollback()
        yield self.node_b.record("bounce", "late", "m-2", "second")
        yield self.poll()
        self.assertEqual(self.submit.calls, [])
        for _ in range(int(GAP_WAIT)):
            yield self.poll()
        self.assertEqual(self.submit.subjects(), ["[smtpplus] Bounce for user late"])
