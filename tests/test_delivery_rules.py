"""The strict address-list parser behind the header From: check."""

from __future__ import annotations

from twisted.trial import unittest

from smtpplus.delivery.rules import header_from_addresses, parse_address_list
from smtpplus.smtp.interfaces import SMTPReply


class AddressListTests(unittest.TestCase):
    def test_ordinary_forms(self) -> None:
        """Display names (quoted, encoded, with dots), comments, groups and quoted local parts give their addresses."""
        cases = {
            "me@example.com": ("me@example.com",),
            "Me <me@example.com>": ("me@example.com",),
            "<me@example.com>": ("me@example.com",),
            '"Boss, The" <boss@example.com>': ("boss@example.com",),
            '"ceo@bank.test" <me@example.com>': ("me@example.com",),
            "=?utf-8?q?M=C3=A9?= <me@example.com>": ("me@example.com",),
            "J. Smith <j@example.com>": ("j@example.com",),
            "me@example.com (Me)": ("me@example.com",),
            "Müller <m@bücher.example>": ("m@bücher.example",),
            '"a@b"@example.com': ('"a@b"@example.com',),
            "a@example.com, B <b@example.org>,": ("a@example.com", "b@example.org"),
            "Team: a@example.com, b@example.com;": ("a@example.com", "b@example.com"),
            "Undisclosed recipients:;": (),
        }
        for value, expected in cases.items():
            self.assertEqual(parse_address_list(value), expected, value)

    def test_malformed(self) -> None:
        """
        A doubled or empty local part or domain, stray words, routes,
        domain literals and unbalanced quotes, comments or brackets are
        errors, never read as some other address.
        """
        for value in [
            "evil@evil.test@example.com",
            "a@b@c",
            "@c",
            "a@",
            "Me <a@>",
            "<a@b@example.com>",
            "a@@example.com",
            "a@example..com",
            ".a@example.com",
            "a.@example.com",
            "a b@example.com",
            "a@exam ple.com",
            "a@example.com evil@evil.test",
            "Me <a@example.com> <b@example.com>",
            "ceo@bank.test <me@example.com>",
            "<@route.test:a@example.com>",
            "a@[192.0.2.1]",
            '"unterminated <a@example.com>',
            "(unterminated a@example.com",
            "Me <a@example.com",
            "Team: a@example.com",
            "Me",
            "a\x00b@example.com",
        ]:
            self.assertIsNone(parse_address_list(value), value)

    def test_header_from_replies(self) -> None:
        """A malformed, empty or repeated From: is refused with 550 5.7.1; none at all gives no addresses."""
        self.assertEqual(header_from_addresses([]), [])
        self.assertEqual(header_from_addresses(["Me <me@example.com>"]), ["me@example.com"])
        for values in (["a@b@c"], ["Undisclosed:;"], ["a@example.com", "b@example.com"]):
            with self.assertRaises(SMTPReply) as caught:
                header_from_addresses(values)
            self.assertEqual((caught.exception.code, caught.exception.status), (550, "5.7.1"))
