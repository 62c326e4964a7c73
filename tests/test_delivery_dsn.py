"""Delivery status notifications built as bytes, without sending them."""

from __future__ import annotations

import email
import email.policy
import email.utils
import os

from twisted.trial import unittest

from smtpplus.delivery.dsn import HEADERS_QUOTED, build_dsn, read_headers, status_of

ORIGINAL = b"From: Me <me@example.com>\r\nSubject: lost\r\nMessage-ID: <orig@example.com>\r\n"


class StatusTests(unittest.TestCase):
    def test_enhanced_code_of_the_reply(self) -> None:
        """The reply's own enhanced status code counts when its class matches the reply code."""
        self.assertEqual(status_of(550, "5.1.1 No such user here"), "5.1.1")
        self.assertEqual(status_of(451, "Try again (4.7.1)"), "4.7.1")

    def test_from_the_reply_code(self) -> None:
        """Without an enhanced code, or with one of another class, the status follows the reply code."""
        self.assertEqual(status_of(554, "Rejected"), "5.0.0")
        self.assertEqual(status_of(550, "2.0.0 odd"), "5.0.0")
        self.assertEqual(status_of(421, "closing"), "4.0.0")
        self.assertEqual(status_of(0, "connection refused"), "5.0.0")


class BuildTests(unittest.TestCase):
    def setUp(self) -> None:
        self.raw = build_dsn(
            "mx.test",
            "Q123",
            "me@example.com",
            [("bad@dest.test", 550, "5.1.1 No such user here"), ("gone@dest.test", 554, "Rejected")],
            ORIGINAL,
            arrival=1_700_000_000.0,
            now=1_700_000_600.0,
        )
        self.report = email.message_from_bytes(self.raw, policy=email.policy.default)

    def test_envelope_headers(self) -> None:
        """From MAILER-DAEMON of our host to the envelope sender, auto-replied, a multipart/report of delivery-status."""
        self.assertEqual(self.report["From"], "Mail Delivery System <MAILER-DAEMON@mx.test>")
        self.assertIn(b"\r\nTo: <me@example.com>\r\n", self.raw)
        self.assertEqual(self.report["Auto-Submitted"], "auto-replied")
        self.assertEqual(self.report.get_content_type(), "multipart/report")
        self.assertEqual(self.report.get_param("report-type"), "delivery-status")
        self.assertEqual(email.utils.parsedate_to_datetime(self.report["Date"]).timestamp(), 1_700_000_600.0)
        self.assertTrue(self.report["Message-ID"].startswith("<Q123.dsn."))

    def test_three_parts(self) -> None:
        """A human part naming each recipient with its reply, the per-recipient report, and the original headers."""
        human, status, headers = self.report.iter_parts()
        text = human.get_content()
        self.assertIn("<bad@dest.test>: 550 5.1.1 No such user here", text)
        self.assertIn("<gone@dest.test>: 554 Rejected", text)
        self.assertEqual(status.get_content_type(), "message/delivery-status")
        self.assertEqual(headers.get_content_type(), "text/rfc822-headers")
        self.assertIn(b"X-Queue-ID: Q123\r\n", self.raw)
        self.assertIn(b"Final-Recipient: rfc822; bad@dest.test\r\nAction: failed\r\nStatus: 5.1.1\r\n", self.raw)
        self.assertIn(b"Final-Recipient: rfc822; gone@dest.test\r\nAction: failed\r\nStatus: 5.0.0\r\n", self.raw)
        self.assertIn(b"Diagnostic-Code: smtp; 554 Rejected\r\n", self.raw)
        self.assertIn(b"\r\n\r\n" + ORIGINAL + b"\r\n--", self.raw)

    def test_crlf_only(self) -> None:
        """Every line ends in CRLF, as the relay sends it."""
        self.assertNotIn(b"\n", self.raw.replace(b"\r\n", b""))


class ReadHeadersTests(unittest.TestCase):
    def write(self, data: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_header_section_only(self) -> None:
        """Up to the blank line: the body is not quoted."""
        self.assertEqual(read_headers(self.write(ORIGINAL + b"\r\nsecret body\r\n")), ORIGINAL)

    def test_bounded(self) -> None:
        """At most HEADERS_QUOTED bytes, and never past the message's own length (the envelope record follows it)."""
        huge = b"X-Pad: " + b"p" * (2 * HEADERS_QUOTED) + b"\r\n\r\nbody"
        self.assertEqual(len(read_headers(self.write(huge))), HEADERS_QUOTED)
        path = self.write(b"Subject: s\r\n" + b"{record}")
        self.assertEqual(read_headers(path, length=os.path.getsize(path) - len(b"{record}")), b"Subject: s\r\n")
