"""
The per-user policies of contract section 8 on delivery assembled from
fakes (memory queue, event and suppression stores, a scripted relay,
synchronous "threads", a Clock; the spool is real): the suppression list
at RCPT and after hard bounces, sandbox users, and the priority budget.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import implementer

from smtpplus.config import config_from_text
from smtpplus.delivery.interfaces import IRelay
from smtpplus.delivery.memory import MemoryQueueStore
from smtpplus.delivery.relay import HopOutcome
from smtpplus.delivery.service import Delivery
from smtpplus.delivery.spool import MEMORY_LIMIT
from smtpplus.delivery.suppressions import MemorySuppressionList
from smtpplus.delivery.threads import run_synchronously
from smtpplus.model import Suppression, User
from smtpplus.notify.events import MemoryEventStore
from smtpplus.smtp.interfaces import Envelope, SessionInfo, SMTPReply
from tests.harness.fakes import Recorder
from tests.harness.messages import simple_message
from tests.harness.stack import USER

NOW = 1_764_547_200.0  # 2025-12-01T00:00:00Z
SESSION = SessionInfo("127.0.0.1", 25, "client.test", False)


@implementer(IRelay)
class _Relay:
    """Answers each recipient as C{replies} says (default 250), as a next hop or as the daemon's own verdict."""

    def __init__(self, replies: dict[str, tuple[int, str]] | None = None, local: bool = False) -> None:
        self.replies = replies or {}
        self.local = local
        self.offered: list[list[str]] = []

    def send(
        self, mail_from: str, recipients: list[str], path: str, content: bytes | None = None, length: int | None = None
    ) -> Deferred[list[HopOutcome]]:
        self.offered.append(list(recipients))
        results = {r: self.replies.get(r, (250, "2.0.0 ok")) for r in recipients}
        return succeed([HopOutcome("smarthost:25", results, local=self.local)])

    def close(self) -> Deferred[None]:
        return succeed(None)


class PolicyTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.state_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.state_dir)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = MemoryQueueStore()
        self.events = MemoryEventStore(self.clock)
        self.stats = Recorder()
        self.suppressions = MemorySuppressionList()
        self.relay = _Relay()

    def delivery(self, extra: str = "") -> Delivery:
        config = config_from_text(f'[delivery]\nmode = "smarthost"\nsmarthost = "127.0.0.1:1"\n{extra}')
        delivery = Delivery(
            config.delivery,
            hostname="relay.test",
            state_dir=self.state_dir,
            delay_threshold=3600,
            clock=self.clock,
            run_in_thread=run_synchronously,
            connector=None,  # type: ignore[arg-type]  # the scripted relay connects nowhere
            store=self.store,
            events=self.events,
            stats=self.stats,
            relay=self.relay,
            suppressions=self.suppressions,
        )
        delivery.recover()
        return delivery

    def send(
        self, delivery: Delivery, user: User = USER, data: bytes | None = None, recipients: Sequence[str] = ("r@dest.test",)
    ) -> Deferred[str]:
        """One SMTP transaction through the user's avatar: MAIL, RCPTs (each must pass), DATA; the final dot's Deferred."""
        submitter = delivery.avatar(user)
        submitter.validateFrom(SESSION, "me@example.com", None)
        for recipient in recipients:
            self.successResultOf(maybeDeferred(submitter.validateTo, SESSION, "me@example.com", recipient))
        envelope = Envelope(SESSION, "me@example.com", tuple(recipients), None, "7BIT", b"Received: x\r\n")
        writer = submitter.openMessage(envelope)
        writer.write(simple_message() if data is None else data)
        return writer.eomReceived()

    def stored_bytes(self, delivery: Delivery, message_id: str) -> bytes:
        _, length = delivery.spool.read_small(message_id)
        with open(delivery.spool.path(message_id), "rb") as f:
            return f.read(length)


class SuppressionTests(PolicyTestCase):
    def test_suppressed_recipient_refused_at_rcpt(self) -> None:
        """RCPT TO a suppressed address fails with 550 5.1.1 and counts one rejection; other users may still send to it."""
        self.suppressions.add("alice", "gone@dest.test", "550 5.1.1 No such user", NOW)
        delivery = self.delivery()
        submitter = delivery.avatar(USER)
        submitter.validateFrom(SESSION, "me@example.com", None)
        failure = self.failureResultOf(maybeDeferred(submitter.validateTo, SESSION, "me@example.com", "GONE@dest.test"))
        reply = failure.value
        self.assertIsInstance(reply, SMTPReply)
        self.assertEqual((reply.code, reply.status), (550, "5.1.1"))
        self.assertIn("Recipient suppressed since 2025-12-01", reply.text)
        self.assertEqual(self.stats.rejections(), [("alice", "me@example.com", "", None)])
        self.successResultOf(maybeDeferred(submitter.validateTo, SESSION, "me@example.com", "here@dest.test"))
        bob = delivery.avatar(User("bob", authorized_domains=["example.com"]))
        self.successResultOf(maybeDeferred(bob.validateTo, SESSION, "me@example.com", "gone@dest.test"))

    def test_hard_bounce_suppresses(self) -> None:
        """A recipient the next hop refuses with 5xx joins the sender's list, with the reply as reason; a 4xx does not."""
        self.relay.replies = {"gone@dest.test": (550, "5.1.1 No such user here"), "later@dest.test": (451, "4.3.0 later")}
        delivery = self.delivery()
        delivery.start()
        self.successResultOf(self.send(delivery, recipients=("gone@dest.test", "later@dest.test", "ok@dest.test")))
        self.assertEqual(
            self.successResultOf(self.suppressions.list("alice")),
            [Suppression("gone@dest.test", "550 5.1.1 No such user here", NOW)],
        )

    def test_local_refusal_and_expiry_do_not_suppress(self) -> None:
        """The daemon's own permanent verdicts and the lifetime bounce suppress nothing."""
        self.relay.replies = {"gone@dest.test": (553, "5.6.7 Recipient address refused")}
        self.relay.local = True
        delivery = self.delivery('max_queue_lifetime = 60\nretry_schedule = [30]\n')
        delivery.start()
        self.successResultOf(self.send(delivery, recipients=("gone@dest.test",)))
        self.relay.local = False
        self.relay.replies = {"slow@dest.test": (451, "4.3.0 later")}
        message_id = self.successResultOf(self.send(delivery, recipients=("slow@dest.test",)))
        self.clock.advance(30)
        self.clock.advance(30)
        self.assertEqual(self.store.rows[message_id]["status"], "bounced")
        self.assertEqual(self.successResultOf(self.suppressions.list("alice")), [])

    def test_switched_off(self) -> None:
        """With suppress_hard_bounces = false a hard bounce adds nothing (hand-made entries still apply)."""
        self.relay.replies = {"gone@dest.test": (550, "5.1.1 No such user here")}
        delivery = self.delivery("suppress_hard_bounces = false\n")
        delivery.start()
        self.successResultOf(self.send(delivery, recipients=("gone@dest.test",)))
        self.assertEqual(self.successResultOf(self.suppressions.list("alice")), [])


class SandboxTests(PolicyTestCase):
    def test_sandbox_message_finishes_sandboxed_unrelayed(self) -> None:
        """A sandbox user's message is queued, never offered to the relay, ends sandboxed, and its file is removed."""
        delivery = self.delivery()
        delivery.start()
        user = attrs.evolve(USER, sandbox=True)
        message_id = self.successResultOf(self.send(delivery, user, recipients=("a@dest.test", "b@dest.test")))
        row = self.store.rows[message_id]
        self.assertEqual(row["status"], "sandboxed")
        self.assertEqual([r["status"] for r in row["recipients"]], ["sandboxed", "sandboxed"])
        self.assertEqual(self.relay.offered, [])
        self.assertFalse(os.path.exists(delivery.spool.path(message_id)))
        calls = [(name, args[0]["recipients"] if name == "accepted" else args[1]) for name, args in self.stats.calls]
        self.assertEqual(calls, [("accepted", 2)])

    def test_scheduled_sandbox_message_waits_for_its_time(self) -> None:
        """A sandbox message scheduled by X-SMTPAPI stays scheduled until its time, then ends sandboxed."""
        delivery = self.delivery()
        delivery.start()
        data = simple_message(extra=f'X-SMTPAPI: {{"Schedule": {int(NOW) + 600}}}\r\n')
        message_id = self.successResultOf(self.send(delivery, attrs.evolve(USER, sandbox=True), data))
        self.assertEqual(self.store.rows[message_id]["status"], "scheduled")
        self.clock.advance(600)
        self.assertEqual(self.store.rows[message_id]["status"], "sandboxed")
        self.assertEqual(self.relay.offered, [])

    def test_ordinary_user_relayed(self) -> None:
        """A user without the flag is relayed as before."""
        delivery = self.delivery()
        delivery.start()
        message_id = self.successResultOf(self.send(delivery))
        self.assertEqual(self.store.rows[message_id]["status"], "sent")
        self.assertEqual(self.relay.offered, [["r@dest.test"]])


class PriorityBudgetTests(PolicyTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.user = attrs.evolve(USER, priority=1, priority_budget=2)
        self.delivery_ = self.delivery()

    def send_urgent(self, size: int = 0) -> tuple[str, bytes]:
        data = simple_message(extra="X-Pad: " + "p" * size + "\r\n" if size else "")
        message_id = self.successResultOf(self.send(self.delivery_, self.user, data))
        return message_id, self.stored_bytes(self.delivery_, message_id)

    def test_over_budget_goes_at_two_with_one_event(self) -> None:
        """
        Past the budget within the hour a message is queued at priority 2
        with X-Priority: 2 written in it, and one priority_budget event is
        recorded for the hour however many are demoted.
        """
        for _ in range(2):
            message_id, content = self.send_urgent()
            self.assertEqual(self.store.rows[message_id]["priority"], 1)
            self.assertIn(b"\r\nX-Priority: 1\r\n", content)
        for _ in range(2):
            message_id, content = self.send_urgent()
            self.assertEqual(self.store.rows[message_id]["priority"], 2)
            self.assertIn(b"\r\nX-Priority: 2\r\n", content)
            self.assertNotIn(b"X-Priority: 1", content)
        events = self.successResultOf(self.events.list_events("priority_budget", None, None))
        self.assertEqual([(e["user"], e["type"]) for e in events], [("alice", "priority_budget")])
        self.assertIn("more than 2 messages", events[0]["detail"])

    def test_rolling_hour(self) -> None:
        """Once the budget's messages are an hour old, priority 1 is back; a new hour over budget has a new event."""
        for _ in range(3):
            self.send_urgent()
        self.clock.advance(3601)
        message_id, _ = self.send_urgent()
        self.assertEqual(self.store.rows[message_id]["priority"], 1)
        self.send_urgent()
        message_id, _ = self.send_urgent()
        self.assertEqual(self.store.rows[message_id]["priority"], 2)
        self.assertEqual(len(self.successResultOf(self.events.list_events("priority_budget", "alice", None))), 2)

    def test_large_message_patched_on_disk(self) -> None:
        """A message spilled to disk during DATA gets its X-Priority changed in the file, nothing else."""
        for _ in range(2):
            self.send_urgent()
        message_id, content = self.send_urgent(size=MEMORY_LIMIT * 2)
        self.assertEqual(self.store.rows[message_id]["priority"], 2)
        self.assertIn(b"\r\nX-Priority: 2\r\n", content)
        self.assertIn(b"X-Pad: " + b"p" * (MEMORY_LIMIT * 2) + b"\r\n", content)

    def test_no_budget_or_lower_priority_untouched(self) -> None:
        """Budget 0 means no limit, and messages below priority 1 never ask the budget."""
        self.user = attrs.evolve(self.user, priority_budget=0)
        for _ in range(4):
            message_id, _ = self.send_urgent()
            self.assertEqual(self.store.rows[message_id]["priority"], 1)
        self.user = attrs.evolve(USER, priority=3, priority_budget=1)
        for _ in range(3):
            message_id, _ = self.send_urgent()
            self.assertEqual(self.store.rows[message_id]["priority"], 3)
        self.assertEqual(self.successResultOf(self.events.list_events("priority_budget", None, None)), [])

    def test_question_without_notification(self) -> None:
        """Asked with notify=False (a dry-run), the budget answers 2 past it and records no event."""
        for _ in range(2):
            self.send_urgent()
        intake = self.delivery_.intake
        self.assertEqual(self.successResultOf(intake.effective_priority("alice", 2, notify=False)), 2)
        self.assertEqual(self.successResultOf(intake.effective_priority("alice", 3, notify=False)), 1)
        self.assertEqual(self.successResultOf(self.events.list_events("priority_budget", None, None)), [])

    def test_store_failure_keeps_priority(self) -> None:
        """When the count cannot be read, the message keeps priority 1 rather than being refused."""

        def broken(user: str, since: float) -> Deferred[int]:
            raise OSError("database gone")

        self.store.count_urgent = broken  # type: ignore[method-assign]
        message_id, content = self.send_urgent()
        self.assertEqual(self.store.rows[message_id]["priority"], 1)
        self.assertIn(b"X-Priority: 1\r\n", content)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

