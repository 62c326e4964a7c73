"""
C{/health} and C{/metrics} (contract section 6) on the real twistd daemon,
with real clients: smtplib sessions, the aiosmtpd sink as the next hop,
urllib for HTTP, and prometheus_client's own parser for the scrape.
"""

from __future__ import annotations

import os
import shutil

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import TestCase

from tests.contract_helpers import (
    Daemon,
    api_request,
    logged_in,
    message,
    plain_auth,
    poll,
    queue_id,
    smtp,
    submit,
    tls_context,
)


def config(d: Daemon) -> str:
    return f"""
[server]
hostname = "mx.test.example"
state_dir = "{d.state_dir}"
[smtp]
listen = "127.0.0.1"
ports = "{d.plain_ports[0]}"
max_message_size = 100000
[delivery]
mode = "smarthost"
smarthost = "127.0.0.1:{d.sink_port}"
smarthost_tls = "none"
[admin]
listen = "127.0.0.1"
port = {d.admin_port}
"""


def scrape(d: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one C{/metrics} scrape: (name, sorted labels) -> value."""
    response = d.api("GET", "/metrics")
    assert response.status == 200, response
    assert response.headers["Content-Type"].startswith("text/plain"), response.headers["Content-Type"]
    samples = {}
    for family in text_string_to_metric_families(response.body.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


class MetricsTests(TestCase):
    """What a short load leaves in C{/metrics}."""

    def setUp(self) -> None:
        self.daemon = Daemon(config, plain=1, tls=0)
        self.addCleanup(self.daemon.stop)

    def test_scrape_after_load(self) -> None:
        """
        Accepted and refused messages (sender at MAIL, SIZE= at MAIL), a
        failed AUTH and the recipient results (sent, bounced, deferred) are
        counted; the accept and delivery histograms hold one observation
        per accepted message and per final recipient result; the queue
        gauge shows the deferred message; the sessions gauge the one open
        session.
        """
        d = self.daemon
        before = scrape(d)
        self.assertEqual(value(before, "smtpplus_messages_accepted_total"), 0)
        self.assertEqual(value(before, "smtpplus_messages_refused_total", reason="sender"), 0)
        username, password = d.create_user(authorized_domains=["allowed.test"])
        port = d.plain_ports[0]

        client = logged_in(port, username, password)
        ids = [
            queue_id(submit(client, "sender@allowed.test", ["rcpt@dest.test"], message("sent"))),
            queue_id(submit(client, "sender@allowed.test", ["bounce@dest.test"], message("bounced"))),
            queue_id(submit(client, "sender@allowed.test", ["defer@dest.test"], message("deferred"))),
        ]
        code, _ = submit(client, "someone@elsewhere.test", ["rcpt@dest.test"], message("refused"))
        self.assertEqual(code, 550)
        code, _ = submit(client, "sender@allowed.test", ["rcpt@dest.test"], message("big"), ["SIZE=200000"])
        self.assertEqual(code, 552)
        client.quit()

        bad = smtp(port)
        bad.ehlo("client.test")
        bad.starttls(context=tls_context())
        bad.ehlo("client.test")
        code, _ = bad.docmd("AUTH", "PLAIN " + plain_auth(username, "wrong"))
        self.assertEqual(code, 535)
        bad.quit()

        def settled() -> bool:
            statuses = [d.api("GET", f"/api/v1/messages/{i}").json["status"] for i in ids]
            return statuses == ["sent", "bounced", "deferred"]

        self.assertTrue(poll(settled, 20), [d.api("GET", f"/api/v1/messages/{i}").json for i in ids])
        # The bounce of the second message goes to its sender through the sink.
        self.assertTrue(poll(lambda: d.sink.find("Delivery Status Notification") or d.sink.find("bounced"), 20))

        open_session = smtp(port)
        open_session.ehlo("client.test")
        try:

            def delivered() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
                samples = scrape(d)
                sent = value(samples, "smtpplus_deliveries_total", result="sent")
                # The queue count is up to QUEUE_COUNT_MAX_AGE (5 s) old.
                waiting = value(samples, "smtpplus_queue_messages", status="deferred", priority="3")
                return samples if sent >= 2 and waiting >= 1 else None

            after = poll(delivered, 20, interval=0.5)
            self.assertTrue(after)
            self.assertEqual(value(after, "smtpplus_smtp_sessions"), 1)
        finally:
            open_session.quit()

        self.assertEqual(value(after, "smtpplus_messages_accepted_total"), 3)
        self.assertEqual(value(after, "smtpplus_messages_refused_total", reason="sender"), 1)
        self.assertEqual(value(after, "smtpplus_messages_refused_total", reason="size"), 1)
        self.assertEqual(value(after, "smtpplus_messages_refused_total", reason="smtpapi"), 0)
        self.assertEqual(value(after, "smtpplus_auth_failures_total"), 1)
        # rcpt@ and the bounce's notice to sender@; bounce@; defer@ once.
        self.assertEqual(value(after, "smtpplus_deliveries_total", result="sent"), 2)
        self.assertEqual(value(after, "smtpplus_deliveries_total", result="bounced"), 1)
        self.assertEqual(value(after, "smtpplus_deliveries_total", result="deferred"), 1)
        self.assertEqual(value(after, "smtpplus_accept_seconds_count"), 3)
        self.assertEqual(value(after, "smtpplus_delivery_seconds_count"), 3)
        self.assertEqual(value(after, "smtpplus_accept_seconds_bucket", le="+Inf"), 3)
        self.assertEqual(value(after, "smtpplus_queue_messages", status="deferred", priority="3"), 1)
        self.assertEqual(value(after, "smtpplus_queue_messages", status="queued", priority="3"), 0)


class HealthTests(TestCase):
    """C{/health} needs no token and says when the store cannot answer."""

    def setUp(self) -> None:
        self.daemon = Daemon(config, plain=1, tls=0, sink=False)
        self.addCleanup(self.daemon.stop)

    def test_health_without_token(self) -> None:
        """A healthy daemon answers C{200 {"status": "ok"}} to a request without a token; C{/metrics} wants one."""
        response = api_request(self.daemon.admin_port, "GET", "/health")
        self.assertEqual((response.status, response.json), (200, {"status": "ok"}))
        self.assertEqual(response.headers["Content-Type"], "application/json")
        response = api_request(self.daemon.admin_port, "GET", "/metrics")
        self.assertEqual(response.status, 401)
        self.assertEqual(response.json["error"]["code"], "unauthorized")

    def test_database_gone(self) -> None:
        """
        While the database file is replaced by something SQLite cannot open
        (a directory), C{/health} answers 503 naming the database; once the
        path is free again the daemon opens a new file and answers 200.
        """
        d = self.daemon
        path = os.path.join(d.state_dir, "smtpplus.db")
        os.rename(path, path + ".old")
        os.mkdir(path)
        response = api_request(d.admin_port, "GET", "/health")
        self.assertEqual(response.status, 503, response)
        self.assertEqual(response.json["status"], "unavailable")
        self.assertTrue(response.json["reason"].startswith("database: "), response.json)
        # Still unavailable a while later: the daemon keeps failing to reopen.
        again = poll(lambda: api_request(d.admin_port, "GET", "/health").status == 200, 2)
        self.assertFalse(again)
        shutil.rmtree(path)
        self.assertTrue(poll(lambda: api_request(d.admin_port, "GET", "/health").status == 200, 20))
