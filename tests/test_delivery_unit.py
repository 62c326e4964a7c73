"""
Delivery assembled on fakes: the in-memory queue store, a relay that
answers as told, synchronous "threads" and a Clock.  Only the spool is real
(files in the test's directory); no socket, no database thread, no waiting.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
import dkim
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtpplus.config import config_from_text
from smtpplus.delivery.dkim import DKIMKeys, MemoryDKIMStore, StoredKey, dns_txt, generate_key
from smtpplus.delivery.interfaces import IRelay
from smtpplus.delivery.memory import MemoryQueueStore
from smtpplus.delivery.queue import NewMessage
from smtpplus.delivery.relay import HopOutcome, Relay
from smtpplus.delivery.service import PRUNE_INTERVAL, Delivery
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
    """A memory store whose load_for_attempts answers only when the test says, with the rows of that moment."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[tuple[list[str], Deferred[Any]]] = []
        self.slow = False

    def load_for_attempts(self, message_ids: list[str]) -> Deferred[Any]:
        if not self.slow:
            return super().load_for_attempts(message_ids)
        d: Deferred[Any] = Deferred()
        self.loads.append((message_ids, d))
        return d

    def answer_loads(self, found: bool = True) -> None:
        """Answer the waiting loads with the rows as they are now, or (C{found} false) as missing."""
        loads, self.loads = self.loads, []
        for message_ids, d in loads:
            if found:
                super().load_for_attempts(message_ids).chainDeferred(d)
            else:
                d.callback({})


class _SlowInserts(MemoryQueueStore):
    """A memory store whose inserts wait until the test lets them through."""

    def __init__(self) -> None:
        super().__init__()
        self.inserts: list[tuple[list[Any], float, Deferred[list[Any]]]] = []
        self.slow = False

    def insert(self, messages: list[Any], dedup_window: float = 0) -> Deferred[list[Any]]:
        if not self.slow:
            return super().insert(messages, dedup_window)
        d: Deferred[list[Any]] = Deferred()
        self.inserts.append((messages, dedup_window, d))
        return d

    def let_inserts_through(self) -> None:
        inserts, self.inserts = self.inserts, []
        for messages, dedup_window, d in inserts:
            super().insert(messages, dedup_window).chainDeferred(d)


class _OnFakes(unittest.TestCase):
    """Builds delivery on the fakes: memory store, a scripted relay, synchronous threads, a Clock."""

    def setUp(self) -> None:
        self.state_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.state_dir)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.recorder = Recorder()

    def _delivery(self, store: MemoryQueueStore, relay: _ScriptedRelay, retry: str = "[60]", extra: str = "") -> Delivery:
        config = config_from_text(
            f'[delivery]\nmode = "smarthost"\nsmarthost = "127.0.0.1:1"\nretry_schedule = {retry}\n{extra}'
        )
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


class DeliveryOnFakesTests(_OnFakes):
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
        [(messages, _, _)] = store.inserts
        message_id = messages[0].id
        self.assertTrue(os.path.exists(delivery.spool.path(message_id)))
        store.reset()
        store.slow = False
        self.assertEqual(store.rows, {})
        store.let_inserts_through()
        self.assertEqual(self.successResultOf(d), message_id)
        self.assertEqual(store.rows[message_id]["status"], "sent")
        self.assertEqual(len(relay.offered), 1)


class SubmissionOnFakesTests(_OnFakes):
    """Dedup in the committer, its pruning timer, and DKIM signing before the relay, on fakes."""

    def _commit(self, delivery: Delivery, message_id: str, header_message_id: str | None, header_from: str = "") -> Deferred[str]:
        data = f"From: {header_from}\r\nTo: r@dest.test\r\nSubject: s\r\nMessage-ID: {header_message_id}\r\n\r\nBody.\r\n"
        temp = delivery.spool.create(message_id)
        temp.write(data.encode())
        message = NewMessage(
            id=message_id, user="alice", mail_from="a@signed.test", header_from=header_from, subject="s", priority=3,
            recipients=("r@dest.test",), campaign_name=None, campaign_code=None, schedule_at=None, size=len(data),
            internal=False, created_at=self.clock.seconds(), header_message_id=header_message_id,
        )
        return delivery.committer.commit(temp, message)

    def test_duplicate_is_answered_with_the_first_id(self) -> None:
        """A resent message is answered with the first id; its spool file goes and it is never offered."""
        store, relay = MemoryQueueStore(), _ScriptedRelay(250)
        delivery = self._delivery(store, relay)
        delivery.start()
        self.assertEqual(self.successResultOf(self._commit(delivery, "FIRST", "<m@x>")), "FIRST")
        self.assertEqual(self.successResultOf(self._commit(delivery, "AGAIN", "<m@x>")), "FIRST")
        self.assertFalse(os.path.exists(delivery.spool.path("AGAIN")))
        self.assertNotIn("AGAIN", store.rows)
        self.assertEqual(store.rows["FIRST"]["duplicates"], 1)
        self.assertEqual(len(relay.offered), 1)

    def test_dedup_off(self) -> None:
        """With dedup_window = 0 a resent message is queued again."""
        store, relay = MemoryQueueStore(), _ScriptedRelay(250)
        delivery = self._delivery(store, relay, extra="dedup_window = 0\n")
        delivery.start()
        self.successResultOf(self._commit(delivery, "FIRST", "<m@x>"))
        self.assertEqual(self.successResultOf(self._commit(delivery, "AGAIN", "<m@x>")), "AGAIN")
        self.assertEqual(len(relay.offered), 2)

    def test_dedup_records_pruned_on_the_clock(self) -> None:
        """The pruning timer forgets the records older than the window, and only those."""
        store, relay = MemoryQueueStore(), _ScriptedRelay(250)
        delivery = self._delivery(store, relay, extra="dedup_window = 1000\n")
        delivery.start()
        self.successResultOf(self._commit(delivery, "OLD", "<old@x>"))
        self.clock.advance(PRUNE_INTERVAL)
        self.successResultOf(self._commit(delivery, "NEW", "<new@x>"))
        self.assertEqual(len(store.dedup), 2)
        self.clock.advance(PRUNE_INTERVAL)
        self.assertEqual([first for first, _ in store.dedup.values()], ["NEW"])
        delivery.stop_pruning()

    def _signing(self, key: StoredKey) -> tuple[MemoryQueueStore, _ScriptedRelay, Delivery]:
        dkim_store = MemoryDKIMStore()
        self.successResultOf(dkim_store.insert(key))
        store, relay = MemoryQueueStore(), _ScriptedRelay(250)
        delivery = self._delivery(store, relay)
        delivery.sign_with(DKIMKeys(dkim_store, self.clock, run_synchronously), run_synchronously)
        delivery.start()
        return store, relay, delivery

    def test_signed_before_relaying(self) -> None:
        """A message whose From: domain has an enabled key is offered with a DKIM-Signature first, which verifies."""
        key = generate_key("signed.test", "s1", "ed25519-sha256", NOW)
        store, relay, delivery = self._signing(key)
        self.successResultOf(self._commit(delivery, "M1", "<m@x>", "A <a@Signed.Test>"))
        [(_, _, content)] = relay.offered
        self.assertTrue(content.startswith(b"DKIM-Signature: "), content[:100])
        txt = dns_txt(key.algorithm, key.public_key).encode()
        self.assertTrue(dkim.verify(content, dnsfunc=lambda name, timeout=5: txt))

    def test_signing_failure_relays_unsigned(self) -> None:
        """A key that cannot sign: the message is relayed unsigned and ends sent."""
        key = attrs.evolve(generate_key("signed.test", "s1", "ed25519-sha256", NOW), private_key="bm90IGEga2V5")
        store, relay, delivery = self._signing(key)
        self.successResultOf(self._commit(delivery, "M1", "<m@x>", "a@signed.test"))
        [(_, _, content)] = relay.offered
        self.assertTrue(content.startswith(b"From: a@signed.test"))
        self.assertEqual(store.rows["M1"]["status"], "sent")


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
