"""
Real TLS on real sockets: STARTTLS and implicit TLS driven by Python's
smtplib in a thread (Python's C{ssl} links the system OpenSSL, a different
build from the server's), the [tls] profiles' versions, suites and groups,
and certificate generation and renewal.
"""

from __future__ import annotations

import datetime
import os
import smtplib
import socket
import ssl
import stat

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest
from zope.interface import implementer

from smtpplus.config import ConfigError, TLSConfig
from smtpplus.smtp.protocol import SessionRegistry, SMTPServerFactory
from smtpplus.smtp.tls import GENERATED_LIFETIME, check_tls_files, generate_self_signed, server_context
from tests.harness.daemon import temp_dir
from tests.harness.fakes import FakeLogin, session_settings

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

    def start_servers(self, profile: str = "intermediate") -> None:
        self.state_dir = temp_dir(self)
        options = self.options = server_context(TLSConfig("", "", profile), HOSTNAME, self.state_dir)
        settings = session_settings(
            hostname=HOSTNAME, max_message_size=10_000, max_recipients=10, max_connections_per_ip=10, idle_timeout=30
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

    def starttls(self, ctx: ssl.SSLContext) -> Deferred[tuple[str, str, str | None] | ssl.SSLError]:
        """
        EHLO, STARTTLS with C{ctx}, EHLO again; fire with the negotiated
        (version, cipher, ALPN protocol), or with the handshake's SSLError.
        """
        port = self.port.getHost().port

        def talk() -> tuple[str, str, str | None] | ssl.SSLError:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                try:
                    smtp.starttls(context=ctx)
                except ssl.SSLError as e:
                    return e
                result = (smtp.sock.version(), smtp.sock.cipher()[0], smtp.sock.selected_alpn_protocol())
                code, _ = smtp.ehlo("client.test")
                assert code == 250, code
                return result

        return deferToThread(talk)

    @inlineCallbacks
    def negotiate(self, ctx: ssl.SSLContext):
        """L{starttls} that fails the test when the handshake fails."""
        result = yield self.starttls(ctx)
        if isinstance(result, ssl.SSLError):
            self.fail(f"handshake failed: {result}")
        return result


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
    def assert_version_refused(self, version: ssl.TLSVersion):
        ctx = client_context(minimum_version=version, maximum_version=version)
        try:
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        except ssl.SSLError:
            raise unittest.SkipTest(f"local OpenSSL cannot offer {version.name} ciphers") from None
        error = yield self.starttls(ctx)
        self.assertIsInstance(error, ssl.SSLError, f"a {version.name} handshake succeeded: {error}")
        if "NO_PROTOCOLS_AVAILABLE" in str(error) or "no protocols available" in str(error):
            raise unittest.SkipTest(f"local OpenSSL refuses {version.name} itself: {error}")
        self.assertIn("VERSION", str(error).upper())

    def test_tls10_refused(self):
        """A client that speaks only TLS 1.0 gets a protocol_version alert, not a session."""
        return self.assert_version_refused(ssl.TLSVersion.TLSv1)

    def test_tls11_refused(self):
        """A client that speaks only TLS 1.1 gets a protocol_version alert, not a session."""
        return self.assert_version_refused(ssl.TLSVersion.TLSv1_1)

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


@implementer(IProtocolNegotiationFactory)
class NegotiatingFactory(Factory):
    """Serves a protocol that says nothing and speaks ALPN C{x-test}."""

    protocol = Protocol

    def acceptableProtocols(self) -> list[bytes]:
        return [b"x-test"]


def tls12_context(ciphers: str = "", group: str = "") -> ssl.SSLContext:
    """A TLS 1.2-only client offering just C{ciphers} and just C{group}."""
    ctx = client_context(maximum_version=ssl.TLSVersion.TLSv1_2)
    if ciphers:
        ctx.set_ciphers(ciphers)
    if group:
        ctx.set_ecdh_curve(group)
    return ctx


class IntermediateProfileTests(TLSServerMixin, unittest.TestCase):
    """The default profile: AEAD suites, groups X25519, P-256, P-384."""

    def setUp(self) -> None:
        self.start_servers()

    @inlineCallbacks
    def test_alpn_offer_ignored(self):
        """
        A client offering ALPN (h2, http/1.1, as Android's and Go's stacks
        do) gets a TLS 1.3 session without a protocol instead of an
        internal_error alert.
        """
        ctx = client_context()
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        result = yield self.negotiate(ctx)
        self.assertEqual(result[0], "TLSv1.3", result)
        self.assertIsNone(result[2])

    @inlineCallbacks
    def test_alpn_of_negotiating_factory(self):
        """
        A served factory that speaks ALPN protocols (as twisted.web's Site
        does for the admin API) gets its protocol chosen when the client
        offers it, and a session without ALPN when the client offers none of
        them.
        """
        port = reactor.listenSSL(0, NegotiatingFactory(), self.options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        def handshake(offered: list[str]) -> str | None:
            ctx = client_context()
            ctx.set_alpn_protocols(offered)
            with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10) as raw:
                with ctx.wrap_socket(raw) as tls:
                    return tls.selected_alpn_protocol()

        chosen = yield deferToThread(handshake, ["h2", "x-test"])
        self.assertEqual(chosen, "x-test")
        chosen = yield deferToThread(handshake, ["h2", "http/1.1"])
        self.assertIsNone(chosen)

    @inlineCallbacks
    def test_tls12_x25519_only(self):
        """
        A TLS 1.2 client listing only X25519 cannot take the P-256 ECDSA
        certificate; it gets the RSA one (an ECDHE-RSA suite) instead of a
        handshake failure.
        """
        result = yield self.negotiate(tls12_context(group="X25519"))
        self.assertEqual(result[:2], ("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256"), result)

    @inlineCallbacks
    def test_tls12_each_group(self):
        """
        A TLS 1.2 client with only P-256 gets the ECDSA certificate; with
        only P-384 (its groups name the curves it verifies too) the RSA one.
        """
        for group, cipher in (("prime256v1", "ECDHE-ECDSA-AES128-GCM-SHA256"), ("secp384r1", "ECDHE-RSA-AES128-GCM-SHA256")):
            result = yield self.negotiate(tls12_context(group=group))
            self.assertEqual(result[:2], ("TLSv1.2", cipher), (group, result))

    @inlineCallbacks
    def test_tls13_each_group(self):
        """A TLS 1.3 client whose one group is X25519, P-256 or P-384 negotiates."""
        for group in ("X25519", "prime256v1", "secp384r1"):
            ctx = client_context()
            ctx.set_ecdh_curve(group)
            result = yield self.negotiate(ctx)
            self.assertEqual(result[:2], ("TLSv1.3", "TLS_AES_128_GCM_SHA256"), (group, result))

    @inlineCallbacks
    def test_groups_outside_profile_refused(self):
        """A client whose only group is P-521 finds none in common, in TLS 1.3 and 1.2."""
        for ctx in (client_context(), tls12_context()):
            ctx.set_ecdh_curve("secp521r1")
            error = yield self.starttls(ctx)
            self.assertIsInstance(error, ssl.SSLError)
            self.assertIn("HANDSHAKE_FAILURE", str(error).upper())

    @inlineCallbacks
    def test_each_aead_suite(self):
        """Each TLS 1.2 AEAD suite of the profile is accepted on its own, with its certificate type."""
        for cipher in (
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-RSA-AES128-GCM-SHA256",
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            "ECDHE-RSA-AES256-GCM-SHA384",
            "ECDHE-ECDSA-CHACHA20-POLY1305",
            "ECDHE-RSA-CHACHA20-POLY1305",
        ):
            result = yield self.negotiate(tls12_context(cipher))
            self.assertEqual(result[:2], ("TLSv1.2", cipher))

    @inlineCallbacks
    def test_cbc_and_static_rsa_refused(self):
        """CBC suites and suites without forward secrecy get a handshake failure."""
        for cipher in ("ECDHE-ECDSA-AES128-SHA256", "ECDHE-RSA-AES256-SHA", "AES128-GCM-SHA256", "DHE-RSA-AES128-GCM-SHA256"):
            error = yield self.starttls(tls12_context(cipher))
            self.assertIsInstance(error, ssl.SSLError, (cipher, error))
            self.assertIn("HANDSHAKE_FAILURE", str(error).upper())


class CompatibleProfileTests(TLSServerMixin, unittest.TestCase):
    """C{profile = "compatible"}: the intermediate profile plus ECDHE CBC suites."""

    def setUp(self) -> None:
        self.start_servers("compatible")

    @inlineCallbacks
    def test_cbc_accepted(self):
        """Clients that offer only ECDHE CBC suites (Safari 6-8's kind) negotiate TLS 1.2."""
        for cipher in ("ECDHE-ECDSA-AES128-SHA256", "ECDHE-RSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA", "ECDHE-RSA-AES256-SHA"):
            result = yield self.negotiate(tls12_context(cipher))
            self.assertEqual(result[:2], ("TLSv1.2", cipher))

    @inlineCallbacks
    def test_aead_preferred(self):
        """A client offering CBC and GCM gets GCM: CBC is only a fallback."""
        result = yield self.negotiate(tls12_context("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES128-GCM-SHA256"))
        self.assertEqual(result[:2], ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"))

    @inlineCallbacks
    def test_static_rsa_and_old_versions_refused(self):
        """Key exchange without forward secrecy and TLS 1.1 stay refused."""
        error = yield self.starttls(tls12_context("AES128-SHA"))
        self.assertIn("HANDSHAKE_FAILURE", str(error).upper())
        ctx = client_context(minimum_version=ssl.TLSVersion.TLSv1_1, maximum_version=ssl.TLSVersion.TLSv1_1)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        error = yield self.starttls(ctx)
        self.assertIsInstance(error, ssl.SSLError)


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

    def load(self, path: str) -> x509.Certificate:
        with open(path, "rb") as f:
            return x509.load_pem_x509_certificate(f.read())

    def test_generated_lifetime_and_rsa(self) -> None:
        """
        The generated ECDSA P-256 and RSA-2048 certificates are valid for at
        most 825 days, and both fingerprints are logged.
        """
        state_dir = temp_dir(self)
        with capturedLogs() as events:
            server_context(TLSConfig("", ""), HOSTNAME, state_dir)
        ecdsa = self.load(os.path.join(state_dir, "tls", "cert.pem"))
        rsa = self.load(os.path.join(state_dir, "tls", "rsa-cert.pem"))
        self.assertEqual(ecdsa.public_key().curve.name, "secp256r1")
        self.assertEqual(rsa.public_key().key_size, 2048)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(state_dir, "tls", "rsa-key.pem")).st_mode), 0o600)
        for cert in (ecdsa, rsa):
            self.assertLessEqual(cert.not_valid_after_utc - cert.not_valid_before_utc, datetime.timedelta(days=825))
        logged = [e.get("fingerprint") for e in events if "fingerprint" in e]
        self.assertEqual(logged, [c.fingerprint(hashes.SHA256()).hex(":").upper() for c in (ecdsa, rsa)])

    def test_renewed_when_due(self) -> None:
        """
        A generated certificate with fewer than 30 days left is made anew at
        start (logged with the reason); one with more is kept.
        """
        state_dir = temp_dir(self)
        tls_dir = os.path.join(state_dir, "tls")
        os.makedirs(tls_dir)
        now = datetime.datetime.now(datetime.UTC)
        cert, key = os.path.join(tls_dir, "cert.pem"), os.path.join(tls_dir, "key.pem")
        rsa_cert, rsa_key = os.path.join(tls_dir, "rsa-cert.pem"), os.path.join(tls_dir, "rsa-key.pem")
        # Due in 29 days: made 796 days ago.
        generate_self_signed(HOSTNAME, cert, key, now=now - GENERATED_LIFETIME + datetime.timedelta(days=30))
        # Not yet due: 31 days left.
        generate_self_signed(HOSTNAME, rsa_cert, rsa_key, "rsa", now=now - GENERATED_LIFETIME + datetime.timedelta(days=32))
        due, kept = self.fingerprint(cert), self.fingerprint(rsa_cert)
        with capturedLogs() as events:
            server_context(TLSConfig("", ""), HOSTNAME, state_dir)
        self.assertNotEqual(self.fingerprint(cert), due)
        self.assertEqual(self.fingerprint(rsa_cert), kept)
        self.assertGreater(self.load(cert).not_valid_after_utc - now, GENERATED_LIFETIME - datetime.timedelta(days=2))
        renewals = [e for e in events if "reason" in e]
        self.assertEqual([(e["path"], e["reason"][:10]) for e in renewals], [(cert, "it expires")])

    def test_long_lived_generated_replaced(self) -> None:
        """A generated certificate valid for 10 years (made by an older release) is replaced at start."""
        state_dir = temp_dir(self)
        server_context(TLSConfig("", ""), HOSTNAME, state_dir)
        cert = os.path.join(state_dir, "tls", "cert.pem")
        key = os.path.join(state_dir, "tls", "key.pem")
        old = self.load(cert)
        forged = (
            x509.CertificateBuilder()
            .subject_name(old.subject)
            .issuer_name(old.issuer)
            .public_key(old.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(old.not_valid_before_utc)
            .not_valid_after(old.not_valid_before_utc + datetime.timedelta(days=3650))
        )
        with open(key, "rb") as f:
            private = serialization.load_pem_private_key(f.read(), None)
        with open(cert, "wb") as f:
            f.write(forged.sign(private, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        server_context(TLSConfig("", ""), HOSTNAME, state_dir)
        renewed = self.load(cert)
        self.assertLessEqual(renewed.not_valid_after_utc - renewed.not_valid_before_utc, GENERATED_LIFETIME)

    def test_configured_expiring_warned(self) -> None:
        """
        A configured certificate is never renewed; expiring within 30 days or
        expired, it is named in one warning at start.
        """
        directory = temp_dir(self)
        now = datetime.datetime.now(datetime.UTC)
        cert, key = os.path.join(directory, "c.pem"), os.path.join(directory, "k.pem")
        for made, text in ((GENERATED_LIFETIME - datetime.timedelta(days=10), "expires on"), (GENERATED_LIFETIME + datetime.timedelta(days=2), "expired on")):
            generate_self_signed(HOSTNAME, cert, key, now=now - made)
            before = self.fingerprint(cert)
            with capturedLogs() as events:
                server_context(TLSConfig(cert, key), HOSTNAME, directory)
            self.assertEqual(self.fingerprint(cert), before)
            warnings = [e for e in events if e["log_level"].name == "warn"]
            self.assertEqual(len(warnings), 1)
            self.assertIn(text, warnings[0]["log_format"])
            self.assertEqual(warnings[0]["path"], cert)
        generate_self_signed(HOSTNAME, cert, key, now=now)
        with capturedLogs() as events:
            server_context(TLSConfig(cert, key), HOSTNAME, directory)
        self.assertEqual([e for e in events if e["log_level"].name == "warn"], [])
