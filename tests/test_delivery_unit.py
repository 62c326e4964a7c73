"""
Delivery assembled on fakes: the in-memory queue store, a relay that
answers as told, synchronous "threads" and a Clock.  Only the spool is real
(files in the test's directory); no socket, no database thread, no waiting.
"""

from __future__ import annotations

import os
from typing import Any

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
from tests.harness.fakes import Recorder

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


class _SlowLoads(MemoryQueueStore):
    """A memory store whose load_message answers only when the test says, with the rows of that moment."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[tuple[str, Deferred[Any]]] = []
        self.slow = False

    def load_message(self, message_id: str) -> Deferred[Any]:
        if not self.slow:
            return super().load_message(message_id)
        d: Deferred[Any] = Deferred()
        self.loads.append((message_id, d))
        return d

    def answer_loads(self, found: bool = True) -> None:
        """Answer the waiting loads with the rows as they are now, or (C{found} false) as missing."""
        loads, self.loads = self.loads, []
        for message_id, d in loads:
            if found:
                super().load_message(message_id).chainDeferred(d)
            else:
                d.callback(None)


class _SlowInserts(MemoryQueueStore):
    """A memory store whose inserts wait until the test lets them through."""

    def __init__(self) -> None:
        super().__init__()
        self.inserts: list[tuple[list[Any], Deferred[list[int]]]] = []
        self.slow = False

    def insert(self, messages: list[Any]) -> Deferred[list[int]]:
        if not self.slow:
            return super().insert(messages)
        d: Deferred[list[int]] = Deferred()
        self.inserts.append((messages, d))
        return d

    def let_inserts_through(self) -> None:
        inserts, self.inserts = self.inserts, []
        for messages, d in inserts:
            super().insert(messages).chainDeferred(d)


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


    def test_reset_while_an_attempt_waits_for_its_row(self) -> None:
        """
        An attempt that asks for its row only after the store lost it does
        not keep the message from being queued again: it is delivered once,
        whether that attempt finds the row queued again or finds none.
        """
        self._reset_while_loading(found=True)
        self._reset_while_loading(found=False)

    def _reset_while_loading(self, found: bool) -> None:
        store, relay = _SlowLoads(), _ScriptedRelay(451, 250)
        delivery = self._delivery(store, relay)
        delivery.start()
        message_id = self._submit(delivery)
        store.slow = True
        self.clock.advance(60)
        self.assertEqual(delivery.agent.attempting, set())
        self.assertIn(message_id, delivery.scheduler.in_flight)
        store.reset()
        self.assertEqual(store.rows[message_id]["status"], "queued")
        store.slow = False
        store.answer_loads(found)
        self.assertEqual(len(relay.offered), 2)
        self.assertEqual(store.rows[message_id]["status"], "sent")
        self.assertEqual(delivery.scheduler.in_flight, {})
        self.clock.advance(3600)
        self.assertEqual(len(relay.offered), 2)

    def test_reset_during_an_attempt_holding_its_row(self) -> None:
        """An attempt holding its row when the store loses it writes the row back with its result: not queued twice."""
        store = MemoryQueueStore()
        relay = _PausedRelay()
        delivery = self._delivery(store, relay)  # type: ignore[arg-type]
        delivery.start()
        message_id = self._submit(delivery)
        self.assertEqual(delivery.agent.attempting, {message_id})
        store.reset()
        self.assertNotIn(message_id, store.rows)
        relay.answer(250)
        self.assertEqual(store.rows[message_id]["status"], "sent")
        self.assertEqual(relay.offers, 1)

    def test_reset_while_a_message_is_committed(self) -> None:
        """
        A message whose file is in the spool but whose row is still being
        written when the store loses its rows is left to its commit: it is
        queued once and its sender gets its queue id.
        """
        store, relay = _SlowInserts(), _ScriptedRelay(250)
        delivery = self._delivery(store, relay)
        delivery.start()
        store.slow = True
        d = delivery.submit_internal("me@example.com", ["r@dest.test"], b"Subject: unit\r\n\r\nbody\r\n", 2, "alice")
        [(messages, _)] = store.inserts
        message_id = messages[0].id
        self.assertTrue(os.path.exists(delivery.spool.path(message_id)))
        store.reset()
        store.slow = False
        self.assertEqual(store.rows, {})
        store.let_inserts_through()
        self.assertEqual(self.successResultOf(d), message_id)
        self.assertEqual(store.rows[message_id]["status"], "sent")
        self.assertEqual(len(relay.offered), 1)


@implementer(IRelay)
class _PausedRelay:
    """Holds each offer until the test answers it."""

    def __init__(self) -> None:
        self.offers = 0
        self.waiting: list[tuple[list[str], Deferred[list[HopOutcome]]]] = []

    def send(self, mail_from: str, recipients: list[str], path: str, content: bytes | None = None, length: int | None = None) -> Deferred[list[HopOutcome]]:
        self.offers += 1
        d: Deferred[list[HopOutcome]] = Deferred()
        self.waiting.append((list(recipients), d))
        return d

    def answer(self, code: int) -> None:
        waiting, self.waiting = self.waiting, []
        for recipients, d in waiting:
            d.callback([HopOutcome("smarthost", {r: (code, "scripted") for r in recipients})])

    def close(self) -> Deferred[None]:
        return succeed(None)
