"""The credentials checker and its verification cache."""

from __future__ import annotations

import threading
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from smtpplus.auth import hashing
from smtpplus.auth.checker import CACHE_SECONDS, UnknownUser, UserChecker
from smtpplus.auth.hashing import PasswordHasher
from smtpplus.auth.users import new_user
from tests.harness.stores import make_sqlite_store


class CountingHasher(PasswordHasher):
    """A synchronous low-cost hasher that counts verifications."""

    def __init__(self) -> None:
        super().__init__(None, rounds=4)
        self.verified = 0

    def verify(self, password: str, password_hash: bytes) -> Deferred[bool]:
        self.verified += 1
        return super().verify(password, password_hash)


class GatedHasher(CountingHasher):
    """Counts verifications and holds each result until L{release} is called."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple[Deferred[bool], bool]] = []

    def verify(self, password: str, password_hash: bytes) -> Deferred[bool]:
        result: list[bool] = []
        super().verify(password, password_hash).addCallback(result.append)
        gate: Deferred[bool] = Deferred()
        self.pending.append((gate, result[0]))
        return gate

    def release(self) -> None:
        pending, self.pending = self.pending, []
        for gate, result in pending:
            gate.callback(result)


class CheckerTests(TestCase):
    @inlineCallbacks
    def setUp(self) -> Any:
        self.clock = Clock()
        self.store = make_sqlite_store(self, self.clock)
        self.hasher = CountingHasher()
        self.checker = UserChecker(self.store, self.hasher, self.clock)
        self.password = "k3v9-x2qa-abcd-efgh-jkmn-pqrs-tuvw"
        yield self.store.create(new_user({"username": "alice"}), (yield self.hasher.hash(self.password)))

    def login(self, username: str, password: str) -> Deferred[Any]:
        return self.checker.requestAvatarId(UsernamePassword(username, password))

    @inlineCallbacks
    def test_correct_password(self) -> Any:
        """The right password yields the canonical username, whatever case was typed."""
        self.assertEqual((yield self.login("ALICE", self.password)), "alice")

    @inlineCallbacks
    def test_wrong_password(self) -> Any:
        """A wrong password fails with UnauthorizedLogin (not UnknownUser)."""
        with self.assertRaises(UnauthorizedLogin) as caught:
            yield self.login("alice", "wrong")
        self.assertNotIsInstance(caught.exception, UnknownUser)

    @inlineCallbacks
    def test_unknown_user_pays_bcrypt(self) -> Any:
        """An unknown username fails with UnknownUser after a bcrypt check, like a wrong password."""
        with self.assertRaises(UnknownUser):
            yield self.login("nobody", self.password)
        self.assertEqual(self.hasher.verified, 1)

    @inlineCallbacks
    def test_cache_skips_bcrypt(self) -> Any:
        """Repeated logins with the same password verify with bcrypt once, until the entry expires."""
        for _ in range(5):
            yield self.login("alice", self.password)
        self.assertEqual(self.hasher.verified, 1)
        self.clock.advance(CACHE_SECONDS + 1)
        yield self.login("alice", self.password)
        self.assertEqual(self.hasher.verified, 2)

    @inlineCallbacks
    def test_concurrent_logins_share_one_check(self) -> Any:
        """Logins with the same credentials arriving while bcrypt runs wait for that one check."""
        gated = GatedHasher()
        checker = UserChecker(self.store, gated, self.clock)
        right = [checker.requestAvatarId(UsernamePassword("alice", self.password)) for _ in range(5)]
        wrong = [checker.requestAvatarId(UsernamePassword("alice", "wrong")) for _ in range(3)]
        for _ in range(500):
            if len(gated.pending) >= 2:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(gated.verified, 2)
        gated.release()
        for d in right:
            self.assertEqual((yield d), "alice")
        for d in wrong:
            with self.assertRaises(UnauthorizedLogin):
                yield d

    @inlineCallbacks
    def test_cache_key_holds_no_password(self) -> Any:
        """The cache stores neither the password nor its hash."""
        yield self.login("alice", self.password)
        dump = repr(self.checker._cache)
        self.assertNotIn(self.password, dump)
        self.assertEqual(self.checker.cached_entries(), 1)

    @inlineCallbacks
    def test_regenerated_password(self) -> Any:
        """After the hash changes, the old cached password fails at once."""
        yield self.login("alice", self.password)
        yield self.store.set_password_hash("alice", (yield self.hasher.hash("new-password")))
        self.assertEqual(self.checker.cached_entries(), 0)
        with self.assertRaises(UnauthorizedLogin):
            yield self.login("alice", self.password)
        self.assertEqual((yield self.login("alice", "new-password")), "alice")

    @inlineCallbacks
    def test_disabled_and_deleted(self) -> Any:
        """A disabled or deleted user fails even with a cached password."""
        yield self.login("alice", self.password)
        yield self.store.update("alice", {"enabled": False})
        with self.assertRaises(UnauthorizedLogin):
            yield self.login("alice", self.password)
        yield self.store.update("alice", {"enabled": True})
        yield self.login("alice", self.password)
        yield self.store.delete("alice")
        with self.assertRaises(UnknownUser):
            yield self.login("alice", self.password)

    @inlineCallbacks
    def test_overlong_password(self) -> Any:
        """A password bcrypt cannot take (over 72 bytes) just fails."""
        with self.assertRaises(UnauthorizedLogin):
            yield self.login("alice", self.password + "x" * 80)


class HasherPoolTests(TestCase):
    @inlineCallbacks
    def test_pool_round_trip(self) -> Any:
        """The threaded hasher hashes and verifies off the reactor thread, then stops."""
        hasher = PasswordHasher(reactor, rounds=4)
        hasher.startService()
        self.addCleanup(hasher.stopService)
        seen = []
        original = hashing._hash

        def spy(password: bytes, rounds: int) -> bytes:
            seen.append(threading.current_thread())
            return original(password, rounds)

        self.patch(hashing, "_hash", spy)
        hashed = yield hasher.hash("secret")
        self.assertNotIn(threading.main_thread(), seen)
        self.assertTrue((yield hasher.verify("secret", hashed)))
        self.assertFalse((yield hasher.verify("Secret", hashed)))
