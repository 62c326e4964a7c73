"""Tests for L{smtpplus.address}: mailbox syntax, envelope IDNA, normalized domains and addresses."""

from __future__ import annotations

from twisted.trial import unittest

from smtpplus.address import (
    BadAddressSyntax,
    BadInternationalDomain,
    NonASCIILocalPart,
    envelope_mailbox,
    normalize_address,
    normalize_domain,
    parse_mailbox,
)


class ParseMailboxTests(unittest.TestCase):
    def test_parse_mailbox(self) -> None:
        """Valid mailboxes pass (source routes dropped); malformed ones are None."""
        self.assertEqual(parse_mailbox("a.b+c@example.org"), "a.b+c@example.org")
        self.assertEqual(parse_mailbox("@relay.example:a@example.org"), "a@example.org")
        self.assertEqual(parse_mailbox('"x y"@example.org'), '"x y"@example.org')
        self.assertEqual(parse_mailbox("a@[192.0.2.1]"), "a@[192.0.2.1]")
        for bad in ("plain", "@example.org", "a@", "a..b@example.org", "a@-x.org", "a@b@c.org", "x" * 65 + "@a.org"):
            self.assertIsNone(parse_mailbox(bad), bad)


class EnvelopeMailboxTests(unittest.TestCase):
    def test_unicode_domain_becomes_a_label(self) -> None:
        """A Unicode domain is kept in its IDNA A-label form; the local part and an ASCII domain stay as written."""
        self.assertEqual(envelope_mailbox("Chef@Bücher.example"), "Chef@xn--bcher-kva.example")
        self.assertEqual(envelope_mailbox("@relay.example:a@Example.ORG"), "a@Example.ORG")

    def test_errors_say_why(self) -> None:
        """Each unusable address raises the error the session turns into its own reply."""
        with self.assertRaises(NonASCIILocalPart):
            envelope_mailbox("jürgen@example.com")
        with self.assertRaises(BadInternationalDomain):
            envelope_mailbox("a@bü\u200dcher.example")
        for bad in ("plain", "a@", "a..b@example.org"):
            with self.assertRaises(BadAddressSyntax):
                envelope_mailbox(bad)


class NormalizeTests(unittest.TestCase):
    def test_domain_idna(self) -> None:
        """Domains become lower-case A-labels without a trailing dot."""
        self.assertEqual(normalize_domain("Bücher.Example."), "xn--bcher-kva.example")
        self.assertEqual(normalize_domain(" Example.COM "), "example.com")

    def test_bad_domains(self) -> None:
        """Anything that is not a domain name is a ValueError."""
        for bad in ("", "exa mple.com", "user@example.com", "a..b", "a" * 64 + ".com", "[1.2.3.4]"):
            with self.assertRaises(ValueError):
                normalize_domain(bad)

    def test_address(self) -> None:
        """An address keeps its local part and gets a normalized domain; literals and junk are refused."""
        self.assertEqual(normalize_address(" Info@Bücher.EXAMPLE "), "Info@xn--bcher-kva.example")
        for bad in ("no-at-sign", "a@[192.0.2.1]", "a b@example.com"):
            with self.assertRaises(ValueError):
                normalize_address(bad)
