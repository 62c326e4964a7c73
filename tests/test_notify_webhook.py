"""Tests for the webhook channel of L{smtpplus.notify.dispatch}: one JSON POST per event, with retries."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from smtpplus.notify.dispatch import WebhookSender, backoff_delays

EVENT = {
    "id": "evt-000000000001",
    "type": "send_problem",
    "user": None,
    "message_id": None,
    "detail": "mx.example.com: connection refused",
    "created_at": "2024-05-01T12:00:00Z",
}


class FlakyEndpoint(Resource):
    """Answers 500 to the first C{failures} POSTs, then 204."""

    isLeaf = True

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.bodies: list[Any] = []
        self.content_types: list[bytes | None] = []

    def render_POST(self, request: Any) -> bytes:
        self.bodies.append(json.loads(request.content.read()))
        self.content_types.append(request.getHeader(b"content-type"))
        if len(self.bodies) <= self.failures:
            request.setResponseCode(500)
            return b"try later"
        request.setResponseCode(204)
        return b""


class RealServerTests(unittest.TestCase):
    @inlineCallbacks
    def test_retried_until_endpoint_recovers(self) -> Any:
        """A POST that gets 500 is retried with backoff until the endpoint answers 2xx; each body is the event JSON."""
        endpoint = FlakyEndpoint(failures=3)
        port = reactor.listenTCP(0, Site(endpoint), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        url = f"http://127.0.0.1:{port.getHost().port}/hook"
        sender = WebhookSender(url, reactor, Agent(reactor, pool=pool), delays=(0.01, 0.02, 0.04, 0.08, 0.16))
        sender.post(EVENT)
        for _ in range(200):
            if len(endpoint.bodies) >= 4:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        # Let the last response finish before looking for extra requests.
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(endpoint.bodies, [EVENT] * 4)
        self.assertEqual(endpoint.content_types, [b"application/json"] * 4)
        sender.stop()


class FakeAgent:
    """An IAgent whose requests the test answers by hand."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes, Deferred[Any]]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.requests.append((method, uri, d))
        return d


class ClockTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.agent = FakeAgent()
        self.log: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.log.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.log.append)

    def test_backoff_schedule_and_give_up(self) -> None:
        """Failed POSTs are retried after doubling delays; after the last one the event is dropped with an error."""
        sender = WebhookSender("http://hooks.example.test/x", self.clock, self.agent, delays=(5, 10, 20))
        sender.post(EVENT)
        self.assertEqual(len(self.agent.requests), 1)
        for expected, delay in [(2, 5), (3, 10), (4, 20)]:
            self.agent.requests[-1][2].errback(ConnectionRefusedError())
            self.clock.advance(delay - 0.1)
            self.assertEqual(len(self.agent.requests), expected - 1)
            self.clock.advance(0.1)
            self.assertEqual(len(self.agent.requests), expected)
        self.agent.requests[-1][2].errback(ConnectionRefusedError())
        self.clock.advance(3600)
        self.assertEqual(len(self.agent.requests), 4)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(any("giving up" in (e.get("log_format") or "") for e in self.log))

    def test_timeout_counts_as_failure(self) -> None:
        """An endpoint that never answers is timed out and retried."""
        sender = WebhookSender("http://hooks.example.test/x", self.clock, self.agent, delays=(5,), timeout=30)
        sender.post(EVENT)
        self.clock.advance(30)
        self.clock.advance(5)
        self.assertEqual(len(self.agent.requests), 2)

    def test_never_blocks_and_bounded_in_flight(self) -> None:
        """post() returns at once while the endpoint hangs, with at most max_in_flight POSTs open."""
        sender = WebhookSender("http://hooks.example.test/x", self.clock, self.agent, max_in_flight=4, timeout=1e9)
        for n in range(10):
            sender.post({**EVENT, "id": f"evt-{n}"})
        self.assertEqual(len(self.agent.requests), 4)
        self.agent.requests[0][2].errback(ConnectionRefusedError())
        self.assertEqual(len(self.agent.requests), 5)
        sender.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_backlog_bounded(self) -> None:
        """Beyond max_backlog waiting events the oldest are dropped, with a warning."""
        sender = WebhookSender("http://h.example.test/", self.clock, self.agent, max_in_flight=1, max_backlog=3,
                               timeout=1e9)
        for n in range(6):
            sender.post({**EVENT, "id": f"evt-{n}"})
        self.assertEqual(len(self.agent.requests), 1)
        self.assertEqual(sum("backlog full" in (e.get("log_format") or "") for e in self.log), 2)
        sender.stop()

    def test_default_delays(self) -> None:
        """The default schedule doubles from 5 s, caps at 10 min and spans about an hour in a bounded number of tries."""
        delays = backoff_delays()
        self.assertEqual(delays[:3], (5.0, 10.0, 20.0))
        self.assertLessEqual(max(delays), 600)
        self.assertGreaterEqual(sum(delays), 3600)
        self.assertLess(sum(delays), 3600 + 600)
        self.assertLess(len(delays), 20)
