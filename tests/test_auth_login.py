"""
SMTP AUTH end to end: the real SMTPSession on a real port with real TLS,
Python's smtplib as the client, the user store, bcrypt and the throttle.
"""

from __future__ import annotations

import os
import smtplib
import ssl
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from smtpplus.auth.hashing import PasswordHasher
from smtpplus.auth.login import build_login_service
from smtpplus.auth.throttle import LoginThrottle
from smtpplus.auth.users import generate_password, new_user
from smtpplus.config import SecurityConfig, TLSConfig
from smtpplus.model import User
from smtpplus.smtp.interfaces import IMessageWriter, ISubmitter
from smtpplus.smtp.protocol import SessionRegistry, SMTPServerFactory
from smtpplus.smtp.tls import server_context
from smtpplus.storage.database import StorageUnavailable
from tests.harness.fakes import Recorder, session_settings
from tests.harness.stores import make_sqlite_store


@implementer(IMessageWriter)
class _Writer:
    def write(self, data: bytes) -> None:
        pass

    def eomReceived(self) -> str:
        return "TESTQUEUEID"

    def connectionLost(self) -> None:
        pass


@implementer(ISubmitter)
class FakeSubmitter:
    """Accepts everything; remembers whether its session logged out."""

    def __init__(self, user: User) -> None:
        self.username = user.username
        self.logged_out = False

    def validateFrom(self, session: Any, mail_from: str, mt_priority: Any) -> None:
        pass

    def validateTo(self, session: Any, mail_from: str, recipient: str) -> None:
        pass

    def openMessage(self, envelope: Any) -> _Writer:
        return _Writer()

    def logout(self) -> None:
        self.logged_out = True


class CountingHasher(PasswordHasher):
    def __init__(self) -> None:
        super().__init__(reactor, rounds=4)
        self.verified = 0

    def verify(self, password: str, password_hash: bytes) -> Deferred[bool]:
        self.verified += 1
        return super().verify(password, password_hash)


def _client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def smtp_dialogue(
    port: int, username: str | None, password: str, mechanism: str = "PLAIN", source: str = "127.0.0.1"
) -> tuple[int, Any]:
    """
    Run in a thread: STARTTLS, EHLO, optionally AUTH, then MAIL FROM, from
    the loopback address C{source} (any of 127.0.0.0/8 on Linux).
    Returns the AUTH reply code (0 when no AUTH was tried) and the MAIL reply code
    (or None when AUTH failed).
    """
    with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(source, 0)) as client:
        client.ehlo("client.test")
        client.starttls(context=_client_context())
        client.ehlo("client.test")
        auth_code = 0
        if username is not None:
            client.user, client.password = username, password
            method = client.auth_plain if mechanism == "PLAIN" else client.auth_login
            try:
                auth_code = client.auth(mechanism, method, initial_response_ok=mechanism == "PLAIN")[0]
            except smtplib.SMTPAuthenticationError as e:
                return e.smtp_code, None
        mail_code = client.mail("sender@example.com")[0]
        return auth_code, mail_code


class AuthEndToEndTests(TestCase):
    @inlineCallbacks
    def setUp(self) -> Any:
        state_dir = self.mktemp()
        os.makedirs(state_dir)
        self.store = make_sqlite_store(self)
        self.hasher = CountingHasher()
        self.hasher.startService()
        self.addCleanup(self.hasher.stopService)
        self.events = Recorder()
        security = SecurityConfig(auth_failures_per_ip=50, auth_failures_per_user=3, auth_lock_seconds=900)
        self.throttle = LoginThrottle(reactor, security, self.events, first_delay=0.001, max_delay=0.01)
        self.avatars: list[FakeSubmitter] = []

        def avatar_factory(user: User, standing: Any) -> FakeSubmitter:
            avatar = FakeSubmitter(user)
            self.avatars.append(avatar)
            return avatar

        login_service, _ = build_login_service(self.store, self.hasher, self.throttle, avatar_factory, reactor)
        settings = session_settings(
            hostname="relay.test", max_message_size=1_000_000, max_recipients=10, max_connections=20,
            max_connections_per_ip=20, idle_timeout=30,
        )
        tls = server_context(TLSConfig("", ""), "relay.test", state_dir)
        self.registry = SessionRegistry(settings, reactor)
        factory = SMTPServerFactory(self.registry, login_service, tls)
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(lambda: self.registry.drain(1.0))
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port
        self.password = generate_password()
        yield self.store.create(new_user({"username": "alice"}), (yield self.hasher.hash(self.password)))

    def dialogue(
        self, username: str | None, password: str = "", mechanism: str = "PLAIN", source: str = "127.0.0.1"
    ) -> Deferred[Any]:
        return deferToThread(smtp_dialogue, self.port, username, password, mechanism, source)

    @inlineCallbacks
    def test_plain_and_login(self) -> Any:
        """AUTH PLAIN and AUTH LOGIN with the right password give 235, and MAIL FROM is then accepted."""
        self.assertEqual((yield self.dialogue("alice", self.password, "PLAIN")), (235, 250))
        self.assertEqual((yield self.dialogue("alice", self.password, "LOGIN")), (235, 250))
        self.assertEqual([a.username for a in self.avatars], ["alice", "alice"])

    @inlineCallbacks
    def test_repeated_logins_pay_bcrypt_once(self) -> Any:
        """Logging in again with the same password does not run bcrypt again."""
        for _ in range(3):
            self.assertEqual((yield self.dialogue("alice", self.password)), (235, 250))
        self.assertEqual(self.hasher.verified, 1)

    @inlineCallbacks
    def test_wrong_password(self) -> Any:
        """A wrong password, or an unknown user, gets 535."""
        self.assertEqual((yield self.dialogue("alice", "wrong-password")), (535, None))
        self.assertEqual((yield self.dialogue("nobody", self.password, "LOGIN")), (535, None))

    @inlineCallbacks
    def test_mail_before_auth(self) -> Any:
        """MAIL FROM before AUTH gets 530."""
        self.assertEqual((yield self.dialogue(None)), (0, 530))

    @inlineCallbacks
    def test_disabled_user(self) -> Any:
        """A disabled user gets 535 even with a password that worked (and was cached) before."""
        self.assertEqual((yield self.dialogue("alice", self.password)), (235, 250))
        yield self.store.update("alice", {"enabled": False})
        self.assertEqual((yield self.dialogue("alice", self.password)), (535, None))

    @inlineCallbacks
    def test_deleted_user(self) -> Any:
        """A deleted user gets 535."""
        self.assertEqual((yield self.dialogue("alice", self.password)), (235, 250))
        yield self.store.delete("alice")
        self.assertEqual((yield self.dialogue("alice", self.password, "LOGIN")), (535, None))

    @inlineCallbacks
    def test_regenerated_password(self) -> Any:
        """After regenerating, the old password gets 535 at once and the new one works."""
        self.assertEqual((yield self.dialogue("alice", self.password)), (235, 250))
        new = generate_password()
        yield self.store.set_password_hash("alice", (yield self.hasher.hash(new)))
        self.assertEqual((yield self.dialogue("alice", self.password)), (535, None))
        self.assertEqual((yield self.dialogue("alice", new, "LOGIN")), (235, 250))

    @inlineCallbacks
    def test_store_unavailable_is_454(self) -> Any:
        """
        While the accounts cannot be read, AUTH gets a temporary 454 and one
        log line without a traceback; once they can, the login works.
        """
        original = self.store.login_record

        def unavailable(username: str) -> Any:
            return fail(StorageUnavailable("the database is unavailable"))

        self.store.login_record = unavailable  # type: ignore[method-assign]
        with capturedLogs() as events:
            self.assertEqual((yield self.dialogue("alice", self.password)), (454, None))
        self.assertEqual([e for e in events if e.get("log_failure") is not None], [])
        self.assertIn("the accounts cannot be read now", " ".join(e["log_format"] for e in events))
        self.store.login_record = original  # type: ignore[method-assign]
        self.assertEqual((yield self.dialogue("alice", self.password)), (235, 250))

    @inlineCallbacks
    def test_lock_then_454(self) -> Any:
        """After repeated failures the username is refused with 454, even with the right password, and an account_block is recorded."""
        for _ in range(3):
            self.assertEqual((yield self.dialogue("alice", "wrong")), (535, None))
        self.assertEqual((yield self.dialogue("alice", self.password)), (454, None))
        self.assertEqual([e[:2] for e in self.events.events], [("account_block", "alice")])

    @inlineCallbacks
    def test_lock_spares_known_address(self) -> Any:
        """
        Failures from another address lock alice for new addresses, but the
        address she logged in from earlier still gets in.
        """
        known, attacker, new = "127.0.0.2", "127.0.0.3", "127.0.0.4"
        self.assertEqual((yield self.dialogue("alice", self.password, source=known)), (235, 250))
        for _ in range(3):
            self.assertEqual((yield self.dialogue("alice", "wrong", source=attacker)), (535, None))
        self.assertEqual((yield self.dialogue("alice", self.password, source=attacker)), (454, None))
        self.assertEqual((yield self.dialogue("alice", self.password, source=new)), (454, None))
        self.assertEqual((yield self.dialogue("alice", self.password, "LOGIN", source=known)), (235, 250))
        self.assertEqual([e[:2] for e in self.events.events], [("account_block", "alice")])
