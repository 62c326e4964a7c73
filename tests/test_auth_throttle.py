"""Brute-force throttling of AUTH failures, on a fake clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from smtpplus.auth.throttle import MAX_DELAY, MAX_KNOWN, KnownAddresses, LoginThrottle
from smtpplus.config import SecurityConfig
from tests.harness.fakes import Recorder

# The name other test modules imported from here before tests.harness.
FakeEvents = Recorder


class ThrottleTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events = Recorder()
        security = SecurityConfig(auth_failures_per_ip=5, auth_failures_per_user=3, auth_lock_seconds=900)
        self.throttle = LoginThrottle(self.clock, security, self.events)

    def test_growing_delay(self) -> None:
        """Each recent failure makes the next failure answer later, up to the cap."""
        delays = []
        for _ in range(4):
            delays.append(self.throttle.failure_delay("x", "10.0.0.1"))
            self.throttle.failed("x", "10.0.0.1", known_user=False)
            self.clock.advance(1)
            self.throttle.succeeded("x", "10.0.0.1")  # the IP's count alone keeps growing
        self.assertEqual(delays, sorted(delays))
        self.assertLess(delays[0], delays[-1])
        self.assertLessEqual(delays[-1], MAX_DELAY)

    def test_user_lock_and_event(self) -> None:
        """The Nth failure for one username locks it (from any IP) and records one account_block event."""
        for i in range(3):
            self.assertFalse(self.throttle.refused("alice", f"10.0.0.{i}"))
            self.throttle.failed("alice", f"10.0.0.{i}", known_user=True)
        self.assertTrue(self.throttle.refused("alice", "10.9.9.9"))
        self.assertTrue(self.throttle.refused("ALICE", "10.9.9.9"))
        self.assertFalse(self.throttle.refused("bob", "10.9.9.9"))
        self.assertEqual(len(self.events.events), 1)
        kind, user, message_id, detail = self.events.events[0]
        self.assertEqual((kind, user, message_id), ("account_block", "alice", None))
        self.assertIn("10.0.0.2", detail)

    def test_recovers_after_lock(self) -> None:
        """A locked username is accepted again once the lock period has passed."""
        for _ in range(3):
            self.throttle.failed("alice", "10.0.0.1", known_user=True)
        self.clock.advance(899)
        self.assertTrue(self.throttle.refused("alice", "10.0.0.2"))
        self.clock.advance(2)
        self.assertFalse(self.throttle.refused("alice", "10.0.0.2"))
        self.throttle.failed("alice", "10.0.0.2", known_user=True)
        self.assertFalse(self.throttle.refused("alice", "10.0.0.2"), "the count starts afresh after a lock")

    def test_unknown_user_no_event(self) -> None:
        """An unknown username locks like a known one but records no event."""
        for _ in range(3):
            self.throttle.failed("nobody", "10.0.0.1", known_user=False)
        self.assertTrue(self.throttle.refused("nobody", "10.0.0.3"))
        self.assertEqual(self.events.events, [])

    def test_ip_lock(self) -> None:
        """Failures from one IP over many usernames lock that IP only."""
        for i in range(5):
            self.throttle.failed(f"user{i}", "10.0.0.1", known_user=False)
        self.assertTrue(self.throttle.refused("someone-else", "10.0.0.1"))
        self.assertFalse(self.throttle.refused("someone-else", "10.0.0.2"))
        self.clock.advance(901)
        self.assertFalse(self.throttle.refused("someone-else", "10.0.0.1"))

    def test_window(self) -> None:
        """Failures older than ten minutes no longer count."""
        self.throttle.failed("alice", "10.0.0.1", known_user=True)
        self.throttle.failed("alice", "10.0.0.1", known_user=True)
        self.clock.advance(601)
        self.throttle.failed("alice", "10.0.0.1", known_user=True)
        self.assertFalse(self.throttle.refused("alice", "10.0.0.1"))

    def test_success_forgives_user(self) -> None:
        """A correct login clears the username's earlier failures."""
        self.throttle.failed("alice", "10.0.0.1", known_user=True)
        self.throttle.failed("alice", "10.0.0.1", known_user=True)
        self.throttle.succeeded("alice", "10.0.0.1")
        self.throttle.failed("alice", "10.0.0.1", known_user=True)
        self.assertFalse(self.throttle.refused("alice", "10.0.0.1"))


class KnownAddressTests(TestCase):
    """The username lock spares addresses the user logged in from within 24 hours (contract section 9)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.events = Recorder()
        security = SecurityConfig(auth_failures_per_ip=10, auth_failures_per_user=10, auth_lock_seconds=900)
        self.throttle = LoginThrottle(self.clock, security, self.events)

    def lock_from(self, ip: str) -> None:
        for _ in range(10):
            self.assertFalse(self.throttle.refused("u", ip))
            self.throttle.failed("u", ip, known_user=True)
        self.assertEqual([e[:2] for e in self.events.events], [("account_block", "u")])

    def test_known_address_keeps_logging_in(self) -> None:
        """After 10 failures from A lock u, u may still log in from B (a recent success) but not from a new C."""
        self.throttle.succeeded("u", "192.0.2.2")  # B
        self.clock.advance(3600)
        self.lock_from("198.51.100.1")  # A
        self.assertTrue(self.throttle.refused("u", "198.51.100.1"), "A is refused")
        self.assertTrue(self.throttle.refused("u", "203.0.113.3"), "a new address C is refused")
        self.assertFalse(self.throttle.refused("u", "192.0.2.2"), "B is not")
        self.assertFalse(self.throttle.refused("U", "192.0.2.2"), "usernames compare case-insensitively")
        self.assertFalse(self.throttle.refused("other", "203.0.113.3"), "other usernames are not locked")
        self.throttle.succeeded("u", "192.0.2.2")
        self.assertTrue(self.throttle.refused("u", "203.0.113.3"), "a success from B does not lift the lock for others")

    def test_known_address_keeps_ip_limit(self) -> None:
        """B is still locked by its own failures (per-IP limit), and they do not lock u for other addresses."""
        self.throttle.succeeded("u", "192.0.2.2")
        for _ in range(10):
            self.assertFalse(self.throttle.refused("u", "192.0.2.2"))
            self.throttle.failed("u", "192.0.2.2", known_user=True)
        self.assertTrue(self.throttle.refused("u", "192.0.2.2"))
        self.assertTrue(self.throttle.refused("someone", "192.0.2.2"))
        self.assertFalse(self.throttle.refused("u", "203.0.113.3"))
        self.assertEqual(self.events.events, [])

    def test_known_address_no_user_delay(self) -> None:
        """Failures for u from elsewhere do not slow down answers to B; B's own failures do."""
        self.throttle.succeeded("u", "192.0.2.2")
        first = self.throttle.failure_delay("u", "192.0.2.2")
        for _ in range(5):
            self.throttle.failed("u", "198.51.100.1", known_user=True)
        self.assertGreater(self.throttle.failure_delay("u", "203.0.113.3"), first)
        self.assertEqual(self.throttle.failure_delay("u", "192.0.2.2"), first)
        self.throttle.failed("u", "192.0.2.2", known_user=True)
        self.assertGreater(self.throttle.failure_delay("u", "192.0.2.2"), first)

    def test_expires_after_24_hours(self) -> None:
        """A success more than 24 hours ago no longer exempts the address; a newer one does again."""
        self.throttle.succeeded("u", "192.0.2.2")
        self.clock.advance(24 * 3600 - 500)
        self.lock_from("198.51.100.1")
        self.assertFalse(self.throttle.refused("u", "192.0.2.2"))
        self.clock.advance(500)  # the lock (900 s) still holds; the success is 24 h old
        self.assertTrue(self.throttle.refused("u", "192.0.2.2"))
        self.throttle.succeeded("u", "192.0.2.3")
        self.assertFalse(self.throttle.refused("u", "192.0.2.3"))

    def test_success_from_other_user_does_not_count(self) -> None:
        """Only u's own successes exempt an address from u's lock."""
        self.throttle.succeeded("v", "192.0.2.2")
        self.lock_from("198.51.100.1")
        self.assertTrue(self.throttle.refused("u", "192.0.2.2"))


class KnownAddressesMemoryTests(TestCase):
    """The known-address record stays bounded in entries and in time."""

    def setUp(self) -> None:
        self.clock = Clock()

    def test_expired_entries_go(self) -> None:
        """Entries older than the maximum age are dropped as new ones arrive."""
        known = KnownAddresses(self.clock, max_age=100)
        for i in range(50):
            known.add(f"user{i}", "192.0.2.1")
        self.assertEqual(len(known), 50)
        self.clock.advance(100)
        self.assertNotIn(("user0", "192.0.2.1"), known)
        known.add("fresh", "192.0.2.1")
        self.assertEqual(len(known), 1)

    def test_global_cap(self) -> None:
        """Beyond max_entries the least recently successful entry goes, and a refreshed one stays."""
        known = KnownAddresses(self.clock, max_entries=100)
        for i in range(100):
            known.add(f"user{i}", "192.0.2.1")
            self.clock.advance(1)
        known.add("user0", "192.0.2.1")  # refreshed: now the most recent
        for i in range(100, 150):
            known.add(f"user{i}", "192.0.2.1")
        self.assertEqual(len(known), 100)
        self.assertIn(("user0", "192.0.2.1"), known)
        self.assertNotIn(("user1", "192.0.2.1"), known)
        self.assertIn(("user149", "192.0.2.1"), known)

    def test_per_user_cap(self) -> None:
        """One user logging in from many addresses keeps only its most recent ones and evicts nobody else."""
        known = KnownAddresses(self.clock, max_entries=100, max_per_user=10)
        known.add("other", "198.51.100.1")
        for i in range(500):
            known.add("busy", f"10.0.{i // 256}.{i % 256}")
        self.assertEqual(len(known), 11)
        self.assertIn(("other", "198.51.100.1"), known)
        self.assertIn(("busy", "10.0.1.243"), known)
        self.assertNotIn(("busy", "10.0.1.233"), known)

    def test_default_bounds(self) -> None:
        """The throttle's record is capped at MAX_KNOWN entries over all users."""
        known = LoginThrottle(Clock(), SecurityConfig(10, 10, 900)).known
        for i in range(MAX_KNOWN + 50):
            known.add(f"user{i % 1000}", f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        self.assertEqual(len(known), MAX_KNOWN)
