"""
The in-memory L{IUserStore}: for tests, and the template for another
backend.  It passes the same contract tests as L{SQLiteUserStore}.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from smtpplus.auth.store import DuplicateUser, LoginRecord, Revocations, UserStoreBase
from smtpplus.interfaces import IUserStore
from smtpplus.model import User


@attrs.define
class _Entry:
    user: User
    password_hash: bytes
    generation: int = 1


@implementer(IUserStore)
class MemoryUserStore(UserStoreBase):
    """L{IUserStore} in a dict, keyed case-insensitively as SQLite's C{COLLATE NOCASE} does."""

    def __init__(self, clock: IReactorTime, revocations: Revocations | None = None) -> None:
        super().__init__(clock, revocations)
        self._entries: dict[str, _Entry] = {}

    def _insert(self, user: User, password_hash: bytes) -> Deferred[User]:
        key = user.username.lower()
        if key in self._entries:
            return fail(DuplicateUser(user.username))
        self._entries[key] = _Entry(user, password_hash)
        return succeed(user)

    def get(self, username: str) -> Deferred[User | None]:
        entry = self._entries.get(username.lower())
        return succeed(None if entry is None else entry.user)

    def list(self) -> Deferred[list[User]]:
        return succeed([self._entries[key].user for key in sorted(self._entries)])

    def _update(self, username: str, changes: dict[str, Any], now: str) -> Deferred[User | None]:
        entry = self._entries.get(username.lower())
        if entry is None:
            return succeed(None)
        entry.user = attrs.evolve(entry.user, **changes, updated_at=now)
        entry.generation += 1
        return succeed(entry.user)

    def _delete(self, username: str) -> Deferred[bool]:
        return succeed(self._entries.pop(username.lower(), None) is not None)

    def _set_password_hash(self, username: str, password_hash: bytes, now: str) -> Deferred[bool]:
        entry = self._entries.get(username.lower())
        if entry is None:
            return succeed(False)
        entry.user = attrs.evolve(entry.user, updated_at=now)
        entry.password_hash = password_hash
        entry.generation += 1
        return succeed(True)

    def login_record(self, username: str) -> Deferred[LoginRecord | None]:
        entry = self._entries.get(username.lower())
        if entry is None:
            return succeed(None)
        return succeed(LoginRecord(entry.user.username, entry.user.enabled, entry.password_hash, entry.generation))
