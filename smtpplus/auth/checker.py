"""
The credentials checker: username and password against the user store,
with a short-lived cache so that a client that logs in again and again does
not pay bcrypt every time.

The cache never holds a password: its keys are an HMAC, under a random key
of this process, of the username, the password and the stored hash.  A
changed hash (regenerated password) therefore never matches an old entry,
and every change of a user drops that user's entries at once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpplus.auth.hashing import PasswordHasher
from smtpplus.auth.store import LoginRecord
from smtpplus.interfaces import IUserStore

CACHE_SECONDS = 300.0
CACHE_ENTRIES = 10000


class UnknownUser(UnauthorizedLogin):
    """No such user (callers that must not record per-user events need to know)."""


@implementer(ICredentialsChecker)
class UserChecker:
    """Checks L{IUsernamePassword} credentials against an L{IUserStore}."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, store: IUserStore, hasher: PasswordHasher, clock: IReactorTime) -> None:
        self._store = store
        self._hasher = hasher
        self._clock = clock
        self._key = secrets.token_bytes(32)
        # cache key -> (canonical username, expiry); oldest first.
        self._cache: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        # cache key -> logins waiting for the bcrypt check already running.
        self._inflight: dict[bytes, list[Deferred[bool]]] = {}
        # Unknown usernames are checked against a hash of the same cost so
        # that they take as long as a wrong password and do not reveal which
        # usernames exist; made on first use.
        self._dummy_hash: bytes | None = None
        store.subscribe(self.forget)

    def forget(self, username: str) -> None:
        """Drop every cached verification of C{username}."""
        folded = username.casefold()
        for key in [k for k, (name, _) in self._cache.items() if name.casefold() == folded]:
            del self._cache[key]

    def _cache_key(self, record: LoginRecord, password: str) -> bytes:
        material = b"\0".join((record.username.encode("utf-8"), password.encode("utf-8"), record.password_hash))
        return hmac.new(self._key, material, hashlib.sha256).digest()

    @inlineCallbacks
    def requestAvatarId(self, credentials: Any) -> Any:
        username = credentials.username
        password = credentials.password
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        record = yield self._store.login_record(username)
        if record is None:
            if self._dummy_hash is None:
                self._dummy_hash = yield self._hasher.hash(secrets.token_urlsafe(16))
            yield self._hasher.verify(password, self._dummy_hash)
            raise UnknownUser()
        if not record.enabled:
            raise UnauthorizedLogin()
        key = self._cache_key(record, password)
        now = self._clock.seconds()
        cached = self._cache.get(key)
        if cached is not None and cached[1] > now:
            return record.username
        ok = yield self._verify_once(key, password, record.password_hash)
        if not ok:
            raise UnauthorizedLogin()
        self._remember(key, record.username)
        return record.username

    def _verify_once(self, key: bytes, password: str, password_hash: bytes) -> Deferred[bool]:
        """
        One bcrypt check per cache key at a time: a client opening fifty
        sessions at once with the same credentials pays bcrypt once, not
        fifty times, and does not starve everyone else's logins.
        """
        waiters = self._inflight.get(key)
        if waiters is not None:
            mine: Deferred[bool] = Deferred()
            waiters.append(mine)
            return mine
        waiters = self._inflight[key] = []

        def share(result: bool | Failure) -> bool | Failure:
            for waiter in self._inflight.pop(key):
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)
            return result

        return self._hasher.verify(password, password_hash).addBoth(share)

    def _remember(self, key: bytes, username: str) -> None:
        now = self._clock.seconds()
        while self._cache and (len(self._cache) >= CACHE_ENTRIES or next(iter(self._cache.values()))[1] <= now):
            self._cache.popitem(last=False)
        self._cache[key] = (username, now + CACHE_SECONDS)

    def cached_entries(self) -> int:
        """How many verifications are cached (for tests and diagnostics)."""
        return len(self._cache)
