"""
The SASL table of SMTP AUTH: PLAIN and LOGIN challenges and responses in
their base64 wire form, cancellation and malformed responses.
"""

from __future__ import annotations

import base64

from twisted.trial import unittest

from smtpplus.smtp.interfaces import SMTPReply
from smtpplus.smtp.sasl import EXTENSION, MECHANISMS, SASLExchange


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class TableTests(unittest.TestCase):
    def test_extension(self) -> None:
        """EHLO offers PLAIN and LOGIN, in this order, from the table."""
        self.assertEqual(EXTENSION, "AUTH PLAIN LOGIN")
        self.assertEqual(list(MECHANISMS), [b"PLAIN", b"LOGIN"])

    def test_unknown_mechanism(self) -> None:
        """A mechanism not in the table cannot start an exchange."""
        self.assertRaises(KeyError, SASLExchange, b"CRAM-MD5")


class PlainTests(unittest.TestCase):
    def test_one_response(self) -> None:
        """PLAIN's challenge is empty; one response completes the credentials."""
        exchange = SASLExchange(b"PLAIN")
        self.assertEqual(exchange.challenge, "")
        self.assertTrue(exchange.respond(b64(b"\0alice\0secret")))
        self.assertEqual((exchange.credentials.username, exchange.credentials.password), (b"alice", b"secret"))

    def test_authorization_identity_ignored(self) -> None:
        """The authorization identity before the first NUL does not change who logs in."""
        exchange = SASLExchange(b"PLAIN")
        self.assertTrue(exchange.respond(b64(b"mallory\0alice\0secret") + b"  "))
        self.assertEqual(exchange.credentials.username, b"alice")

    def test_malformed(self) -> None:
        """A PLAIN response without exactly two NULs gets 501 5.5.2."""
        for response in (b64(b"alice\0secret"), b"="):
            error = self.assertRaises(SMTPReply, SASLExchange(b"PLAIN").respond, response)
            self.assertEqual(str(error), "501 5.5.2 Malformed PLAIN response")


class LoginTests(unittest.TestCase):
    def test_two_challenges(self) -> None:
        """LOGIN asks for "Username:" and then "Password:"."""
        exchange = SASLExchange(b"LOGIN")
        self.assertEqual(base64.b64decode(exchange.challenge), b"Username:")
        self.assertFalse(exchange.respond(b64(b"alice")))
        self.assertEqual(base64.b64decode(exchange.challenge), b"Password:")
        self.assertTrue(exchange.respond(b64(b"secret")))
        self.assertEqual((exchange.credentials.username, exchange.credentials.password), (b"alice", b"secret"))

    def test_empty_response(self) -> None:
        """A lone "=" is the empty response (RFC 4954 4)."""
        exchange = SASLExchange(b"LOGIN")
        self.assertFalse(exchange.respond(b"="))
        self.assertTrue(exchange.respond(b"="))
        self.assertEqual((exchange.credentials.username, exchange.credentials.password), (b"", b""))


class ResponseErrorTests(unittest.TestCase):
    def test_cancel(self) -> None:
        """"*" cancels the exchange with 501 5.0.0."""
        error = self.assertRaises(SMTPReply, SASLExchange(b"LOGIN").respond, b"*")
        self.assertEqual(str(error), "501 5.0.0 Authentication cancelled")

    def test_not_base64(self) -> None:
        """A response that is not strict base64 gets 501 5.5.2."""
        for response in (b"not base64!", b"YWJj=x", "é".encode()):
            error = self.assertRaises(SMTPReply, SASLExchange(b"PLAIN").respond, response)
            self.assertEqual(str(error), "501 5.5.2 Cannot decode response")
