"""
Real TLS on real sockets: STARTTLS and implicit TLS driven by Python's
smtplib in a thread, the TLS version floor, and certificate handling.
"""

from __future__ import annotations

import os
import smtplib
import ssl
import stat

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from smtpplus.config import ConfigError, TLSConfig
from smtpplus.smtp.protocol import SessionRegistry, SessionSettings, SMTPServerFactory
from smtpplus.smtp.tls import check_tls_files, server_context
from tests.helpers import FakeLogin, temp_dir

HOSTNAME = "mx.tls.test"


def client_context(**kwargs: object) -> ssl.SSLContext:
    """A client context that trusts anything: the cert is self-signed."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for name, value in kwargs.items():
        setattr(ctx, name, value)
    return ctx


class TLSServerMixin:
    """Starts STARTTLS and implicit-TLS listeners on 127.0.0.1 port 0."""

    def start_servers(self) -> None:
        self.state_dir = temp_dir(self)
        options = server_context(TLSConfig("", ""), HOSTNAME, self.state_dir)
        settings = SessionSettings(
            hostname=HOSTNAME,
            max_message_size=10_000,
            max_recipients=10,
            max_connections=10,
            max_connections_per_ip=10,
            idle_timeout=30,
            auth_requires_tls=True,
        )
        self.registry = SessionRegistry(settings, reactor)
        self.login = FakeLogin()
        plain = SMTPServerFactory(self.registry, self.login, options)
        implicit = TLSMemoryBIOFactory(options, False, SMTPServerFactory(self.registry, self.login, None, True))
        self.port = reactor.listenTCP(0, plain, interface="127.0.0.1")
        self.tls_port = reactor.listenTCP(0, implicit, interface="127.0.0.1")
        self.addCleanup(self.stop_servers)

    @inlineCallbacks
    def stop_servers(self):
        yield self.port.stopListening()
        yield self.tls_port.stopListening()
        # Let the server side of every connection finish closing.
        for _ in range(200):
            if not self.registry.sessions:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        for session in list(self.registry.sessions):
            session.transport.abortConnection()
        yield deferLater(reactor, 0.01, lambda: None)


class STARTTLSTests(TLSServerMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.start_servers()

    @inlineCallbacks
    def test_starttls_dialogue(self):
        """EHLO offers STARTTLS and no AUTH; after STARTTLS and EHLO, AUTH and no STARTTLS; AUTH works; a message queues."""
        port = self.port.getHost().port

        def talk():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                code, _ = smtp.ehlo("client.test")
                before = dict(smtp.esmtp_features)
                smtp.starttls(context=client_context())
                cipher = smtp.sock.version()
                smtp.ehlo("client.test")
                after = dict(smtp.esmtp_features)
                smtp.login("alice", "secret")
                refused = smtp.sendmail("alice@example.test", ["bob@example.org"], b"Subject: x\r\n\r\nhi\r\n")
                return code, before, after, cipher, refused

        code, before, after, version, refused = yield deferToThread(talk)
        self.assertEqual(code, 250)
        self.assertIn("starttls", before)
        self.assertNotIn("auth", before)
        self.assertEqual(before["size"], "10000")
        self.assertIn("auth", after)
        self.assertEqual(after["auth"].split(), ["PLAIN", "LOGIN"])
        self.assertNotIn("starttls", after)
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(refused, {})
        writer = self.login.submitter.writers[0]
        self.assertEqual(writer.data, b"Subject: x\r\n\r\nhi\r\n")
        self.assertTrue(writer.envelope.session.tls)

    @inlineCallbacks
    def test_auth_on_plaintext_refused(self):
        """Over real plaintext, AUTH gets 530 5.7.0 Must issue a STARTTLS command first."""
        port = self.port.getHost().port

        def talk():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                return smtp.docmd("AUTH", "PLAIN AGFsaWNlAHNlY3JldA==")

        code, text = yield deferToThread(talk)
        self.assertEqual((code, text), (530, b"5.7.0 Must issue a STARTTLS command first"))

    @inlineCallbacks
    def test_old_tls_refused(self):
        """A client that can speak at most TLS 1.1 does not get a TLS session."""
        port = self.port.getHost().port
        ctx = client_context(minimum_version=ssl.TLSVersion.TLSv1, maximum_version=ssl.TLSVersion.TLSv1_1)
        try:
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        except ssl.SSLError:
            raise unittest.SkipTest("local OpenSSL cannot offer TLS 1.1 ciphers") from None

        def talk():
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                try:
                    smtp.starttls(context=ctx)
                except ssl.SSLError as e:
                    return e
                return None

        error = yield deferToThread(talk)
        self.assertIsNotNone(error, "a TLS 1.1 handshake succeeded")
        if "NO_PROTOCOLS_AVAILABLE" in str(error) or "no protocols available" in str(error):
            raise unittest.SkipTest(f"local OpenSSL refuses TLS 1.1 itself: {error}")
        self.assertIn("VERSION", str(error).upper())

    @inlineCallbacks
    def test_implicit_tls(self):
        """On the implicit-TLS port the session is TLS from the start: AUTH offered, STARTTLS not."""
        port = self.tls_port.getHost().port

        def talk():
            with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=client_context()) as smtp:
                smtp.ehlo("client.test")
                features = dict(smtp.esmtp_features)
                smtp.login("alice", "secret")
                return features, smtp.noop()

        features, noop = yield deferToThread(talk)
        self.assertIn("auth", features)
        self.assertNotIn("starttls", features)
        self.assertEqual(noop, (250, b"2.0.0 Ok"))


class CertificateTests(unittest.TestCase):
    def fingerprint(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return x509.load_pem_x509_certificate(f.read()).fingerprint(hashes.SHA256())

    def test_generated_once(self) -> None:
        """The self-signed certificate is generated once (key mode 0600) and reused on the next start."""
        state_dir = temp_dir(self)
        server_context(TLSConfig("", ""), HOSTNAME, state_dir)
        cert = os.path.join(state_dir, "tls", "cert.pem")
        key = os.path.join(state_dir, "tls", "key.pem")
        first = self.fingerprint(cert)
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)
        server_context(TLSConfig("", ""), HOSTNAME, state_dir)
        self.assertEqual(self.fingerprint(cert), first)
        with open(cert, "rb") as f:
            parsed = x509.load_pem_x509_certificate(f.read())
        names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(names.get_values_for_type(x509.DNSName), [HOSTNAME])

    def test_configured_pair_used(self) -> None:
        """A configured certificate and key pass the check and are served."""
        state_dir = temp_dir(self)
        server_context(TLSConfig("", ""), HOSTNAME, state_dir)
        cert = os.path.join(state_dir, "tls", "cert.pem")
        key = os.path.join(state_dir, "tls", "key.pem")
        check_tls_files(TLSConfig(cert, key))
        other = temp_dir(self)
        server_context(TLSConfig(cert, key), "other.name", other)
        self.assertFalse(os.path.exists(os.path.join(other, "tls")))

    def assert_config_error(self, tls: TLSConfig, text: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            check_tls_files(tls)
        self.assertIn(text, str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))

    def test_bad_files(self) -> None:
        """Unreadable, garbage, lone or mismatched certificate files are one ConfigError naming the key."""
        directory = temp_dir(self)
        garbage = os.path.join(directory, "garbage.pem")
        with open(garbage, "w") as f:
            f.write("not a certificate\n")
        first, second = temp_dir(self), temp_dir(self)
        server_context(TLSConfig("", ""), HOSTNAME, first)
        server_context(TLSConfig("", ""), HOSTNAME, second)
        cert1, key1 = os.path.join(first, "tls", "cert.pem"), os.path.join(first, "tls", "key.pem")
        key2 = os.path.join(second, "tls", "key.pem")
        missing = os.path.join(directory, "missing.pem")

        self.assert_config_error(TLSConfig(missing, key1), f"[tls] certificate: cannot read {missing}")
        self.assert_config_error(TLSConfig(cert1, missing), f"[tls] private_key: cannot read {missing}")
        self.assert_config_error(TLSConfig(garbage, key1), "[tls] certificate:")
        self.assert_config_error(TLSConfig(cert1, garbage), "[tls] private_key:")
        self.assert_config_error(TLSConfig(cert1, ""), "[tls] private_key: must be set together")
        self.assert_config_error(TLSConfig(cert1, key2), "[tls] private_key:")
        self.assert_config_error(TLSConfig(cert1, key2), "does not match")
        if os.geteuid() != 0:
            unreadable = os.path.join(directory, "unreadable.pem")
            with open(unreadable, "w") as f:
                f.write("x")
            os.chmod(unreadable, 0)
            self.assert_config_error(TLSConfig(unreadable, key1), "Permission denied")
