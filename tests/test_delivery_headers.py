"""The header section as pure functions: splitting, fields, X-SMTPAPI, priority, rewriting."""

from __future__ import annotations

import email.utils

from twisted.trial import unittest

from smtpplus.delivery import headers
from smtpplus.smtp.interfaces import SMTPReply


class SplitTests(unittest.TestCase):
    def test_header_end(self) -> None:
        """The header section ends before the first blank line (which goes with the body); an empty one ends at once; None until then."""
        self.assertEqual(headers.find_header_end(b"A: 1\r\nB: 2\r\n\r\nbody"), 12)
        self.assertEqual(headers.find_header_end(b"\r\nbody"), 0)
        self.assertIsNone(headers.find_header_end(b"A: 1\r\nB: 2\r\n"))

    def test_search_from_an_offset(self) -> None:
        """A search from C{start} still finds a blank line that begins just before it."""
        buffer = bytearray(b"A: 1\r\n")
        buffer += b"\r\nbody"
        self.assertEqual(headers.find_header_end(buffer, len(b"A: 1\r\n") - 3), 6)

    def test_fields_keep_folding(self) -> None:
        """Fields come back in order with lower-case names, continuation lines attached, raw bytes kept."""
        fields = headers.parse_fields(b"Subject: a\r\n  b\r\nX-Priority: 2\r\nno colon\r\n")
        self.assertEqual([f.name for f in fields], ["subject", "x-priority", ""])
        self.assertEqual(fields[0].raw, b"Subject: a\r\n  b\r\n")
        self.assertEqual(fields[0].value, "a  b")

    def test_value_is_unfolded_utf8(self) -> None:
        """A field's value is unfolded, stripped, and decoded as UTF-8 with replacement."""
        self.assertEqual(headers.HeaderField("subject", "Subject:  Grüße\r\n\tda\r\n".encode()).value, "Grüße da")
        self.assertEqual(headers.HeaderField("subject", b"Subject: \xff\r\n").value, "\ufffd")

    def test_encoded_words(self) -> None:
        """RFC 2047 encoded words are decoded; an undecodable value comes back as written."""
        self.assertEqual(headers.decode_text("=?utf-8?q?Gr=C3=BC=C3=9Fe?="), "Grüße")
        self.assertEqual(headers.decode_text("=?x-unknown?q?abc?="), "=?x-unknown?q?abc?=")


class SMTPAPITests(unittest.TestCase):
    def refused(self, *values: str) -> SMTPReply:
        with self.assertRaises(SMTPReply) as caught:
            headers.parse_smtpapi(list(values))
        self.assertEqual((caught.exception.code, caught.exception.status), (550, "5.6.0"))
        return caught.exception

    def test_absent(self) -> None:
        """No X-SMTPAPI asks for nothing."""
        self.assertEqual(headers.parse_smtpapi([]), headers.SMTPAPI())

    def test_fields(self) -> None:
        """Priority (clamped, digits in a string too), campaign name and code (numbers as text), an ISO schedule."""
        api = headers.parse_smtpapi(
            ['{"Priority": "9", "CampaignName": "Spring", "CampaignCode": 42, "Schedule": "2030-01-01T00:00:00Z"}']
        )
        self.assertEqual((api.priority, api.campaign_name, api.campaign_code), (5, "Spring", "42"))
        self.assertEqual(api.schedule, 1893456000.0)
        self.assertEqual(headers.parse_smtpapi(['{"Priority": 0, "Schedule": 12.5}']), headers.SMTPAPI(priority=1, schedule=12.5))

    def test_schedule_without_zone_is_utc(self) -> None:
        """A schedule without a time zone is read as UTC."""
        self.assertEqual(headers.parse_smtpapi(['{"Schedule": "2030-01-01T00:00:00"}']).schedule, 1893456000.0)

    def test_refusals(self) -> None:
        """Malformed instructions get 550 5.6.0 and say what is wrong."""
        self.assertIn("invalid JSON", self.refused("{not json").text)
        self.assertIn("more than one", self.refused("{}", "{}").text)
        self.assertIn("JSON object", self.refused("[1]").text)
        self.assertIn("Priority", self.refused('{"Priority": true}').text)
        self.assertIn("Priority", self.refused('{"Priority": "high"}').text)
        self.assertIn("CampaignCode", self.refused('{"CampaignCode": ["x"]}').text)
        self.assertIn("Schedule", self.refused('{"Schedule": "tomorrow"}').text)
        self.assertIn("Schedule", self.refused('{"Schedule": false}').text)


class PriorityTests(unittest.TestCase):
    def test_mt_priority_mapping(self) -> None:
        """MT-PRIORITY maps as clamp(3 - round(n/3), 1, 5): 9 -> 1, 0 -> 3, -9 -> 5, 4 -> 2."""
        self.assertEqual([headers.mt_priority_level(n) for n in (9, 0, -9, 4)], [1, 3, 5, 2])

    def test_x_priority(self) -> None:
        """X-Priority's leading number counts, clamped to 1..5; a value without one is ignored."""
        self.assertEqual([headers.x_priority_level(v) for v in ("2 (High)", " 1", "0", "7", "high")], [2, 1, 1, 5, None])

    def test_sources_in_order(self) -> None:
        """X-SMTPAPI Priority beats MT-PRIORITY, which beats X-Priority; none (or an unreadable one) means 3."""
        self.assertEqual(headers.message_priority(headers.SMTPAPI(priority=4), 9, "1"), 4)
        self.assertEqual(headers.message_priority(headers.SMTPAPI(), -9, "2 (High)"), 5)
        self.assertEqual(headers.message_priority(headers.SMTPAPI(), None, "2 (High)"), 2)
        self.assertEqual(headers.message_priority(headers.SMTPAPI(), None, "urgent"), 3)
        self.assertEqual(headers.message_priority(headers.SMTPAPI(), None, None), 3)


class RewriteTests(unittest.TestCase):
    def test_relayed_header_section(self) -> None:
        """Our Received: first, the client's fields without X-SMTPAPI and X-Priority, added fields, then the effective X-Priority."""
        fields = headers.parse_fields(b"Subject: s\r\nX-SMTPAPI: {}\r\nX-Priority: 1\r\nTo: t@dest.test\r\n")
        self.assertEqual(
            headers.rewrite(fields, b"Received: r\r\n", 2, [b"Date: d\r\n"]),
            b"Received: r\r\nSubject: s\r\nTo: t@dest.test\r\nDate: d\r\nX-Priority: 2\r\n",
        )

    def test_last_field_without_line_end(self) -> None:
        """A header section cut without its final CRLF (no body) still ends each field with one."""
        self.assertEqual(headers.rewrite(headers.parse_fields(b"Subject: s"), b"", 3), b"Subject: s\r\nX-Priority: 3\r\n")

    def test_date(self) -> None:
        """The Date: value is RFC 5322 and in UTC."""
        value = headers.format_date(0.0).decode()
        self.assertEqual(email.utils.parsedate_to_datetime(value).timestamp(), 0.0)
        self.assertTrue(value.endswith("-0000"), value)
