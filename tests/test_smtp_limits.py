"""
Connection limits on real sockets, and draining sessions at shutdown.
"""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from smtpplus.smtp.protocol import SessionRegistry, SMTPServerFactory
from tests.harness.fakes import FakeLogin, session_settings
from tests.test_smtp_protocol import Dialogue


def read_until_closed(sock: socket.socket, limit: int = 65536) -> bytes:
    """Everything the server sends until it closes (bounded by size and the socket timeout)."""
    data = b""
    while len(data) < limit:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


class ConnectionLimitTests(unittest.TestCase):
    def start(self, **overrides: object) -> int:
        self.registry = SessionRegistry(session_settings(**overrides), reactor)
        port = reactor.listenTCP(0, SMTPServerFactory(self.registry, FakeLogin(), None), interface="127.0.0.1")
        self.addCleanup(self.stop, port)
        return port.getHost().port

    @inlineCallbacks
    def stop(self, port):
        yield port.stopListening()
        for _ in range(200):
            if not self.registry.sessions:
                break
            yield deferLater(reactor, 0.01, lambda: None)

    @inlineCallbacks
    def check_refused(self, port: int, allowed: int, reply: bytes):
        def talk():
            held = []
            try:
                for _ in range(allowed):
                    s = socket.create_connection(("127.0.0.1", port), timeout=10)
                    held.append(s)
                    assert s.recv(1024).startswith(b"220 "), "no banner"
                extra = socket.create_connection(("127.0.0.1", port), timeout=10)
                with extra:
                    refused = read_until_closed(extra)
                # One slot frees up: the next connection is served again.
                held.pop().close()
                for _ in range(100):
                    again = socket.create_connection(("127.0.0.1", port), timeout=10)
                    with again:
                        banner = again.recv(1024)
                    if banner.startswith(b"220 "):
                        break
                return refused, banner
            finally:
                for s in held:
                    s.close()

        refused, banner = yield deferToThread(talk)
        self.assertEqual(refused, reply)
        self.assertTrue(banner.startswith(b"220 "), banner)

    def test_max_connections(self):
        """Beyond max_connections a client gets 421 4.7.0 and is closed; a freed slot is reusable."""
        port = self.start(max_connections=3, max_connections_per_ip=10)
        return self.check_refused(port, 3, b"421 4.7.0 Too many connections, try again later\r\n")

    def test_max_connections_per_ip(self):
        """Beyond max_connections_per_ip one address gets 421 4.7.0 and is closed."""
        port = self.start(max_connections=10, max_connections_per_ip=2)
        return self.check_refused(port, 2, b"421 4.7.0 Too many connections from your address, try again later\r\n")


class RegistryTests(unittest.TestCase):
    def test_per_ip_counts(self) -> None:
        """The registry counts sessions per address and forgets an address at zero."""
        d1 = Dialogue(self)
        self.assertEqual(d1.registry.per_ip, {"192.0.2.7": 1})
        d1.session.connectionLost(None)
        self.assertEqual(d1.registry.per_ip, {})
        self.assertEqual(d1.registry.sessions, set())


class DrainTests(unittest.TestCase):
    def test_idle_session_closed(self) -> None:
        """On drain an idle session gets 421 4.3.2 and is closed; new connections are refused."""
        d = Dialogue(self)
        d.send("EHLO c\r\n")
        drained = d.registry.drain(7)
        self.assertEqual(d.take(), ["421 4.3.2 Service shutting down"])
        self.assertTrue(d.transport.disconnecting)
        self.assertEqual(d.registry.admit("192.0.2.8"), "421 4.3.2 Service shutting down")
        fired = []
        drained.addCallback(fired.append)
        d.session.connectionLost(None)
        self.assertEqual(fired, [None])

    def test_session_in_data_finishes(self) -> None:
        """A session in DATA may finish its message, gets its queue id, then 421 4.3.2 and close."""
        d = Dialogue(self)
        d.envelope()
        d.send("DATA\r\nSubject: x\r\n")
        drained = d.registry.drain(7)
        self.assertEqual(d.take(), [])
        self.assertFalse(d.transport.disconnecting)
        self.assertEqual(
            d.send("\r\nbody\r\n.\r\nMAIL FROM:<alice@example.test>\r\n"),
            ["250 2.0.0 Ok: queued as Q1", "421 4.3.2 Service shutting down"],
        )
        self.assertTrue(d.transport.disconnecting)
        self.assertEqual(len(d.submitter.from_calls), 1)
        fired = []
        drained.addCallback(fired.append)
        d.session.connectionLost(None)
        self.assertEqual(fired, [None])

    def test_slow_session_cut(self) -> None:
        """A session still in DATA after the grace period is aborted."""
        d = Dialogue(self)
        d.envelope()
        d.send("DATA\r\n")
        d.registry.drain(7)
        d.clock.advance(6)
        self.assertFalse(d.transport.disconnecting)
        aborted = []
        d.transport.abortConnection = lambda: aborted.append(True)
        d.clock.advance(2)
        self.assertEqual(aborted, [True])

    def test_nothing_to_drain(self) -> None:
        """With no sessions the drain is done at once."""
        registry = SessionRegistry(session_settings(), Dialogue(self).clock)
        fired = []
        registry.drain(7).addCallback(fired.append)
        self.assertEqual(fired, [None])
