"""
Signed webhooks and per-recipient message webhooks end to end: the
delivery agent tells each stored recipient result to its collaborator (one
per attempt, a deferred one for each failed attempt), and the real daemon
POSTs events and results, each signed, to a receiver that checks the HMAC.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from tests.harness.clients import WebhookReceiver, logged_in, submit
from tests.harness.daemon import Daemon
from tests.harness.messages import message, queue_id, simple_message
from tests.harness.polling import poll, wait_until
from tests.harness.ports import free_port_range
from tests.harness.smarthost import DATA_REPLY
from tests.harness.stack import Stack, wall_clock

SECRET = "whsec-contract-4d1f"
RESULT_KEYS = {"type", "message_id", "user", "recipient", "response", "created_at"}


class Results:
    """The agent's results collaborator, recording each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str | None, str, str]] = []

    def message_result(self, status: str, message_id: str, user: str | None, recipient: str, response: str) -> None:
        self.calls.append((status, message_id, user, recipient, response))


class AgentResultsTests(unittest.TestCase):
    """The delivery agent and its optional results collaborator, on a real queue and smarthost."""

    @inlineCallbacks
    def test_every_attempt_reported(self) -> Any:
        """
        Each recipient's result is reported once per attempt with the next
        hop's whole reply line: a deferred result for the failed attempt,
        then the delivered one; a bounce at once.
        """
        stack = Stack(self, delivery="retry_schedule = [60]\n", clock=wall_clock())
        results = Results()
        stack.delivery.agent.results = results
        stack.smarthost.replies["later@dest.test"] = ["451 4.3.0 Greylisted, come back later", "250 2.1.5 OK"]
        stack.smarthost.replies["nobody@dest.test"] = ["550 5.1.1 No such user here"]
        message_id = yield stack.attempted(["ok@dest.test", "later@dest.test", "nobody@dest.test"], "deferred")
        yield stack.next_attempt(60)
        yield stack.wait_status(message_id, "partial")
        mine = yield wait_until(lambda: len([c for c in results.calls if c[1] == message_id]) >= 4 or None)
        self.assertTrue(mine)
        self.assertEqual(
            sorted((status, recipient, response) for status, mid, _, recipient, response in results.calls
                   if mid == message_id),
            [
                ("bounced", "nobody@dest.test", "550 5.1.1 No such user here"),
                ("deferred", "later@dest.test", "451 4.3.0 Greylisted, come back later"),
                ("sent", "later@dest.test", "250 2.0.0 Ok: queued at smarthost"),
                ("sent", "ok@dest.test", "250 2.0.0 Ok: queued at smarthost"),
            ],
        )
        self.assertEqual({c[2] for c in results.calls if c[1] == message_id}, {"alice"})

    @inlineCallbacks
    def test_no_collaborator(self) -> Any:
        """Without a collaborator (the default), delivery goes on as before."""
        stack = Stack(self)
        self.assertIsNone(stack.delivery.agent.results)
        code, text = yield stack.submit("me@example.com", ["ok@dest.test"], simple_message())
        message = yield stack.wait_status(queue_id(text), "sent")
        self.assertEqual(message["status"], "sent")


def hooks_config(hook_port: int) -> Any:
    def config(d: Daemon) -> str:
        return d.toml(
            hostname="mx.contract.test",
            tables=(
                f'[notifications]\nwebhook_url = "http://127.0.0.1:{hook_port}/hook"\n'
                f'webhook_secret = "{SECRET}"\nmessage_webhooks = true\n'
            ),
        )

    return config


def verified(headers: dict[str, str], body: bytes) -> bool:
    """The receiver's check: the HMAC of "<timestamp>.<body>" over the bytes received, compared in constant time."""
    timestamp = headers.get("x-smtpplus-timestamp", "")
    expected = "sha256=" + hmac.new(SECRET.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return timestamp.isdigit() and hmac.compare_digest(headers.get("x-smtpplus-signature", ""), expected)


class DaemonWebhookTests(unittest.TestCase):
    """The real daemon with webhook_secret and message_webhooks set."""

    def setUp(self) -> None:
        self.hook = WebhookReceiver(free_port_range(1)[0])
        self.addCleanup(self.hook.stop)
        self.d = Daemon(hooks_config(self.hook.server.server_address[1]), plain=1, tls=0)
        self.addCleanup(self.d.stop)

    def test_signed_events_and_results(self) -> None:
        """
        A delivered and a bounced recipient are each POSTed as a result with
        exactly the contract's keys, the bounce event as the event object,
        and the bounce (DSN) mail's own delivery too; every POST verifies.
        """
        name, password = self.d.create_user(authorized_domains=["allowed.test"])
        with logged_in(self.d.plain_ports[0], name, password) as client:
            message_id = queue_id(
                submit(client, "s@allowed.test", ["rcpt@dest.test", "bounce@dest.test"], message("hooks"))
            )

        def documents() -> list[dict[str, Any]]:
            return self.hook.events()

        def complete() -> list[dict[str, Any]] | None:
            docs = documents()
            kinds = {(doc["type"], doc.get("recipient")) for doc in docs}
            wanted = {("delivered", "rcpt@dest.test"), ("bounced", "bounce@dest.test"), ("bounce", None),
                      ("delivered", "s@allowed.test")}
            return docs if wanted <= kinds else None

        docs = poll(complete, 20)
        self.assertTrue(docs, documents())
        # Copies: a late POST may be half recorded; zip pairs the complete ones.
        posts = list(zip(list(self.hook.headers), list(self.hook.bodies)))  # noqa: B905
        self.assertGreaterEqual(len(posts), 4)
        self.assertTrue(all(verified(headers, body) for headers, (_, body) in posts))
        results = {(doc["type"], doc["recipient"]): doc for doc in docs if doc["type"] != "bounce"}
        for doc in results.values():
            self.assertEqual(set(doc), RESULT_KEYS)
        self.assertEqual(results[("delivered", "rcpt@dest.test")]["message_id"], message_id)
        self.assertEqual(results[("delivered", "rcpt@dest.test")]["user"], name)
        self.assertEqual(results[("delivered", "rcpt@dest.test")]["response"], DATA_REPLY)
        self.assertEqual(results[("bounced", "bounce@dest.test")]["response"], "550 5.1.1 No such user here")
        # The DSN to the sender is the daemon's own mail, under its own id.
        self.assertNotEqual(results[("delivered", "s@allowed.test")]["message_id"], message_id)
        event = next(doc for doc in docs if doc["type"] == "bounce")
        self.assertEqual(event["message_id"], message_id)
        stored = self.d.api("GET", "/api/v1/notifications").json["notifications"]
        self.assertEqual({e["type"] for e in stored}, {"bounce"}, "results are not stored as events")
