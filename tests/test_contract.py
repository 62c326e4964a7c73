"""
The black-box contract suite: every checkable sentence of
C{/work/shared/CONTRACT.md} exercised from outside, against the real twistd
daemon, with real clients only (smtplib, raw sockets, ssl, urllib) and an
aiosmtpd smarthost sink.  Nothing from smtpplus is imported.

Daemons are shared per concern (started lazily by the first test that needs
one, stopped when the test process exits) to keep the suite fast.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import stat
import tempfile
import time
import uuid
from typing import Any

from twisted.trial import unittest

from tests.harness.clients import RawSession, WebhookReceiver, api_request, logged_in, smtp, submit
from tests.harness.daemon import Daemon, Shared, run_configs
from tests.harness.messages import message, plain_auth, queue_id
from tests.harness.polling import poll
from tests.harness.ports import free_port_range, occupy, port_is_free
from tests.harness.smarthost import Smarthost
from tests.harness.tls import client_context

USER_FIELDS = {
    "username",
    "enabled",
    "priority",
    "notes",
    "authorized_domains",
    "authorized_senders",
    "aggregation",
    "sandbox",
    "priority_budget",
    "created_at",
    "updated_at",
}
MESSAGE_FIELDS = {
    "id",
    "user",
    "mail_from",
    "header_from",
    "subject",
    "priority",
    "status",
    "recipients",
    "campaign_code",
    "created_at",
    "updated_at",
    "next_attempt_at",
    "size",
    "duplicates",
}
RECIPIENT_FIELDS = {"address", "status", "attempts", "last_response"}
EVENT_FIELDS = {"id", "type", "user", "message_id", "detail", "created_at"}
GROUP_FIELDS = {"key", "messages", "recipients", "sent", "deferred", "bounced", "rejected"}
FINAL = ("sent", "bounced", "partial")


def unique(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def main_config(d: Daemon) -> str:
    return d.toml(
        hostname="mx.contract.test",
        ports=f"{d.plain_ports[0]}-{d.plain_ports[1]}",
        smtp="max_message_size = 2000000",
        delivery="retry_schedule = [1]\nmax_queue_lifetime = 4",
        tables=(
            '[notifications]\nrecipients = ["postmaster@admin.test"]\n'
            "[security]\nauth_failures_per_ip = 100000\nauth_failures_per_user = 100000\n"
        ),
    )


MAIN = Shared(lambda: Daemon(main_config))


class _MainDaemon:
    """Tests against the shared smarthost-mode daemon."""

    def setUp(self) -> None:
        self.d = MAIN.get()
        self.port = self.d.plain_ports[0]

    def user(self, **fields: Any) -> tuple[str, str]:
        fields.setdefault("username", unique())
        return self.d.create_user(**fields)

    def sender(self, **fields: Any) -> tuple[str, str]:
        """A user authorized for the domain allowed.test."""
        fields.setdefault("authorized_domains", ["allowed.test"])
        return self.user(**fields)

    def message(self, message_id: str) -> dict[str, Any]:
        response = self.d.api("GET", f"/api/v1/messages/{message_id}")
        assert response.status == 200, response
        return response.json

    def wait_status(self, message_id: str, statuses: tuple[str, ...] = FINAL, timeout: float = 15.0) -> dict[str, Any]:
        found = poll(lambda: (m := self.message(message_id))["status"] in statuses and m, timeout, 0.2)
        assert found, f"message {message_id} never reached {statuses}: {self.message(message_id)}"
        return found

    def events(self, **query: str) -> list[dict[str, Any]]:
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        response = self.d.api("GET", f"/api/v1/notifications?{qs}")
        assert response.status == 200, response
        return response.json["notifications"]

    def send(
        self,
        username: str,
        password: str,
        mail_from: str = "sender@allowed.test",
        recipients: tuple[str, ...] = ("rcpt@dest.test",),
        data: bytes | None = None,
        mail_options: tuple[str, ...] = (),
        port: int | None = None,
    ) -> tuple[int, str]:
        with logged_in(port or self.port, username, password) as client:
            return submit(client, mail_from, recipients, data if data is not None else message(), mail_options)


# --- section 3: SMTP -----------------------------------------------------------------


class SMTPContractTests(_MainDaemon, unittest.TestCase):
    def test_ehlo_extensions(self) -> None:
        """
        Every STARTTLS port offers STARTTLS, SIZE (the configured maximum),
        8BITMIME, PIPELINING, ENHANCEDSTATUSCODES and MT-PRIORITY; AUTH
        PLAIN LOGIN only after STARTTLS (auth_requires_tls defaults to true).
        """
        for port in self.d.plain_ports:
            with smtp(port) as client:
                code, text = client.ehlo("client.test")
                self.assertEqual(code, 250)
                self.assertTrue(text.startswith(b"mx.contract.test"), text)
                features = client.esmtp_features
                for name in ("starttls", "8bitmime", "pipelining", "enhancedstatuscodes", "mt-priority"):
                    self.assertIn(name, features, (port, features))
                self.assertEqual(features.get("size"), "2000000")
                self.assertNotIn("auth", features)
                client.starttls(context=client_context())
                client.ehlo("client.test")
                self.assertEqual(set(client.esmtp_features["auth"].upper().split()), {"PLAIN", "LOGIN"})
                for name in ("8bitmime", "pipelining", "enhancedstatuscodes", "mt-priority", "size"):
                    self.assertIn(name, client.esmtp_features)

    def test_auth_on_plaintext(self) -> None:
        """AUTH on a plaintext session gets exactly `530 5.7.0 Must issue a STARTTLS command first`."""
        for command in (f"AUTH PLAIN {plain_auth('x', 'y')}", "AUTH LOGIN"):
            session = RawSession(self.port)
            try:
                self.assertTrue(session.reply()[0].startswith(b"220 "))
                session.command("EHLO client.test")
                self.assertEqual(session.command(command), [b"530 5.7.0 Must issue a STARTTLS command first\r\n"])
            finally:
                session.close()

    def test_ehlo_again_after_starttls(self) -> None:
        """After STARTTLS, MAIL or AUTH before a new EHLO gets 503 5.5.1."""
        for command in ("MAIL FROM:<sender@allowed.test>", f"AUTH PLAIN {plain_auth('x', 'y')}"):
            session = RawSession(self.port)
            try:
                session.reply()
                session.command("EHLO client.test")
                self.assertTrue(session.command("STARTTLS")[0].startswith(b"220 "))
                session.starttls()
                reply = session.command(command)
                self.assertTrue(reply[-1].startswith(b"503 5.5.1"), (command, reply))
            finally:
                session.close()

    def test_mail_before_auth(self) -> None:
        """MAIL FROM before AUTH gets 530 5.7.0, in plaintext and inside TLS."""
        with smtp(self.port) as client:
            client.ehlo("client.test")
            code, text = client.mail("sender@allowed.test")
            self.assertEqual((code, text[:5]), (530, b"5.7.0"))
            client.starttls(context=client_context())
            client.ehlo("client.test")
            code, text = client.mail("sender@allowed.test")
            self.assertEqual((code, text[:5]), (530, b"5.7.0"))

    def test_wrong_credentials_and_disabled_user(self) -> None:
        """Wrong password, unknown user and a disabled user get 535 5.7.8; AUTH PLAIN and LOGIN both work."""
        username, password = self.sender()
        for name, secret in ((username, "wrong-password"), (unique("nobody"), password)):
            for mechanism in ("PLAIN", "LOGIN"):
                with self.assertRaises(smtplib.SMTPAuthenticationError) as caught:
                    logged_in(self.port, name, secret, mechanism).close()
                self.assertEqual(caught.exception.smtp_code, 535)
                self.assertTrue(caught.exception.smtp_error.startswith(b"5.7.8"), caught.exception.smtp_error)
        for mechanism in ("PLAIN", "LOGIN"):
            logged_in(self.port, username, password, mechanism).quit()
        self.assertEqual(self.d.api("PATCH", f"/api/v1/users/{username}", {"enabled": False}).status, 200)
        with self.assertRaises(smtplib.SMTPAuthenticationError) as caught:
            logged_in(self.port, username, password).close()
        self.assertEqual(caught.exception.smtp_code, 535)
        self.assertTrue(caught.exception.smtp_error.startswith(b"5.7.8"))
        self.assertEqual(self.d.api("PATCH", f"/api/v1/users/{username}", {"enabled": True}).status, 200)
        logged_in(self.port, username, password).quit()

    def test_envelope_sender_rules(self) -> None:
        """
        MAIL FROM is authorized by a listed address or an exactly listed
        domain, case-insensitively; subdomains and others get 550 5.7.1 at MAIL FROM.
        """
        username, password = self.user(
            authorized_domains=["allowed.test", "Mixed.Example"], authorized_senders=["boss@other.test"]
        )
        with logged_in(self.port, username, password) as client:
            for address in (
                "a@allowed.test",
                "b@ALLOWED.Test",
                "c@mixed.example",
                "boss@other.test",
                "boss@Other.TEST",
            ):
                code, text = client.mail(address)
                self.assertEqual(code, 250, (address, text))
                client.rset()
            for address in ("a@sub.allowed.test", "x@other.test", "a@allowed.test.evil", "a@notallowed.test"):
                code, text = client.mail(address)
                self.assertEqual((code, text[:5]), (550, b"5.7.1"), address)
                client.rset()
        events = self.events(type="sender_domain", user=username)
        self.assertEqual(len(events), 4, events)
        for event in events:
            self.assertEqual(set(event), EVENT_FIELDS)
            self.assertEqual((event["type"], event["user"], event["message_id"]), ("sender_domain", username, None))
        mailed = poll(lambda: [m for m in self.d.sink.find(username) if "postmaster@admin.test" in m.rcpt_tos], 15)
        self.assertTrue(mailed, "no notification mail reached [notifications] recipients")

    def test_header_from_rules(self) -> None:
        """
        Every address of the header From: must be authorized, else 550 5.7.1
        at the end of DATA; several From: headers are refused; each refusal
        is a sender_domain event and nothing is queued.
        """
        username, password = self.sender()
        refused = [
            message(from_="Evil <evil@other.test>"),
            message(from_="ok@allowed.test, evil@other.test"),
            message(from_="sub@sub.allowed.test"),
            message(from_="ok@allowed.test", headers=["From: ok2@allowed.test"]),
        ]
        with logged_in(self.port, username, password) as client:
            for data in refused:
                code, text = submit(client, "sender@allowed.test", ["rcpt@dest.test"], data)
                self.assertEqual(code, 550, (data, text))
                if b"ok2@" not in data:
                    self.assertTrue(text.startswith("5.7.1"), text)
            ok = submit(client, "sender@allowed.test", ["rcpt@dest.test"], message(from_="Me <ME@Allowed.TEST>"))
            queue_id(ok)
        events = self.events(type="sender_domain", user=username)
        self.assertEqual(len(events), len(refused), events)
        listed = self.d.api("GET", f"/api/v1/messages?user={username}").json["messages"]
        self.assertEqual(len(listed), 1, listed)

    def test_user_without_lists_may_not_send(self) -> None:
        """A user with both authorized lists empty gets 550 5.7.1 at MAIL FROM for any sender."""
        username, password = self.user()
        for address in ("sender@allowed.test", f"{username}@mx.contract.test"):
            code, text = self.send(username, password, mail_from=address)
            self.assertEqual((code, text[:5]), (550, "5.7.1"))

    def test_queued_id_and_relay(self) -> None:
        """
        `250 2.0.0 Ok: queued as ID`; ID works in GET /api/v1/messages/ID,
        whose shape is the contract's; the message reaches the smarthost
        with X-Priority and without X-SMTPAPI, and ends up `sent`.
        """
        username, password = self.sender()
        marker = unique("relay")
        data = message(subject=marker, from_="Sender <sender@allowed.test>", headers=['X-SMTPAPI: {"CampaignName": "x"}'])
        reply = self.send(username, password, recipients=("one@dest.test", "two@dest.test"), data=data)
        message_id = queue_id(reply)
        first = self.message(message_id)
        self.assertEqual(set(first), MESSAGE_FIELDS)
        self.assertEqual(first["id"], message_id)
        self.assertEqual(first["user"], username)
        self.assertEqual(first["mail_from"], "sender@allowed.test")
        self.assertIn("sender@allowed.test", first["header_from"])
        self.assertEqual(first["subject"], marker)
        self.assertEqual(first["priority"], 3)
        self.assertIsNone(first["campaign_code"])
        self.assertIn(first["status"], ("queued", "sending", "sent"))
        self.assertRegex(first["created_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
        received = self.d.sink.wait_for(marker)
        self.assertEqual(sorted(received.rcpt_tos), ["one@dest.test", "two@dest.test"])
        self.assertEqual(received.mail_from, "sender@allowed.test")
        self.assertEqual(received.message.get_all("X-Priority"), ["3"])
        self.assertIsNone(received.message.get("X-SMTPAPI"))
        self.assertIsNotNone(received.message.get("Received"))
        final = self.wait_status(message_id)
        self.assertEqual(final["status"], "sent")
        self.assertEqual(len(final["recipients"]), 2)
        for recipient in final["recipients"]:
            self.assertEqual(set(recipient), RECIPIENT_FIELDS)
            self.assertEqual(recipient["status"], "sent")
            self.assertGreaterEqual(recipient["attempts"], 1)
        self.assertEqual({r["address"] for r in final["recipients"]}, {"one@dest.test", "two@dest.test"})

    def test_size_limit(self) -> None:
        """A SIZE= above max_message_size is refused at MAIL, and so is a larger message at the end of DATA (552)."""
        username, password = self.sender()
        with logged_in(self.port, username, password) as client:
            code, text = client.mail("sender@allowed.test", ["SIZE=2000001"])
            self.assertEqual(code, 552, text)
            client.rset()
            big = message(body="x" * 998 + "\r\n" + ("y" * 998 + "\r\n") * 2100)
            code, text = submit(client, "sender@allowed.test", ["rcpt@dest.test"], big)
            self.assertEqual(code, 552, text)

    def test_8bit_and_pipelining(self) -> None:
        """
        A BODY=8BITMIME message with 8-bit text is accepted and relayed
        intact behind our Received: header; MAIL, RCPT and DATA sent in one
        write (PIPELINING) get their replies in order.
        """
        username, password = self.sender()
        marker = unique("pipe")
        session = RawSession(self.port)
        try:
            session.reply()
            session.command("EHLO client.test")
            session.command("STARTTLS")
            session.starttls()
            session.command("EHLO client.test")
            self.assertTrue(session.command(f"AUTH PLAIN {plain_auth(username, password)}")[0].startswith(b"235 "))
            session.sock.sendall(
                b"MAIL FROM:<sender@allowed.test> BODY=8BITMIME\r\nRCPT TO:<a@dest.test>\r\n"
                b"RCPT TO:<b@dest.test>\r\nDATA\r\n"
            )
            replies = [session.reply()[0][:3] for _ in range(4)]
            self.assertEqual(replies, [b"250", b"250", b"250", b"354"])
            body = f"From: sender@allowed.test\r\nSubject: {marker}\r\n\r\nGr\u00fc\u00dfe aus K\u00f6ln\r\n.\r\n"
            session.sock.sendall(body.encode("utf-8"))
            self.assertRegex(session.reply()[0], rb"^250 2\.0\.0 Ok: queued as \S+\r\n$")
            session.command("QUIT")
        finally:
            session.close()
        received = self.d.sink.wait_for(marker)
        self.assertIn("Grüße aus Köln".encode(), received.content)
        first = received.content.split(b"\r\n" if b"\r\n" in received.content else b"\n", 1)[0]
        self.assertTrue(first.startswith(b"Received:"), received.content[:200])
        self.assertIn(b"mx.contract.test", received.content.split(b"Subject:")[0])

    def test_priority_sources(self) -> None:
        """
        The message priority comes from X-SMTPAPI Priority, else MT-PRIORITY
        (clamp(3 - round(n/3), 1, 5)), else X-Priority, else 3; the effective
        priority is the numerically lower of it and the user's default; the
        API and the relayed X-Priority show the effective one.
        """
        cases = [
            # (user default, headers, MAIL parameters, expected).  A user
            # default of 5 lets the message's own priority through.
            (5, ['X-SMTPAPI: {"Priority": 2}', "X-Priority: 5"], ("MT-PRIORITY=-9",), 2),
            (5, ['X-SMTPAPI: {"Priority": 4}', "X-Priority: 1"], ("MT-PRIORITY=9",), 4),
            (5, ["X-Priority: 5"], ("MT-PRIORITY=9",), 1),
            (5, ["X-Priority: 1"], ("MT-PRIORITY=-9",), 5),
            (5, [], ("MT-PRIORITY=0",), 3),
            (5, [], ("MT-PRIORITY=-9",), 5),
            (5, [], ("MT-PRIORITY=4",), 2),
            (5, [], ("MT-PRIORITY=-5",), 5),
            (5, [], ("MT-PRIORITY=-2",), 4),
            (5, ["X-Priority: 4 (Low)"], (), 4),
            (5, [], (), 3),
            (3, ["X-Priority: 5"], (), 3),
            (3, [], ("MT-PRIORITY=-9",), 3),
            (2, ["X-Priority: 4"], (), 2),
            (2, ['X-SMTPAPI: {"Priority": 1}'], (), 1),
            (4, [], (), 3),
        ]
        users = {p: self.sender(priority=p) for p in {c[0] for c in cases}}
        sent = []
        for default, headers, options, expected in cases:
            marker = unique("prio")
            username, password = users[default]
            reply = self.send(username, password, data=message(subject=marker, headers=headers), mail_options=options)
            sent.append((queue_id(reply), marker, expected, (default, headers, options)))
        for message_id, marker, expected, case in sent:
            self.assertEqual(self.message(message_id)["priority"], expected, case)
            received = self.d.sink.wait_for(marker)
            self.assertEqual(received.message.get_all("X-Priority"), [str(expected)], case)
            self.assertIsNone(received.message.get("X-SMTPAPI"), case)

    def test_invalid_smtpapi(self) -> None:
        """Invalid JSON in X-SMTPAPI gets 550 5.6.0 with the reason."""
        username, password = self.sender()
        code, text = self.send(username, password, data=message(headers=["X-SMTPAPI: {not json"]))
        self.assertEqual(code, 550, text)
        self.assertTrue(text.startswith("5.6.0"), text)
        self.assertGreater(len(text), len("5.6.0 "))

    def test_schedule_and_campaign(self) -> None:
        """X-SMTPAPI Schedule holds the message (status scheduled); CampaignCode shows as campaign_code."""
        username, password = self.sender()
        marker = unique("sched")
        api = json.dumps({"Schedule": "2099-01-01T00:00:00Z", "CampaignCode": "camp-sched"})
        message_id = queue_id(self.send(username, password, data=message(subject=marker, headers=[f"X-SMTPAPI: {api}"])))
        stored = self.message(message_id)
        self.assertEqual(stored["status"], "scheduled")
        self.assertEqual(stored["campaign_code"], "camp-sched")
        time.sleep(1.5)
        self.assertEqual(self.d.sink.find(marker), [])
        self.assertEqual(self.message(message_id)["status"], "scheduled")
        listed = self.d.api("GET", f"/api/v1/messages?user={username}&status=scheduled").json["messages"]
        self.assertEqual([m["id"] for m in listed], [message_id])

    def test_implicit_tls_port(self) -> None:
        """A tls_ports port speaks TLS at once: smtplib.SMTP_SSL can AUTH and send; /settings lists it."""
        username, password = self.sender()
        marker = unique("ssl")
        with smtplib.SMTP_SSL("127.0.0.1", self.d.tls_ports[0], timeout=15, context=client_context()) as client:
            client.ehlo("client.test")
            self.assertEqual(set(client.esmtp_features["auth"].upper().split()), {"PLAIN", "LOGIN"})
            client.login(username, password)
            message_id = queue_id(submit(client, "sender@allowed.test", ["rcpt@dest.test"], message(subject=marker)))
        self.d.sink.wait_for(marker)
        self.assertEqual(self.wait_status(message_id)["status"], "sent")
        settings = self.d.api("GET", "/api/v1/settings").json
        self.assertEqual(settings["listening_tls_ports"], self.d.tls_ports)

    def test_bounce_and_partial(self) -> None:
        """
        A permanently refused recipient bounces: the envelope sender gets an
        RFC 3464 multipart/report from <>; some sent and some bounced is
        `partial`, all bounced is `bounced`; a bounce event is recorded.
        """
        username, password = self.sender()
        marker = unique("partial")
        partial = queue_id(
            self.send(
                username,
                password,
                mail_from="owner@allowed.test",
                recipients=("ok@dest.test", "bounce-1@dest.test"),
                data=message(subject=marker),
            )
        )
        bounced = queue_id(self.send(username, password, recipients=("bounce-2@dest.test",), data=message(subject=marker + "b")))
        result = self.wait_status(partial)
        self.assertEqual(result["status"], "partial")
        statuses = {r["address"]: r for r in result["recipients"]}
        self.assertEqual(statuses["ok@dest.test"]["status"], "sent")
        self.assertEqual(statuses["bounce-1@dest.test"]["status"], "bounced")
        self.assertIn("550", statuses["bounce-1@dest.test"]["last_response"] or "")
        self.assertEqual(self.wait_status(bounced)["status"], "bounced")

        def dsn() -> Any:
            return [m for m in self.d.sink.find("bounce-1@dest.test") if m.rcpt_tos == ["owner@allowed.test"]]

        reports = poll(dsn, 15)
        self.assertTrue(reports, "no bounce reached the envelope sender")
        report = reports[0]
        self.assertIn(report.mail_from, ("<>", ""))
        self.assertEqual(report.message.get_content_type(), "multipart/report")
        self.assertEqual(report.message.get_param("report-type"), "delivery-status")
        parts = [p.get_content_type() for p in report.message.iter_parts()]
        self.assertIn("message/delivery-status", parts)
        found = poll(lambda: {e["message_id"] for e in self.events(type="bounce", user=username)} >= {partial, bounced}, 10)
        self.assertTrue(found, self.events(type="bounce", user=username))

    def test_retry_until_lifetime(self) -> None:
        """
        A temporarily refused recipient is deferred and retried after the
        retry_schedule interval until max_queue_lifetime, then it bounces.
        """
        username, password = self.sender()
        message_id = queue_id(self.send(username, password, recipients=("defer-1@dest.test",)))
        deferred = self.wait_status(message_id, ("deferred",), 10)
        self.assertIn("451", deferred["recipients"][0]["last_response"] or "")
        final = self.wait_status(message_id, FINAL, 20)
        self.assertEqual(final["status"], "bounced")
        self.assertGreaterEqual(final["recipients"][0]["attempts"], 2)


# --- section 4: REST API --------------------------------------------------------------


class AdminAPIContractTests(_MainDaemon, unittest.TestCase):
    def assertError(self, response: Any, status: int) -> None:
        self.assertEqual(response.status, status, response)
        self.assertEqual(set(response.json), {"error"}, response)
        self.assertEqual(set(response.json["error"]), {"code", "message"}, response)
        self.assertIsInstance(response.json["error"]["code"], str)
        self.assertIsInstance(response.json["error"]["message"], str)
        self.assertTrue(response.json["error"]["code"])

    def test_token_required(self) -> None:
        """Every endpoint answers 401 with the JSON error without or with a wrong bearer token."""
        requests = [
            ("GET", "/api/v1/settings"),
            ("GET", "/api/v1/users"),
            ("POST", "/api/v1/users"),
            ("GET", "/api/v1/users/someone"),
            ("PATCH", "/api/v1/users/someone"),
            ("DELETE", "/api/v1/users/someone"),
            ("POST", "/api/v1/users/someone/password"),
            ("GET", "/api/v1/messages"),
            ("GET", "/api/v1/messages/xyz"),
            ("GET", "/api/v1/notifications"),
            ("GET", "/api/v1/stats"),
            ("GET", "/api/v1/openapi.json"),
        ]
        for method, path in requests:
            body = {} if method in ("POST", "PATCH") else None
            self.assertError(api_request(self.d.admin_port, method, path, body), 401)
            self.assertError(api_request(self.d.admin_port, method, path, body, token="wrong"), 401)
        self.assertEqual(self.d.api("GET", "/api/v1/users").status, 200)

    def test_settings(self) -> None:
        """GET /settings: hostname, port specs, the ports actually bound, STARTTLS, AUTH mechanisms."""
        response = self.d.api("GET", "/api/v1/settings")
        self.assertEqual(response.status, 200)
        self.assertTrue(response.headers["Content-Type"].startswith("application/json"))
        s = response.json
        self.assertEqual(s["hostname"], "mx.contract.test")
        self.assertEqual(s["ports"], f"{self.d.plain_ports[0]}-{self.d.plain_ports[1]}")
        self.assertEqual(s["listening_ports"], self.d.plain_ports)
        self.assertEqual(s["tls_ports"], str(self.d.tls_ports[0]))
        self.assertEqual(s["listening_tls_ports"], self.d.tls_ports)
        self.assertEqual(s["encryption"], "STARTTLS")
        self.assertEqual({m.upper() for m in s["auth_mechanisms"]}, {"PLAIN", "LOGIN"})

    def test_create_with_defaults(self) -> None:
        """POST {} creates a user with a generated smtp-xxxxxxxx name and the defaults; 201 with the one-time password."""
        response = self.d.api("POST", "/api/v1/users", {})
        self.assertEqual(response.status, 201, response)
        user = response.json
        self.assertEqual(set(user), USER_FIELDS | {"password"})
        self.assertRegex(user["username"], r"^smtp-[a-z0-9]{8}$")
        self.assertIsInstance(user["password"], str)
        self.assertGreaterEqual(len(user["password"]), 12)
        expected = {
            "enabled": True,
            "priority": 3,
            "notes": "",
            "authorized_domains": [],
            "authorized_senders": [],
            "aggregation": "day",
            "sandbox": False,
            "priority_budget": 0,
        }
        self.assertEqual({k: user[k] for k in expected}, expected)
        fetched = self.d.api("GET", f"/api/v1/users/{user['username']}")
        self.assertEqual(fetched.status, 200)
        self.assertEqual(set(fetched.json), USER_FIELDS)
        self.assertEqual(fetched.json, {k: v for k, v in user.items() if k != "password"})
        listed = self.d.api("GET", "/api/v1/users").json
        self.assertEqual(set(listed), {"users"})
        self.assertIn(user["username"], [u["username"] for u in listed["users"]])
        for u in listed["users"]:
            self.assertEqual(set(u), USER_FIELDS)
        other = self.d.api("POST", "/api/v1/users", {}).json["username"]
        self.assertNotEqual(other, user["username"])

    def test_create_with_fields(self) -> None:
        """
        POST with every writable field; the ";"-separated string form of the
        authorized lists is accepted, items stripped and empty ones ignored.
        """
        name = unique("full")
        body = {
            "username": name,
            "enabled": False,
            "priority": 1,
            "notes": "billing app",
            "authorized_domains": " a.test; b.test ;; ",
            "authorized_senders": "x@c.test;  ;y@d.test",
            "aggregation": "subject",
        }
        response = self.d.api("POST", "/api/v1/users", body)
        self.assertEqual(response.status, 201, response)
        user = response.json
        self.assertEqual(user["username"], name)
        self.assertEqual((user["enabled"], user["priority"], user["notes"]), (False, 1, "billing app"))
        self.assertEqual(user["authorized_domains"], ["a.test", "b.test"])
        self.assertEqual(user["authorized_senders"], ["x@c.test", "y@d.test"])
        self.assertEqual(user["aggregation"], "subject")
        listed = [u for u in self.d.api("GET", "/api/v1/users").json["users"] if u["username"] == name]
        self.assertEqual(len(listed), 1, "disabled users are listed")
        self.assertFalse(listed[0]["enabled"])

    def test_username_validation(self) -> None:
        """Usernames match [A-Za-z0-9][A-Za-z0-9._@+-]{0,63}; others get 400; a duplicate gets 409."""
        tag = uuid.uuid4().hex[:8]
        for good in (f"A{tag}", f"{tag}.x_y-z+w@example.com", tag + "a" * 56):
            self.assertEqual(len(good) <= 64, True)
            response = self.d.api("POST", "/api/v1/users", {"username": good})
            self.assertEqual(response.status, 201, (good, response))
        for bad in ("", "-" + tag, "." + tag, f"has space{tag}", f"ü{tag}", "x" + tag + "a" * 56, f"a/{tag}", 42):
            self.assertError(self.d.api("POST", "/api/v1/users", {"username": bad}), 400)
        self.assertError(self.d.api("POST", "/api/v1/users", {"username": f"A{tag}"}), 409)

    def test_field_validation(self) -> None:
        """Bad field values get 400: priority outside 1-5, unknown aggregation, non-bool enabled, unknown field."""
        name, _ = self.user()
        for body in (
            {"priority": 0},
            {"priority": 6},
            {"priority": "2"},
            {"aggregation": "hourly"},
            {"enabled": "yes"},
            {"no_such_field": 1},
        ):
            self.assertError(self.d.api("POST", "/api/v1/users", body), 400)
            self.assertError(self.d.api("PATCH", f"/api/v1/users/{name}", body), 400)
        for aggregation in (
            "day",
            "week",
            "month",
            "year",
            "subject",
            "dynamic_subject",
            "sender_email",
            "sender_name",
            "sender_email_subject",
            "user",
        ):
            response = self.d.api("PATCH", f"/api/v1/users/{name}", {"aggregation": aggregation})
            self.assertEqual((response.status, response.json["aggregation"]), (200, aggregation))

    def test_not_json(self) -> None:
        """A body that is not JSON gets 415."""
        self.assertError(
            self.d.api("POST", "/api/v1/users", raw=b"username=abc", content_type="application/x-www-form-urlencoded"),
            415,
        )
        self.assertError(self.d.api("POST", "/api/v1/users", raw=b"{not json", content_type="application/json"), 415)
        name, _ = self.user()
        self.assertError(self.d.api("PATCH", f"/api/v1/users/{name}", raw=b"notes=x", content_type="text/plain"), 415)

    def test_unknown_things(self) -> None:
        """An unknown user or message gets 404 on every route that names one."""
        name = unique("ghost")
        self.assertError(self.d.api("GET", f"/api/v1/users/{name}"), 404)
        self.assertError(self.d.api("PATCH", f"/api/v1/users/{name}", {"notes": "x"}), 404)
        self.assertError(self.d.api("DELETE", f"/api/v1/users/{name}"), 404)
        self.assertError(self.d.api("POST", f"/api/v1/users/{name}/password"), 404)
        self.assertError(self.d.api("GET", "/api/v1/messages/no-such-message"), 404)

    def test_patch(self) -> None:
        """PATCH changes the given writable fields, answers 200 with the user, and updated_at moves on."""
        name, _ = self.user(notes="before")
        before = self.d.api("GET", f"/api/v1/users/{name}").json
        time.sleep(1.1)
        response = self.d.api(
            "PATCH",
            f"/api/v1/users/{name}",
            {"notes": "after", "priority": 2, "authorized_domains": "x.test;y.test", "enabled": False},
        )
        self.assertEqual(response.status, 200, response)
        user = response.json
        self.assertEqual(set(user), USER_FIELDS)
        self.assertEqual(user["notes"], "after")
        self.assertEqual(user["priority"], 2)
        self.assertEqual(user["authorized_domains"], ["x.test", "y.test"])
        self.assertFalse(user["enabled"])
        self.assertEqual(user["authorized_senders"], before["authorized_senders"])
        self.assertEqual(user["created_at"], before["created_at"])
        self.assertGreater(user["updated_at"], before["updated_at"])
        self.assertEqual(self.d.api("GET", f"/api/v1/users/{name}").json, user)

    def test_delete(self) -> None:
        """DELETE answers 204; the user is gone and can no longer authenticate."""
        name, password = self.sender()
        logged_in(self.port, name, password).quit()
        response = self.d.api("DELETE", f"/api/v1/users/{name}")
        self.assertEqual(response.status, 204)
        self.assertEqual(response.body, b"")
        self.assertError(self.d.api("GET", f"/api/v1/users/{name}"), 404)
        with self.assertRaises(smtplib.SMTPAuthenticationError) as caught:
            logged_in(self.port, name, password).close()
        self.assertEqual(caught.exception.smtp_code, 535)

    def test_regenerate_password(self) -> None:
        """POST .../password answers {username, password}; the old password stops working at once."""
        name, old = self.sender()
        logged_in(self.port, name, old).quit()
        response = self.d.api("POST", f"/api/v1/users/{name}/password")
        self.assertEqual(response.status, 200, response)
        self.assertEqual(set(response.json), {"username", "password"})
        self.assertEqual(response.json["username"], name)
        new = response.json["password"]
        self.assertNotEqual(new, old)
        with self.assertRaises(smtplib.SMTPAuthenticationError) as caught:
            logged_in(self.port, name, old).close()
        self.assertEqual(caught.exception.smtp_code, 535)
        logged_in(self.port, name, new).quit()

    def test_password_never_shown_again(self) -> None:
        """No password or hash appears in the user reads, and no password in the daemon's log."""
        name, password = self.user()
        regenerated = self.d.api("POST", f"/api/v1/users/{name}/password").json["password"]
        for response in (self.d.api("GET", f"/api/v1/users/{name}"), self.d.api("GET", "/api/v1/users")):
            self.assertNotIn(b"password", response.body.lower())
            self.assertNotIn(b"$2b$", response.body)
            self.assertNotIn(password.encode(), response.body)
        log = self.d.process.output()
        self.assertNotIn(password, log)
        self.assertNotIn(regenerated, log)
        self.assertNotIn("$2b$", log)

    def test_messages_list(self) -> None:
        """GET /messages: newest first; user, status and limit filter; a bad status is a 400."""
        name, password = self.sender()
        other, other_password = self.sender()
        ids = []
        with logged_in(self.port, name, password) as client:
            for i in range(3):
                ids.append(queue_id(submit(client, "sender@allowed.test", ["r@dest.test"], message(subject=f"n{i}"))))
                time.sleep(1.05)  # distinct created_at seconds
        queue_id(self.send(other, other_password))
        listed = self.d.api("GET", f"/api/v1/messages?user={name}").json
        self.assertEqual(set(listed), {"messages", "next_cursor"})
        self.assertEqual([m["id"] for m in listed["messages"]], ids[::-1])
        for m in listed["messages"]:
            self.assertEqual(set(m), MESSAGE_FIELDS)
        limited = self.d.api("GET", f"/api/v1/messages?user={name}&limit=2").json["messages"]
        self.assertEqual([m["id"] for m in limited], ids[::-1][:2])
        everyone = self.d.api("GET", "/api/v1/messages?limit=1000").json["messages"]
        self.assertTrue({m["user"] for m in everyone} >= {name, other})
        stamps = [m["created_at"] for m in everyone]
        self.assertEqual(stamps, sorted(stamps, reverse=True))
        for message_id in ids:
            self.wait_status(message_id)
        sent = self.d.api("GET", f"/api/v1/messages?user={name}&status=sent").json["messages"]
        self.assertEqual([m["id"] for m in sent], ids[::-1])
        self.assertEqual(self.d.api("GET", f"/api/v1/messages?user={name}&status=bounced").json["messages"], [])
        self.assertError(self.d.api("GET", "/api/v1/messages?status=lost"), 400)

    def test_notifications_filters(self) -> None:
        """GET /notifications filters by type and user, newest first, with the event shape."""
        name, password = self.sender()
        other, other_password = self.sender()
        for user, secret in ((name, password), (other, other_password), (name, password)):
            self.assertEqual(self.send(user, secret, mail_from="x@forbidden.test")[0], 550)
            time.sleep(1.05)
        mine = self.events(type="sender_domain", user=name)
        self.assertEqual(len(mine), 2, mine)
        self.assertGreater(mine[0]["created_at"], mine[1]["created_at"])
        self.assertEqual({e["user"] for e in self.events(user=other)}, {other})
        everything = self.events()
        self.assertTrue({e["id"] for e in mine} <= {e["id"] for e in everything})
        for event in everything:
            self.assertEqual(set(event), EVENT_FIELDS)
            self.assertIn(event["type"], ("sender_domain", "send_problem", "bounce", "delivery_delay", "account_block"))
        stamps = [e["created_at"] for e in everything]
        self.assertEqual(stamps, sorted(stamps, reverse=True))
        self.assertTrue(all(e["type"] == "bounce" for e in self.events(type="bounce")))
        self.assertError(self.d.api("GET", "/api/v1/notifications?type=nonsense"), 400)

    def test_openapi(self) -> None:
        """GET /openapi.json is an OpenAPI 3 document describing every endpoint."""
        response = self.d.api("GET", "/api/v1/openapi.json")
        self.assertEqual(response.status, 200)
        document = response.json
        self.assertTrue(str(document["openapi"]).startswith("3."), document.get("openapi"))
        self.assertIn("info", document)
        paths = {re.sub(r"\{[^}]+\}", "{}", p.removeprefix("/api/v1")) for p in document["paths"]}
        for path in (
            "/settings",
            "/users",
            "/users/{}",
            "/users/{}/password",
            "/messages",
            "/messages/{}",
            "/notifications",
            "/stats",
            "/openapi.json",
        ):
            self.assertIn(path, paths)

    def test_stats_policies(self) -> None:
        """
        GET /stats groups by every policy with the contract's keys; a refusal
        at MAIL FROM counts as rejected under key "" for subject policies;
        a CampaignCode message counts under its code; sender_email is lower-cased.
        """
        name, password = self.user(authorized_domains=["example.com"], aggregation="subject")
        subject = "Ticket 4711 solved"
        data = message(subject=subject, from_="Alice Example <Alice@Example.COM>")
        with logged_in(self.port, name, password) as client:
            message_id = queue_id(submit(client, "alice@example.com", ["a@dest.test", "b@dest.test"], data))
            self.assertEqual(submit(client, "alice@elsewhere.test", ["a@dest.test"], data)[0], 550)
            campaign = message(subject="Spring", from_="alice@example.com", headers=['X-SMTPAPI: {"CampaignCode": "spring-sale"}'])
            campaign_id = queue_id(submit(client, "alice@example.com", ["c@dest.test"], campaign))
        created = self.wait_status(message_id)["created_at"]
        self.wait_status(campaign_id)
        day = datetime.datetime.strptime(created[:10], "%Y-%m-%d").date()
        iso = day.isocalendar()
        expected_keys = {
            "day": day.strftime("%Y-%m-%d"),
            "week": f"{iso[0]:04d}-W{iso[1]:02d}",
            "month": day.strftime("%Y-%m"),
            "year": day.strftime("%Y"),
            "subject": subject,
            "dynamic_subject": "Ticket {n} solved",
            "sender_email": "alice@example.com",
            "sender_name": "Alice Example",
            "sender_email_subject": f"alice@example.com | {subject}",
            "user": name,
        }

        def groups(policy: str | None) -> dict[str, dict[str, int]]:
            query = f"user={name}" + (f"&policy={policy}" if policy else "")
            response = self.d.api("GET", f"/api/v1/stats?{query}")
            assert response.status == 200, response
            assert set(response.json) == {"policy", "groups"}, response.json
            assert response.json["policy"] == (policy or "subject"), response.json
            result = {}
            for group in response.json["groups"]:
                assert set(group) == GROUP_FIELDS, group
                result[group["key"]] = group
            return result

        settled = poll(lambda: groups("subject").get(subject, {}).get("sent") == 2 and groups("subject"), 10, 0.3)
        self.assertTrue(settled, groups("subject"))
        for policy, key in expected_keys.items():
            found = groups(policy)
            self.assertIn(key, found, (policy, found))
            self.assertIn("spring-sale", found, (policy, found))
            self.assertEqual(found["spring-sale"]["messages"], 1, policy)
            group = found[key]
            self.assertEqual((group["recipients"], group["sent"], group["deferred"], group["bounced"]), (2, 2, 0, 0), policy)
            if policy in ("subject", "dynamic_subject", "sender_email_subject"):
                self.assertEqual(group["messages"], 1, policy)
                self.assertEqual(group["rejected"], 0, policy)
                self.assertEqual(found[""]["rejected"], 1, (policy, found))
                self.assertEqual(found[""]["recipients"], 0, (policy, found))
        self.assertEqual(sum(g["rejected"] for g in groups("day").values()), 1)
        self.assertEqual(groups(None), groups("subject"))
        self.assertError(self.d.api("GET", "/api/v1/stats?policy=hourly"), 400)


# --- section 3: queue order, Schedule, limits --------------------------------------------------


def queue_config(d: Daemon) -> str:
    return d.toml(
        hostname="mx.contract.test",
        smtp="max_recipients = 3\nidle_timeout = 2",
        delivery="max_concurrency = 1\nrate_limit = 4",
    )


QUEUE = Shared(lambda: Daemon(queue_config, plain=1, tls=0))


class QueueContractTests(_MainDaemon, unittest.TestCase):
    def setUp(self) -> None:
        self.d = QUEUE.get()
        self.port = self.d.plain_ports[0]

    def test_priority_order(self) -> None:
        """
        With one delivery at a time, messages waiting behind a slow one leave
        in priority order, whatever their arrival order.
        """
        username, password = self.sender(priority=5)
        marker = unique("order")
        queued_at = {}
        with logged_in(self.port, username, password) as client:
            slow = message(subject=f"{marker} slow", headers=['X-SMTPAPI: {"Priority": 1}'])
            queue_id(submit(client, "s@allowed.test", ["slow@dest.test"], slow))
            in_flight = poll(
                lambda: self.d.api("GET", f"/api/v1/messages?user={username}").json["messages"][0]["status"] == "sending",
                5,
                0.05,
            )
            self.assertTrue(in_flight)
            for i, level in enumerate((5, 4, 5, 3, 2, 1)):
                subject = f"{marker} n{i} p{level}"
                data = message(subject=subject, headers=[f'X-SMTPAPI: {{"Priority": {level}}}'])
                queue_id(submit(client, "s@allowed.test", ["r@dest.test"], data))
                queued_at[subject] = time.time()
        arrived = poll(lambda: len(self.d.sink.find(marker)) == 7 and self.d.sink.find(marker), 30)
        self.assertTrue(arrived, len(self.d.sink.find(marker)))
        self.assertTrue(arrived[0].message["Subject"].endswith("slow"))
        # Only the messages queued while the slow one was still in flight
        # were waiting together (a loaded machine may queue some later).
        waiting = [m for m in arrived[1:] if queued_at[m.message["Subject"]] < arrived[0].at]
        if len(waiting) < 3:
            raise unittest.SkipTest("machine too slow: the slow delivery ended before the others were queued")
        levels = [int(m.message["Subject"].rsplit("p", 1)[1]) for m in waiting]
        self.assertEqual(levels, sorted(levels), [m.message["Subject"] for m in arrived])

    def test_schedule_holds_until_then(self) -> None:
        """A message with X-SMTPAPI Schedule is held until that moment, then delivered."""
        username, password = self.sender()
        marker = unique("later")
        when = int(time.time()) + 3
        stamp = datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        data = message(subject=marker, headers=[f'X-SMTPAPI: {{"Schedule": "{stamp}"}}'])
        message_id = queue_id(self.send(username, password, data=data))
        self.assertEqual(self.message(message_id)["status"], "scheduled")
        received = self.d.sink.wait_for(marker, 15)
        self.assertGreaterEqual(received.at, when - 0.5)
        self.assertEqual(self.wait_status(message_id)["status"], "sent")

    def test_rate_limit(self) -> None:
        """rate_limit = 4: nine messages submitted at once leave over at least about a second."""
        username, password = self.sender()
        marker = unique("rate")
        with logged_in(self.port, username, password) as client:
            for i in range(9):
                queue_id(submit(client, "s@allowed.test", [f"r{i}@dest.test"], message(subject=f"{marker} {i}")))
        arrived = poll(lambda: len(self.d.sink.find(marker)) == 9 and self.d.sink.find(marker), 20)
        self.assertTrue(arrived)
        times = sorted(m.at for m in arrived)
        self.assertGreaterEqual(times[-1] - times[0], 1.0)

    def test_max_recipients(self) -> None:
        """The recipient after max_recipients is refused."""
        username, password = self.sender()
        with logged_in(self.port, username, password) as client:
            self.assertEqual(client.mail("s@allowed.test")[0], 250)
            for i in range(3):
                self.assertEqual(client.rcpt(f"r{i}@dest.test")[0], 250)
            code, text = client.rcpt("r3@dest.test")
            self.assertGreaterEqual(code, 400, text)

    def test_idle_timeout(self) -> None:
        """An idle session is closed with a 421 after idle_timeout seconds."""
        session = RawSession(self.port)
        try:
            session.reply()
            session.command("EHLO client.test")
            started = time.monotonic()
            reply = session.reply()
            self.assertTrue(reply[0].startswith(b"421 "), reply)
            self.assertLess(time.monotonic() - started, 10)
        finally:
            session.close()


# --- sections 1 and 2: running and configuration ---------------------------------------


def lifecycle_config(d: Daemon) -> str:
    # Deliberately wrong ports and state_dir: the command line overrides them.
    return f"""
[server]
hostname = "mx.contract.test"
state_dir = "{d.directory}/not-this-one"
[smtp]
listen = "127.0.0.1"
ports = "{d.tls_ports[0]}"
auth_requires_tls = false
[delivery]
mode = "smarthost"
smarthost = "127.0.0.1:{d.sink_port}"
smarthost_tls = "none"
retry_schedule = [1]
[admin]
listen = "127.0.0.1"
port = {d.sink_port}
"""


class LifecycleContractTests(unittest.TestCase):
    def test_overrides_state_dir_and_sigterm(self) -> None:
        """
        --ports, --state-dir and --admin-port override the file; everything
        is written under state_dir (database, spool, TLS key, admin-token
        0600); without auth_requires_tls AUTH works on plaintext; on SIGTERM
        new connections are refused, a session in DATA may finish, and the
        daemon exits within 10 s with status 0 (or by the signal); after a
        restart the token, key, users and queued message are still there.
        """
        d = Daemon(
            lifecycle_config,
            args=lambda d: ["--ports", str(d.plain_ports[0]), "--state-dir", d.state_dir, "--admin-port", str(d.admin_port)],
            plain=1,
            sink=False,
            wait=False,
        )
        self.addCleanup(d.stop)
        d.wait_ready([d.plain_ports[0], d.admin_port])
        self.assertTrue(port_is_free(d.tls_ports[0]), "the file's port is overridden")
        self.assertTrue(port_is_free(d.sink_port), "the file's admin port is overridden")
        self.assertFalse(os.path.exists(os.path.join(d.directory, "not-this-one")))

        mode = stat.S_IMODE(os.stat(os.path.join(d.state_dir, "admin-token")).st_mode)
        self.assertEqual(mode, 0o600)
        settings = d.api("GET", "/api/v1/settings").json
        self.assertEqual((settings["ports"], settings["listening_ports"]), (str(d.plain_ports[0]), d.plain_ports))
        self.assertTrue(os.path.exists(os.path.join(d.state_dir, "smtpplus.db")))
        self.assertTrue(os.path.isdir(os.path.join(d.state_dir, "spool")))
        keys = []
        for root, _, files in os.walk(d.state_dir):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    if b"PRIVATE KEY-----" in f.read():
                        keys.append(name)
        self.assertTrue(keys, "no generated TLS key under state_dir")
        self.assertEqual(sorted(os.listdir(d.directory)), ["smtpplus.toml", "state", "twistd.out"])

        username, password = d.create_user(authorized_domains=["allowed.test"])
        port = d.plain_ports[0]
        client = smtp(port)
        try:
            client.ehlo("client.test")
            self.assertIn("PLAIN", client.esmtp_features.get("auth", "").upper())
            client.login(username, password)
            self.assertEqual(client.mail("sender@allowed.test")[0], 250)
            self.assertEqual(client.rcpt("rcpt@dest.test")[0], 250)
            code, _ = client.docmd("DATA")
            self.assertEqual(code, 354)
            client.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
            d.process.terminate()

            def refused() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=2).close()
                except OSError:
                    return True
                return False

            self.assertTrue(poll(refused, 5), "new connections still accepted after SIGTERM")
            client.send(b"second half\r\n.\r\n")
            code, text = client.getreply()
            self.assertEqual(code, 250, text)
            self.assertTrue(text.startswith(b"2.0.0 Ok: queued as "), text)
            message_id = text.split()[-1].decode()
        finally:
            client.close()
        status = d.process.wait(10)
        self.assertIsNotNone(status, "still running 10 s after SIGTERM")
        self.assertIn(status, (0, -signal.SIGTERM), d.process.output())
        self.assertNotIn("Traceback", d.process.output())

        # A restart keeps the generated token and TLS key, the users and the
        # queue: the message accepted during the shutdown is delivered now.
        token_before = d.token
        key_files = {name: open(os.path.join(root, name), "rb").read() for root, _, files in os.walk(d.state_dir) for name in files if name in keys}
        d.sink = Smarthost(d.sink_port, conventions=True)
        d.restart()
        d.wait_ready([d.plain_ports[0], d.admin_port])
        with open(os.path.join(d.state_dir, "admin-token")) as f:
            self.assertEqual(f.read().strip(), token_before)
        for root, _, files in os.walk(d.state_dir):
            for name in files:
                if name in key_files:
                    with open(os.path.join(root, name), "rb") as f:
                        self.assertEqual(f.read(), key_files[name], name)
        self.assertEqual(d.api("GET", f"/api/v1/users/{username}").status, 200)
        delivered = poll(lambda: d.api("GET", f"/api/v1/messages/{message_id}").json["status"] == "sent", 15, 0.2)
        self.assertTrue(delivered, (d.api("GET", f"/api/v1/messages/{message_id}").json, d.process.output()[-3000:]))
        self.assertTrue(d.sink.find("in flight"))


def _bad_configs() -> dict[str, tuple[int | None, str]]:
    port, admin = free_port_range(2)
    scratch = tempfile.mkdtemp(prefix="smtpplus-contract-")
    atexit.register(shutil.rmtree, scratch, True)
    garbage = os.path.join(scratch, "garbage.pem")
    with open(garbage, "w") as f:
        f.write("this is not a certificate\n")

    def base(extra: str = "", smtp: str = "", ports: str = str(port)) -> str:
        return (
            f'[server]\nstate_dir = "{scratch}/state"\n'
            f'[smtp]\nlisten = "127.0.0.1"\nports = "{ports}"\n{smtp}\n'
            f"[admin]\nport = {admin}\n{extra}\n"
        )

    return run_configs(
        {
            "unknown_key": (base(smtp="prots = 25"), ()),
            "port_70000": (base(ports=f"{port},70000"), ()),
            "backwards_range": (base(smtp='tls_ports = "5000-1025"'), ()),
            "admin_port_option": (base(), ("--admin-port", "70000")),
            "missing_certificate": (
                base(f'[tls]\ncertificate = "{scratch}/none.pem"\nprivate_key = "{scratch}/none.key"\n'),
                (),
            ),
            "garbage_certificate": (base(f'[tls]\ncertificate = "{garbage}"\nprivate_key = "{garbage}"\n'), ()),
        }
    )


BAD_CONFIGS: dict[str, tuple[int | None, str]] = {}


class ConfigContractTests(unittest.TestCase):
    def setUp(self) -> None:
        # All the bad configurations start at once, the first time.
        if not BAD_CONFIGS:
            BAD_CONFIGS.update(_bad_configs())

    def check_refused(self, case: str, key: str, value: str | None = None) -> None:
        status, output = BAD_CONFIGS[case]
        self.assertIsNotNone(status, f"still running:\n{output}")
        self.assertNotEqual(status, 0, output)
        self.assertNotIn("Traceback", output)
        lines = [line for line in output.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, f"not one line:\n{output}")
        self.assertIn(key, lines[0])
        if value is not None:
            self.assertIn(value, lines[0])

    def test_unknown_key(self) -> None:
        """An unknown key stops start-up with one line naming it."""
        self.check_refused("unknown_key", "prots")

    def test_port_out_of_range(self) -> None:
        """A port 70000 in ports stops start-up with one line naming the key and the value."""
        self.check_refused("port_70000", "ports", "70000")

    def test_backwards_range(self) -> None:
        """A range 5000-1025 stops start-up with one line naming the key and the range."""
        self.check_refused("backwards_range", "tls_ports", "5000-1025")

    def test_admin_port_override_out_of_range(self) -> None:
        """--admin-port 70000 is refused with one line naming it."""
        self.check_refused("admin_port_option", "admin", "70000")

    def test_missing_certificate(self) -> None:
        """A certificate file that cannot be read stops start-up with one line naming the key."""
        self.check_refused("missing_certificate", "certificate")

    def test_garbage_certificate(self) -> None:
        """A certificate file that holds no PEM certificate stops start-up with one line naming the key."""
        self.check_refused("garbage_certificate", "certificate")


def ports_config(extra: str = "") -> Any:
    def config(d: Daemon) -> str:
        return d.toml(hostname="mx.contract.test", smtp=extra, delivery=None)

    return config


class PortsContractTests(unittest.TestCase):
    def hold(self, ports: list[int]) -> None:
        for port in ports:
            self.addCleanup(occupy(port).close)

    def test_busy_port_warned_rest_served(self) -> None:
        """A port in use is named in one warning line with the reason; the other ports are served."""
        d = Daemon(ports_config(), wait=False, sink=False, prepare=lambda d: self.hold(d.plain_ports[1:2]))
        self.addCleanup(d.stop)
        busy, free = d.plain_ports[1], d.plain_ports[:1]
        d.wait_ready(free + d.tls_ports + [d.admin_port])
        self.assertTrue(poll(lambda: str(busy) in d.process.output(), 5), d.process.output())
        lines = [line for line in d.process.output().splitlines() if str(busy) in line]
        self.assertEqual(len(lines), 1, lines)
        self.assertRegex(lines[0].lower(), r"in use")
        self.assertEqual(d.api("GET", "/api/v1/settings").json["listening_ports"], free)
        self.assertIsNone(d.process.proc.poll())

    def test_only_tls_port_is_enough(self) -> None:
        """When no plain port can be bound but an implicit TLS port can, the daemon serves it."""
        d = Daemon(ports_config(), wait=False, sink=False, prepare=lambda d: self.hold(d.plain_ports))
        self.addCleanup(d.stop)
        d.wait_ready(d.tls_ports + [d.admin_port])
        settings = d.api("GET", "/api/v1/settings").json
        self.assertEqual(settings["listening_ports"], [])
        self.assertEqual(settings["listening_tls_ports"], d.tls_ports)
        with smtplib.SMTP_SSL("127.0.0.1", d.tls_ports[0], timeout=15, context=client_context()) as client:
            self.assertEqual(client.ehlo("client.test")[0], 250)

    def test_require_all_ports(self) -> None:
        """With require_all_ports = true one busy port stops start-up with a non-zero status and frees the rest."""
        d = Daemon(
            ports_config("require_all_ports = true"), wait=False, sink=False, prepare=lambda d: self.hold(d.tls_ports)
        )
        self.addCleanup(d.stop)
        status = d.process.wait(30)
        self.assertIsNotNone(status, d.process.output())
        self.assertNotEqual(status, 0)
        self.assertNotIn("Traceback", d.process.output())
        self.assertIn(str(d.tls_ports[0]), d.process.output())
        self.assertTrue(all(port_is_free(p) for p in d.plain_ports))


# --- notifications: outages, delays, locks, webhooks --------------------------------------


def outage_config(hook_port: int) -> Any:
    def config(d: Daemon) -> str:
        return d.toml(
            hostname="mx.contract.test",
            delivery="retry_schedule = [1]\nmax_queue_lifetime = 600",
            tables=(
                f'[notifications]\nwebhook_url = "http://127.0.0.1:{hook_port}/hook"\ndelivery_delay_threshold = 1\n'
                "[security]\nauth_failures_per_ip = 1000\nauth_failures_per_user = 3\nauth_lock_seconds = 600\n"
            ),
        )

    return config


class NotificationContractTests(unittest.TestCase):
    def setUp(self) -> None:
        hook_port = free_port_range(1)[0]
        self.hook = WebhookReceiver(hook_port)
        self.addCleanup(self.hook.stop)
        self.d = Daemon(outage_config(hook_port), plain=1, tls=0, sink=False)
        self.addCleanup(self.d.stop)
        self.d.sink = Smarthost(self.d.sink_port, conventions=True, start=False)

    def events(self, **query: str) -> list[dict[str, Any]]:
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        return self.d.api("GET", f"/api/v1/notifications?{qs}").json["notifications"]

    def message(self, message_id: str) -> dict[str, Any]:
        return self.d.api("GET", f"/api/v1/messages/{message_id}").json

    def send(self, name: str, password: str) -> str:
        with logged_in(self.d.plain_ports[0], name, password) as client:
            return queue_id(submit(client, "s@allowed.test", ["r@dest.test"], message()))

    def test_outage_delay_and_webhook(self) -> None:
        """
        One send_problem event per outage of the next hop, however many
        messages fail; delivery_delay once a message waits past the
        threshold; every event is also POSTed as the event object.
        """
        name, password = self.d.create_user(authorized_domains=["allowed.test"])
        ids = [self.send(name, password) for _ in range(2)]
        retried = poll(lambda: all(self.message(i)["recipients"][0]["attempts"] >= 2 for i in ids), 15, 0.2)
        self.assertTrue(retried, [self.message(i) for i in ids])
        self.assertEqual({self.message(i)["status"] for i in ids}, {"deferred"})
        self.assertEqual(len(self.events(type="send_problem")), 1, self.events())
        delayed = poll(lambda: {e["message_id"] for e in self.events(type="delivery_delay")} >= set(ids), 10)
        self.assertTrue(delayed, self.events())

        self.d.sink.start()
        self.assertTrue(poll(lambda: all(self.message(i)["status"] == "sent" for i in ids), 15, 0.2))
        self.d.sink.stop()
        third = self.send(name, password)
        self.assertTrue(poll(lambda: self.message(third)["recipients"][0]["attempts"] >= 2, 15, 0.2))
        self.assertEqual(len(self.events(type="send_problem")), 2, self.events())

        stored = {e["id"]: e for e in self.events()}
        posted = poll(lambda: len(self.hook.events()) >= len(stored) and self.hook.events(), 10)
        self.assertTrue(posted, (self.hook.bodies, stored))
        for event in posted:
            self.assertEqual(set(event), EVENT_FIELDS)
            self.assertEqual(event, stored[event["id"]])
        self.assertTrue(all(ct.startswith("application/json") for ct, _ in self.hook.bodies))

    def test_account_block(self) -> None:
        """After auth_failures_per_user failed AUTHs the account locks (even the right password fails) and an account_block event is recorded."""
        name, password = self.d.create_user(authorized_domains=["allowed.test"])
        for _ in range(3):
            with self.assertRaises(smtplib.SMTPAuthenticationError):
                logged_in(self.d.plain_ports[0], name, "wrong").close()
        with self.assertRaises(smtplib.SMTPException):
            logged_in(self.d.plain_ports[0], name, password).close()
        blocks = poll(lambda: self.events(type="account_block", user=name), 5)
        self.assertEqual(len(blocks), 1, self.events())

