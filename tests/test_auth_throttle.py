"""Brute-force throttling of AUTH failures, on a fake clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from smtpplus.auth.throttle import MAX_DELAY, LoginThrottle
from smtpplus.config import SecurityConfig


class FakeEvents:
    """An in-memory IEventRecorder."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str | None, str | None, str]] = []

    def record(self, type: str, user: str | None, message_id: str | None, detail: str) -> Any:
        self.events.append((type, user, message_id, detail))
        return None


class ThrottleTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events = FakeEvents()
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
