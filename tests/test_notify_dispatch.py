"""Tests for L{smtpplus.notify.dispatch}: notification mail, coalescing, digests and templates."""

from __future__ import annotations

import email
import os
import socket
from email.policy import default as default_policy
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial import unittest

from smtpplus.config import config_from_text
from smtpplus.notify.dispatch import MailNotifier, Notifier, build_notifier
from smtpplus.notify.templates import TEMPLATE_NAMES, MailTemplate, load_templates

# 2024-05-01T12:00:00Z
START = 1714564800.0


def make_event(type: str = "bounce", user: str | None = "alice", n: int = 0, detail: str = "550 unknown user") -> dict:
    return {
        "id": f"evt-{n:012d}",
        "type": type,
        "user": user,
        "message_id": f"msg-{n}",
        "detail": detail,
        "created_at": "2024-05-01T12:00:00Z",
    }


class FakeSubmit:
    """Records what would go into the delivery queue."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], bytes, int]] = []

    def __call__(self, mail_from: str, recipients: list[str], message: bytes, priority: int) -> Deferred[str]:
        self.calls.append((mail_from, recipients, message, priority))
        return succeed(f"q-{len(self.calls)}")

    def subjects(self) -> list[str]:
        return [str(email.message_from_bytes(m, policy=default_policy)["Subject"]) for _, _, m, _ in self.calls]

    def message(self, i: int) -> email.message.EmailMessage:
        return email.message_from_bytes(self.calls[i][2], policy=default_policy)


def notifier(clock: Clock, submit: FakeSubmit, frequency: dict[str, str] | None = None,
             templates_dir: str = "") -> MailNotifier:
    freq = {t: "immediate" for t in ("sender_domain", "send_problem", "bounce", "delivery_delay", "account_block")}
    freq.update(frequency or {})
    return MailNotifier(clock, submit, "relay.example.test", ["admin@example.test", "ops@example.test"], freq,
                        load_templates(templates_dir))


class MailNotifierTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.submit = FakeSubmit()

    def test_first_event_mailed_at_once(self) -> None:
        """An immediate event becomes one mail at once, from the daemon, to every recipient, priority 1."""
        notifier(self.clock, self.submit).dispatch(make_event())
        self.assertEqual(len(self.submit.calls), 1)
        mail_from, recipients, _, priority = self.submit.calls[0]
        self.assertEqual(mail_from, "smtpplus@relay.example.test")
        self.assertEqual(recipients, ["admin@example.test", "ops@example.test"])
        self.assertEqual(priority, 1)
        msg = self.submit.message(0)
        self.assertEqual(msg["Subject"], "[smtpplus] Bounce for user alice")
        self.assertEqual(msg["From"], "smtpplus <smtpplus@relay.example.test>")
        self.assertEqual(msg["To"], "admin@example.test, ops@example.test")
        self.assertEqual(msg["Auto-Submitted"], "auto-generated")
        self.assertIn("550 unknown user", msg.get_content())
        self.assertIn("msg-0", msg.get_content())

    def test_burst_coalesced(self) -> None:
        """Thousands of one event type and user within a minute become two mails: the first and one summary."""
        mail = notifier(self.clock, self.submit)
        for n in range(5000):
            mail.dispatch(make_event(n=n))
            if n % 100 == 0:
                self.clock.advance(1)
        self.assertEqual(len(self.submit.calls), 1)
        self.clock.advance(60)
        self.assertEqual(len(self.submit.calls), 2)
        self.assertEqual(self.submit.subjects()[1], "[smtpplus] 4999 more bounce events for user alice")
        body = self.submit.message(1).get_content()
        self.assertIn("evt-000000000001", body)
        self.assertIn("... and 4949 more", body)
        # A quiet window closes the burst: no more mail, and the next event is sent at once.
        self.clock.advance(60)
        self.assertEqual(len(self.submit.calls), 2)
        mail.dispatch(make_event(n=9999))
        self.assertEqual(len(self.submit.calls), 3)

    def test_steady_burst_one_mail_per_window(self) -> None:
        """An event stream that never pauses costs one summary mail per 60 s window."""
        mail = notifier(self.clock, self.submit)
        for n in range(600):  # one event per second for ten minutes
            mail.dispatch(make_event(n=n))
            self.clock.advance(1)
        self.assertEqual(len(self.submit.calls), 11)

    def test_coalesced_per_type_and_user(self) -> None:
        """Coalescing is per (type, user): another user or type still gets its first mail at once."""
        mail = notifier(self.clock, self.submit)
        mail.dispatch(make_event("bounce", "alice"))
        mail.dispatch(make_event("bounce", "alice"))
        mail.dispatch(make_event("bounce", "bob"))
        mail.dispatch(make_event("sender_domain", "alice"))
        mail.dispatch(make_event("send_problem", None, detail="mx.example.com: timeout"))
        self.assertEqual(len(self.submit.calls), 4)
        self.assertEqual(self.submit.subjects()[3], "[smtpplus] Delivery problem: mx.example.com: timeout")

    def test_hourly_digest(self) -> None:
        """Hourly events wait for the top of the hour and arrive as one digest listing each."""
        mail = notifier(self.clock, self.submit, {"bounce": "hourly"})
        self.clock.advance(600)
        mail.dispatch(make_event(n=1))
        self.clock.advance(600)
        mail.dispatch(make_event(n=2, user="bob"))
        self.assertEqual(self.submit.calls, [])
        self.clock.advance(3600 - 1200 - 1)
        self.assertEqual(self.submit.calls, [])
        self.clock.advance(1)
        self.assertEqual(self.submit.subjects(), ["[smtpplus] Hourly digest: 2 notification events"])
        body = self.submit.message(0).get_content()
        self.assertIn("between 2024-05-01T12:00:00Z and 2024-05-01T13:00:00Z", body)
        self.assertIn("evt-000000000001", body)
        self.assertIn("user=bob", body)
        self.clock.advance(7200)
        self.assertEqual(len(self.submit.calls), 1)

    def test_daily_digest_at_midnight(self) -> None:
        """Daily events are sent at midnight UTC in one digest."""
        mail = notifier(self.clock, self.submit, {"delivery_delay": "daily"})
        for n in range(3):
            mail.dispatch(make_event("delivery_delay", n=n))
            self.clock.advance(3600)
        self.assertEqual(self.submit.calls, [])
        self.clock.advance(12 * 3600 - 3 * 3600)  # now 2024-05-02T00:00:00Z
        self.assertEqual(self.submit.subjects(), ["[smtpplus] Daily digest: 3 notification events"])

    def test_off(self) -> None:
        """An event type set to off is never mailed."""
        mail = notifier(self.clock, self.submit, {"bounce": "off"})
        mail.dispatch(make_event())
        self.clock.advance(86400 * 2)
        self.assertEqual(self.submit.calls, [])

    def test_flush_sends_collected(self) -> None:
        """At shutdown the collected summary and digest are sent, and no timer is left."""
        mail = notifier(self.clock, self.submit, {"account_block": "daily"})
        mail.dispatch(make_event())
        mail.dispatch(make_event(n=1))
        mail.dispatch(make_event("account_block"))
        d = mail.flush()
        self.assertEqual(len(self.submit.calls), 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.successResultOf(d)

    def test_header_injection(self) -> None:
        """Event data cannot add header lines: CR/LF in a value stay inside the subject or body."""
        mail = notifier(self.clock, self.submit)
        mail.dispatch(make_event(user="x\r\nBcc: victim@example.com", detail="a\r\nBcc: other@example.com"))
        msg = self.submit.message(0)
        self.assertIsNone(msg["Bcc"])
        self.assertEqual(self.submit.calls[0][1], ["admin@example.test", "ops@example.test"])
        headers = self.submit.calls[0][2].split(b"\r\n\r\n", 1)[0]
        self.assertNotIn(b"\r\nBcc:", headers)
        self.assertIn(b"Subject: [smtpplus] Bounce for user x Bcc: victim@example.com\r\n", headers)

    def test_submit_failure_logged(self) -> None:
        """A queue that refuses a notification mail is logged; dispatch does not raise."""

        def failing(*args: Any) -> Deferred[str]:
            raise OSError("spool full")

        mail = MailNotifier(self.clock, failing, "h", ["a@example.test"], {"bounce": "immediate"}, load_templates())
        mail.dispatch(make_event())
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


class TemplateTests(unittest.TestCase):
    def test_every_template_shipped(self) -> None:
        """A template exists for each event type plus the summary and the digest, each with a subject."""
        templates = load_templates()
        self.assertEqual(sorted(templates), sorted(TEMPLATE_NAMES))
        for name, template in templates.items():
            self.assertTrue(template.subject, name)
            self.assertNotIn("Subject:", template.body, name)

    def test_override_directory(self) -> None:
        """A file in templates_dir replaces the shipped template of that name only."""
        directory = self.mktemp()
        os.makedirs(directory)
        with open(os.path.join(directory, "bounce.mail.txt"), "w", encoding="utf-8") as f:
            f.write("Subject: Returned: $message_id ($user)\n\nCustom body $detail on $hostname.\n")
        templates = load_templates(directory)
        subject, body = templates["bounce.mail.txt"].render({"message_id": "m1", "user": "al", "detail": "d",
                                                             "hostname": "h"})
        self.assertEqual(subject, "Returned: m1 (al)")
        self.assertEqual(body, "Custom body d on h.\n")
        self.assertEqual(templates["account_block.mail.txt"], load_templates()["account_block.mail.txt"])

    def test_etc_copies_match(self) -> None:
        """The copies under etc/templates/ (documentation for sysadmins) equal the shipped defaults."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.assertEqual(load_templates(os.path.join(root, "etc", "templates")), load_templates())
        for name in TEMPLATE_NAMES:
            self.assertTrue(os.path.exists(os.path.join(root, "etc", "templates", name)), name)

    def test_rendering_is_safe(self) -> None:
        """Unknown or malformed placeholders stay as written; no attribute access or evaluation happens."""
        template = MailTemplate.parse("Subject: $user ${user.__class__} $nope\n\n$ {detail} $$ ${detail}\n")
        subject, body = template.render({"user": "al", "detail": "d"})
        self.assertEqual(subject, "al ${user.__class__} $nope")
        self.assertEqual(body, "$ {detail} $ d\n")

    def test_template_without_subject_line(self) -> None:
        """A template without a Subject: line gets a generic subject and keeps all its text as body."""
        template = MailTemplate.parse("Just a body for $type\n")
        self.assertEqual(template.render({"type": "bounce"}), ("[smtpplus] bounce notification", "Just a body for bounce\n"))


class NotifierTests(unittest.TestCase):
    def test_build_from_config(self) -> None:
        """build_notifier mails only when recipients are set, and POSTs only when a webhook URL is set."""
        config = config_from_text('[notifications]\nrecipients = ["a@example.test"]\n').notifications
        built = build_notifier(config, "h", Clock(), FakeSubmit(), agent=None)
        self.assertIsNotNone(built.mail)
        self.assertIsNone(built.webhook)
        empty = build_notifier(config_from_text("").notifications, "h", Clock(), FakeSubmit(), agent=None)
        self.assertIsNone(empty.mail)

    def test_bad_webhook_url(self) -> None:
        """A webhook URL that is not http(s) is a configuration error naming the key."""
        from smtpplus.config import ConfigError

        error = self.assertRaises(ConfigError, config_from_text, '[notifications]\nwebhook_url = "ftp://x"\n')
        self.assertIn("webhook_url", str(error))

    @inlineCallbacks
    def test_build_with_webhook(self) -> Any:
        """With a webhook URL the notifier POSTs through its own connection pool, closed when the service stops."""
        config = config_from_text('[notifications]\nwebhook_url = "http://127.0.0.1:9/hook"\n').notifications
        built = build_notifier(config, "h", reactor, FakeSubmit())
        self.assertIsNone(built.mail)
        self.assertIsNotNone(built.webhook)
        built.startService()
        yield built.stopService()

    def test_dispatch_reaches_mail(self) -> None:
        """The service passes each event to the mail channel; stopping flushes it."""
        clock = Clock()
        submit = FakeSubmit()
        service = Notifier(notifier(clock, submit), None)
        service.startService()
        service.dispatch(make_event())
        service.dispatch(make_event(n=1))
        self.assertEqual(len(submit.calls), 1)
        self.successResultOf(service.stopService())
        self.assertEqual(len(submit.calls), 2)


class RealSMTPTests(unittest.TestCase):
    """A notification mail submitted through a real SMTP client to a real SMTP server."""

    def setUp(self) -> None:
        from aiosmtpd.controller import Controller
        from aiosmtpd.handlers import Message

        self.received: list[Any] = []
        received = self.received

        class Collect(Message):
            def handle_message(self, message: Any) -> None:
                received.append(message)

        # aiosmtpd needs a concrete port: take one the kernel says is free.
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.controller = Controller(Collect(), hostname="127.0.0.1", port=self.port)
        self.controller.start()
        self.addCleanup(self.controller.stop)

    @inlineCallbacks
    def test_mail_arrives(self) -> Any:
        """The composed mail, sent with twisted.mail.smtp.sendmail, arrives intact with its subject and body."""
        from twisted.mail.smtp import sendmail

        port = self.port

        def submit(mail_from: str, recipients: list[str], message: bytes, priority: int) -> Deferred[Any]:
            # The queue takes CRLF text; Twisted's SMTP client wants LF and adds the CRs itself.
            self.assertIn(b"\r\n", message)
            lf = message.replace(b"\r\n", b"\n")
            return sendmail("127.0.0.1", mail_from, recipients, lf, port=port, reactor=reactor)

        clock = Clock()
        clock.advance(START)
        mail = MailNotifier(clock, submit, "relay.example.test", ["admin@example.test"], {"account_block": "immediate"},
                            load_templates())
        mail.dispatch(make_event("account_block", "mallory", detail="10 failed logins from 192.0.2.7"))
        yield mail.flush()
        for _ in range(100):
            if self.received:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(len(self.received), 1)
        msg = self.received[0]
        self.assertEqual(msg["Subject"], "[smtpplus] Account mallory locked after failed logins")
        self.assertEqual(msg["X-MailFrom"], "smtpplus@relay.example.test")
        self.assertIn("10 failed logins from 192.0.2.7", msg.get_payload(decode=True).decode())
