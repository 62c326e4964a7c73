"""
SMTPSession dialogues over StringTransport, with fake logic behind the
interfaces: replies, TLS gating, pipelining, DATA handling, limits, flow
control towards clients that do not read, per-line deadlines and IDNA
envelope addresses.
"""

from __future__ import annotations

import base64

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from smtpplus.smtp.framing import SessionState
from smtpplus.smtp.interfaces import SMTPReply
from smtpplus.smtp.protocol import (
    AUTH_LINE_MAX,
    MAX_BAD_COMMANDS,
    MAX_JUNK_COMMANDS,
    SessionRegistry,
    SMTPServerFactory,
)
from tests.harness.fakes import FakeLogin, session_settings

# The name other test modules imported from here before tests.harness.
settings = session_settings

PLAIN_ALICE = base64.b64encode(b"\0alice\0secret").decode()


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that records startTLS; the bytes stay readable."""

    tls_started = False

    def startTLS(self, contextFactory: object) -> None:
        self.tls_started = True


class BufferedTransport(TLSStringTransport):
    """
    Pauses its streaming producer once more than C{limit} bytes wait unsent,
    as a TCP transport does; L{drain} plays the client reading them.
    """

    limit = 1000
    full = False
    largest = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        self.largest = max(self.largest, len(self.value()))
        if self.producer is not None and self.streaming and not self.full and len(self.value()) > self.limit:
            self.full = True
            self.producer.pauseProducing()

    def drain(self) -> list[str]:
        lines = [line for line in self.value().decode().split("\r\n") if line]
        self.clear()
        if self.full:
            self.full = False
            self.producer.resumeProducing()
        return lines


class Dialogue:
    """One session on a fake transport; C{send} returns the new reply lines."""

    def __init__(
        self,
        testcase: unittest.TestCase,
        implicit_tls: bool = False,
        peer: object = None,
        transport_class: type[StringTransport] = TLSStringTransport,
        **overrides: object,
    ):
        self.clock = Clock()
        self.login = FakeLogin()
        self.submitter = self.login.submitter
        self.registry = SessionRegistry(session_settings(**overrides), self.clock)
        factory = SMTPServerFactory(self.registry, self.login, None if implicit_tls else object(), implicit_tls)
        peer = peer or IPv4Address("TCP", "192.0.2.7", 40000)
        self.session = factory.buildProtocol(peer)
        self.transport = transport_class(hostAddress=IPv4Address("TCP", "127.0.0.1", 587), peerAddress=peer)
        self.session.makeConnection(self.transport)
        self.banner = self.take()

    def take(self) -> list[str]:
        out = self.transport.value().decode("utf-8")
        self.transport.clear()
        return [line for line in out.split("\r\n") if line]

    def send(self, data: str | bytes) -> list[str]:
        self.session.dataReceived(data.encode() if isinstance(data, str) else data)
        return self.take()

    def tls_login(self) -> None:
        """EHLO, STARTTLS, EHLO, AUTH PLAIN as alice."""
        self.send("EHLO client.test\r\n")
        assert self.send("STARTTLS\r\n") == ["220 2.0.0 Ready to start TLS"]
        self.send("EHLO client.test\r\n")
        assert self.send(f"AUTH PLAIN {PLAIN_ALICE}\r\n") == ["235 2.7.0 Authentication successful"]

    def envelope(self, recipients: int = 1) -> None:
        self.tls_login()
        assert self.send("MAIL FROM:<alice@example.test>\r\n") == ["250 2.1.0 Sender ok"]
        for i in range(recipients):
            assert self.send(f"RCPT TO:<r{i}@example.org>\r\n") == ["250 2.1.5 Recipient ok"]


class GreetingAndExtensionsTests(unittest.TestCase):
    def test_banner(self) -> None:
        """The greeting is 220 with the configured hostname."""
        d = Dialogue(self)
        self.assertEqual(d.banner, ["220 mx.example.test ESMTP smtpplus"])

    def test_ehlo_plaintext_extensions(self) -> None:
        """On plaintext with auth_requires_tls, EHLO offers STARTTLS and every extension except AUTH."""
        d = Dialogue(self)
        lines = d.send("EHLO client.test\r\n")
        self.assertEqual(lines[0], "250-mx.example.test Hello client.test [192.0.2.7]")
        keywords = [line[4:] for line in lines[1:]]
        self.assertEqual(
            keywords, ["PIPELINING", "SIZE 1000", "8BITMIME", "ENHANCEDSTATUSCODES", "MT-PRIORITY", "STARTTLS"]
        )
        self.assertTrue(lines[-1].startswith("250 "))
        self.assertTrue(all(line.startswith("250-") for line in lines[:-1]))

    def test_ehlo_plaintext_auth_allowed(self) -> None:
        """With auth_requires_tls false, AUTH PLAIN LOGIN is offered on plaintext too."""
        d = Dialogue(self, auth_requires_tls=False)
        keywords = [line[4:] for line in d.send("EHLO client.test\r\n")]
        self.assertIn("AUTH PLAIN LOGIN", keywords)
        self.assertIn("STARTTLS", keywords)
        self.assertEqual(d.send(f"AUTH PLAIN {PLAIN_ALICE}\r\n"), ["235 2.7.0 Authentication successful"])

    def test_ehlo_after_starttls(self) -> None:
        """After STARTTLS, EHLO offers AUTH PLAIN LOGIN and no longer STARTTLS."""
        d = Dialogue(self)
        d.send("EHLO client.test\r\n")
        d.send("STARTTLS\r\n")
        self.assertTrue(d.transport.tls_started)
        keywords = [line[4:] for line in d.send("EHLO client.test\r\n")]
        self.assertIn("AUTH PLAIN LOGIN", keywords)
        self.assertNotIn("STARTTLS", keywords)

    def test_implicit_tls(self) -> None:
        """An implicit-TLS session offers AUTH at once, no STARTTLS, and refuses STARTTLS."""
        d = Dialogue(self, implicit_tls=True)
        keywords = [line[4:] for line in d.send("EHLO client.test\r\n")]
        self.assertIn("AUTH PLAIN LOGIN", keywords)
        self.assertNotIn("STARTTLS", keywords)
        self.assertEqual(d.send("STARTTLS\r\n"), ["503 5.5.1 TLS already active"])

    def test_helo(self) -> None:
        """HELO gets a plain 250 with the hostname and no extension list."""
        d = Dialogue(self)
        self.assertEqual(d.send("HELO client.test\r\n"), ["250 mx.example.test"])

    def test_ehlo_name_with_control_character(self) -> None:
        """An EHLO name with a control character is refused, so it never reaches Received:."""
        d = Dialogue(self)
        self.assertEqual(d.send(b"EHLO a\rBcc: x\r\n"), ["501 5.5.4 Syntax: EHLO hostname"])
        self.assertEqual(d.send("EHLO\r\n"), ["501 5.5.4 Syntax: EHLO hostname"])

    def test_simple_commands(self) -> None:
        """NOOP, RSET, VRFY, EXPN, HELP, unknown verbs and QUIT answer as RFC 5321 says."""
        d = Dialogue(self)
        self.assertEqual(d.send("NOOP\r\n"), ["250 2.0.0 Ok"])
        self.assertEqual(d.send("RSET\r\n"), ["250 2.0.0 Ok"])
        self.assertEqual(d.send("VRFY bob\r\n")[0][:3], "252")
        self.assertEqual(d.send("EXPN list\r\n"), ["502 5.5.1 EXPN not supported"])
        self.assertEqual(d.send("HELP\r\n")[0][:3], "214")
        self.assertEqual(d.send("FROB\r\n"), ["500 5.5.2 Command not recognized"])
        self.assertEqual(d.send("QUIT\r\n"), ["221 2.0.0 Bye"])
        self.assertTrue(d.transport.disconnecting)
        self.assertEqual(d.send("NOOP\r\n"), [])


class AuthTests(unittest.TestCase):
    def test_auth_before_tls(self) -> None:
        """AUTH on plaintext gets the contract's 530 and the login service is not asked."""
        d = Dialogue(self)
        d.send("EHLO client.test\r\n")
        self.assertEqual(d.send(f"AUTH PLAIN {PLAIN_ALICE}\r\n"), ["530 5.7.0 Must issue a STARTTLS command first"])
        self.assertEqual(d.login.attempts, [])

    def test_auth_before_tls_without_ehlo(self) -> None:
        """AUTH on plaintext before any EHLO also gets the STARTTLS 530."""
        d = Dialogue(self)
        self.assertEqual(d.send("AUTH LOGIN\r\n"), ["530 5.7.0 Must issue a STARTTLS command first"])

    def test_mail_before_auth(self) -> None:
        """MAIL FROM before AUTH gets 530 5.7.0, on plaintext and inside TLS."""
        d = Dialogue(self)
        d.send("EHLO client.test\r\n")
        self.assertTrue(d.send("MAIL FROM:<alice@example.test>\r\n")[0].startswith("530 5.7.0 "))
        d.send("STARTTLS\r\n")
        d.send("EHLO client.test\r\n")
        self.assertTrue(d.send("MAIL FROM:<alice@example.test>\r\n")[0].startswith("530 5.7.0 "))

    def test_commands_after_starttls_need_new_ehlo(self) -> None:
        """After STARTTLS, AUTH and MAIL before a new EHLO get 503 5.5.1."""
        d = Dialogue(self)
        d.send("EHLO client.test\r\n")
        d.send("STARTTLS\r\n")
        self.assertTrue(d.send(f"AUTH PLAIN {PLAIN_ALICE}\r\n")[0].startswith("503 5.5.1 "))
        self.assertTrue(d.send("MAIL FROM:<alice@example.test>\r\n")[0].startswith("503 5.5.1 "))
        self.assertEqual(d.login.attempts, [])

    def test_starttls_forgets_authentication(self) -> None:
        """A plaintext AUTH (auth_requires_tls false) does not survive STARTTLS."""
        d = Dialogue(self, auth_requires_tls=False)
        d.send("EHLO client.test\r\n")
        d.send(f"AUTH PLAIN {PLAIN_ALICE}\r\n")
        d.send("STARTTLS\r\n")
        self.assertEqual(d.login.logouts, 1)
        d.send("EHLO client.test\r\n")
        self.assertTrue(d.send("MAIL FROM:<alice@example.test>\r\n")[0].startswith("530 5.7.0 "))

    def test_auth_plain_wrong_password(self) -> None:
        """Wrong credentials get 535 5.7.8."""
        d = Dialogue(self)
        d.send("EHLO c\r\nSTARTTLS\r\n")
        d.send("EHLO c\r\n")
        bad = base64.b64encode(b"\0alice\0wrong").decode()
        self.assertEqual(d.send(f"AUTH PLAIN {bad}\r\n"), ["535 5.7.8 Authentication credentials invalid"])

    def test_auth_throttled(self) -> None:
        """A throttled login gets the temporary 454 4.7.0."""
        d = Dialogue(self)
        d.send("EHLO c\r\nSTARTTLS\r\n")
        d.send("EHLO c\r\n")
        locked = base64.b64encode(b"\0locked\0x").decode()
        self.assertTrue(d.send(f"AUTH PLAIN {locked}\r\n")[0].startswith("454 4.7.0 "))

    def test_auth_plain_two_steps(self) -> None:
        """AUTH PLAIN without an initial response asks with an empty 334, then logs in."""
        d = Dialogue(self)
        d.send("EHLO c\r\nSTARTTLS\r\n")
        d.send("EHLO c\r\n")
        self.assertEqual(d.send("AUTH PLAIN\r\n"), ["334 "])
        self.assertEqual(d.send(PLAIN_ALICE + "\r\n"), ["235 2.7.0 Authentication successful"])
        self.assertEqual(d.login.attempts, [("alice", "secret", "192.0.2.7")])

    def test_auth_login(self) -> None:
        """AUTH LOGIN asks for username and password in base64 and logs in."""
        d = Dialogue(self)
        d.send("EHLO c\r\nSTARTTLS\r\n")
        d.send("EHLO c\r\n")
        self.assertEqual(d.send("AUTH LOGIN\r\n"), ["334 VXNlcm5hbWU6"])
        self.assertEqual(d.send(base64.b64encode(b"alice") + b"\r\n"), ["334 UGFzc3dvcmQ6"])
        self.assertEqual(d.send(base64.b64encode(b"secret") + b"\r\n"), ["235 2.7.0 Authentication successful"])
        self.assertEqual(d.send("AUTH LOGIN\r\n"), ["503 5.5.1 Already authenticated"])

    def test_auth_cancel_and_garbage(self) -> None:
        """'*' cancels with 501; undecodable base64 gets 501; an unknown mechanism 504."""
        d = Dialogue(self)
        d.send("EHLO c\r\nSTARTTLS\r\n")
        d.send("EHLO c\r\n")
        d.send("AUTH LOGIN\r\n")
        self.assertEqual(d.send("*\r\n"), ["501 5.0.0 Authentication cancelled"])
        self.assertEqual(d.send("AUTH PLAIN !!!\r\n"), ["501 5.5.2 Cannot decode response"])
        self.assertEqual(d.send("AUTH CRAM-MD5\r\n"), ["504 5.5.4 Unrecognized authentication type"])
        self.assertEqual(d.send("AUTH\r\n")[0][:9], "501 5.5.4")
        self.assertEqual(d.login.attempts, [])

    def test_login_answered_after_disconnect(self) -> None:
        """A login that succeeds after the client left is logged out at once."""
        d = Dialogue(self)
        d.send("EHLO c\r\nSTARTTLS\r\n")
        d.send("EHLO c\r\n")
        d.login.deferred = Deferred()
        d.send(f"AUTH PLAIN {PLAIN_ALICE}\r\n")
        d.session.connectionLost(None)
        d.login.deferred.callback((d.submitter, d.login._logout))
        self.assertEqual(d.login.logouts, 1)
        self.assertIsNone(d.session.username)


class InjectionAndPipeliningTests(unittest.TestCase):
    def test_plaintext_after_starttls_discarded(self) -> None:
        """
        Commands pipelined in plaintext behind STARTTLS are discarded, not
        run inside TLS (CVE-2011-0411).
        """
        d = Dialogue(self, auth_requires_tls=False)
        d.send("EHLO c\r\n")
        lines = d.send(f"STARTTLS\r\nAUTH PLAIN {PLAIN_ALICE}\r\nMAIL FROM:<alice@example.test>\r\n")
        self.assertEqual(lines, ["220 2.0.0 Ready to start TLS"])
        self.assertEqual(d.login.attempts, [])
        self.assertEqual(d.send("EHLO c\r\n")[0], "250-mx.example.test Hello c [192.0.2.7]")

    def test_pipelining_with_asynchronous_checks(self) -> None:
        """
        With validateFrom and validateTo answering later, a pipelined group
        gets exactly one reply per command, in order, and reading pauses
        while a check is pending.
        """
        d = Dialogue(self)
        d.tls_login()
        d.submitter.asynchronous = True
        lines = d.send(
            "MAIL FROM:<alice@example.test>\r\nRCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nNOOP\r\nDATA\r\n"
        )
        self.assertEqual(lines, [])
        self.assertEqual(d.transport.producerState, "paused")
        self.assertEqual(len(d.submitter.pending), 1)
        d.submitter.pending[0].callback(None)
        self.assertEqual(d.take(), ["250 2.1.0 Sender ok"])
        self.assertEqual(len(d.submitter.pending), 2)
        d.submitter.pending[1].callback(None)
        self.assertEqual(d.take(), ["250 2.1.5 Recipient ok"])
        d.submitter.pending[2].callback(None)
        self.assertEqual(d.take(), ["250 2.1.5 Recipient ok", "250 2.0.0 Ok", "354 End data with <CR><LF>.<CR><LF>"])
        self.assertEqual(d.transport.producerState, "producing")
        self.assertEqual(d.submitter.to_calls, ["a@example.org", "b@example.org"])

    def test_asynchronous_refusal_then_data(self) -> None:
        """A refused recipient answered later gets its own reply; DATA with none valid gets 554."""
        d = Dialogue(self)
        d.tls_login()
        d.submitter.asynchronous = True
        d.submitter.refuse_to["a@example.org"] = SMTPReply(550, "5.7.1", "Relay denied")
        d.send("MAIL FROM:<alice@example.test>\r\nRCPT TO:<a@example.org>\r\nDATA\r\n")
        d.submitter.pending[0].callback(None)
        d.submitter.pending[1].callback(None)
        self.assertEqual(d.take(), ["250 2.1.0 Sender ok", "550 5.7.1 Relay denied", "554 5.5.1 No valid recipients"])

    def test_synchronous_pipelining_keeps_reading(self) -> None:
        """Checks that answer at once do not pause the transport."""
        d = Dialogue(self)
        d.tls_login()
        lines = d.send("MAIL FROM:<alice@example.test>\r\nRCPT TO:<a@example.org>\r\n")
        self.assertEqual(lines, ["250 2.1.0 Sender ok", "250 2.1.5 Recipient ok"])
        self.assertEqual(d.transport.producerState, "producing")

    def test_unexpected_check_error(self) -> None:
        """validateFrom failing with a non-SMTPReply error gets a temporary 451 4.3.0."""
        d = Dialogue(self)
        d.tls_login()
        d.submitter.refuse_from = RuntimeError("database gone")
        self.assertEqual(
            d.send("MAIL FROM:<alice@example.test>\r\n"), ["451 4.3.0 Local error in processing, try again later"]
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class MailParameterTests(unittest.TestCase):
    def setUp(self) -> None:
        self.d = Dialogue(self)
        self.d.tls_login()

    def test_size_over_limit(self) -> None:
        """A SIZE parameter over the limit gets 552 5.3.4 and starts no transaction."""
        self.assertEqual(
            self.d.send("MAIL FROM:<alice@example.test> SIZE=1001\r\n"),
            ["552 5.3.4 Message size exceeds fixed maximum message size"],
        )
        self.assertEqual(self.d.submitter.from_calls, [])
        self.assertEqual(self.d.send("MAIL FROM:<alice@example.test> SIZE=1000\r\n"), ["250 2.1.0 Sender ok"])

    def test_bad_size(self) -> None:
        """A SIZE parameter that is not a number gets 501."""
        self.assertEqual(self.d.send("MAIL FROM:<alice@example.test> SIZE=big\r\n")[0][:9], "501 5.5.4")

    def test_mt_priority(self) -> None:
        """MT-PRIORITY -9..9 is passed to validateFrom and the envelope; out of range gets 501."""
        self.assertEqual(self.d.send("MAIL FROM:<alice@example.test> MT-PRIORITY=10\r\n")[0][:3], "501")
        self.assertEqual(self.d.send("MAIL FROM:<alice@example.test> MT-PRIORITY=x\r\n")[0][:3], "501")
        self.assertEqual(self.d.send("MAIL FROM:<alice@example.test> MT-PRIORITY=-9\r\n"), ["250 2.1.0 Sender ok"])
        self.assertEqual(self.d.submitter.from_calls[-1][1:], ("alice@example.test", -9))
        self.d.send("RCPT TO:<r@example.org>\r\nDATA\r\n.\r\n")
        self.assertEqual(self.d.submitter.writers[0].envelope.mt_priority, -9)

    def test_unknown_parameter(self) -> None:
        """An unknown MAIL parameter gets 555 5.5.4; BODY=8BITMIME and AUTH= are accepted."""
        self.assertEqual(
            self.d.send("MAIL FROM:<alice@example.test> SMTPUTF8\r\n"), ["555 5.5.4 Unsupported parameter SMTPUTF8"]
        )
        self.assertEqual(
            self.d.send("MAIL FROM:<alice@example.test> BODY=8BITMIME AUTH=<>\r\n"), ["250 2.1.0 Sender ok"]
        )

    def test_bad_addresses(self) -> None:
        """Malformed paths get 501 with the RFC 3463 address codes; <> is a valid sender."""
        self.assertEqual(self.d.send("MAIL FROM:<not an address>\r\n")[0][:9], "501 5.1.7")
        self.assertEqual(self.d.send("MAIL TO:<a@b.c>\r\n")[0][:9], "501 5.5.4")
        self.assertEqual(self.d.send("MAIL FROM:<>\r\n"), ["250 2.1.0 Sender ok"])
        self.assertEqual(self.d.send("MAIL FROM:<x@y.z>\r\n")[0][:9], "503 5.5.1")
        self.assertEqual(self.d.send("RCPT TO:<@route:bad>\r\n")[0][:9], "501 5.1.3")

    def test_sender_refused(self) -> None:
        """validateFrom's SMTPReply is the reply, and RCPT then needs a MAIL first."""
        self.d.submitter.refuse_from = SMTPReply(550, "5.7.1", "Sender not authorized")
        self.assertEqual(self.d.send("MAIL FROM:<eve@example.test>\r\n"), ["550 5.7.1 Sender not authorized"])
        self.assertEqual(self.d.send("RCPT TO:<r@example.org>\r\n"), ["503 5.5.1 Need MAIL command"])

    def test_max_recipients(self) -> None:
        """The recipient after max_recipients gets 452 4.5.3 and is not checked."""
        self.d.send("MAIL FROM:<alice@example.test>\r\n")
        for i in range(3):
            self.assertEqual(self.d.send(f"RCPT TO:<r{i}@example.org>\r\n"), ["250 2.1.5 Recipient ok"])
        self.assertEqual(self.d.send("RCPT TO:<r3@example.org>\r\n"), ["452 4.5.3 Too many recipients"])
        self.assertEqual(len(self.d.submitter.to_calls), 3)


class DataTests(unittest.TestCase):
    def test_message_queued(self) -> None:
        """A message is written dot-unstuffed and answered with the queue id; the envelope is complete."""
        d = Dialogue(self)
        d.envelope(recipients=2)
        self.assertEqual(d.send("DATA\r\n"), ["354 End data with <CR><LF>.<CR><LF>"])
        self.assertEqual(d.send("Subject: hi\r\n\r\n..leading dot\r\n.\r\n"), ["250 2.0.0 Ok: queued as Q1"])
        writer = d.submitter.writers[0]
        self.assertEqual(writer.data, b"Subject: hi\r\n\r\n.leading dot\r\n")
        self.assertTrue(writer.eom)
        env = writer.envelope
        self.assertEqual(env.mail_from, "alice@example.test")
        self.assertEqual(env.recipients, ("r0@example.org", "r1@example.org"))
        self.assertEqual(env.session.peer_ip, "192.0.2.7")
        self.assertEqual(env.session.local_port, 587)
        self.assertTrue(env.session.tls)
        self.assertTrue(env.received.startswith(b"Received: from client.test ([192.0.2.7])\r\n"))
        self.assertIn(b"with ESMTPSA;", env.received)
        self.assertTrue(env.received.endswith(b"\r\n"))
        # The transaction is over: a new one needs MAIL again.
        self.assertEqual(d.send("RCPT TO:<x@example.org>\r\n"), ["503 5.5.1 Need MAIL command"])
        self.assertEqual(d.session.messages, 1)

    def test_byte_by_byte(self) -> None:
        """Input fed one byte at a time, terminator and dot-stuffing split across reads, is read the same."""
        d = Dialogue(self)
        d.envelope()
        d.send("DATA\r\n")
        body = b"a\r\n..b\r\n.c\r\n\r\n.\r\n"
        out = []
        for i in range(len(body)):
            out += d.send(body[i : i + 1])
        self.assertEqual(out, ["250 2.0.0 Ok: queued as Q1"])
        self.assertEqual(d.submitter.writers[0].data, b"a\r\n.b\r\nc\r\n\r\n")

    def test_empty_message_and_pipelined_command(self) -> None:
        """A lone dot ends an empty message and a command in the same read is then run."""
        d = Dialogue(self)
        d.envelope()
        self.assertEqual(
            d.send("DATA\r\n.\r\nNOOP\r\n"),
            ["354 End data with <CR><LF>.<CR><LF>", "250 2.0.0 Ok: queued as Q1", "250 2.0.0 Ok"],
        )
        self.assertEqual(d.submitter.writers[0].data, b"")

    def test_bare_newlines_are_not_terminators(self) -> None:
        """
        LF.CRLF and CR.CRLF do not end DATA (SMTP smuggling), and bare LF or
        CR are stored as CRLF.
        """
        d = Dialogue(self)
        d.envelope()
        d.send("DATA\r\n")
        self.assertEqual(d.send(b"a\n.\r\nMAIL FROM:<x@y.z>\r\nb\r.\r\nc\r\n"), [])
        self.assertEqual(d.send(b".\r\n"), ["250 2.0.0 Ok: queued as Q1"])
        self.assertEqual(d.submitter.writers[0].data, b"a\r\n.\r\nMAIL FROM:<x@y.z>\r\nb\r\n.\r\nc\r\n")

    def test_long_line_flushed(self) -> None:
        """A DATA line without CRLF longer than the flush size is passed on in pieces, intact."""
        d = Dialogue(self, max_message_size=10_000_000)
        d.envelope()
        d.send("DATA\r\n")
        long_line = b"x" * 200_000 + b"\r"
        d.send(long_line)
        self.assertEqual(d.send(b"\n.\r\n"), ["250 2.0.0 Ok: queued as Q1"])
        self.assertEqual(d.submitter.writers[0].data, b"x" * 200_000 + b"\r\n")

    def test_data_over_size(self) -> None:
        """A body over the limit gets 552 5.3.4 after the final dot, and the writer is abandoned."""
        d = Dialogue(self)
        d.envelope()
        d.send("DATA\r\n")
        self.assertEqual(d.send(b"y" * 600 + b"\r\n"), [])
        self.assertEqual(d.send(b"y" * 600 + b"\r\n"), [])
        writer = d.submitter.writers[0]
        self.assertTrue(writer.lost)
        self.assertEqual(d.send(b".\r\n"), ["552 5.3.4 Message size exceeds fixed maximum message size"])
        self.assertFalse(writer.eom)
        self.assertEqual(d.send("NOOP\r\n"), ["250 2.0.0 Ok"])

    def test_eom_unexpected_failure(self) -> None:
        """eomReceived failing with a non-SMTPReply error gets 451 4.3.0, never a 5xx."""
        d = Dialogue(self)
        d.submitter.eom_result = OSError("disk full")
        d.envelope()
        d.send("DATA\r\n")
        lines = d.send("x\r\n.\r\n")
        self.assertEqual(len(lines), 1)
        self.assertTrue(lines[0].startswith("451 4.3.0 "), lines)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_eom_refusal(self) -> None:
        """eomReceived failing with SMTPReply sends that reply (e.g. a header From: refusal)."""
        d = Dialogue(self)
        d.submitter.eom_result = SMTPReply(550, "5.7.1", "Header From not authorized")
        d.envelope()
        d.send("DATA\r\n")
        self.assertEqual(d.send("x\r\n.\r\n"), ["550 5.7.1 Header From not authorized"])

    def test_eom_asynchronous(self) -> None:
        """While the message is being stored, pipelined input waits; the queue id reply comes first."""
        d = Dialogue(self)
        stored: Deferred[str] = Deferred()
        d.submitter.eom_result = stored
        d.envelope()
        d.send("DATA\r\n")
        self.assertEqual(d.send("x\r\n.\r\nQUIT\r\n"), [])
        self.assertEqual(d.transport.producerState, "paused")
        stored.callback("ABC123")
        self.assertEqual(d.take(), ["250 2.0.0 Ok: queued as ABC123", "221 2.0.0 Bye"])

    def test_disconnect_during_data(self) -> None:
        """Losing the connection in DATA abandons the message and logs out the avatar."""
        d = Dialogue(self)
        d.envelope()
        d.send("DATA\r\npartial\r\n")
        d.session.connectionLost(None)
        self.assertTrue(d.submitter.writers[0].lost)
        self.assertEqual(d.login.logouts, 1)
        self.assertEqual(d.registry.sessions, set())

    def test_rset_abandons_nothing_written(self) -> None:
        """RSET clears the envelope; DATA then needs MAIL."""
        d = Dialogue(self)
        d.envelope()
        d.send("RSET\r\n")
        self.assertEqual(d.send("DATA\r\n"), ["503 5.5.1 Need MAIL command"])

    def test_ipv6_received(self) -> None:
        """The Received: header writes an IPv6 peer as an IPv6 address literal."""
        d = Dialogue(self, peer=IPv6Address("TCP", "2001:db8::1", 40000))
        d.envelope()
        d.send("DATA\r\n.\r\n")
        self.assertIn(b"([IPv6:2001:db8::1])", d.submitter.writers[0].envelope.received)


class LimitTests(unittest.TestCase):
    def test_command_line_too_long(self) -> None:
        """A command line over 512 octets gets 500 5.5.2."""
        d = Dialogue(self)
        self.assertEqual(d.send("NOOP " + "x" * 600 + "\r\n"), ["500 5.5.2 Line too long"])

    def test_endless_line_answered_once(self) -> None:
        """A line with no end gets one 500 5.5.2; its rest is skipped and the next line works."""
        d = Dialogue(self)
        lines = []
        for _ in range(5):
            lines += d.send(b"z" * (AUTH_LINE_MAX // 2))
        self.assertEqual(lines, ["500 5.5.2 Line too long"])
        self.assertEqual(d.send(b"zzz\r\nNOOP\r\n"), ["250 2.0.0 Ok"])

    def test_too_many_bad_commands(self) -> None:
        """After MAX_BAD_COMMANDS errors the session says 421 and closes."""
        d = Dialogue(self)
        lines = d.send("BOGUS\r\n" * (MAX_BAD_COMMANDS + 5))
        self.assertEqual(lines[:MAX_BAD_COMMANDS], ["500 5.5.2 Command not recognized"] * MAX_BAD_COMMANDS)
        self.assertEqual(lines[MAX_BAD_COMMANDS:], ["421 4.7.0 Too many errors, closing connection"])
        self.assertTrue(d.transport.disconnecting)

    def test_idle_timeout(self) -> None:
        """An idle client gets 421 4.4.2 after idle_timeout and is disconnected."""
        d = Dialogue(self, idle_timeout=60)
        d.send("EHLO c\r\n")
        d.clock.advance(59)
        self.assertEqual(d.take(), [])
        d.send("NOOP\r\n")
        d.clock.advance(59)
        self.assertFalse(d.transport.disconnecting)
        d.clock.advance(2)
        self.assertEqual(d.take(), ["421 4.4.2 mx.example.test Error: timeout exceeded"])
        self.assertTrue(d.transport.disconnecting)

    def test_no_timeout_while_we_are_slow(self) -> None:
        """While a check of ours is pending the idle timer does not run against the client."""
        d = Dialogue(self, idle_timeout=60)
        d.tls_login()
        d.submitter.asynchronous = True
        d.send("MAIL FROM:<alice@example.test>\r\n")
        d.clock.advance(120)
        self.assertFalse(d.transport.disconnecting)
        d.submitter.pending[0].callback(None)
        self.assertEqual(d.take(), ["250 2.1.0 Sender ok"])
        d.clock.advance(61)
        self.assertTrue(d.transport.disconnecting)


class FlowControlTests(unittest.TestCase):
    """The session stops working and reading while its replies are not going out."""

    def test_registered_as_producer(self) -> None:
        """The session is its transport's streaming producer until it closes."""
        d = Dialogue(self)
        self.assertIs(d.transport.producer, d.session)
        self.assertTrue(d.transport.streaming)
        d.send("QUIT\r\n")
        # loseConnection would otherwise wait for the producer forever.
        self.assertIsNone(d.transport.producer)
        self.assertTrue(d.transport.disconnecting)

    def test_pipelined_input_held_while_replies_unsent(self) -> None:
        """
        A pipelined batch is answered only as fast as the client takes the
        replies: the transport's buffer never holds more than its limit
        plus one reply, and reading pauses meanwhile.
        """
        d = Dialogue(self, transport_class=BufferedTransport)
        d.transport.clear()
        d.session.dataReceived(b"EHLO c\r\n" * 40)

        def answered(lines: list[str]) -> int:
            return sum(1 for line in lines if line.startswith("250 "))

        replies = 0
        for _ in range(40):
            if replies + answered(d.transport.value().decode().split("\r\n")) == 40:
                break
            # Some EHLOs still wait, behind replies the client has not read.
            self.assertTrue(d.transport.full)
            self.assertEqual(d.transport.producerState, "paused")
            replies += answered(d.transport.drain())
        self.assertGreater(replies, 20)
        replies += answered(d.transport.drain())
        self.assertEqual(replies, 40)
        self.assertEqual(d.transport.producerState, "producing")
        one_reply = len(b"\r\n".join(line.encode() for line in d.send("EHLO c\r\n"))) + 2
        self.assertLessEqual(d.transport.largest, BufferedTransport.limit + one_reply)

    def test_blocked_without_input_keeps_reading(self) -> None:
        """
        With its replies unsent but no input waiting (as while the TLS
        handshake holds the banner) the session reads on; input that comes
        waits, with reading paused, until the replies go out.
        """
        d = Dialogue(self)
        d.session.pauseProducing()
        self.assertEqual(d.transport.producerState, "producing")
        self.assertEqual(d.send("NOOP\r\n"), [])
        self.assertEqual(d.transport.producerState, "paused")
        d.session.resumeProducing()
        self.assertEqual(d.take(), ["250 2.0.0 Ok"])
        self.assertEqual(d.transport.producerState, "producing")

    def test_pending_check_and_unsent_replies(self) -> None:
        """Reading resumes only when neither a pending check nor unsent replies hold the input."""
        d = Dialogue(self)
        d.tls_login()
        d.submitter.asynchronous = True
        d.send("MAIL FROM:<alice@example.test>\r\nNOOP\r\n")
        self.assertEqual(d.transport.producerState, "paused")
        d.session.pauseProducing()
        d.submitter.pending[0].callback(None)
        self.assertEqual(d.take(), ["250 2.1.0 Sender ok"])
        self.assertEqual(d.transport.producerState, "paused")
        d.session.resumeProducing()
        self.assertEqual(d.take(), ["250 2.0.0 Ok"])
        self.assertEqual(d.transport.producerState, "producing")
        # The other way round: the replies drain while the check is pending.
        d.send("RCPT TO:<a@example.org>\r\nNOOP\r\n")
        d.session.pauseProducing()
        d.session.resumeProducing()
        self.assertEqual(d.transport.producerState, "paused")
        d.submitter.pending[1].callback(None)
        self.assertEqual(d.take(), ["250 2.1.5 Recipient ok", "250 2.0.0 Ok"])
        self.assertEqual(d.transport.producerState, "producing")

    def record_aborts(self, d: Dialogue) -> list[bool]:
        aborted: list[bool] = []
        d.transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        return aborted

    def test_idle_timeout_aborts_with_unsent_output(self) -> None:
        """When the idle timeout fires while replies are unsent, the connection is aborted at once."""
        d = Dialogue(self, idle_timeout=60)
        aborted = self.record_aborts(d)
        d.send("EHLO c\r\n")
        d.session.pauseProducing()
        d.clock.advance(60)
        self.assertEqual(aborted, [True])
        self.assertEqual(d.take(), ["421 4.4.2 mx.example.test Error: timeout exceeded"])
        self.assertIsNone(d.transport.producer)

    def test_close_bounded(self) -> None:
        """
        A session closing normally lets its last replies go out, but aborts
        when the client has not taken them within idle_timeout.
        """
        d = Dialogue(self, idle_timeout=60)
        aborted = self.record_aborts(d)
        d.clock.advance(60)
        self.assertEqual(d.take(), ["421 4.4.2 mx.example.test Error: timeout exceeded"])
        self.assertTrue(d.transport.disconnecting)
        self.assertEqual(aborted, [])
        d.clock.advance(59)
        self.assertEqual(aborted, [])
        d.clock.advance(1)
        self.assertEqual(aborted, [True])

    def test_no_abort_after_close(self) -> None:
        """A session whose connection closed in time leaves no timer behind."""
        d = Dialogue(self, idle_timeout=60)
        aborted = self.record_aborts(d)
        d.send("QUIT\r\n")
        d.session.connectionLost(None)
        d.clock.advance(120)
        self.assertEqual(aborted, [])
        self.assertEqual(d.clock.getDelayedCalls(), [])


class LineDeadlineTests(unittest.TestCase):
    """idle_timeout bounds each line, not the gap between two bytes."""

    def trickle(self, d: Dialogue, data: bytes, step: float) -> None:
        for byte in data:
            d.clock.advance(step)
            d.send(bytes([byte]))

    def test_trickled_command_line(self) -> None:
        """A command line sent a byte every 10 s ends the session with 421 4.4.2 at idle_timeout."""
        d = Dialogue(self, idle_timeout=60)
        d.send("EHLO c\r\n")
        self.trickle(d, b"NOOP xxx", 7)
        self.assertEqual(d.clock.seconds(), 56)
        self.assertEqual(d.take(), [])
        d.clock.advance(3)
        self.assertFalse(d.transport.disconnecting)
        d.clock.advance(1)
        self.assertEqual(d.take(), ["421 4.4.2 mx.example.test Error: timeout exceeded"])
        self.assertTrue(d.transport.disconnecting)

    def test_trickled_data_line(self) -> None:
        """A DATA line trickled in ends the session with 421 4.4.2; the message is abandoned."""
        d = Dialogue(self, idle_timeout=60)
        d.envelope()
        d.send("DATA\r\nSubject: slow\r\n")
        self.trickle(d, b"abcdef", 9)
        self.assertFalse(d.transport.disconnecting)
        d.clock.advance(6)
        self.assertEqual(d.take(), ["421 4.4.2 mx.example.test Error: timeout exceeded"])
        self.assertTrue(d.transport.disconnecting)
        d.session.connectionLost(None)
        self.assertTrue(d.submitter.writers[0].lost)

    def test_complete_lines_extend(self) -> None:
        """Each complete line, command or DATA, gives the client idle_timeout again."""
        d = Dialogue(self, idle_timeout=60)
        d.envelope()
        for line in ("DATA\r\n", "Subject: s\r\n", "\r\n", "body\r\n", ".\r\n", "NOOP\r\n"):
            d.clock.advance(50)
            d.send(line)
        self.assertEqual(d.clock.seconds(), 300)
        self.assertFalse(d.transport.disconnecting)
        self.assertEqual(d.submitter.writers[0].data, b"Subject: s\r\n\r\nbody\r\n")

    def test_line_completed_across_reads(self) -> None:
        """The end of a line that began in an earlier read resets the deadline."""
        d = Dialogue(self, idle_timeout=60)
        d.send("NO")
        d.clock.advance(50)
        self.assertEqual(d.send("OP\r\n"), ["250 2.0.0 Ok"])
        d.clock.advance(50)
        self.assertFalse(d.transport.disconnecting)


class JunkCommandTests(unittest.TestCase):
    """More than MAX_JUNK_COMMANDS commands that move no transaction forward end the session."""

    TOO_MUCH = "421 4.7.0 Too many commands without a mail transaction, closing connection"

    def test_noop_flood(self) -> None:
        """100 NOOPs are answered; the 101st gets 421 4.7.0 and the connection closes."""
        self.assertEqual(MAX_JUNK_COMMANDS, 100)
        d = Dialogue(self)
        lines = d.send("NOOP\r\n" * 100)
        self.assertEqual(lines, ["250 2.0.0 Ok"] * 100)
        self.assertFalse(d.transport.disconnecting)
        self.assertEqual(d.send("NOOP\r\nNOOP\r\n"), [self.TOO_MUCH])
        self.assertTrue(d.transport.disconnecting)
        self.assertEqual(d.session.outcome, "too many junk commands")

    def test_every_kind_counts(self) -> None:
        """RSET, VRFY, EXPN, HELP, NOOP and refused commands all count towards the same limit."""
        d = Dialogue(self)
        d.tls_login()
        d.send("MAIL FROM:<alice@example.test>\r\n")
        d.submitter.refuse_to["no@example.org"] = SMTPReply(550, "5.7.1", "Relay denied")
        lines = []
        for verb in ("RSET", "VRFY x", "EXPN x", "HELP", "NOOP"):
            lines += d.send(f"{verb}\r\n" * 19)
        self.assertEqual(len(lines), 95)
        d.send("MAIL FROM:<alice@example.test>\r\n")
        self.assertEqual(d.send("RCPT TO:<no@example.org>\r\n" * 5), ["550 5.7.1 Relay denied"] * 5)
        self.assertFalse(d.transport.disconnecting)
        self.assertEqual(d.send("HELP\r\n"), [self.TOO_MUCH])
        self.assertTrue(d.transport.disconnecting)

    def test_refusal_over_the_limit(self) -> None:
        """A refused command beyond the limit gets its refusal, then 421 4.7.0."""
        d = Dialogue(self)
        d.send("NOOP\r\n" * 100)
        self.assertEqual(d.send("RCPT TO:<a@example.org>\r\n"), ["503 5.5.1 Need MAIL command", self.TOO_MUCH])
        self.assertTrue(d.transport.disconnecting)

    def test_transaction_does_not_count(self) -> None:
        """MAIL and RCPT between junk commands do not count."""
        d = Dialogue(self)
        d.tls_login()
        self.assertEqual(d.send("NOOP\r\n" * 60), ["250 2.0.0 Ok"] * 60)
        lines = d.send("MAIL FROM:<alice@example.test>\r\nRCPT TO:<a@example.org>\r\n")
        self.assertEqual(lines, ["250 2.1.0 Sender ok", "250 2.1.5 Recipient ok"])
        self.assertEqual(d.send("NOOP\r\n" * 40), ["250 2.0.0 Ok"] * 40)
        self.assertEqual(d.send("RSET\r\n"), [self.TOO_MUCH])

    def test_accepted_message_restarts_the_count(self) -> None:
        """A client sending RSET between messages on one long connection is not cut off."""
        d = Dialogue(self)
        d.tls_login()
        for _ in range(3):
            self.assertEqual(d.send("NOOP\r\n" * 90), ["250 2.0.0 Ok"] * 90)
            lines = d.send("MAIL FROM:<alice@example.test>\r\nRCPT TO:<a@example.org>\r\nDATA\r\nx\r\n.\r\nRSET\r\n")
            self.assertTrue(lines[-2].startswith("250 2.0.0 Ok: queued as "), lines)
        self.assertEqual(d.send("NOOP\r\n" * 99), ["250 2.0.0 Ok"] * 99)
        self.assertEqual(d.send("NOOP\r\n"), [self.TOO_MUCH])


class EnvelopeAddressTests(unittest.TestCase):
    """Unicode domains become IDNA A-labels; a non-ASCII local part needs SMTPUTF8."""

    def setUp(self) -> None:
        self.d = Dialogue(self)
        self.d.tls_login()

    def test_unicode_domains_become_a_labels(self) -> None:
        """MAIL FROM and RCPT TO in Unicode reach the checks and the message as A-labels."""
        d = self.d
        self.assertEqual(d.send("MAIL FROM:<info@Bücher.example>\r\n"), ["250 2.1.0 Sender ok"])
        self.assertEqual(d.send("RCPT TO:<x@bücher.example>\r\n"), ["250 2.1.5 Recipient ok"])
        self.assertEqual(d.send("RCPT TO:<@relay.example:y@faß.example>\r\n"), ["250 2.1.5 Recipient ok"])
        self.assertEqual(d.send("RCPT TO:<Plain@Example.ORG>\r\n"), ["250 2.1.5 Recipient ok"])
        d.send("DATA\r\n.\r\n")
        self.assertEqual(d.submitter.from_calls[0][1], "info@xn--bcher-kva.example")
        self.assertEqual(d.submitter.to_calls, ["x@xn--bcher-kva.example", "y@xn--fa-hia.example", "Plain@Example.ORG"])
        envelope = d.submitter.writers[0].envelope
        self.assertEqual(envelope.mail_from, "info@xn--bcher-kva.example")
        self.assertEqual(envelope.recipients, ("x@xn--bcher-kva.example", "y@xn--fa-hia.example", "Plain@Example.ORG"))

    def test_non_ascii_local_part(self) -> None:
        """A non-ASCII local part, quoted or not, gets 553 5.6.7 at MAIL and RCPT."""
        d = self.d
        self.assertEqual(d.send("MAIL FROM:<jösé@example.test>\r\n")[0][:9], "553 5.6.7")
        d.send("MAIL FROM:<alice@example.test>\r\n")
        self.assertEqual(d.send("RCPT TO:<jösé@bücher.example>\r\n")[0][:9], "553 5.6.7")
        self.assertEqual(d.send('RCPT TO:<"jö sé"@example.org>\r\n')[0][:9], "553 5.6.7")
        self.assertEqual(d.submitter.to_calls, [])

    def test_invalid_idna_domain(self) -> None:
        """A Unicode domain that is not valid IDNA gets 553 5.1.7 (sender) or 553 5.1.3 (recipient)."""
        d = self.d
        self.assertEqual(
            d.send("MAIL FROM:<a@☃.example>\r\n"),
            ["553 5.1.7 Bad sender domain: not a valid internationalized domain name"],
        )
        d.send("MAIL FROM:<alice@example.test>\r\n")
        for domain in ("☃.example", "bü..example", "-bü.example", "ü" * 70 + ".example"):
            self.assertEqual(
                d.send(f"RCPT TO:<x@{domain}>\r\n"),
                ["553 5.1.3 Bad recipient domain: not a valid internationalized domain name"],
                domain,
            )
        self.assertEqual(d.submitter.to_calls, [])

    def test_a_label_too_long(self) -> None:
        """An address whose A-label form is over 254 octets gets 501 5.1.3."""
        d = self.d
        d.send("MAIL FROM:<alice@example.test>\r\n")
        domain = ".".join(["bücher"] * 17) + ".example"
        self.assertEqual(len("x" * 10 + "@" + domain.encode("idna").decode()), 256)
        self.assertEqual(d.send(f"RCPT TO:<{'x' * 10}@{domain}>\r\n"), ["501 5.1.3 Bad recipient address syntax"])
        self.assertEqual(d.send(f"RCPT TO:<{'x' * 8}@{domain}>\r\n"), ["250 2.1.5 Recipient ok"])


class SessionStateTests(unittest.TestCase):
    """The session's one state (smtpplus.smtp.framing.SessionState) follows the dialogue."""

    def test_states_follow_the_dialogue(self) -> None:
        """COMMAND, AUTH between challenges, DATA, WAITING while the message is stored, CLOSING, CLOSED."""
        d = Dialogue(self)
        stored: Deferred[str] = Deferred()
        d.submitter.eom_result = stored
        self.assertIs(d.session.state, SessionState.COMMAND)
        d.send("EHLO client.test\r\nSTARTTLS\r\n")
        d.send("EHLO client.test\r\nAUTH LOGIN\r\n")
        self.assertIs(d.session.state, SessionState.AUTH)
        d.send(base64.b64encode(b"alice") + b"\r\n")
        self.assertIs(d.session.state, SessionState.AUTH)
        self.assertEqual(d.send(base64.b64encode(b"secret") + b"\r\n"), ["235 2.7.0 Authentication successful"])
        self.assertIs(d.session.state, SessionState.COMMAND)
        d.send("MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
        self.assertIs(d.session.state, SessionState.DATA)
        d.send("body\r\n.\r\n")
        self.assertIs(d.session.state, SessionState.WAITING)
        stored.callback("Q9")
        self.assertIs(d.session.state, SessionState.COMMAND)
        self.assertEqual(d.take(), ["250 2.0.0 Ok: queued as Q9"])
        self.assertEqual(d.send("QUIT\r\n"), ["221 2.0.0 Bye"])
        self.assertIs(d.session.state, SessionState.CLOSING)
        d.session.connectionLost(None)
        self.assertIs(d.session.state, SessionState.CLOSED)

    def test_attributes_created_in_init(self) -> None:
        """A whole session creates no attribute after construction, beyond those Twisted's own classes set."""
        registry = SessionRegistry(session_settings(auth_requires_tls=False), Clock())
        login = FakeLogin()
        peer = IPv4Address("TCP", "192.0.2.7", 40000)
        session = SMTPServerFactory(registry, login, None).buildProtocol(peer)
        before = set(vars(session))
        transport = TLSStringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 587), peerAddress=peer)
        session.makeConnection(transport)
        session.dataReceived(
            f"EHLO c\r\nAUTH PLAIN {PLAIN_ALICE}\r\nMAIL FROM:<alice@example.test>\r\n"
            "RCPT TO:<bob@example.org>\r\nDATA\r\n".encode()
        )
        session.dataReceived(b"x" * 2000 + b"\r\n.\r\nAUTH LOGIN\r\n*\r\nBOGUS\r\nQUIT\r\n")
        registry.clock.advance(400)
        session.connectionLost(None)
        self.assertIn(b"552 5.3.4", transport.value())
        # Protocol.makeConnection sets transport and connected; TimeoutMixin.setTimeout its timer.
        twisted_own = {"transport", "connected", "timeOut", "_TimeoutMixin__timeoutCall"}
        self.assertEqual(set(vars(session)) - before - twisted_own, set())
