"""
The submitter (the avatar after AUTH) and its message writer on their own:
a Clock, work "in threads" run at once, a real spool in the test's
directory and a committer that writes the message out and records it.  No
socket, no database, no SMTP session.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from smtpplus.address import normalize_address, normalize_domain
from smtpplus.delivery.queue import NewMessage
from smtpplus.delivery.rules import Refusals
from smtpplus.delivery.spool import Spool, TempMessage
from smtpplus.delivery.submitter import Intake, Submitter
from smtpplus.delivery.threads import run_synchronously
from smtpplus.model import User
from smtpplus.smtp.interfaces import Envelope, SessionInfo, SMTPReply
from tests.harness.fakes import Recorder
from tests.harness.messages import simple_message
from tests.harness.stack import USER

NOW = 1_700_000_000
SESSION = SessionInfo("127.0.0.1", 25, "client.test", False)


def padding(size: int) -> bytes:
    """Header fields of about C{size} bytes, in ordinary 80-byte lines."""
    return b"".join(b"X-Pad-%05d: %s\r\n" % (i, b"p" * 66) for i in range(size // 80 + 1))


def hops(count: int) -> bytes:
    """A message that already passed C{count} relays."""
    received = "".join(
        f"Received: from hop{i}.test by hop{i + 1}.test; Mon, 1 Jan 2024 00:00:{i % 60:02d} +0000\r\n"
        for i in range(count)
    )
    return (received + "From: me@example.com\r\nSubject: loop\r\n\r\nbody\r\n").encode()


class SubmitterTestCase(unittest.TestCase):
    """A submitter for each user, sharing one intake whose commits are kept in C{committed}."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.spool = Spool(os.path.abspath(self.mktemp()))
        self.recorder = Recorder()
        self.committed: list[NewMessage] = []
        self.intake = Intake(
            self.clock, run_synchronously, self.spool, self.commit, Refusals(self.recorder, self.recorder), "relay.test"
        )

    def commit(self, temp: TempMessage, message: NewMessage) -> Deferred[str]:
        # What the committer does to the file, without its fsyncs and queue.
        temp.envelope = message
        temp.write_out()
        temp.finish()
        self.committed.append(message)
        return succeed(message.id)

    def send(
        self,
        data: bytes,
        user: User = USER,
        mail_from: str = "me@example.com",
        mt_priority: int | None = None,
        pieces: Sequence[bytes] | None = None,
    ) -> Deferred[str]:
        """MAIL FROM, then DATA with C{data} (in C{pieces} when given); the end of DATA's Deferred."""
        submitter = Submitter(user, self.intake)
        submitter.validateFrom(SESSION, mail_from, mt_priority)
        envelope = Envelope(SESSION, mail_from, ("r@dest.test",), mt_priority, "7BIT", b"Received: x\r\n")
        writer = submitter.openMessage(envelope)
        for piece in [data] if pieces is None else pieces:
            writer.write(piece)
        return writer.eomReceived()

    def accepted(self, data: bytes, **kw: Any) -> tuple[NewMessage, bytes]:
        """Send; the committed message and its stored bytes."""
        message_id = self.successResultOf(self.send(data, **kw))
        _, length = self.spool.read_small(message_id)
        with open(self.spool.path(message_id), "rb") as f:
            return self.committed[-1], f.read(length)

    def refused(self, data: bytes, code: int, status: str, **kw: Any) -> SMTPReply:
        """Send; the refusal at the end of DATA, which must commit nothing and leave nothing in the spool."""
        committed, stored = len(self.committed), sorted(os.listdir(self.spool.msg_dir))
        reply = self.failureResultOf(self.send(data, **kw), SMTPReply).value
        self.assertEqual((reply.code, reply.status), (code, status), reply.text)
        self.assertEqual(len(self.committed), committed)
        self.assertEqual(os.listdir(self.spool.tmp_dir), [])
        self.assertEqual(sorted(os.listdir(self.spool.msg_dir)), stored)
        return reply

    def refused_sender(self, mail_from: str, user: User = USER) -> SMTPReply:
        """The refusal of C{MAIL FROM:<mail_from>}."""
        with self.assertRaises(SMTPReply) as caught:
            Submitter(user, self.intake).validateFrom(SESSION, mail_from, None)
        return caught.exception


class EnvelopeSenderTests(SubmitterTestCase):
    def test_unauthorized_envelope_sender(self) -> None:
        """An envelope sender outside the user's lists gets 550 5.7.1, one sender_domain event and one rejected count."""
        reply = self.refused_sender("intruder@evil.test")
        self.assertEqual((reply.code, reply.status), (550, "5.7.1"))
        self.assertEqual(len(self.recorder.of("sender_domain")), 1)
        self.assertEqual(self.recorder.rejections(), [("alice", "intruder@evil.test", "", "")])

    def test_authorized_senders_and_domains(self) -> None:
        """A listed address and any address of a listed domain (any case) are accepted; a subdomain is not."""
        submitter = Submitter(USER, self.intake)
        submitter.validateFrom(SESSION, "Someone@EXAMPLE.com", None)
        submitter.validateFrom(SESSION, "boss@other.org", None)
        self.assertEqual(self.refused_sender("x@sub.example.com").code, 550)

    def test_user_without_lists_may_not_send(self) -> None:
        """A user with both lists empty is refused at MAIL FROM, the null sender too."""
        self.assertEqual(self.refused_sender("me@example.com", User("alice")).code, 550)
        self.assertEqual(self.refused_sender("", User("alice")).code, 550)

    def test_internationalized_domains(self) -> None:
        """
        A sender domain written in Unicode (any case, envelope and header
        From:) matches the IDNA A-labels the user store keeps; an unlisted
        Unicode domain is still refused.
        """
        user = User(
            "alice",
            authorized_domains=[normalize_domain("Bücher.example")],
            authorized_senders=[normalize_address("chef@café.example")],
        )
        self.assertEqual(user.authorized_domains, ("xn--bcher-kva.example",))
        self.accepted("From: Info <info@BÜCHER.example>\r\nSubject: x\r\n\r\nbody\r\n".encode(), user=user, mail_from="info@Bücher.example")
        self.accepted(b"From: info@xn--bcher-kva.example\r\n\r\nbody\r\n", user=user, mail_from="Chef@Café.example")
        self.refused("From: x@büchers.example\r\n\r\nb\r\n".encode(), 550, "5.7.1", user=user, mail_from="chef@café.example")
        self.assertEqual(self.refused_sender("x@büchers.example", user).code, 550)


class HeaderFromTests(SubmitterTestCase):
    def test_unauthorized_header_from(self) -> None:
        """An unauthorized header From: is refused with 550 5.7.1 and recorded with the header From: and subject."""
        self.refused(simple_message(sender="ceo@bank.test"), 550, "5.7.1")
        self.assertEqual(len(self.recorder.of("sender_domain")), 1)
        self.assertEqual(self.recorder.rejections(), [("alice", "me@example.com", "Me <ceo@bank.test>", "hello")])

    def test_one_of_several_from_addresses_unauthorized(self) -> None:
        """Every address of the From: field must be authorized."""
        self.refused(b"From: a@example.com, b@bank.test\r\nSubject: x\r\n\r\nbody\r\n", 550, "5.7.1")

    def test_several_from_headers_refused(self) -> None:
        """A message with two From: headers is refused with 550 5.7.1."""
        self.refused(b"From: a@example.com\r\nFrom: b@example.com\r\nSubject: x\r\n\r\nbody\r\n", 550, "5.7.1")

    def test_malformed_from_addresses_refused(self) -> None:
        """
        A From: address with a doubled or empty local part or domain is
        refused with 550 5.7.1 and a sender_domain record, never read as
        some other address (C{evil@evil.test@example.com} is not
        C{@example.com}).
        """
        bad = ["evil@evil.test@example.com", "a@b@example.com", "@example.com", "a@", "Me <a@b@example.com>", "x@example..com"]
        for value in bad:
            self.refused(f"From: {value}\r\nSubject: x\r\n\r\nbody\r\n".encode(), 550, "5.7.1")
        self.assertEqual(len(self.recorder.of("sender_domain")), len(bad))
        self.assertEqual([args[2] for args in self.recorder.rejections()], bad)

    def test_missing_from_is_completed(self) -> None:
        """A message without From: is accepted and gets From: <envelope sender>, Date (from the clock) and Message-ID."""
        message, content = self.accepted(b"Subject: bare\r\n\r\nbody\r\n")
        self.assertIn(b"\r\nFrom: <me@example.com>\r\n", content)
        self.assertIn(b"\r\nDate: Tue, 14 Nov 2023 22:13:20 -0000\r\n", content)
        self.assertIn(f"\r\nMessage-ID: <{message.id}@relay.test>\r\n".encode(), content)
        self.assertEqual(message.header_from, "<me@example.com>")

    def test_fields_kept_when_present(self) -> None:
        """A message with its own Date and Message-ID keeps them and gets none added; the subject is decoded."""
        data = b"From: me@example.com\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <own@example.com>\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n\r\nb\r\n"
        message, content = self.accepted(data)
        self.assertEqual((content.count(b"\r\nDate: "), content.count(b"Message-ID: ")), (1, 1))
        self.assertEqual(message.subject, "café")


class HeaderSectionTests(SubmitterTestCase):
    """The whole header section is checked, however large (contract section 9)."""

    def test_from_after_padding_with_legitimate_from(self) -> None:
        """A second From: after 300 KiB of header fields is seen: several From: headers, 550 5.7.1."""
        data = b"From: me@example.com\r\n" + padding(300 * 1024) + b"From: ceo@bank.test\r\nSubject: x\r\n\r\nbody\r\n"
        self.assertIn("more than one From:", self.refused(data, 550, "5.7.1").text)
        self.assertEqual(len(self.recorder.of("sender_domain")), 1)

    def test_from_after_padding_alone(self) -> None:
        """The only From: placed after 300 KiB of header fields is checked and refused, not replaced by an added one."""
        data = b"Subject: x\r\n" + padding(300 * 1024) + b"From: ceo@bank.test\r\n\r\nbody\r\n"
        self.assertIn("ceo@bank.test", self.refused(data, 550, "5.7.1").text)
        self.assertEqual(len(self.recorder.of("sender_domain")), 1)

    def test_invalid_smtpapi(self) -> None:
        """Invalid JSON in X-SMTPAPI, even after 300 KiB of header fields, gets 550 5.6.0 with the reason."""
        self.assertIn("JSON", self.refused(simple_message(extra="X-SMTPAPI: {not json\r\n"), 550, "5.6.0").text)
        self.refused(simple_message(extra=padding(300 * 1024).decode() + "X-SMTPAPI: {not json\r\n"), 550, "5.6.0")

    def test_valid_smtpapi_after_padding(self) -> None:
        """A valid X-SMTPAPI after 300 KiB of header fields is obeyed and removed from the stored message."""
        data = simple_message(extra=padding(300 * 1024).decode() + 'X-SMTPAPI: {"CampaignCode": "late", "Priority": 1}\r\n')
        message, content = self.accepted(data)
        self.assertEqual((message.campaign_code, message.priority), ("late", 1))
        self.assertNotIn(b"X-SMTPAPI", content)
        self.assertIn(b"\r\nX-Priority: 1\r\n", content)

    def test_header_section_over_limit(self) -> None:
        """A 1.1 MiB header section gets 552 5.3.4; nothing is committed or left in the spool."""
        reply = self.refused(simple_message(extra=padding(1126 * 1024).decode()), 552, "5.3.4")
        self.assertIn("header section too large", reply.text)

    def test_headers_without_body(self) -> None:
        """A message that is all header fields (no blank line, no body) is accepted, its fields ending in CRLF."""
        _, content = self.accepted(b"From: me@example.com\r\nSubject: only")
        self.assertIn(b"Subject: only\r\n", content)

    def test_header_split_across_writes(self) -> None:
        """
        Fed to the message writer one byte at a time, a message is stored
        exactly as when written in one piece (the blank line and the
        fields are found across chunk boundaries).
        """
        data = simple_message(
            extra='X-SMTPAPI: {"CampaignCode": "c"}\r\nX-Priority: 2\r\n'
            "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <split@example.com>\r\n"
        )
        _, whole = self.accepted(data)
        _, bytewise = self.accepted(data, pieces=[data[i : i + 1] for i in range(len(data))])
        self.assertEqual(whole, bytewise)
        self.assertNotIn(b"X-SMTPAPI", whole)
        self.assertIn(b"X-Priority: 2\r\n", whole)

    def test_connection_lost_discards(self) -> None:
        """A session lost during DATA leaves nothing in the spool and commits nothing."""
        submitter = Submitter(USER, self.intake)
        writer = submitter.openMessage(Envelope(SESSION, "me@example.com", ("r@dest.test",), None, "7BIT", b""))
        writer.write(b"Subject: x\r\n\r\n" + b"y" * 300_000)
        writer.connectionLost()
        self.assertEqual((os.listdir(self.spool.tmp_dir), self.committed), ([], []))


class MailLoopTests(SubmitterTestCase):
    """More than 50 Received: fields: 554 5.4.6 (contract section 9)."""

    def test_fifty_hops_accepted(self) -> None:
        """A message with 50 Received: fields is accepted (our own Received: is not counted) and stored with 51."""
        _, content = self.accepted(hops(50))
        self.assertEqual(content.count(b"Received: "), 51)

    def test_fifty_one_hops_refused(self) -> None:
        """A message with 51 Received: fields is refused with 554 5.4.6, naming the hops."""
        self.assertIn("hops", self.refused(hops(51), 554, "5.4.6").text)


class PriorityTests(SubmitterTestCase):
    def priority(self, user_priority: int, data: bytes, mt_priority: int | None = None) -> int:
        user = User("alice", priority=user_priority, authorized_domains=["example.com"])
        message, content = self.accepted(data, user=user, mt_priority=mt_priority)
        self.assertIn(b"\r\nX-Priority: %d\r\n" % message.priority, content)
        return message.priority

    def test_sources_in_order(self) -> None:
        """X-SMTPAPI Priority beats MT-PRIORITY, which beats X-Priority; none means 3."""
        api = simple_message(extra='X-SMTPAPI: {"Priority": 4}\r\nX-Priority: 1\r\n')
        self.assertEqual(self.priority(5, api, 9), 4)
        xp = simple_message(extra="X-Priority: 2 (High)\r\n")
        self.assertEqual(self.priority(5, xp, -9), 5)
        self.assertEqual(self.priority(5, xp), 2)
        self.assertEqual(self.priority(5, simple_message()), 3)

    def test_user_default_caps(self) -> None:
        """Effective priority is the numerically lower of the user's default and the message's."""
        self.assertEqual(self.priority(2, simple_message(extra="X-Priority: 5\r\n")), 2)
        self.assertEqual(self.priority(2, simple_message(extra="X-Priority: 1\r\n")), 1)

    def test_schedule_and_campaign_recorded(self) -> None:
        """X-SMTPAPI's schedule and campaign go into the committed message; a future schedule holds it."""
        data = simple_message(extra=f'X-SMTPAPI: {{"Schedule": {NOW + 60}, "CampaignName": "spring"}}\r\n')
        message, _ = self.accepted(data)
        self.assertEqual((message.schedule_at, message.campaign_name, message.status), (NOW + 60, "spring", "scheduled"))
        self.assertEqual(message.created_at, NOW)
