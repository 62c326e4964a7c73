"""
The metrics and the health check as units: the collectors, the cached
queue count, the health probe on a L{Clock}; the counting points in the
SMTP session (StringTransport), the submitter (a real listener and spool),
the login service; the two admin routes over a real HTTP socket; the
database probe and queue count on real SQLite files.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from smtpplus.admin.api import AdminAPI
from smtpplus.admin.service import admin_site
from smtpplus.auth.login import LoginService
from smtpplus.auth.throttle import LoginThrottle
from smtpplus.config import SecurityConfig
from smtpplus.delivery import queue
from smtpplus.delivery import spool as spool_module
from smtpplus.metrics import (
    HEALTH_MAX_AGE,
    QUEUE_COUNT_MAX_AGE,
    REFUSAL_REASONS,
    STORE_TIMEOUT,
    HealthCheck,
    Metrics,
)
from smtpplus.smtp.interfaces import LoginThrottled, SMTPReply
from smtpplus.storage.database import Database, DatabaseLost
from tests.delivery_helpers import Stack, simple_message
from tests.harness.web import serve
from tests.test_admin_api import TOKEN, AdminServer
from tests.test_smtp_protocol import Dialogue

CONTRACT_NAMES = {
    "smtpplus_messages_accepted",
    "smtpplus_messages_refused",
    "smtpplus_deliveries",
    "smtpplus_queue_messages",
    "smtpplus_smtp_sessions",
    "smtpplus_auth_failures",
    "smtpplus_accept_seconds",
    "smtpplus_delivery_seconds",
}


def new_metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


class MetricsTests(TestCase):
    """The counting methods and the exposition."""

    def test_refusal_reasons(self) -> None:
        """Every reason is exposed from the start at 0; None or an unknown reason counts as C{other}."""
        metrics = new_metrics()
        for reason in REFUSAL_REASONS:
            self.assertEqual(sample(metrics, "smtpplus_messages_refused_total", reason=reason), 0)
        metrics.message_refused("sender")
        metrics.message_refused(None)
        metrics.message_refused("no such reason")
        self.assertEqual(sample(metrics, "smtpplus_messages_refused_total", reason="sender"), 1)
        self.assertEqual(sample(metrics, "smtpplus_messages_refused_total", reason="other"), 2)
        self.assertIsNone(sample(metrics, "smtpplus_messages_refused_total", reason="no such reason"))

    def test_recipient_results(self) -> None:
        """Each result is counted; only the final ones (sent, bounced) are observed in the delivery histogram."""
        metrics = new_metrics()
        metrics.recipient_result("sent", 2.0)
        metrics.recipient_result("deferred", 60.0)
        metrics.recipient_result("bounced", 400.0)
        for result in ("sent", "deferred", "bounced"):
            self.assertEqual(sample(metrics, "smtpplus_deliveries_total", result=result), 1)
        self.assertEqual(sample(metrics, "smtpplus_delivery_seconds_count"), 2)
        self.assertEqual(sample(metrics, "smtpplus_delivery_seconds_sum"), 402.0)
        self.assertEqual(sample(metrics, "smtpplus_delivery_seconds_bucket", le="5.0"), 1)

    def test_accepted_and_auth(self) -> None:
        """An accepted message counts once and is observed in the accept histogram; AUTH failures count."""
        metrics = new_metrics()
        metrics.message_accepted(0.003)
        metrics.auth_failed()
        self.assertEqual(sample(metrics, "smtpplus_messages_accepted_total"), 1)
        self.assertEqual(sample(metrics, "smtpplus_accept_seconds_bucket", le="0.0025"), 0)
        self.assertEqual(sample(metrics, "smtpplus_accept_seconds_bucket", le="0.005"), 1)
        self.assertEqual(sample(metrics, "smtpplus_auth_failures_total"), 1)

    @inlineCallbacks
    def test_scrape_has_contract_names(self) -> Any:
        """A scrape, read by prometheus_client's parser, holds every metric the contract names."""
        metrics = new_metrics()
        metrics.count_sessions(lambda: 4)
        metrics.count_queue(Clock(), lambda: succeed({("queued", 2): 7}), queue.ACTIVE)
        text = yield Deferred.fromCoroutine(metrics.scrape())
        families = {family.name: family for family in text_string_to_metric_families(text.decode("utf-8"))}
        self.assertLessEqual(CONTRACT_NAMES, set(families))
        self.assertEqual(families["smtpplus_smtp_sessions"].samples[0].value, 4)
        self.assertEqual(families["smtpplus_accept_seconds"].type, "histogram")


class QueueGaugeTests(TestCase):
    """C{smtpplus_queue_messages}: read from a count kept for a few seconds."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = new_metrics()
        self.counts: list[Deferred[Any]] = []
        self.metrics.count_queue(self.clock, self._count, ("queued", "deferred"))

    def _count(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.counts.append(d)
        return d

    def scrape(self) -> Deferred[bytes]:
        return Deferred.fromCoroutine(self.metrics.scrape())

    def gauge(self, status: str, priority: int) -> float | None:
        return sample(self.metrics, "smtpplus_queue_messages", status=status, priority=str(priority))

    def test_every_status_and_priority(self) -> None:
        """Each status and priority is exposed; those the count does not name are 0."""
        self.scrape()
        self.counts[0].callback({("deferred", 1): 3, ("queued", 5): 2})
        self.assertEqual(self.gauge("deferred", 1), 3)
        self.assertEqual(self.gauge("queued", 5), 2)
        self.assertEqual(self.gauge("queued", 1), 0)
        self.assertEqual(self.gauge("deferred", 5), 0)
        self.assertIsNone(self.gauge("sent", 1))

    def test_count_reused_and_shared(self) -> None:
        """
        Scrapes while a count runs wait for that one count; within
        QUEUE_COUNT_MAX_AGE scrapes reuse it; afterwards the queue is counted
        again.
        """
        first, second = self.scrape(), self.scrape()
        self.assertEqual(len(self.counts), 1)
        self.assertNoResult(first)
        self.counts[0].callback({("queued", 3): 1})
        self.assertIn(b'smtpplus_queue_messages{priority="3",status="queued"} 1.0', self.successResultOf(second))
        self.clock.advance(QUEUE_COUNT_MAX_AGE - 0.1)
        self.successResultOf(self.scrape())
        self.assertEqual(len(self.counts), 1)
        self.clock.advance(0.1)
        third = self.scrape()
        self.assertEqual(len(self.counts), 2)
        self.counts[1].callback({("queued", 3): 4})
        self.assertIn(b'smtpplus_queue_messages{priority="3",status="queued"} 4.0', self.successResultOf(third))

    def test_failed_or_slow_count_keeps_last(self) -> None:
        """A count that fails, or takes longer than STORE_TIMEOUT, leaves the previous count; the scrape answers."""
        self.scrape()
        self.counts[0].callback({("queued", 3): 5})
        self.clock.advance(QUEUE_COUNT_MAX_AGE)
        failing = self.scrape()
        self.counts[1].errback(RuntimeError("database is locked"))
        self.successResultOf(failing)
        self.assertEqual(self.gauge("queued", 3), 5)
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        self.clock.advance(QUEUE_COUNT_MAX_AGE)
        slow = self.scrape()
        self.assertNoResult(slow)
        self.clock.advance(STORE_TIMEOUT)
        self.successResultOf(slow)
        self.assertEqual(self.gauge("queued", 3), 5)


class HealthCheckTests(TestCase):
    """The health check's answers and how often it asks the store."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.ports = 2
        self.probes = 0
        self.probe_result: Any = None

    def check(self) -> Deferred[str | None]:
        def probe() -> Deferred[object]:
            self.probes += 1
            if isinstance(self.probe_result, Exception):
                return fail(self.probe_result)
            return self.probe_result if isinstance(self.probe_result, Deferred) else succeed(None)

        if not hasattr(self, "health"):
            self.health = HealthCheck(self.clock, probe, lambda: self.ports)
        return Deferred.fromCoroutine(self.health.problem())

    def test_healthy(self) -> None:
        """The store answers and a port listens: no problem."""
        self.assertIsNone(self.successResultOf(self.check()))

    def test_no_port(self) -> None:
        """No SMTP port listening is the problem, whatever the store says."""
        self.ports = 0
        self.assertEqual(self.successResultOf(self.check()), "smtp: no SMTP port is listening")

    def test_store_fails(self) -> None:
        """A failing probe names the database and the error."""
        self.probe_result = OSError(errno.EISDIR, "Is a directory")
        self.assertEqual(self.successResultOf(self.check()), "database: [Errno 21] Is a directory")

    def test_store_slow(self) -> None:
        """A probe without an answer within STORE_TIMEOUT is a problem."""
        self.probe_result = Deferred()
        result = self.check()
        self.assertNoResult(result)
        self.clock.advance(STORE_TIMEOUT)
        self.assertEqual(self.successResultOf(result), "database: no answer within 2 s")

    def test_probe_at_most_once_a_second(self) -> None:
        """However often /health is asked, the store is probed at most once per HEALTH_MAX_AGE."""
        for _ in range(50):
            self.assertIsNone(self.successResultOf(self.check()))
        self.assertEqual(self.probes, 1)
        self.clock.advance(HEALTH_MAX_AGE)
        self.successResultOf(self.check())
        self.assertEqual(self.probes, 2)


class SessionCountingTests(TestCase):
    """What the SMTP session counts, on a StringTransport."""

    def dialogue(self, **overrides: object) -> Dialogue:
        d = Dialogue(self, **overrides)
        d.metrics = d.registry.metrics = new_metrics()
        return d

    def refused(self, d: Dialogue, reason: str) -> float | None:
        return sample(d.metrics, "smtpplus_messages_refused_total", reason=reason)

    def test_size_at_mail(self) -> None:
        """A SIZE= over the limit at MAIL counts as reason size."""
        d = self.dialogue()
        d.tls_login()
        self.assertEqual(d.send("MAIL FROM:<a@example.test> SIZE=5000\r\n")[0][:3], "552")
        self.assertEqual(self.refused(d, "size"), 1)

    def test_data_over_limit(self) -> None:
        """A message outgrowing the limit during DATA counts as reason size."""
        d = self.dialogue()
        d.envelope()
        d.send("DATA\r\n")
        self.assertEqual(d.send(b"x" * 1200 + b"\r\n.\r\n")[0][:3], "552")
        self.assertEqual(self.refused(d, "size"), 1)
        self.assertEqual(sample(d.metrics, "smtpplus_messages_accepted_total"), 0)

    def test_sender_refused_at_mail(self) -> None:
        """A refusal at MAIL counts with its reason; one without a reason as other; RCPT refusals do not count."""
        d = self.dialogue()
        d.tls_login()
        d.submitter.refuse_from = SMTPReply(550, "5.7.1", "not yours", reason="sender")
        self.assertEqual(d.send("MAIL FROM:<a@example.test>\r\n"), ["550 5.7.1 not yours"])
        d.submitter.refuse_from = SMTPReply(550, "5.7.1", "no")
        d.send("MAIL FROM:<a@example.test>\r\n")
        d.submitter.refuse_from = None
        d.submitter.refuse_to["r@example.org"] = SMTPReply(550, "5.1.1", "no such user")
        d.send("MAIL FROM:<a@example.test>\r\n")
        self.assertEqual(d.send("RCPT TO:<r@example.org>\r\n")[0][:3], "550")
        self.assertEqual(self.refused(d, "sender"), 1)
        self.assertEqual(self.refused(d, "other"), 1)
        self.assertEqual(sum(self.refused(d, r) or 0 for r in REFUSAL_REASONS), 2)

    def test_refused_at_data_command(self) -> None:
        """A refusal when the message is opened (DATA) counts with its reason."""
        d = self.dialogue()
        d.envelope()

        def revoked(envelope: Any) -> Any:
            raise SMTPReply(550, "5.7.13", "disabled", reason="account")

        d.submitter.openMessage = revoked  # type: ignore[method-assign]
        self.assertEqual(d.send("DATA\r\n"), ["550 5.7.13 disabled"])
        self.assertEqual(self.refused(d, "account"), 1)

    def test_refused_and_failed_at_end_of_data(self) -> None:
        """A refusal at the final dot counts with its reason; an unexpected error as storage (the 451)."""
        d = self.dialogue()
        d.envelope()
        d.submitter.eom_result = SMTPReply(550, "5.6.0", "X-SMTPAPI: bad", reason="smtpapi")
        d.send("DATA\r\n")
        self.assertEqual(d.send("Subject: x\r\n\r\nbody\r\n.\r\n"), ["550 5.6.0 X-SMTPAPI: bad"])
        d.submitter.eom_result = RuntimeError("bug")
        d.send("MAIL FROM:<a@example.test>\r\nRCPT TO:<r@example.org>\r\nDATA\r\n")
        self.assertEqual(d.send("body\r\n.\r\n")[0][:3], "451")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.refused(d, "smtpapi"), 1)
        self.assertEqual(self.refused(d, "storage"), 1)

    def test_accepted_with_time_to_250(self) -> None:
        """An accepted message counts once, observed with the time from its final dot to the 250."""
        d = self.dialogue()
        d.envelope()
        durable: Deferred[str] = Deferred()
        d.submitter.eom_result = durable
        d.send("DATA\r\n")
        self.assertEqual(d.send("body\r\n.\r\n"), [])
        d.clock.advance(0.25)
        durable.callback("Q7")
        self.assertEqual(d.take(), ["250 2.0.0 Ok: queued as Q7"])
        self.assertEqual(sample(d.metrics, "smtpplus_messages_accepted_total"), 1)
        self.assertEqual(sample(d.metrics, "smtpplus_accept_seconds_sum"), 0.25)

    def test_sessions_gauge(self) -> None:
        """The sessions gauge, wired to the registry as tap.py does, follows sessions opening and closing."""
        d = self.dialogue()
        d.metrics.count_sessions(lambda: len(d.registry.sessions))
        self.assertEqual(sample(d.metrics, "smtpplus_smtp_sessions"), 1)
        d.send("QUIT\r\n")
        d.session.connectionLost(None)
        self.assertEqual(sample(d.metrics, "smtpplus_smtp_sessions"), 0)


class SubmitterReasonTests(TestCase):
    """The reasons the real submitter gives its refusals, counted through a real SMTP listener."""

    def stack(self) -> Stack:
        stack = Stack(self, start=False)
        self.metrics = stack.registry.metrics = new_metrics()
        return stack

    def refused(self, reason: str) -> float | None:
        return sample(self.metrics, "smtpplus_messages_refused_total", reason=reason)

    @inlineCallbacks
    def test_policy_reasons(self) -> Any:
        """An unauthorized sender (MAIL, or header From:), a bad X-SMTPAPI and a mail loop each count under their reason."""
        stack = self.stack()
        code, _ = yield stack.submit("x@evil.test", ["r@dest.test"], simple_message())
        self.assertEqual(code, 550)
        code, _ = yield stack.submit("me@example.com", ["r@dest.test"], simple_message(sender="ceo@bank.test"))
        self.assertEqual(code, 550)
        code, _ = yield stack.submit("me@example.com", ["r@dest.test"], simple_message(extra="X-SMTPAPI: {nope\r\n"))
        self.assertEqual(code, 550)
        hops = "".join(f"Received: from h{i} by h{i + 1}; Mon, 1 Jan 2024 00:00:00 +0000\r\n" for i in range(51))
        code, _ = yield stack.submit("me@example.com", ["r@dest.test"], hops.encode() + simple_message())
        self.assertEqual(code, 554)
        code, _ = yield stack.submit("me@example.com", ["r@dest.test"], simple_message())
        self.assertEqual(code, 250)
        self.assertEqual(self.refused("sender"), 2)
        self.assertEqual(self.refused("smtpapi"), 1)
        self.assertEqual(self.refused("loop"), 1)
        self.assertEqual(sample(self.metrics, "smtpplus_messages_accepted_total"), 1)

    @inlineCallbacks
    def test_header_section_too_large(self) -> Any:
        """A header section over the limit counts as reason size."""
        stack = self.stack()
        padding = "".join(f"X-Pad-{i}: {'p' * 990}\r\n" for i in range(1100))
        code, _ = yield stack.submit("me@example.com", ["r@dest.test"], simple_message(extra=padding))
        self.assertEqual(code, 552)
        self.assertEqual(self.refused("size"), 1)

    @inlineCallbacks
    def test_storage_failures(self) -> Any:
        """A spool file that cannot be created (at DATA) and a full disk (at the commit) count as reason storage."""
        stack = self.stack()
        real_tmp = stack.delivery.spool.tmp_dir
        stack.delivery.spool.tmp_dir = os.path.join(stack.state_dir, "missing")
        code, _ = yield stack.submit("me@example.com", ["r@dest.test"], simple_message())
        self.assertEqual(code, 451)
        stack.delivery.spool.tmp_dir = real_tmp

        def full(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(spool_module.os, "fsync", full)
        code, _ = yield stack.submit("me@example.com", ["r@dest.test"], simple_message())
        self.assertEqual(code, 452)
        self.assertEqual(self.refused("storage"), 2)


class AuthCountingTests(TestCase):
    """The login service counts each refused AUTH."""

    def test_wrong_and_locked(self) -> None:
        """Wrong credentials count, and so does an attempt refused while locked; a success does not."""
        clock = Clock()
        metrics = new_metrics()
        @implementer(ICredentialsChecker)
        class Checker:
            credentialInterfaces = (IUsernamePassword,)

            def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
                if credentials.password == "secret":
                    return succeed(credentials.username)
                return fail(UnauthorizedLogin())

        class Realm:
            def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
                return interfaces[0], object(), lambda: None

        security = SecurityConfig(auth_failures_per_ip=100, auth_failures_per_user=1, auth_lock_seconds=900)
        throttle = LoginThrottle(clock, security, None, first_delay=0.0, max_delay=0.0)
        service = LoginService(Portal(Realm(), [Checker()]), throttle, clock, metrics)  # type: ignore[arg-type]
        self.successResultOf(service.login("alice", "secret", "192.0.2.1"))
        # From an address alice never logged in from: the username locks.
        wrong = service.login("alice", "guess", "192.0.2.5")
        clock.advance(0)
        self.failureResultOf(wrong, UnauthorizedLogin)
        self.failureResultOf(service.login("alice", "secret", "192.0.2.9"), LoginThrottled)
        self.assertEqual(sample(metrics, "smtpplus_auth_failures_total"), 2)


class RoutesTests(AdminServer, TestCase):
    """C{/health} and C{/metrics} over a real HTTP socket."""

    def setUp(self) -> None:
        self.trouble: str | None = None
        self.metrics = new_metrics()
        self.start_server(self)
        api = AdminAPI(TOKEN, self.store, self.hasher, dict, metrics=self.metrics, health=self)  # type: ignore[arg-type]
        self.base = serve(self, admin_site(api))

    async def problem(self) -> str | None:
        """The test plays the health check."""
        return self.trouble

    @inlineCallbacks
    def test_health(self) -> Any:
        """/health needs no token: 200 {"status": "ok"}, or 503 with the reason."""
        self.assertEqual((yield self.call("GET", "/health", token=None)), (200, {"status": "ok"}))
        self.trouble = "database: gone"
        self.assertEqual(
            (yield self.call("GET", "/health", token=None)),
            (503, {"status": "unavailable", "reason": "database: gone"}),
        )
        self.assertEqual(self.last_headers.getRawHeaders("Content-Type"), ["application/json"])

    @inlineCallbacks
    def test_metrics(self) -> Any:
        """/metrics needs the token and answers prometheus_client's text format."""
        code, document = yield self.call("GET", "/metrics", token=None)
        self.assertEqual((code, document["error"]["code"]), (401, "unauthorized"))
        self.metrics.message_accepted(0.01)
        response = yield self.http.get(self.base + "/metrics", headers={"Authorization": [f"Bearer {TOKEN}"]})
        text = (yield response.content()).decode("utf-8")
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders("Content-Type")[0].startswith("text/plain; version="))
        families = {f.name: f for f in text_string_to_metric_families(text)}
        self.assertEqual(families["smtpplus_messages_accepted"].samples[0].value, 1)


class StoreProbeTests(TestCase):
    """The database probe and the queue count on real SQLite files."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "smtpplus.db")
        self.database = Database(reactor, self.path)
        self.addCleanup(self.database.stop)
        self.store = queue.SQLiteQueueStore(self.database)
        self.store.migrate()

    @inlineCallbacks
    def test_probe(self) -> Any:
        """
        The probe answers on a working file, fails once the file is removed
        under the daemon, and answers again when the database has opened a
        new one.
        """
        yield self.database.probe()
        os.rename(self.path, self.path + ".old")
        with self.assertRaises(DatabaseLost) as caught:
            yield self.database.probe()
        self.assertIn("removed or replaced", str(caught.exception))
        reopened: Deferred[None] = Deferred()
        self.database.on_reopen(lambda: reopened.callback(None))
        yield reopened
        yield self.database.probe()
        self.assertTrue(os.path.exists(self.path))

    @inlineCallbacks
    def test_count_active(self) -> Any:
        """The queue count groups active messages by status and priority and leaves final ones out."""
        rows = [("a", 3, "queued"), ("b", 3, "queued"), ("c", 1, "deferred"), ("d", 2, "sent"), ("e", 5, "scheduled")]

        def insert(conn: Any) -> None:
            for message_id, priority, status in rows:
                conn.execute(
                    "INSERT INTO queue_messages (id, mail_from, priority, status, created_at, updated_at) "
                    "VALUES (?, '', ?, ?, 0, 0)",
                    (message_id, priority, status),
                )

        yield self.database.write(insert)
        counts = yield self.store.count_active()
        self.assertEqual(counts, {("queued", 3): 2, ("deferred", 1): 1, ("scheduled", 5): 1})
