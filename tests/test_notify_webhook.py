"""
Tests for the webhook channel of L{smtpplus.notify.dispatch}: one JSON POST
per event, with retries, signed with the secret; recipient results.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from smtpplus.notify.dispatch import Notifier, WebhookSender, backoff_delays, signature

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


# --- signatures and message webhooks ------------------------------------------------

SECRET = "whsec-7f3a9c"


def verify(secret: str, timestamp: str | None, signature_header: str | None, body: bytes, now: float,
           tolerance: float = 300) -> bool:
    """What a receiver does (the README's recipe): recompute the HMAC of the bytes received, compare in constant time."""
    if timestamp is None or signature_header is None or not timestamp.isdigit():
        return False
    if abs(now - int(timestamp)) > tolerance:
        return False
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(signature_header, "sha256=" + expected)


class VerifyingReceiver(Resource):
    """
    A webhook endpoint that checks each POST's signature the way a receiver
    would, over the exact body bytes; answers 500 to the first C{failures}
    POSTs, then 204.
    """

    isLeaf = True

    def __init__(self, secret: str, now: Any = time.time, failures: int = 0) -> None:
        super().__init__()
        self.secret = secret
        self.now = now
        self.failures = failures
        self.posts: list[dict[str, Any]] = []

    def render_POST(self, request: Any) -> bytes:
        body = request.content.read()
        timestamp = request.getHeader(b"x-smtpplus-timestamp")
        signature_header = request.getHeader(b"x-smtpplus-signature")
        self.posts.append(
            {
                "document": json.loads(body),
                "timestamp": timestamp.decode() if timestamp else None,
                "signed": timestamp is not None or signature_header is not None,
                "valid": verify(self.secret, timestamp and timestamp.decode(),
                                signature_header and signature_header.decode(), body, self.now()),
            }
        )
        request.setResponseCode(500 if len(self.posts) <= self.failures else 204)
        return b""


class SignatureTests(unittest.TestCase):
    """Signed POSTs against a real HTTP endpoint on 127.0.0.1 that verifies them."""

    def serve(self, resource: Resource) -> str:
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/hook"

    def agent(self) -> Agent:
        pool = HTTPConnectionPool(reactor, persistent=False)
        return Agent(reactor, pool=pool)

    @inlineCallbacks
    def wait_for(self, receiver: VerifyingReceiver, count: int) -> Any:
        for _ in range(250):
            if len(receiver.posts) >= count:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        # Long enough for a POST too many to show.
        yield deferLater(reactor, 0.2, lambda: None)

    def test_signature_verifies(self) -> Any:
        """With a secret, the receiver's HMAC-SHA256 of "<timestamp>.<body>" matches X-Smtpplus-Signature."""
        receiver = VerifyingReceiver(SECRET)
        sender = WebhookSender(self.serve(receiver), reactor, self.agent(), secret=SECRET)
        self.addCleanup(sender.stop)
        sender.post(EVENT)
        d = self.wait_for(receiver, 1)

        def check(_: Any) -> None:
            self.assertEqual(len(receiver.posts), 1)
            post = receiver.posts[0]
            self.assertEqual(post["document"], EVENT)
            self.assertTrue(post["valid"], post)
            self.assertLessEqual(abs(int(post["timestamp"]) - time.time()), 5)

        return d.addCallback(check)

    def test_wrong_secret_does_not_verify(self) -> Any:
        """The signature depends on the secret: a receiver holding another one refuses it."""
        receiver = VerifyingReceiver("another-secret")
        sender = WebhookSender(self.serve(receiver), reactor, self.agent(), secret=SECRET)
        self.addCleanup(sender.stop)
        sender.post(EVENT)
        d = self.wait_for(receiver, 1)
        return d.addCallback(lambda _: self.assertEqual([(p["signed"], p["valid"]) for p in receiver.posts],
                                                        [(True, False)]))

    def test_unsigned_without_secret(self) -> Any:
        """Without a secret the POST carries neither X-Smtpplus-Timestamp nor X-Smtpplus-Signature."""
        receiver = VerifyingReceiver(SECRET)
        sender = WebhookSender(self.serve(receiver), reactor, self.agent())
        self.addCleanup(sender.stop)
        sender.post(EVENT)
        d = self.wait_for(receiver, 1)
        return d.addCallback(lambda _: self.assertEqual([(p["document"], p["signed"]) for p in receiver.posts],
                                                        [(EVENT, False)]))

    def test_retry_signed_afresh(self) -> Any:
        """A retried POST carries a new timestamp, and its signature verifies against that timestamp."""
        clock = Clock()
        clock.advance(1_700_000_000)
        receiver = VerifyingReceiver(SECRET, now=clock.seconds, failures=1)
        sender = WebhookSender(self.serve(receiver), clock, self.agent(), delays=(90,), secret=SECRET)
        self.addCleanup(sender.stop)
        sender.post(EVENT)
        d = self.wait_for(receiver, 1)

        def retry(_: Any) -> Any:
            self.assertEqual(len(receiver.posts), 1)
            clock.advance(90)
            return self.wait_for(receiver, 2)

        def check(_: Any) -> None:
            self.assertEqual([p["timestamp"] for p in receiver.posts], ["1700000000", "1700000090"])
            self.assertEqual([p["valid"] for p in receiver.posts], [True, True])

        return d.addCallback(retry).addCallback(check)

    def test_signature_function(self) -> None:
        """signature() is "sha256=" and the hex HMAC-SHA256 of the timestamp, a dot and the body."""
        expected = hmac.new(b"k", b"1700000000.{}", hashlib.sha256).hexdigest()
        self.assertEqual(signature("k", "1700000000", b"{}"), "sha256=" + expected)


RESULT_KEYS = {"type", "message_id", "user", "recipient", "response", "created_at"}


class MessageResultTests(unittest.TestCase):
    """Notifier.message_result: one POST per recipient result when message webhooks are on."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.agent = FakeAgent()
        self.posted: list[dict[str, Any]] = []

    def notifier(self, message_webhooks: bool) -> Notifier:
        sender = WebhookSender("http://hooks.example.test/x", self.clock, self.agent)
        sender.post = self.posted.append  # type: ignore[method-assign]
        return Notifier(None, sender, self.clock, message_webhooks)

    def test_each_result_posted(self) -> None:
        """sent, deferred and bounced become delivered, deferred and bounced documents with exactly the contract's keys."""
        notifier = self.notifier(True)
        notifier.message_result("sent", "Q1", "alice", "a@dest.test", "250 2.0.0 Ok: queued as X")
        notifier.message_result("deferred", "Q1", "alice", "b@dest.test", "451 4.3.0 Try again later")
        notifier.message_result("bounced", "Q1", None, "c@dest.test", "550 5.1.1 No such user here")
        self.assertEqual([set(p) for p in self.posted], [RESULT_KEYS] * 3)
        self.assertEqual(
            [(p["type"], p["recipient"], p["response"], p["user"]) for p in self.posted],
            [
                ("delivered", "a@dest.test", "250 2.0.0 Ok: queued as X", "alice"),
                ("deferred", "b@dest.test", "451 4.3.0 Try again later", "alice"),
                ("bounced", "c@dest.test", "550 5.1.1 No such user here", None),
            ],
        )
        self.assertEqual({(p["message_id"], p["created_at"]) for p in self.posted}, {("Q1", "2023-11-14T22:13:20Z")})

    def test_off_by_default(self) -> None:
        """With message_webhooks false, results are not posted (events still are)."""
        notifier = self.notifier(False)
        notifier.message_result("sent", "Q1", "alice", "a@dest.test", "250 ok")
        notifier.dispatch(EVENT)
        self.assertEqual(self.posted, [EVENT])

    def test_other_statuses_ignored(self) -> None:
        """A status that is no delivery result (queued, sending) posts nothing."""
        notifier = self.notifier(True)
        for status in ("queued", "sending"):
            notifier.message_result(status, "Q1", "alice", "a@dest.test", "")
        self.assertEqual(self.posted, [])
