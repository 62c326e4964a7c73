"""
A user disabled or deleted while its session is open can no longer send
from that session (contract section 9): the real SMTP server, the real
login service over the SQLite user store, real delivery and smtplib.
"""

from __future__ import annotations

import os
import smtplib
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from smtpplus.auth.hashing import PasswordHasher
from smtpplus.auth.login import build_login_service
from smtpplus.auth.realm import SubmitterRealm
from smtpplus.auth.throttle import LoginThrottle
from smtpplus.auth.users import new_user
from smtpplus.config import SecurityConfig
from smtpplus.smtp.interfaces import ISubmitter
from smtpplus.smtp.protocol import SMTPServerFactory
from tests.harness.clients import logged_in, submit
from tests.harness.fakes import Recorder
from tests.harness.messages import message, simple_message
from tests.harness.polling import wait_until
from tests.harness.stack import PASSWORD, Stack
from tests.harness.stores import make_sqlite_store
from tests.test_contract import _MainDaemon, unique


class OpenSessionTests(unittest.TestCase):
    @inlineCallbacks
    def setUp(self) -> Any:
        self.stack = Stack(self)
        self.store = make_sqlite_store(self)
        hasher = PasswordHasher(reactor, threads=1, rounds=4)
        hasher.startService()
        self.addCleanup(hasher.stopService)
        security = SecurityConfig(auth_failures_per_ip=50, auth_failures_per_user=50, auth_lock_seconds=60)
        throttle = LoginThrottle(reactor, security, Recorder())
        login, _ = build_login_service(self.store, hasher, throttle, self.stack.avatar_factory, reactor)
        listener = reactor.listenTCP(0, SMTPServerFactory(self.stack.registry, login, None), interface="127.0.0.1")
        self.addCleanup(listener.stopListening)
        self.port = listener.getHost().port
        fields = new_user({"username": "alice", "authorized_domains": ["example.com"]})
        yield self.store.create(fields, (yield hasher.hash(PASSWORD)))

    def session(self) -> Deferred[smtplib.SMTP]:
        """An smtplib session logged in as alice (closed after the test)."""

        def connect() -> smtplib.SMTP:
            client = smtplib.SMTP("127.0.0.1", self.port, timeout=15)
            client.ehlo("client.test")
            client.login("alice", PASSWORD)
            return client

        def opened(client: smtplib.SMTP) -> smtplib.SMTP:
            self.addCleanup(deferToThread, client.close)
            return client

        return deferToThread(connect).addCallback(opened)

    def call(self, fn: Any, *args: Any) -> Deferred[tuple[int, str]]:
        """Run one smtplib command off the reactor; its (code, text)."""
        return deferToThread(fn, *args).addCallback(lambda reply: (reply[0], reply[1].decode()))

    def send(self, client: smtplib.SMTP) -> Deferred[tuple[int, str]]:
        return deferToThread(submit, client, "me@example.com", ["r@dest.test"], simple_message())

    def assert_revoked(self, reply: tuple[int, str], reason: str) -> None:
        self.assertEqual(reply, (550, f"5.7.13 User account alice has been {reason}"))

    @inlineCallbacks
    def test_disabled_then_mail(self) -> Any:
        """After the user is disabled, the next MAIL FROM of its open session gets 550 5.7.13."""
        client = yield self.session()
        self.assertEqual((yield self.send(client))[0], 250)
        yield self.store.update("alice", {"enabled": False})
        self.assert_revoked((yield self.call(client.mail, "me@example.com")), "disabled")

    @inlineCallbacks
    def test_deleted_then_mail(self) -> Any:
        """After the user is deleted, the next MAIL FROM of its open session gets 550 5.7.13."""
        client = yield self.session()
        yield self.store.delete("alice")
        self.assert_revoked((yield self.call(client.mail, "me@example.com")), "deleted")

    @inlineCallbacks
    def test_disabled_then_rcpt(self) -> Any:
        """A transaction under way when the user is disabled gets 550 5.7.13 at the next RCPT TO."""
        client = yield self.session()
        self.assertEqual((yield self.call(client.mail, "me@example.com"))[0], 250)
        self.assertEqual((yield self.call(client.rcpt, "a@dest.test"))[0], 250)
        yield self.store.update("alice", {"enabled": False})
        self.assert_revoked((yield self.call(client.rcpt, "b@dest.test")), "disabled")

    @inlineCallbacks
    def test_disabled_during_data(self) -> Any:
        """
        A message whose DATA is open when the user is disabled is refused
        with 550 5.7.13 at the final dot: nothing queued, relayed or left
        in the spool.
        """
        client = yield self.session()
        self.assertEqual((yield self.call(client.mail, "me@example.com"))[0], 250)
        self.assertEqual((yield self.call(client.rcpt, "r@dest.test"))[0], 250)

        def start_data() -> tuple[int, bytes]:
            client.putcmd("data")
            reply = client.getreply()
            client.send(b"From: me@example.com\r\nSubject: half\r\n\r\nfirst half\r\n")
            return reply

        self.assertEqual((yield deferToThread(start_data))[0], 354)
        yield self.store.update("alice", {"enabled": False})

        def finish_data() -> tuple[int, bytes]:
            client.send(b"second half\r\n.\r\n")
            return client.getreply()

        self.assert_revoked((yield self.call(finish_data)), "disabled")
        yield wait_until(lambda: not os.listdir(self.stack.delivery.spool.tmp_dir))
        self.assertEqual(os.listdir(self.stack.delivery.spool.msg_dir), [])
        self.assertEqual((yield self.stack.query.list_messages(None, None, 10)), [])
        self.assertEqual(self.stack.smarthost.received(), [])

    @inlineCallbacks
    def test_disabled_then_data(self) -> Any:
        """An envelope accepted before the user is disabled gets 550 5.7.13 at DATA, before any content is sent."""
        client = yield self.session()
        self.assertEqual((yield self.call(client.mail, "me@example.com"))[0], 250)
        self.assertEqual((yield self.call(client.rcpt, "r@dest.test"))[0], 250)
        yield self.store.delete("alice")
        self.assert_revoked((yield self.call(client.docmd, "DATA")), "deleted")

    @inlineCallbacks
    def test_reenabled_sends_in_new_session(self) -> Any:
        """
        Re-enabling the user lets a new session send; the session open while
        it was disabled stays refused (it must log in again).
        """
        old = yield self.session()
        yield self.store.update("alice", {"enabled": False})
        yield self.store.update("alice", {"enabled": True})
        self.assert_revoked((yield self.call(old.mail, "me@example.com")), "disabled")
        new = yield self.session()
        code, text = yield self.send(new)
        self.assertEqual(code, 250, text)
        yield wait_until(lambda: self.stack.smarthost.received())

    @inlineCallbacks
    def test_other_changes_keep_session(self) -> Any:
        """A new password or a changed priority does not end an open session: it goes on sending."""
        client = yield self.session()
        yield self.store.set_password_hash("alice", b"$2b$04$" + b"x" * 53)
        yield self.store.update("alice", {"priority": 1})
        code, text = yield self.send(client)
        self.assertEqual(code, 250, text)


class RealmTests(unittest.TestCase):
    @inlineCallbacks
    def test_disabled_while_login_reads_user(self) -> Any:
        """
        A user disabled after the realm read its (still enabled) row but
        before the avatar exists is refused: the standing is taken first.
        """
        store = make_sqlite_store(self)
        yield store.create(new_user({"username": "alice"}), b"h")
        read = store.get

        def racing_get(username: str) -> Deferred[Any]:
            return read(username).addCallback(lambda user: store.update(username, {"enabled": False}).addCallback(lambda _: user))

        self.patch(store, "get", racing_get)
        realm = SubmitterRealm(store, lambda user, standing: object())
        with self.assertRaises(UnauthorizedLogin):
            yield realm.requestAvatar("alice", None, ISubmitter)


class OpenSessionDaemonTests(_MainDaemon, unittest.TestCase):
    """The same through the real admin API and the real twistd daemon."""

    def test_disabled_and_deleted_through_api(self) -> None:
        """
        PATCH enabled=false and DELETE end the user's open sessions: the
        next MAIL FROM gets 550 5.7.13; re-enabled, a new session sends.
        """
        username, password = self.sender()
        with logged_in(self.port, username, password) as client:
            self.assertEqual(submit(client, "sender@allowed.test", ["rcpt@dest.test"], message())[0], 250)
            self.assertEqual(self.d.api("PATCH", f"/api/v1/users/{username}", {"enabled": False}).status, 200)
            code, text = client.mail("sender@allowed.test")
            self.assertEqual((code, text.decode()), (550, f"5.7.13 User account {username} has been disabled"))
        self.assertEqual(self.d.api("PATCH", f"/api/v1/users/{username}", {"enabled": True}).status, 200)
        self.assertEqual(self.send(username, password)[0], 250)

        other, other_password = self.sender(username=unique())
        with logged_in(self.port, other, other_password) as client:
            self.assertEqual(self.d.api("DELETE", f"/api/v1/users/{other}").status, 204)
            code, text = client.mail("sender@allowed.test")
            self.assertEqual((code, text.decode()), (550, f"5.7.13 User account {other} has been deleted"))
