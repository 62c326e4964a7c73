"""
Delivery assembled on fakes: the in-memory queue store, a relay that
answers as told, synchronous "threads" and a Clock.  Only the spool is real
(files in the test's directory); no socket, no database thread, no waiting.
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtpplus.config import config_from_text
from smtpplus.delivery.interfaces import IRelay
from smtpplus.delivery.memory import MemoryQueueStore
from smtpplus.delivery.relay import HopOutcome, Relay
from smtpplus.delivery.service import Delivery
from smtpplus.delivery.threads import run_synchronously
from tests.delivery_helpers import Recorder

NOW = 1_700_000_000.0


@implementer(IRelay)
class _ScriptedRelay:
    """Answers every recipient with the next code of C{codes} (the last repeats) and records what it was offered."""

    def __init__(self, *codes: int) -> None:
        self.codes = list(codes) or [250]
        self.offered: list[tuple[str, list[str], bytes]] = []

    def send(self, mail_from: str, recipients: list[str], path: str, content: bytes | None = None, length: int | None = None) -> Deferred[list[HopOutcome]]:
        if content is None:
            with open(path, "rb") as f:
                content = f.read(length)
        self.offered.append((mail_from, list(recipients), content))
        code = self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]
        return succeed([HopOutcome("smarthost", {r: (code, f"{code // 100}.0.0 scripted") for r in recipients})])

    def close(self) -> Deferred[None]:
        return succeed(None)


class DeliveryOnFakesTests(unittest.TestCase):
    def setUp(self) -> None:
        self.state_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.state_dir)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.recorder = Recorder()

    def _delivery(self, store: MemoryQueueStore, relay: _ScriptedRelay, retry: str = "[60]") -> Delivery:
        config = config_from_text(f'[delivery]\nmode = "smarthost"\nsmarthost = "127.0.0.1:1"\nretry_schedule = {retry}\n')
        delivery = Delivery(
            config.delivery,
            hostname="relay.test",
            state_dir=self.state_dir,
            delay_threshold=3600,
            clock=self.clock,
            run_in_thread=run_synchronously,
            connector=None,  # type: ignore[arg-type]  # the scripted relay connects nowhere
            store=store,
            events=self.recorder,
            stats=self.recorder,
            relay=relay,
        )
        delivery.recover()
        return delivery

    def _submit(self, delivery: Delivery, recipients: tuple[str, ...] = ("r@dest.test",)) -> str:
        d = delivery.submit_internal("me@example.com", list(recipients), b"Subject: unit\r\n\r\nbody\r\n", 2, "alice")
        return self.successResultOf(d)

    def test_relay_provides_interface(self) -> None:
        """The real relay provides IRelay."""
        config = config_from_text('[delivery]\nmode = "smarthost"\nsmarthost = "127.0.0.1:1"\n')
        self.assertTrue(verifyObject(IRelay, Relay(self.clock, None, config.delivery, "relay.test")))  # type: ignore[arg-type]

    def test_retry_on_the_clock(self) -> None:
        """A deferred recipient is offered again when the clock reaches its retry time, and the message ends sent."""
        store, relay = MemoryQueueStore(), _ScriptedRelay(451, 250)
        delivery = self._delivery(store, relay)
        delivery.start()
        message_id = self._submit(delivery)
        self.assertEqual(store.rows[message_id]["status"], "deferred")
        self.assertEqual(store.rows[message_id]["next_attempt"], NOW + 60)
        self.clock.advance(59)
        self.assertEqual(len(relay.offered), 1)
        self.clock.advance(1)
        self.assertEqual(len(relay.offered), 2)
        row = store.rows[message_id]
        self.assertEqual((row["status"], row["recipients"][0]["attempts"]), ("sent", 2))
        self.assertFalse(os.path.exists(delivery.spool.path(message_id)))

    def test_reset_store_is_rebuilt_from_the_spool(self) -> None:
        """
        When the store loses its rows, every accepted spool file is queued
        again from its envelope record (user, sender, recipients,
        priority) and delivered once.
        """
        store, relay = MemoryQueueStore(), _ScriptedRelay(250)
        delivery = self._delivery(store, relay)
        message_id = self._submit(delivery, ("a@dest.test", "b@dest.test"))
        store.reset()
        row = store.rows[message_id]
        self.assertEqual(
            (row["user"], row["mail_from"], row["priority"], row["status"]), ("alice", "me@example.com", 2, "queued")
        )
        self.assertEqual([r["address"] for r in row["recipients"]], ["a@dest.test", "b@dest.test"])
        delivery.start()
        self.assertEqual([(f, r) for f, r, _ in relay.offered], [("me@example.com", ["a@dest.test", "b@dest.test"])])
        self.assertEqual(store.rows[message_id]["status"], "sent")

    def test_spool_file_without_row_is_queued_at_start(self) -> None:
        """At start-up, an accepted file that no queue row knows (the database was lost) is queued again and delivered."""
        first = self._delivery(MemoryQueueStore(), _ScriptedRelay())
        message_id = self._submit(first)
        store, relay = MemoryQueueStore(), _ScriptedRelay(250)
        second = self._delivery(store, relay)
        self.assertEqual(store.rows, {})
        second.start()
        self.assertEqual(store.rows[message_id]["status"], "sent")
        self.assertEqual(relay.offered[0][2], b"Subject: unit\r\n\r\nbody\r\n")

    def test_finished_file_is_removed_at_start(self) -> None:
        """At start-up, a file whose message is finished (its removal was cut short) is removed, not sent again."""
        store, relay = MemoryQueueStore(), _ScriptedRelay(250)
        delivery = self._delivery(store, relay)
        delivery.start()
        message_id = self._submit(delivery)
        self.assertEqual(store.rows[message_id]["status"], "sent")
        os.rename(os.path.join(self.state_dir, "spool", "free", message_id), delivery.spool.path(message_id))
        again = _ScriptedRelay(250)
        self._delivery(store, again).start()
        self.assertEqual(again.offered, [])
        self.assertFalse(os.path.exists(delivery.spool.path(message_id)))

