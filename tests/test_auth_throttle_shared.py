"""
The login throttle's contract (CONTRACT.md section 9 and [security]), run
against the memory throttle of one node and the PostgreSQL throttle that
nodes share: the same delays, lock thresholds, expiry and known-address
exemption; and, for PostgreSQL, that two throttles on one database (two
nodes) count towards one limit.
"""

from __future__ import annotations

from typing import Any

import psycopg
from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from smtpplus.auth.postgres_throttle import KNOWN_REFRESH, PostgresThrottle
from smtpplus.auth.throttle import FIRST_DELAY, MAX_DELAY, LoginThrottle
from smtpplus.config import SecurityConfig
from tests.harness.fakes import Recorder
from tests.harness.postgres import make_postgres_database

SECURITY = SecurityConfig(auth_failures_per_ip=5, auth_failures_per_user=3, auth_lock_seconds=900)


class ThrottleContract:
    """Mixin: C{make(clock, security, events)} returns the throttle under test."""

    def make(self, clock: Clock, security: SecurityConfig, events: Recorder) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.clock = Clock()
        # Not at 0: a known address's age is measured from the clock's start.
        self.clock.advance(1_000_000)
        self.events = Recorder()
        self.throttle = self.make(self.clock, SECURITY, self.events)

    def refused(self, username: str, ip: str) -> Any:
        return maybeDeferred(self.throttle.refused, username, ip)

    def failed(self, username: str, ip: str, known: bool = True) -> Any:
        return maybeDeferred(self.throttle.failed, username, ip, known)

    def succeeded(self, username: str, ip: str) -> Any:
        return maybeDeferred(self.throttle.succeeded, username, ip)

    @inlineCallbacks
    def test_growing_delay(self) -> Any:
        """Each failure answers twice as late as the one before, from the first delay up to the cap."""
        delays = []
        for _ in range(5):
            delays.append((yield self.failed("x", "10.0.0.1", known=False)))
            self.clock.advance(1)
            yield self.succeeded("x", "10.0.0.1")  # the IP's count alone keeps growing
        self.assertEqual(delays, [FIRST_DELAY * 2**n for n in range(3)] + [MAX_DELAY, MAX_DELAY])

    @inlineCallbacks
    def test_user_lock_and_event(self) -> Any:
        """The Nth failure for one username locks it (from any IP, any case) and records one account_block event."""
        for i in range(3):
            self.assertFalse((yield self.refused("alice", f"10.0.0.{i}")))
            yield self.failed("alice", f"10.0.0.{i}")
        self.assertTrue((yield self.refused("alice", "10.9.9.9")))
        self.assertTrue((yield self.refused("ALICE", "10.9.9.9")))
        self.assertFalse((yield self.refused("bob", "10.9.9.9")))
        self.assertEqual(len(self.events.events), 1)
        kind, user, message_id, detail = self.events.events[0]
        self.assertEqual((kind, user, message_id), ("account_block", "alice", None))
        self.assertIn("10.0.0.2", detail)

    @inlineCallbacks
    def test_lock_expires_and_count_restarts(self) -> Any:
        """A lock lasts auth_lock_seconds; after it the count starts afresh."""
        for _ in range(3):
            yield self.failed("alice", "10.0.0.1")
        self.clock.advance(899)
        self.assertTrue((yield self.refused("alice", "10.0.0.2")))
        self.clock.advance(2)
        self.assertFalse((yield self.refused("alice", "10.0.0.2")))
        yield self.failed("alice", "10.0.0.2")
        self.assertFalse((yield self.refused("alice", "10.0.0.2")))

    @inlineCallbacks
    def test_unknown_user_no_event(self) -> Any:
        """An unknown username locks like a known one but records no event."""
        for _ in range(3):
            yield self.failed("nobody", "10.0.0.1", known=False)
        self.assertTrue((yield self.refused("nobody", "10.0.0.3")))
        self.assertEqual(self.events.events, [])

    @inlineCallbacks
    def test_ip_lock(self) -> Any:
        """Failures from one IP over many usernames lock that IP only, for the lock period."""
        for i in range(5):
            yield self.failed(f"user{i}", "10.0.0.1", known=False)
        self.assertTrue((yield self.refused("someone-else", "10.0.0.1")))
        self.assertFalse((yield self.refused("someone-else", "10.0.0.2")))
        self.clock.advance(901)
        self.assertFalse((yield self.refused("someone-else", "10.0.0.1")))

    @inlineCallbacks
    def test_window(self) -> Any:
        """Failures older than ten minutes no longer count."""
        yield self.failed("alice", "10.0.0.1")
        yield self.failed("alice", "10.0.0.1")
        self.clock.advance(601)
        yield self.failed("alice", "10.0.0.1")
        self.assertFalse((yield self.refused("alice", "10.0.0.1")))
        yield self.failed("alice", "10.0.0.1")
        yield self.failed("alice", "10.0.0.1")
        self.assertTrue((yield self.refused("alice", "10.0.0.1")))

    @inlineCallbacks
    def test_success_forgives_user(self) -> Any:
        """A correct login clears the username's earlier failures."""
        yield self.failed("alice", "10.0.0.1")
        yield self.failed("alice", "10.0.0.1")
        yield self.succeeded("alice", "10.0.0.1")
        yield self.failed("alice", "10.0.0.7")
        self.assertFalse((yield self.refused("alice", "10.0.0.8")))

    @inlineCallbacks
    def test_known_address_keeps_logging_in(self) -> Any:
        """A locked username may still log in from an address of a success within 24 hours, not from others."""
        yield self.succeeded("u", "192.0.2.2")
        self.clock.advance(3600)
        for _ in range(3):
            yield self.failed("u", "198.51.100.1")
        self.assertTrue((yield self.refused("u", "198.51.100.1")))
        self.assertTrue((yield self.refused("u", "203.0.113.3")))
        self.assertFalse((yield self.refused("U", "192.0.2.2")))
        self.assertFalse((yield self.refused("v", "203.0.113.3")), "other usernames are not locked")

    @inlineCallbacks
    def test_known_address_counts_for_ip_only(self) -> Any:
        """Failures from a known address lock that IP, not the username elsewhere, and set the delay by the IP."""
        yield self.succeeded("u", "192.0.2.2")
        for _ in range(3):
            yield self.failed("u", "198.51.100.1")
        delay = yield self.failed("u", "192.0.2.2")
        self.assertEqual(delay, FIRST_DELAY, "the username's failures do not slow a known address")
        for _ in range(4):
            yield self.failed("u", "192.0.2.2")
        self.assertTrue((yield self.refused("someone", "192.0.2.2")))
        self.assertEqual([e[0] for e in self.events.events], ["account_block"])

    @inlineCallbacks
    def test_known_address_expires(self) -> Any:
        """A success more than 24 hours ago no longer exempts the address."""
        yield self.succeeded("u", "192.0.2.2")
        self.clock.advance(24 * 3600 - 500)
        for _ in range(3):
            yield self.failed("u", "198.51.100.1")
        self.assertFalse((yield self.refused("u", "192.0.2.2")))
        self.clock.advance(500)
        self.assertTrue((yield self.refused("u", "192.0.2.2")))

    @inlineCallbacks
    def test_reconfigure(self) -> Any:
        """A reloaded [security] applies its thresholds to the next failures."""
        self.throttle.reconfigure(SecurityConfig(auth_failures_per_ip=5, auth_failures_per_user=2, auth_lock_seconds=60))
        for _ in range(2):
            yield self.failed("alice", "10.0.0.1")
        self.assertTrue((yield self.refused("alice", "10.0.0.2")))
        self.clock.advance(61)
        self.assertFalse((yield self.refused("alice", "10.0.0.2")))


class MemoryThrottleTests(ThrottleContract, TestCase):
    """The contract against one node's L{LoginThrottle}."""

    def make(self, clock: Clock, security: SecurityConfig, events: Recorder) -> Any:
        return LoginThrottle(clock, security, events)


class PostgresThrottleTests(ThrottleContract, TestCase):
    """The contract against L{PostgresThrottle} on the tests' PostgreSQL server."""

    def make(self, clock: Clock, security: SecurityConfig, events: Recorder) -> Any:
        self.db = make_postgres_database(self)
        return PostgresThrottle(self.db, clock, security, events)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.db.dsn) as conn:
            return conn.execute(sql).fetchall()

    @inlineCallbacks
    def test_two_nodes_count_together(self) -> Any:
        """Failures on two throttles of one database lock the username on both, with one event."""
        other_events = Recorder()
        other = PostgresThrottle(self.db, self.clock, SECURITY, other_events)
        yield self.failed("alice", "10.0.0.1")
        yield other.failed("alice", "10.0.0.2", True)
        self.assertFalse((yield other.refused("alice", "10.0.0.3")))
        yield self.failed("alice", "10.0.0.4")
        self.assertTrue((yield other.refused("alice", "10.0.0.3")))
        self.assertTrue((yield self.refused("alice", "10.0.0.3")))
        self.assertEqual(len(self.events.events) + len(other_events.events), 1)

    @inlineCallbacks
    def test_concurrent_failures_lock_once(self) -> Any:
        """Failures counted at once on several database threads all count, and lock the username once."""
        from twisted.internet.defer import gatherResults

        yield gatherResults([self.failed("alice", f"10.0.1.{n}") for n in range(6)])
        self.assertTrue((yield self.refused("alice", "10.0.0.3")))
        self.assertEqual(len(self.events.events), 1)

    @inlineCallbacks
    def test_known_success_one_round_trip(self) -> Any:
        """Logging in again from a known address with nothing to forgive writes nothing; a stale one refreshes."""
        yield self.succeeded("u", "192.0.2.2")
        first = self.rows("SELECT last_success FROM auth_known")
        self.clock.advance(10)
        yield self.refused("u", "192.0.2.2")
        yield self.succeeded("u", "192.0.2.2")
        self.assertEqual(self.rows("SELECT last_success FROM auth_known"), first)
        self.clock.advance(KNOWN_REFRESH)
        yield self.refused("u", "192.0.2.2")
        yield self.succeeded("u", "192.0.2.2")
        self.assertEqual(self.rows("SELECT last_success FROM auth_known"), [(self.clock.seconds(),)])

    @inlineCallbacks
    def test_sweep(self) -> Any:
        """The sweep deletes expired counts, locks and known addresses, and keeps those in force."""
        for _ in range(3):
            yield self.failed("alice", "10.0.0.1")
        yield self.succeeded("bob", "10.0.0.9")
        self.assertEqual((yield self.throttle.sweep()), 0)
        self.clock.advance(901)
        yield self.failed("carol", "10.0.0.2")
        yield self.throttle.sweep()
        self.assertEqual(sorted(self.rows("SELECT kind, key FROM auth_throttle")), [("ip", "10.0.0.2"), ("user", "carol")])
        self.clock.advance(24 * 3600)
        yield self.throttle.sweep()
        self.assertEqual(self.rows("SELECT * FROM auth_known"), [])
        self.assertEqual(self.rows("SELECT * FROM auth_throttle"), [])
