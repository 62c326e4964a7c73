"""The sender rules: the strict address-list parser behind the header From: check, who may send as whom, and how a refusal is recorded."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import fail
from twisted.trial import unittest

from smtpplus.delivery.rules import (
    Refusals,
    SenderRules,
    address_key,
    header_from_addresses,
    parse_address_list,
    unauthorized,
)
from smtpplus.model import User
from smtpplus.smtp.interfaces import SMTPReply
from tests.harness.fakes import Recorder


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


class SenderRulesTests(unittest.TestCase):
    def setUp(self) -> None:
        self.rules = SenderRules.from_user(
            User("alice", authorized_domains=["example.com", "xn--bcher-kva.example"], authorized_senders=["Boss@Other.org"])
        )

    def test_keys(self) -> None:
        """An address key folds the case of both parts and writes the domain as IDNA A-labels, without a final dot."""
        self.assertEqual(address_key(" Chef@Café.Example. "), "chef@xn--caf-dma.example")
        self.assertEqual(address_key("a@exa mple"), "a@exa mple")

    def test_listed_domains_exactly(self) -> None:
        """Any address of a listed domain, in any case or in Unicode, is authorized; a subdomain or parent is not."""
        for address in ("x@example.com", "X@EXAMPLE.COM", "info@Bücher.example", "y@example.com."):
            self.assertTrue(self.rules.authorizes(address), address)
        for address in ("x@sub.example.com", "x@com", "x@example.org", "x@büchers.example"):
            self.assertFalse(self.rules.authorizes(address), address)

    def test_listed_senders(self) -> None:
        """A listed address is authorized in any case; another address of its domain is not."""
        self.assertTrue(self.rules.authorizes("boss@other.org"))
        self.assertTrue(self.rules.authorizes("BOSS@OTHER.ORG"))
        self.assertFalse(self.rules.authorizes("assistant@other.org"))

    def test_no_address(self) -> None:
        """The null sender and a string without @ are never authorized, whatever the lists hold."""
        self.assertFalse(self.rules.authorizes(""))
        self.assertFalse(self.rules.authorizes("example.com"))
        self.assertFalse(SenderRules.from_user(User("nobody")).authorizes("x@example.com"))

    def test_unauthorized_keeps_order(self) -> None:
        """The addresses the rules refuse, in the order given."""
        self.assertEqual(unauthorized(["b@bank.test", "x@example.com", "a@evil.test"], self.rules), ["b@bank.test", "a@evil.test"])


class RefusalsTests(unittest.TestCase):
    def test_event_and_count(self) -> None:
        """A refusal is one sender_domain event with the detail and one rejected count with the message's fields."""
        recorder = Recorder()
        Refusals(recorder, recorder).record("alice", "me@example.com", "Me <ceo@bank.test>", "hi", "header From: refused")
        self.assertEqual(recorder.events, [("sender_domain", "alice", None, "header From: refused")])
        self.assertEqual(recorder.rejections(), [("alice", "me@example.com", "Me <ceo@bank.test>", "hi")])

    def test_recorder_failures_are_logged(self) -> None:
        """A failing recorder is logged and never raises into the SMTP reply; either recorder may be absent."""

        class Broken:
            def record(self, *args: Any) -> Any:
                return fail(RuntimeError("events down"))

            def rejected(self, *args: Any) -> None:
                raise RuntimeError("stats down")

        Refusals(Broken(), Broken()).record("alice", "a@b.test", "", "", "detail")  # type: ignore[arg-type]
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        Refusals(None, None).record("alice", "a@b.test", "", "", "detail")
