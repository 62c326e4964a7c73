"""Reuse of outbound connections: one session carries consecutive messages."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from twisted.trial import unittest

from smtpplus.delivery import client
from tests.harness.messages import queue_id, simple_message
from tests.harness.polling import wait_until
from tests.harness.smarthost import Smarthost
from tests.harness.stack import Stack, wall_clock
from tests.harness.tls import server_context


@inlineCallbacks
def _send_one(stack: Stack, recipients: list[str], status: str = "sent") -> Any:
    code, text = yield stack.submit("me@example.com", recipients, simple_message())
    assert code == 250, text
    message = yield stack.wait_status(queue_id(text), status)
    return message


class ReuseTests(unittest.TestCase):
    @inlineCallbacks
    def test_consecutive_messages_share_a_connection(self) -> Any:
        """Messages sent one after the other to the smarthost travel over one connection."""
        stack = Stack(self)
        for n in range(4):
            yield _send_one(stack, [f"r{n}@dest.test"])
        self.assertEqual(len(stack.smarthost.received()), 4)
        self.assertEqual(stack.smarthost.connections(), 1)
        self.assertEqual(stack.delivery.relay.pool.connections_opened, 1)

    @inlineCallbacks
    def test_per_recipient_results_on_a_reused_connection(self) -> Any:
        """
        On one connection, a message whose recipients are all refused (then
        RSET) is followed by a partly refused one and a clean one; each
        recipient gets its own result.
        """
        stack = Stack(self)
        stack.smarthost.replies["bad@dest.test"] = ["550 5.1.1 no such user"]
        stack.smarthost.replies["busy@dest.test"] = ["451 4.2.0 busy"]
        first = yield _send_one(stack, ["bad@dest.test"], "bounced")
        self.assertIn("550", first["recipients"][0]["last_response"])
        # The DSN for bad@ goes out next, on the same connection.
        yield wait_until(lambda: len(stack.smarthost.received()) == 1)
        second = yield _send_one(stack, ["good@dest.test", "busy@dest.test"], "deferred")
        statuses = {r["address"]: r["status"] for r in second["recipients"]}
        self.assertEqual(statuses, {"good@dest.test": "sent", "busy@dest.test": "deferred"})
        yield _send_one(stack, ["other@dest.test"])
        rcpts = [tuple(m.rcpt_tos) for m in stack.smarthost.received()]
        self.assertEqual(rcpts, [("me@example.com",), ("good@dest.test",), ("other@dest.test",)])
        self.assertEqual(stack.smarthost.connections(), 1)

    @inlineCallbacks
    def test_reuse_keeps_tls(self) -> Any:
        """In opportunistic mode, the reused connection stays the STARTTLS one: every message goes over TLS."""
        smarthost = Smarthost(tls_context=server_context(self.mktemp()))
        self.addCleanup(smarthost.stop)
        stack = Stack(self, smarthost=smarthost)
        for n in range(3):
            yield _send_one(stack, [f"r{n}@dest.test"])
        self.assertEqual([m.tls for m in smarthost.received()], [True, True, True])
        self.assertEqual(smarthost.connections(), 1)

    @inlineCallbacks
    def test_max_messages_per_connection(self) -> Any:
        """After max_messages messages a connection is retired and a new one opened."""
        stack = Stack(self)
        stack.delivery.relay.pool.max_messages = 2
        for n in range(3):
            yield _send_one(stack, [f"r{n}@dest.test"])
        self.assertEqual(stack.smarthost.connections(), 2)

    @inlineCallbacks
    def test_idle_connection_closed(self) -> Any:
        """An idle connection is closed after IDLE_SECONDS, not before; the next message opens a new one."""
        stack = Stack(self, clock=wall_clock())
        yield _send_one(stack, ["r0@dest.test"])
        pool = stack.delivery.relay.pool
        stack.clock.advance(client.IDLE_SECONDS - 0.1)
        yield _send_one(stack, ["r1@dest.test"])
        self.assertEqual(pool.connections_opened, 1)
        stack.clock.advance(client.IDLE_SECONDS)
        yield wait_until(lambda: not pool._all, timeout=5)
        yield _send_one(stack, ["r2@dest.test"])
        self.assertEqual(pool.connections_opened, 2)
        self.assertEqual(stack.smarthost.connections(), 2)

    @inlineCallbacks
    def test_server_times_out_idle_connection(self) -> Any:
        """A smarthost that drops an idle session (421 timeout) costs nothing: the next message is sent at once."""
        smarthost = Smarthost(timeout=0.2)
        self.addCleanup(smarthost.stop)
        # On a clock that stands still, only the smarthost can end the session.
        stack = Stack(self, smarthost=smarthost, clock=wall_clock())
        yield _send_one(stack, ["r0@dest.test"])
        yield wait_until(lambda: not stack.delivery.relay.pool._all, timeout=5)
        message = yield _send_one(stack, ["r1@dest.test"])
        self.assertEqual(message["recipients"][0]["attempts"], 1)
        self.assertEqual(smarthost.connections(), 2)


class _Hangup(LineReceiver):
    """A minimal SMTP server that accepts one message per connection, then hangs up at the next MAIL."""

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.messages = 0
        self.in_data = False
        self.sendLine(b"220 hangup.test ESMTP")

    def lineReceived(self, line: bytes) -> None:
        if self.in_data:
            if line == b".":
                self.in_data = False
                self.messages += 1
                self.factory.delivered += 1
                self.sendLine(b"250 2.0.0 queued")
            return
        verb = line[:4].upper()
        if verb == b"MAIL" and self.messages:
            self.transport.loseConnection()
        elif verb == b"DATA":
            self.in_data = True
            self.sendLine(b"354 go on")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        elif verb == b"EHLO":
            self.sendLine(b"250 hangup.test")
        else:
            self.sendLine(b"250 ok")


class BrokenReuseTests(unittest.TestCase):
    @inlineCallbacks
    def test_reused_connection_dropped_before_data(self) -> Any:
        """
        A kept connection the server drops when the next MAIL arrives is
        not a delivery failure: the message goes out at once on a fresh
        connection, in the same attempt.
        """
        factory = Factory.forProtocol(_Hangup)
        factory.connections = 0
        factory.delivered = 0
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        stack = Stack(self, delivery=f'mode = "smarthost"\nsmarthost = "127.0.0.1:{port.getHost().port}"\nsmarthost_tls = "none"')
        yield _send_one(stack, ["r0@dest.test"])
        second = yield _send_one(stack, ["r1@dest.test"])
        self.assertEqual(second["recipients"][0]["attempts"], 1)
        self.assertEqual((factory.connections, factory.delivered), (2, 2))


class _Pipelining(LineReceiver):
    """
    An SMTP server offering PIPELINING that answers a MAIL/RCPT/DATA group
    only once its DATA has arrived: a client waiting for each reply in turn
    would wait forever.
    """

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.in_data = False
        self.group: list[bytes] = []
        self.mail_ok = False
        self.accepted: list[str] = []
        self.lines: list[bytes] = []
        self.sendLine(b"220 pipe.test ESMTP")

    def lineReceived(self, line: bytes) -> None:
        if self.in_data:
            if line == b".":
                self.in_data = False
                self.factory.messages.append((self.accepted, b"\r\n".join(self.lines)))
                self.sendLine(b"250 2.0.0 queued")
            else:
                self.lines.append(line)
            return
        verb = line[:4].upper()
        if verb == b"EHLO":
            self.sendLine(b"250-pipe.test\r\n250 PIPELINING")
        elif verb == b"MAIL":
            sender = line.partition(b"<")[2].partition(b">")[0].decode()
            self.mail_ok = sender not in self.factory.refused_senders
            self.accepted = []
            self.group = [b"250 2.1.0 ok" if self.mail_ok else b"550 5.7.1 sender refused"]
        elif verb == b"RCPT":
            address = line.partition(b"<")[2].partition(b">")[0].decode()
            reply = self.factory.replies.get(address, b"250 2.1.5 ok") if self.mail_ok else b"503 5.5.1 no MAIL"
            if reply.startswith(b"2"):
                self.accepted.append(address)
            self.group.append(reply)
        elif verb == b"DATA":
            if self.mail_ok and self.accepted:
                self.in_data = True
                self.lines = []
                self.group.append(b"354 go on")
            else:
                self.group.append(b"554 5.5.1 no valid recipients")
            self.transport.write(b"".join(reply + b"\r\n" for reply in self.group))
        elif verb == b"RSET":
            self.factory.rsets += 1
            self.sendLine(b"250 2.0.0 ok")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"502 5.5.2 unknown")


class PipeliningTests(unittest.TestCase):
    def _server(self) -> tuple[Factory, str]:
        factory = Factory.forProtocol(_Pipelining)
        factory.connections = 0
        factory.rsets = 0
        factory.messages = []
        factory.replies = {}
        factory.refused_senders = set()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return factory, f'mode = "smarthost"\nsmarthost = "127.0.0.1:{port.getHost().port}"\nsmarthost_tls = "none"'

    @inlineCallbacks
    def test_pipelined_per_recipient_results(self) -> Any:
        """
        To a server offering PIPELINING, MAIL, RCPT and DATA go out as one
        group; each recipient still gets its own result, and consecutive
        messages share the connection without an RSET between them.
        """
        factory, delivery = self._server()
        factory.replies = {"busy@dest.test": b"451 4.2.0 busy", "bad@dest.test": b"550 5.1.1 no such user"}
        stack = Stack(self, delivery=delivery)
        first = yield _send_one(stack, ["good@dest.test", "busy@dest.test", "bad@dest.test"], "deferred")
        results = {r["address"]: (r["status"], r["last_response"]) for r in first["recipients"]}
        self.assertEqual(results["good@dest.test"], ("sent", "250 2.0.0 queued"))
        self.assertEqual(results["busy@dest.test"], ("deferred", "451 4.2.0 busy"))
        self.assertEqual(results["bad@dest.test"], ("bounced", "550 5.1.1 no such user"))
        yield _send_one(stack, ["other@dest.test"])
        # The bounce for bad@ goes out too; all on one connection.
        yield wait_until(lambda: len(factory.messages) == 3)
        data = next(data for rcpts, data in factory.messages if rcpts == ["good@dest.test"])
        self.assertTrue(data.startswith(b"Received: "), data[:40])
        # Sent in one write, still dot-stuffed (this server does not unstuff).
        self.assertIn(b"\r\nSubject: hello\r\n", data)
        self.assertTrue(data.endswith(b"\r\nBody line one.\r\n..dotted line"), data[-40:])
        self.assertIn(["other@dest.test"], [rcpts for rcpts, _ in factory.messages])
        self.assertEqual((factory.connections, factory.rsets), (1, 0))

    @inlineCallbacks
    def test_pipelined_refused_sender_then_reset(self) -> Any:
        """
        A MAIL refused within a pipelined group bounces every recipient
        with that reply; the connection is RSET and carries the next message.
        """
        factory, delivery = self._server()
        factory.refused_senders = {"nobody@example.com"}
        stack = Stack(self, delivery=delivery)
        code, text = yield stack.submit("nobody@example.com", ["a@dest.test", "b@dest.test"], simple_message())
        self.assertEqual(code, 250, text)
        refused = yield stack.wait_status(queue_id(text), "bounced")
        self.assertEqual(
            [r["last_response"] for r in refused["recipients"]], ["550 5.7.1 sender refused", "550 5.7.1 sender refused"]
        )
        yield _send_one(stack, ["c@dest.test"])
        self.assertIn(["c@dest.test"], [rcpts for rcpts, _ in factory.messages])
        self.assertGreaterEqual(factory.rsets, 1)
        self.assertEqual(factory.connections, 1)


class _Silent(LineReceiver):
    """An SMTP server that greets, then never answers a command."""

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.sendLine(b"220 silent.test ESMTP")

    def lineReceived(self, line: bytes) -> None:
        self.factory.lines.append(line)


class ReplyTimeoutTests(unittest.TestCase):
    @inlineCallbacks
    def test_server_that_stops_answering(self) -> Any:
        """
        A next hop that stops answering is given up after REPLY_TIMEOUT on
        delivery's clock, not before: the recipient is deferred with the
        reason and the connection closed.
        """
        factory = Factory.forProtocol(_Silent)
        factory.connections = 0
        factory.lines = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        delivery = f'mode = "smarthost"\nsmarthost = "127.0.0.1:{port.getHost().port}"\nsmarthost_tls = "none"'
        stack = Stack(self, delivery=delivery, clock=wall_clock())
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], simple_message())
        self.assertEqual(code, 250, text)
        yield wait_until(lambda: factory.lines)
        stack.clock.advance(client.REPLY_TIMEOUT - 1)
        self.assertEqual(len(stack.delivery.scheduler.in_flight), 1)
        stack.clock.advance(1)
        message = yield stack.wait_status(queue_id(text), "deferred")
        self.assertIn("Timeout", message["recipients"][0]["last_response"])
        yield wait_until(lambda: not stack.delivery.relay.pool._all)
        self.assertEqual(factory.connections, 1)
