"""Outbound delivery through a real smarthost and by MX, retries, bounces and events."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.names import authority, dns, server
from twisted.trial import unittest

from smtpplus.delivery import queue
from smtpplus.delivery import spool as spool_module
from tests.harness.messages import queue_id, simple_message
from tests.harness.polling import wait_until
from tests.harness.ports import free_port
from tests.harness.smarthost import Smarthost, parse
from tests.harness.stack import Stack, wall_clock
from tests.harness.tls import server_context


class SmarthostTests(unittest.TestCase):
    @inlineCallbacks
    def test_relayed_message_headers(self) -> Any:
        """The relayed message carries our Received first, X-Priority: <effective>, no X-SMTPAPI, and the body intact."""
        stack = Stack(self)
        data = simple_message(extra='X-SMTPAPI: {"Priority": 2}\r\nX-Priority: 5\r\n')
        code, text = yield stack.submit("me@example.com", ["rcpt@dest.test"], data)
        self.assertEqual(code, 250)
        message = yield stack.wait_status(queue_id(text), "sent")
        self.assertEqual(message["recipients"][0]["status"], "sent")
        self.assertEqual(message["recipients"][0]["attempts"], 1)
        self.assertIn("250", message["recipients"][0]["last_response"])
        [got] = stack.smarthost.received()
        self.assertEqual((got.mail_from, got.rcpt_tos), ("me@example.com", ["rcpt@dest.test"]))
        self.assertTrue(got.data.startswith(b"Received: from client.test"))
        self.assertNotIn(b"X-SMTPAPI", got.data)
        parsed = parse(got.data)
        self.assertEqual(parsed.get_all("X-Priority"), ["2"])
        self.assertIn(b"\r\n.dotted line\r\n", got.data)
        yield wait_until(lambda: not os.path.exists(stack.delivery.spool.path(queue_id(text))))
        results = [args[1] for name, args in stack.recorder.calls if name == "recipient_result"]
        self.assertEqual(results, ["sent"])

    @inlineCallbacks
    def test_large_message_intact(self) -> Any:
        """A message larger than the in-memory limit is spooled to a file and relayed byte for byte, dots included."""
        stack = Stack(self)
        lines = b"".join(b".%06d dotted line that the relay must stuff again\r\n" % n for n in range(8000))
        data = simple_message(extra="X-Big: yes\r\n") + lines
        self.assertGreater(len(data), 4 * spool_module.MEMORY_LIMIT)
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], data)
        self.assertEqual(code, 250, text)
        yield stack.wait_status(queue_id(text), "sent")
        [got] = stack.smarthost.received()
        self.assertTrue(got.data.endswith(lines), "body changed in transit")

    @inlineCallbacks
    def test_opportunistic_starttls(self) -> Any:
        """A smarthost offering STARTTLS (self-signed) gets the message over TLS in opportunistic mode."""
        smarthost = Smarthost(tls_context=server_context(self.mktemp()))
        self.addCleanup(smarthost.stop)
        stack = Stack(self, smarthost=smarthost)
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], simple_message())
        yield stack.wait_status(queue_id(text), "sent")
        self.assertTrue(smarthost.received()[0].tls)

    @inlineCallbacks
    def test_required_tls_unavailable(self) -> Any:
        """smarthost_tls = "required" towards a server without STARTTLS defers and records one send_problem."""
        stack = Stack(self, delivery='smarthost_tls = "required"')
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], simple_message())
        message = yield stack.wait_status(queue_id(text), "deferred")
        self.assertIn("TLS", message["recipients"][0]["last_response"])
        self.assertEqual(stack.smarthost.received(), [])
        self.assertEqual(len(stack.recorder.of("send_problem")), 1)

    @inlineCallbacks
    def test_smarthost_auth(self) -> Any:
        """With smarthost_username/password set, the relay authenticates to the smarthost before sending."""
        from aiosmtpd.smtp import AuthResult, LoginPassword

        logins: list[tuple[bytes, bytes]] = []

        def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
            ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"relayuser", b"relaypass")
            logins.append((data.login, data.password))
            return AuthResult(success=ok)

        smarthost = Smarthost(authenticator=authenticator, auth_require_tls=False)
        self.addCleanup(smarthost.stop)
        stack = Stack(self, smarthost=smarthost, delivery='smarthost_username = "relayuser"\nsmarthost_password = "relaypass"')
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], simple_message())
        yield stack.wait_status(queue_id(text), "sent")
        self.assertEqual(logins, [(b"relayuser", b"relaypass")])

    @inlineCallbacks
    def test_retry_then_success(self) -> Any:
        """A 451 defers the recipient; the retry comes after retry_schedule, not before, and succeeds (attempts 2)."""
        stack = Stack(self, delivery="retry_schedule = [60]", clock=wall_clock())
        stack.smarthost.replies["r@dest.test"] = ["451 4.3.0 try later", "250 2.1.5 OK"]
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], simple_message())
        message_id = queue_id(text)
        deferred = yield stack.wait_status(message_id, "deferred")
        self.assertEqual(deferred["recipients"][0]["status"], "deferred")
        self.assertIn("451", deferred["recipients"][0]["last_response"])
        yield stack.settled()
        stack.clock.advance(59)
        self.assertEqual(stack.delivery.scheduler.started, 1)
        yield stack.next_attempt(1)
        sent = yield stack.wait_status(message_id, "sent")
        self.assertEqual(sent["recipients"][0]["attempts"], 2)
        self.assertEqual(len(stack.smarthost.received()), 1)

    @inlineCallbacks
    def test_permanent_failure_bounces_with_dsn(self) -> Any:
        """A 550 bounces the recipient; an RFC 3464 DSN from <> reaches the envelope sender; the message is partial."""
        stack = Stack(self)
        stack.smarthost.replies["bad@dest.test"] = ["550 5.1.1 no such user"]
        code, text = yield stack.submit("me@example.com", ["good@dest.test", "bad@dest.test"], simple_message())
        message_id = queue_id(text)
        message = yield stack.wait_status(message_id, "partial")
        statuses = {r["address"]: r["status"] for r in message["recipients"]}
        self.assertEqual(statuses, {"good@dest.test": "sent", "bad@dest.test": "bounced"})
        yield wait_until(lambda: len(stack.smarthost.received()) == 2)
        dsn = stack.smarthost.received()[1]
        self.assertEqual((dsn.mail_from, dsn.rcpt_tos), ("", ["me@example.com"]))
        report = parse(dsn.data)
        self.assertEqual(report.get_content_type(), "multipart/report")
        self.assertEqual(report.get_param("report-type"), "delivery-status")
        self.assertIn(b"Final-Recipient: rfc822; bad@dest.test", dsn.data)
        self.assertIn(b"Status: 5.1.1", dsn.data)
        bounces = stack.recorder.of("bounce")
        self.assertEqual([(e[1], e[2]) for e in bounces], [("alice", message_id)])

    @inlineCallbacks
    def test_bounce_never_bounces(self) -> Any:
        """A null-sender message that fails permanently gets no DSN of its own."""
        stack = Stack(self)
        stack.smarthost.replies["gone@example.com"] = ["550 5.1.1 gone"]
        message_id = yield stack.submit_internal("", ["gone@example.com"], b"Subject: dsn\r\n\r\nx\r\n")
        yield stack.wait_status(message_id, "bounced")
        messages = yield stack.query.list_messages(None, None, 10)
        self.assertEqual(len(messages), 1)

    @inlineCallbacks
    def test_expiry_bounces(self) -> Any:
        """
        A recipient still deferred at max_queue_lifetime bounces with 4.4.7
        and a DSN; the last retry is brought forward to the deadline.
        """
        stack = Stack(self, delivery="retry_schedule = [60]\nmax_queue_lifetime = 100", clock=wall_clock())
        stack.smarthost.replies["slow@dest.test"] = ["451 4.3.0 busy"]
        message_id = yield stack.attempted(["slow@dest.test"], "deferred")
        yield stack.next_attempt(60)
        message = yield stack.message(message_id)
        self.assertEqual((message["status"], message["recipients"][0]["attempts"]), ("deferred", 2))
        yield stack.next_attempt(40)
        message = yield stack.wait_status(message_id, "bounced")
        self.assertIn("4.4.7", message["recipients"][0]["last_response"])
        self.assertEqual(message["recipients"][0]["attempts"], 3)
        yield wait_until(lambda: any(m.mail_from == "" for m in stack.smarthost.received()))

    @inlineCallbacks
    def test_delivery_delay_event_once(self) -> Any:
        """
        A delivery still failing once delivery_delay_threshold has passed
        records exactly one delivery_delay event, none before.
        """
        stack = Stack(self, delivery="retry_schedule = [60]", notifications_threshold=100, clock=wall_clock())
        stack.smarthost.replies["slow@dest.test"] = ["451 4.3.0 busy"]
        message_id = yield stack.attempted(["slow@dest.test"], "deferred")
        yield stack.next_attempt(60)
        self.assertEqual(stack.recorder.of("delivery_delay"), [])
        yield stack.next_attempt(60)
        yield stack.next_attempt(60)
        message = yield stack.message(message_id)
        self.assertEqual(message["recipients"][0]["attempts"], 4)
        delays = stack.recorder.of("delivery_delay")
        self.assertEqual([(e[1], e[2]) for e in delays], [("alice", message_id)])

    @inlineCallbacks
    def test_next_hop_outage_one_send_problem(self) -> Any:
        """Connection refused defers every message but records one send_problem per outage; success ends it."""
        dead = Smarthost()
        dead.stop()
        stack = Stack(self, smarthost=dead, clock=wall_clock())
        ids = []
        for n in range(2):
            code, text = yield stack.submit("me@example.com", [f"r{n}@dest.test"], simple_message())
            ids.append(queue_id(text))
        for message_id in ids:
            message = yield stack.wait_status(message_id, "deferred")
            self.assertIn("connection", message["recipients"][0]["last_response"])
        self.assertEqual(len(stack.recorder.of("send_problem")), 1)
        self.assertEqual(stack.delivery.agent.outages, {stack.config.delivery.smarthost})

    @inlineCallbacks
    def test_recovery_after_crash(self) -> Any:
        """Messages left 'sending' by a crash are delivered after restart; partial temp files are removed."""
        first = Stack(self, start=False)
        code, text = yield first.submit("me@example.com", ["r@dest.test"], simple_message())
        message_id = queue_id(text)
        first.database.run_sync(lambda c: c.execute("UPDATE queue_messages SET status = 'sending'"))
        with open(os.path.join(first.delivery.spool.tmp_dir, "PARTIAL"), "wb") as f:
            f.write(b"Subject: half")
        yield first.listener.stopListening()
        first.database.stop()
        second = Stack(self, smarthost=first.smarthost, state_dir=first.state_dir)
        self.assertEqual(os.listdir(second.delivery.spool.tmp_dir), [])
        yield second.wait_status(message_id, "sent")
        self.assertEqual(len(second.smarthost.received()), 1)


class _MemoryAuthority(authority.FileAuthority):
    def __init__(self, records: dict[bytes, list[Any]]) -> None:
        authority.FileAuthority.__init__(self, None)
        soa = dns.Record_SOA(mname=b"ns.test", rname=b"admin.test", serial=1, ttl=60)
        self.soa = (b"test", soa)
        self.records = {b"test": [soa], **records}


class MXTests(unittest.TestCase):
    def _dns(self, records: dict[bytes, list[Any]]) -> int:
        factory = server.DNSServerFactory(authorities=[_MemoryAuthority(records)])
        protocol = dns.DNSDatagramProtocol(factory)
        port = free_port()
        udp = reactor.listenUDP(port, protocol, interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        return port

    @inlineCallbacks
    def test_mx_routing(self) -> Any:
        """In MX mode each domain goes to its best MX (by preference) found through [delivery] dns_servers."""
        stack_smarthost = Smarthost()
        self.addCleanup(stack_smarthost.stop)
        port = self._dns(
            {
                b"dest.test": [dns.Record_MX(20, b"backup.dest.test"), dns.Record_MX(10, b"mx.dest.test")],
                b"mx.dest.test": [dns.Record_A("127.0.0.1")],
                b"backup.dest.test": [dns.Record_A("127.0.0.2")],
                b"nomx.test": [dns.Record_A("127.0.0.1")],
            }
        )
        from smtpplus.delivery.relay import Relay
        from tests.harness.stack import make_config

        config = make_config("unused", f'mode = "mx"\ndns_servers = ["127.0.0.1:{port}"]')
        relay = Relay(reactor, reactor, config.delivery, "relay.test", mx_port=stack_smarthost.port)
        stack = Stack(self, smarthost=stack_smarthost, delivery=f'mode = "mx"\ndns_servers = ["127.0.0.1:{port}"]', relay=relay)
        code, text = yield stack.submit("me@example.com", ["a@dest.test", "b@nomx.test", "c@missing.test"], simple_message())
        self.assertEqual(code, 250)
        message = yield stack.wait_status(queue_id(text), "partial")
        statuses = {r["address"]: r["status"] for r in message["recipients"]}
        self.assertEqual(statuses, {"a@dest.test": "sent", "b@nomx.test": "sent", "c@missing.test": "bounced"})
        self.assertIn("5.1.2", message["recipients"][2]["last_response"])
        got = sorted(tuple(m.rcpt_tos) for m in stack_smarthost.received() if m.mail_from)
        self.assertEqual(got, [("a@dest.test",), ("b@nomx.test",)])


class StateWriterTests(unittest.TestCase):
    @inlineCallbacks
    def test_changes_share_transactions(self) -> Any:
        """State changes made while a batch commits are committed together in the next one."""
        from smtpplus.storage.database import Database

        database = Database(reactor, os.path.join(os.path.abspath(self.mktemp()) + ".db"))
        self.addCleanup(database.stop)
        store = queue.SQLiteQueueStore(database)
        store.migrate()
        messages = [
            queue.NewMessage(f"M{n}", "u", "a@b.c", "", "", 3, ("x@y.z",), None, None, None, 1, False, 0.0) for n in range(50)
        ]
        database.run_sync(queue.insert_messages, messages)
        writer = queue.StateWriter(store)
        yield gatherResults([writer.write(queue.MarkSending(f"M{n}", 1.0)) for n in range(50)])
        self.assertLessEqual(writer.batches, 2)
        statuses = database.run_sync(lambda c: {r[0] for r in c.execute("SELECT status FROM queue_messages")})
        self.assertEqual(statuses, {"sending"})

    def test_finished_before_its_start_was_written(self) -> None:
        """
        An attempt that ends while its MarkSending still waits for a batch
        drops that write: the message goes from queued to sent, and the
        MarkSending's Deferred fires; one already committed stays.
        """
        from smtpplus.delivery.memory import MemoryQueueStore

        class HeldStore(MemoryQueueStore):
            """Holds each write_state batch until released."""

            def __init__(self) -> None:
                super().__init__()
                self.held: list[Deferred[Any]] = []
                self.written: list[list[Any]] = []

            def write_state(self, changes: list[Any]) -> Deferred[Any]:
                self.written.append(list(changes))
                d: Deferred[Any] = Deferred()
                self.held.append(d)
                return d.addCallback(lambda _: MemoryQueueStore.write_state(self, changes))

        store = HeldStore()
        new = [queue.NewMessage(f"M{n}", "u", "a@b.c", "", "", 3, ("x@y.z",), None, None, None, 1, False, 0.0) for n in (1, 2)]
        self.successResultOf(store.insert(new))
        writer = queue.StateWriter(store)
        # M1's start goes into the first batch at once; M2's waits behind it.
        first = writer.write(queue.MarkSending("M1", 1.0))
        waiting = writer.write(queue.MarkSending("M2", 1.0))
        finished = [
            writer.write(queue.FinishAttempt(queue.as_row(m), "sent", None, [], False, 2.0)) for m in new
        ]
        self.assertIsNone(self.successResultOf(waiting))
        store.held[0].callback(None)
        store.held[1].callback(None)
        self.assertIsNone(self.successResultOf(first))
        for d in finished:
            self.assertIsNone(self.successResultOf(d))
        kinds = [[type(c).__name__ + ":" + (c.message_id if isinstance(c, queue.MarkSending) else c.message["id"]) for c in batch] for batch in store.written]
        self.assertEqual(kinds, [["MarkSending:M1"], ["FinishAttempt:M1", "FinishAttempt:M2"]])
        self.assertEqual(self.successResultOf(store.statuses(["M1", "M2"])), {"M1": "sent", "M2": "sent"})

    def test_refused_change_fails_alone(self) -> None:
        """A change the store refuses fails its own Deferred with that error; the others are written."""
        from smtpplus.delivery.memory import MemoryQueueStore, QueueStoreError

        store = MemoryQueueStore()
        new = [queue.NewMessage(f"M{n}", "u", "a@b.c", "", "", 3, ("x@y.z",), None, None, None, 1, False, 0.0) for n in (1, 3)]
        self.successResultOf(store.insert(new))
        broken = queue.as_row(queue.NewMessage("M2", "u", "a@b.c", "", "", 3, ("x@y.z", "w@y.z"), None, None, None, 1, False, 0.0))
        broken["recipients"][1]["idx"] = 0
        writer = queue.StateWriter(store)
        first = writer.write(queue.MarkSending("M1", 1.0))
        refused = writer.write(queue.FinishAttempt(broken, "sent", None, [], False, 1.0))
        last = writer.write(queue.MarkSending("M3", 1.0))
        self.assertIsNone(self.successResultOf(first))
        self.failureResultOf(refused, QueueStoreError)
        self.assertIsNone(self.successResultOf(last))
        self.assertEqual(self.successResultOf(store.statuses(["M1", "M2", "M3"])), {"M1": "sending", "M3": "sending"})
