"""Reuse of outbound connections: one session carries consecutive messages."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from twisted.trial import unittest

from smtpplus.delivery import client
from tests.delivery_helpers import FakeSmarthost, Stack, queue_id, simple_message, tls_context, wait_until


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
        rcpts = [tuple(m["rcpt_tos"]) for m in stack.smarthost.received()]
        self.assertEqual(rcpts, [("me@example.com",), ("good@dest.test",), ("other@dest.test",)])
        self.assertEqual(stack.smarthost.connections(), 1)

    @inlineCallbacks
    def test_reuse_keeps_tls(self) -> Any:
        """In opportunistic mode, the reused connection stays the STARTTLS one: every message goes over TLS."""
        smarthost = FakeSmarthost(tls_context=tls_context(self.mktemp()))
        self.addCleanup(smarthost.stop)
        stack = Stack(self, smarthost=smarthost)
        for n in range(3):
            yield _send_one(stack, [f"r{n}@dest.test"])
        self.assertEqual([m["tls"] for m in smarthost.received()], [True, True, True])
        self.assertEqual(smarthost.connections(), 1)

    @inlineCallbacks
    def test_max_messages_per_connection(self) -> Any:
        """After MAX_MESSAGES messages a connection is retired and a new one opened."""
        self.patch(client, "MAX_MESSAGES", 2)
        stack = Stack(self)
        for n in range(3):
            yield _send_one(stack, [f"r{n}@dest.test"])
        self.assertEqual(stack.smarthost.connections(), 2)

    @inlineCallbacks
    def test_idle_connection_closed(self) -> Any:
        """An idle connection is closed after IDLE_SECONDS; the next message opens a new one."""
        self.patch(client, "IDLE_SECONDS", 0.1)
        stack = Stack(self)
        yield _send_one(stack, ["r0@dest.test"])
        pool = stack.delivery.relay.pool
        yield wait_until(lambda: not pool._all, timeout=5)
        yield _send_one(stack, ["r1@dest.test"])
        self.assertEqual(stack.smarthost.connections(), 2)

    @inlineCallbacks
    def test_server_times_out_idle_connection(self) -> Any:
        """A smarthost that drops an idle session (421 timeout) costs nothing: the next message is sent at once."""
        smarthost = FakeSmarthost(timeout=0.2)
        self.addCleanup(smarthost.stop)
        stack = Stack(self, smarthost=smarthost)
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
