"""
Storage that misbehaves: results that cannot be stored, a database lost or
replaced, spool files that outlive their queue rows, addresses that cannot
be written for the next hop, and file modes.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from smtpplus.delivery import queue
from smtpplus.delivery import spool as spool_module
from smtpplus.delivery.agent import DeliveryAgent
from smtpplus.delivery.memory import MemoryQueueStore
from smtpplus.delivery.relay import HopOutcome, wire_address
from smtpplus.delivery.scheduler import Job, Scheduler
from smtpplus.delivery.spool import EnvelopeError, Spool, envelope_record
from smtpplus.delivery.threads import run_synchronously
from smtpplus.storage.database import Database, DatabaseLost
from tests.harness.messages import queue_id, simple_message
from tests.harness.polling import wait_until
from tests.harness.stack import Stack, wall_clock


def _message(message_id: str = "M1", recipients: tuple[str, ...] = ("a@dest.test", "b@dest.test")) -> queue.NewMessage:
    return queue.NewMessage(
        id=message_id,
        user="alice",
        mail_from="me@example.com",
        header_from="Me <me@example.com>",
        subject="Grüße",
        priority=2,
        recipients=recipients,
        campaign_name="spring",
        campaign_code="C7",
        schedule_at=None,
        size=100,
        internal=False,
        created_at=1000.0,
    )


class _Logged:
    """Collects log events of one level for the length of a test."""

    def __init__(self, testcase: unittest.TestCase, level: str) -> None:
        self.events: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_level") is not None and event["log_level"].name == level:
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        testcase.addCleanup(globalLogPublisher.removeObserver, observe)


class _FlakyStore(MemoryQueueStore):
    """A memory queue store whose state writes fail (disk full) while C{failing} is set."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False
        self.failed_writes = 0

    def write_state(self, changes: list[Any]) -> Deferred[list[BaseException | None]]:
        if self.failing:
            self.failed_writes += 1
            return fail(sqlite3.OperationalError("database or disk is full"))
        return super().write_state(changes)


class _CountingRelay:
    """Accepts every recipient and counts the messages offered."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[str]]] = []

    def send(self, mail_from: str, recipients: list[str], path: str, content: Any = None, length: Any = None) -> Deferred[Any]:
        self.sent.append((mail_from, list(recipients)))
        return succeed([HopOutcome("smarthost", {r: (250, "2.0.0 OK") for r in recipients})])


class _HeldWrites(MemoryQueueStore):
    """A memory queue store whose state writes are committed only when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[list[Any], Deferred[list[BaseException | None]]]] = []

    def write_state(self, changes: list[Any]) -> Deferred[list[BaseException | None]]:
        d: Deferred[list[BaseException | None]] = Deferred()
        self.held.append((changes, d))
        return d

    def commit(self) -> None:
        """Commit the writes held, and those they let start, until none waits."""
        while self.held:
            held, self.held = self.held, []
            for changes, d in held:
                super().write_state(changes).chainDeferred(d)


def _queued(
    testcase: unittest.TestCase,
    clock: Clock,
    store: MemoryQueueStore,
    relay: _CountingRelay,
    slots: int,
    messages: list[queue.NewMessage],
) -> tuple[DeliveryAgent, Scheduler]:
    """C{messages} stored and queued, fresh, for an agent driven by a scheduler of C{slots} slots (not started)."""
    testcase.successResultOf(store.insert(messages))
    agent = DeliveryAgent(
        clock, run_synchronously, store, Spool(os.path.abspath(testcase.mktemp())), relay, None, None,
        [60], 86400, 3600, "relay.test", lambda *a: fail(Exception()),
    )
    scheduler = Scheduler(clock, agent.deliver, slots)
    agent.slots = scheduler
    for seq, message in enumerate(messages, 1):
        agent.remember(message, b"Subject: x\r\n\r\nbody\r\n")
        scheduler.add(Job(message.id, message.priority, seq, message.user))
    return agent, scheduler


class SlotTests(unittest.TestCase):
    def test_next_hop_not_idle_while_results_are_recorded(self) -> None:
        """
        With max_concurrency = 1, the second message goes to the next hop
        while the first one's result waits for its commit: the slot bounds
        transfers, not bookkeeping.
        """
        store, relay = _HeldWrites(), _CountingRelay()
        _, scheduler = _queued(self, Clock(), store, relay, 1, [_message("M1"), _message("M2")])
        scheduler.start()
        self.assertEqual(len(relay.sent), 2)
        self.assertEqual(set(scheduler.in_flight), {"M1", "M2"})
        self.assertEqual(scheduler.holding, set())
        store.commit()
        self.assertEqual(scheduler.in_flight, {})
        statuses = self.successResultOf(store.statuses(["M1", "M2"]))
        self.assertEqual(statuses, {"M1": "sent", "M2": "sent"})


    def test_sending_only_with_a_slot(self) -> None:
        """
        A message's status is "sending" once its attempt talks to the next
        hop; an attempt waiting for the slot leaves its message "queued".
        """
        store = MemoryQueueStore()
        relay = _HeldRelay()
        _, scheduler = _queued(self, Clock(), store, relay, 1, [_message("M1"), _message("M2")])  # type: ignore[arg-type]
        scheduler.start()
        self.assertEqual(set(scheduler.in_flight), {"M1", "M2"})
        self.assertEqual(self.successResultOf(store.statuses(["M1", "M2"])), {"M1": "sending", "M2": "queued"})
        relay.answer()
        self.assertEqual(self.successResultOf(store.statuses(["M1", "M2"])), {"M1": "sent", "M2": "sending"})
        relay.answer()
        self.assertEqual(self.successResultOf(store.statuses(["M1", "M2"])), {"M1": "sent", "M2": "sent"})


class _HeldRelay:
    """Accepts every recipient, each message only when the test says so."""

    def __init__(self) -> None:
        self.held: list[tuple[list[str], Deferred[Any]]] = []

    def send(self, mail_from: str, recipients: list[str], path: str, content: Any = None, length: Any = None) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.held.append((list(recipients), d))
        return d

    def answer(self) -> None:
        recipients, d = self.held.pop(0)
        d.callback([HopOutcome("smarthost", {r: (250, "2.0.0 OK") for r in recipients})])


class UnstoredResultTests(unittest.TestCase):
    def test_result_kept_until_stored_and_never_sent_again(self) -> None:
        """
        A delivery whose result cannot be stored (disk full) is made once:
        the result is written again with a growing delay until the store
        recovers, the scheduler does not offer the message meanwhile, the
        outage is logged once (a result still unstored at shutdown is named),
        and the stored result is the real one.
        """
        clock = Clock()
        store = _FlakyStore()
        message = _message()
        self.successResultOf(store.insert([message]))
        relay = _CountingRelay()
        spool = Spool(os.path.abspath(self.mktemp()))
        agent = DeliveryAgent(
            clock, run_synchronously, store, spool, relay, None, None, [60], 86400, 3600, "relay.test",
            lambda *a: fail(Exception()),
        )
        scheduler = Scheduler(clock, agent.deliver, 5)
        errors = _Logged(self, "error")

        store.failing = True
        agent.remember(message, b"Subject: x\r\n\r\nbody\r\n")
        scheduler.add(Job(message.id, message.priority, 1, message.user))
        scheduler.start()
        for _ in range(20):
            clock.advance(30)
        self.assertEqual(len(relay.sent), 1)
        self.assertIn(message.id, scheduler.in_flight)
        self.assertIn("a@dest.test sent", agent.unrecorded[message.id])
        self.assertGreater(store.failed_writes, 5)
        self.assertEqual(len([e for e in errors.events if "cannot store delivery results" in e["log_format"]]), 1)
        # Were the daemon stopped now, the log would name the result it loses.
        agent.report_unrecorded()
        self.assertEqual([e["id"] for e in errors.events if "was never stored" in e["log_format"]], [message.id])

        store.failing = False
        clock.advance(60)
        self.assertEqual(scheduler.in_flight, {})
        self.assertEqual(agent.unrecorded, {})
        stored = self.successResultOf(store.load_message(message.id))
        self.assertEqual(stored["status"], "sent")
        self.assertEqual([(r["status"], r["attempts"]) for r in stored["recipients"]], [("sent", 1), ("sent", 1)])
        for _ in range(10):
            clock.advance(60)
        self.assertEqual(len(relay.sent), 1)

    def test_slots_held_while_results_cannot_be_stored(self) -> None:
        """
        Once the store failed a write (here the first attempt's "sending"
        mark), each attempt keeps its slot until its result is stored: with
        max_concurrency = 2 and ten messages, two deliveries are made, not
        ten; when the store is back, every message is delivered once.
        """
        store, relay = _FlakyStore(), _CountingRelay()
        messages = [_message(f"M{n}") for n in range(10)]
        clock = Clock()
        agent, scheduler = _queued(self, clock, store, relay, 2, messages)
        _Logged(self, "error")
        store.failing = True
        scheduler.start()
        for _ in range(10):
            clock.advance(30)
        self.assertEqual(len(relay.sent), 2)
        self.assertEqual(len(agent.unrecorded), 2)
        store.failing = False
        for _ in range(10):
            clock.advance(60)
        self.assertEqual(len(relay.sent), 10)
        self.assertEqual(scheduler.in_flight, {})
        statuses = self.successResultOf(store.statuses([m.id for m in messages]))
        self.assertEqual(set(statuses.values()), {"sent"})

    def test_held_results_retry_at_once_when_the_store_is_back(self) -> None:
        """
        Once the store works again (a new database was opened), a held
        result is written at once instead of sleeping out its backoff.
        """
        clock = Clock()
        store = _FlakyStore()
        message = _message()
        self.successResultOf(store.insert([message]))
        agent = DeliveryAgent(
            clock, run_synchronously, store, Spool(os.path.abspath(self.mktemp())), _CountingRelay(), None, None,
            [60], 86400, 3600, "relay.test", lambda *a: fail(Exception()),
        )
        scheduler = Scheduler(clock, agent.deliver, 5)
        _Logged(self, "error")
        store.failing = True
        agent.remember(message, b"Subject: x\r\n\r\nbody\r\n")
        scheduler.add(Job(message.id, message.priority, 1, message.user))
        scheduler.start()
        for _ in range(10):
            clock.advance(30)
        self.assertIn(message.id, agent.unrecorded)
        store.failing = False
        agent.wake_held_results()
        self.assertEqual(agent.unrecorded, {})
        self.assertEqual(scheduler.in_flight, {})


class EnvelopeRecordTests(unittest.TestCase):
    def setUp(self) -> None:
        self.spool = Spool(os.path.abspath(self.mktemp()))

    def _commit(self, message: queue.NewMessage, data: bytes) -> str:
        temp = self.spool.create(message.id)
        temp.write(data)
        temp.envelope = message
        self.assertEqual(self.spool.make_durable([temp]), [None])
        return self.spool.path(message.id)

    def test_small_message_round_trip(self) -> None:
        """A spool file holds the message then its envelope; the relay reads only the message."""
        data = b"Subject: hi\r\n\r\nbody\r\n"
        path = self._commit(_message(), data)
        self.assertEqual(self.spool.read_small("M1"), (data, len(data)))
        self.assertEqual(queue.NewMessage.from_envelope("M1", self.spool.read_envelope(path)), _message())

    def test_record_keeps_the_message_id(self) -> None:
        """
        The envelope record keeps the Message-ID that dedup compares, so a
        message queued again from its file keeps it; a record written
        before it was kept reads as None.
        """
        message = attrs.evolve(_message(), header_message_id="<1@example.com>")
        path = self._commit(message, b"Subject: hi\r\n\r\nbody\r\n")
        self.assertEqual(queue.NewMessage.from_envelope("M1", self.spool.read_envelope(path)), message)
        old = envelope_record(_message()).replace(b', "header_message_id": null', b"")
        self.assertNotIn(b"header_message_id", old)
        old = old[: old.rindex(b"\n", 0, -1)]
        path = self.spool.path("OLD")
        with open(path, "wb") as f:
            f.write(b"Subject: x\r\n\r\n" + old + b"\n%010d smtpplus-envelope-1\n" % len(old))
        self.assertIsNone(self.spool.read_envelope(path).header_message_id)

    def test_large_message_length(self) -> None:
        """A message over the memory limit is read from the file up to its own length."""
        data = b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 2000
        self.assertGreater(len(data), spool_module.MEMORY_LIMIT)
        path = self._commit(_message(), data)
        content, length = self.spool.read_small("M1")
        self.assertIsNone(content)
        self.assertEqual(length, len(data))
        with open(path, "rb") as f:
            self.assertEqual(f.read(length), data)
        self.assertEqual(self.spool.read_envelope(path).recipients, ("a@dest.test", "b@dest.test"))

    def test_reused_file_is_cut_to_size(self) -> None:
        """A file from free/ written over with a shorter message ends with that message's envelope."""
        self._commit(_message("M1", tuple(f"r{n}@dest.test" for n in range(200))), b"Subject: a\r\n\r\n" + b"y" * 5000 + b"\r\n")
        self.spool.remove(["M1"])
        path = self._commit(_message("M2"), b"Subject: b\r\n\r\nshort\r\n")
        self.assertEqual(self.spool.read_small("M2")[0], b"Subject: b\r\n\r\nshort\r\n")
        self.assertEqual(self.spool.read_envelope(path).recipients, ("a@dest.test", "b@dest.test"))

    def test_file_without_record(self) -> None:
        """A file of an earlier release is all message, and has no envelope to read."""
        path = self.spool.path("OLD")
        with open(path, "wb") as f:
            f.write(b"Subject: old\r\n\r\nbody\r\n")
        self.assertEqual(self.spool.read_small("OLD"), (b"Subject: old\r\n\r\nbody\r\n", 22))
        self.assertRaises(EnvelopeError, self.spool.read_envelope, path)

    def test_damaged_record(self) -> None:
        """A record that is not the JSON it should be is an EnvelopeError, not a crash."""
        record = envelope_record(_message())
        path = self.spool.path("BAD")
        with open(path, "wb") as f:
            f.write(b"Subject: x\r\n\r\n" + record.replace(b'"recipients"', b'"recipientz"'))
        self.assertRaises(EnvelopeError, self.spool.read_envelope, path)


class RecoveryTests(unittest.TestCase):
    @inlineCallbacks
    def test_spool_rebuilds_a_lost_database(self) -> Any:
        """
        At start-up, an accepted file without a queue row (the database was
        lost) is queued again from its envelope and delivered; a partial
        file in tmp/ is deleted; a file whose envelope cannot be read is
        moved to spool/corrupt/, never deleted.
        """
        first = Stack(self, start=False)
        data = simple_message(subject="survivor", extra='X-SMTPAPI: {"Priority": 1, "CampaignCode": "K9"}\r\n')
        code, text = yield first.submit("me@example.com", ["r1@dest.test", "r2@dest.test"], data)
        self.assertEqual(code, 250, text)
        message_id = queue_id(text)
        yield first.service.stopService()
        first.database.stop()
        state = first.state_dir
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(os.path.join(state, "smtpplus.db" + suffix)):
                os.unlink(os.path.join(state, "smtpplus.db" + suffix))
        with open(os.path.join(state, "spool", "tmp", "PARTIAL"), "wb") as f:
            f.write(b"Subject: never finished\r\n")
        with open(os.path.join(state, "spool", "msg", "NOENVELOPE"), "wb") as f:
            f.write(b"Subject: no record\r\n\r\nbody\r\n")
        warnings = _Logged(self, "warn")

        second = Stack(self, state_dir=state, smarthost=first.smarthost)
        message = yield second.wait_status(message_id, "sent")
        self.assertEqual((message["user"], message["priority"], message["campaign_code"]), ("alice", 1, "K9"))
        self.assertEqual(message["subject"], "survivor")
        self.assertEqual([r["attempts"] for r in message["recipients"]], [1, 1])
        [got] = first.smarthost.received()
        self.assertEqual(sorted(got.rcpt_tos), ["r1@dest.test", "r2@dest.test"])
        self.assertTrue(got.data.endswith(b".dotted line\r\n"), got.data[-200:])
        self.assertNotIn(b"smtpplus-envelope", got.data)
        self.assertEqual(os.listdir(os.path.join(state, "spool", "tmp")), [])
        self.assertEqual(os.listdir(os.path.join(state, "spool", "corrupt")), ["NOENVELOPE"])
        requeued = [e for e in warnings.events if e.get("id") == message_id and "queued again" in e["log_format"]]
        self.assertEqual(len(requeued), 1)

    @inlineCallbacks
    def test_finished_file_is_not_queued_again(self) -> Any:
        """A file left behind by a finished message (its removal was cut short) is removed, not delivered again."""
        first = Stack(self)
        code, text = yield first.submit("me@example.com", ["r@dest.test"], simple_message())
        message_id = queue_id(text)
        yield first.wait_status(message_id, "sent")
        yield wait_until(lambda: not os.path.exists(first.delivery.spool.path(message_id)))
        yield first.service.stopService()
        first.database.stop()
        # Put the finished file back, as if the daemon died before removing it.
        free = os.path.join(first.state_dir, "spool", "free", message_id)
        os.rename(free, first.delivery.spool.path(message_id))
        second = Stack(self, state_dir=first.state_dir, smarthost=first.smarthost)
        yield wait_until(lambda: not os.path.exists(second.delivery.spool.path(message_id)))
        self.assertEqual(len(first.smarthost.received()), 1)


class LostDatabaseTests(unittest.TestCase):
    @inlineCallbacks
    def test_removed_file_refuses_then_recovers(self) -> Any:
        """
        A database file removed under the running daemon: the next message
        gets 451 4.3.0, the daemon opens a new file by itself, queues again
        what the spool holds, and delivers it once; new mail is accepted
        again.
        """
        stack = Stack(self, start=False, clock=wall_clock())
        code, text = yield stack.submit("me@example.com", ["held@dest.test"], simple_message(subject="held"))
        self.assertEqual(code, 250, text)
        held = queue_id(text)
        reopened: list[bool] = []
        stack.database.on_reopen(lambda: reopened.append(True))
        os.unlink(stack.database.path)

        code, text = yield stack.submit("me@example.com", ["refused@dest.test"], simple_message(subject="refused"))
        self.assertEqual((code, text.split()[0]), (451, "4.3.0"))
        yield wait_until(lambda: reopened)
        self.assertTrue(os.path.exists(stack.database.path))
        message = yield wait_until(lambda: stack.message(held))
        self.assertEqual(message["recipients"][0]["address"], "held@dest.test")

        stack.start()
        code, text = yield stack.submit("me@example.com", ["after@dest.test"], simple_message(subject="after"))
        self.assertEqual(code, 250, text)
        yield stack.wait_status(held, "sent")
        yield stack.wait_status(queue_id(text), "sent")
        subjects = sorted(m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in stack.smarthost.received())
        self.assertEqual(subjects, [b"after", b"held"])

    def test_write_checks_the_file(self) -> Any:
        """A write batch on a database whose file was replaced fails with DatabaseLost."""
        path = os.path.abspath(self.mktemp())
        database = Database(reactor, path)
        self.addCleanup(database.stop)
        database.migrate(queue.COMPONENT, queue.MIGRATIONS)
        os.rename(path, path + ".old")
        with open(path, "wb"):
            pass
        d = database.write(lambda conn: conn.execute("SELECT 1"))
        return self.assertFailure(d, DatabaseLost)


class AddressTests(unittest.TestCase):
    def test_wire_address(self) -> None:
        """Unicode domains go out as A-labels; a non-ASCII local part or a bad name cannot be written."""
        self.assertEqual(wire_address("user@bücher.example"), "user@xn--bcher-kva.example")
        self.assertEqual(wire_address("plain@dest.test"), "plain@dest.test")
        self.assertEqual(wire_address(""), "")
        self.assertRaises(ValueError, wire_address, "jörg@dest.test")
        self.assertRaises(ValueError, wire_address, "x@" + "ü" * 64 + ".test")

    @inlineCallbacks
    def test_unicode_addresses_queued_earlier(self) -> Any:
        """
        A message queued with a Unicode domain is relayed to its A-label; a
        recipient that cannot be written fails for good with the reason
        while the others are delivered.
        """
        stack = Stack(self)
        message_id = yield stack.submit_internal(
            "", ["user@bücher.example", "jörg@dest.test", "ok@dest.test"], b"Subject: idn\r\n\r\nbody\r\n"
        )
        message = yield stack.wait_status(message_id, "partial")
        statuses = {r["address"]: (r["status"], r["last_response"].split()[:2]) for r in message["recipients"]}
        self.assertEqual(
            statuses,
            {
                "user@bücher.example": ("sent", ["250", "2.0.0"]),
                "jörg@dest.test": ("bounced", ["553", "5.6.7"]),
                "ok@dest.test": ("sent", ["250", "2.0.0"]),
            },
        )
        [got] = stack.smarthost.received()
        self.assertEqual(sorted(got.rcpt_tos), ["ok@dest.test", "user@xn--bcher-kva.example"])


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class ModeTests(unittest.TestCase):
    @inlineCallbacks
    def test_private_files(self) -> Any:
        """
        Whatever mode the state directory's contents had, the database, its
        WAL files and the spool are 0600 files in 0700 directories.
        """
        state = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(state, "spool", "msg"), mode=0o755)
        os.chmod(state, 0o755)
        with open(os.path.join(state, "smtpplus.db"), "wb"):
            pass
        os.chmod(os.path.join(state, "smtpplus.db"), 0o644)
        with open(os.path.join(state, "spool", "msg", "OLDFILE"), "wb") as f:
            f.write(b"Subject: old\r\n\r\nbody\r\n")
        os.chmod(os.path.join(state, "spool", "msg", "OLDFILE"), 0o644)
        stack = Stack(self, state_dir=state, start=False)
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], simple_message())
        self.assertEqual(code, 250, text)
        for name in ("smtpplus.db", "smtpplus.db-wal", "smtpplus.db-shm"):
            self.assertEqual(oct(_mode(os.path.join(state, name))), oct(0o600), name)
        for name in ("spool", "spool/msg", "spool/tmp", "spool/free", "spool/corrupt"):
            self.assertEqual(oct(_mode(os.path.join(state, name))), oct(0o700), name)
        for name in os.listdir(os.path.join(state, "spool", "corrupt")) + os.listdir(os.path.join(state, "spool", "msg")):
            where = "msg" if os.path.exists(os.path.join(state, "spool", "msg", name)) else "corrupt"
            self.assertEqual(oct(_mode(os.path.join(state, "spool", where, name))), oct(0o600), name)
        self.assertIn(queue_id(text), os.listdir(os.path.join(state, "spool", "msg")))
