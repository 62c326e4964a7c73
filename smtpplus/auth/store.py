"""
The user store: an interface narrow enough for another database, and its
SQLite implementation on the shared L{Database}.

Users cross this boundary as plain dicts shaped like the contract's C{user}
JSON object; the password hash leaves the store only inside a
L{LoginRecord}, for the credentials checker.
"""

from __future__ import annotations

import datetime
import json
import sqlite3
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

from smtpplus.storage.database import Database

COMPONENT = "users"

MIGRATIONS = [
    """
    CREATE TABLE users (
        username TEXT NOT NULL COLLATE NOCASE PRIMARY KEY,
        enabled INTEGER NOT NULL,
        priority INTEGER NOT NULL,
        notes TEXT NOT NULL,
        authorized_domains TEXT NOT NULL,
        authorized_senders TEXT NOT NULL,
        aggregation TEXT NOT NULL,
        password_hash BLOB NOT NULL,
        generation INTEGER NOT NULL DEFAULT 1,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    """,
]

_COLUMNS = ("enabled", "priority", "notes", "authorized_domains", "authorized_senders", "aggregation")


class DuplicateUser(Exception):
    """A user with this username (compared case-insensitively) exists."""


@attrs.frozen
class LoginRecord:
    """
    What the credentials checker needs about one user.

    @ivar generation: increases with every change of the user, so that
        anything derived from an older state can be recognized as stale.
    """

    username: str
    enabled: bool
    password_hash: bytes = attrs.field(repr=False)
    generation: int


class Revocations:
    """
    Which accounts were disabled or deleted while sessions may still hold
    them, for the check an open SMTP session makes before every MAIL, RCPT
    and end of DATA.  Asked synchronously and in memory: the daemon accepts
    about 1,000 messages a second, and a database query per message (let
    alone one on the reactor thread) would cost more than the check is
    worth.

    Logins read the database, so only revocations need keeping: a
    L{Standing} notes the revocation count when its session logs in, and is
    void once its account is revoked after that.  A later re-enabling does
    not revive it; a new login does.  One entry per account ever revoked in
    this process's lifetime.

    The seam for several processes: here the store's own writes call
    L{revoke}; a process that learns of a change made elsewhere (an AMP
    broadcast from the process that wrote it, or a poll of the users
    table's C{generation} column) calls L{revoke} in just the same way.
    """

    def __init__(self) -> None:
        self._count = 0
        # casefolded username -> (revocation number, reason)
        self._revoked: dict[str, tuple[int, str]] = {}

    def revoke(self, username: str, reason: str) -> None:
        """End every standing of C{username} issued so far; C{reason} is "disabled" or "deleted"."""
        self._count += 1
        self._revoked[username.casefold()] = (self._count, reason)

    def standing(self, username: str) -> Standing:
        """A standing for a session of C{username} logging in now."""
        return Standing(self, username.casefold(), self._count)

    def revoked_since(self, key: str, mark: int) -> str | None:
        """Why C{key}'s account was revoked after revocation number C{mark}, or None."""
        entry = self._revoked.get(key)
        return entry[1] if entry is not None and entry[0] > mark else None


@attrs.frozen
class Standing:
    """One session's hold on its account (see L{Revocations})."""

    _revocations: Revocations
    _key: str
    _mark: int

    def revoked(self) -> str | None:
        """None while the account may send; else why not ("disabled" or "deleted")."""
        return self._revocations.revoked_since(self._key, self._mark)


class IUserStore(Interface):
    """
    Users and their password hashes.  Every method returns a Deferred;
    usernames are looked up case-insensitively.
    """

    def create(fields: dict, password_hash: bytes):
        """
        Add a user from validated, complete C{fields} (including
        C{username}); fire with the user dict, or fail with L{DuplicateUser}.
        """

    def get(username: str):
        """Fire with the user dict, or None."""

    def list():
        """Fire with all user dicts, ordered by username."""

    def update(username: str, fields: dict):
        """Change the given validated fields; fire with the user dict, or None when there is no such user."""

    def delete(username: str):
        """Remove the user; fire with True, or False when there was none."""

    def set_password_hash(username: str, password_hash: bytes):
        """Replace the password hash; fire with True, or False when there is no such user."""

    def login_record(username: str):
        """Fire with the user's L{LoginRecord}, or None."""

    def subscribe(listener: Callable[[str], None]) -> None:
        """Call C{listener(username)} after every change of a user made through this store."""

    def standing(username: str) -> Standing:
        """
        Synchronously, without I/O: a L{Standing} that reports once
        C{username} has been disabled or deleted after this call.  Take it
        before reading the user, so that a change racing the read is seen
        either way.  A password change does not revoke it.
        """


def iso_utc(seconds: float) -> str:
    """C{seconds} since the epoch as ISO 8601 UTC, e.g. C{2024-05-01T12:00:00Z}."""
    return datetime.datetime.fromtimestamp(int(seconds), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _user(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "username": row["username"],
        "enabled": bool(row["enabled"]),
        "priority": row["priority"],
        "notes": row["notes"],
        "authorized_domains": json.loads(row["authorized_domains"]),
        "authorized_senders": json.loads(row["authorized_senders"]),
        "aggregation": row["aggregation"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


def _column_value(name: str, value: Any) -> Any:
    if name in ("authorized_domains", "authorized_senders"):
        return json.dumps(list(value))
    if name == "enabled":
        return int(value)
    return value


@implementer(IUserStore)
class SQLiteUserStore:
    """L{IUserStore} in the daemon's SQLite database (migration component C{"users"})."""

    def __init__(self, database: Database, clock: IReactorTime, revocations: Revocations | None = None) -> None:
        self._db = database
        self._clock = clock
        self._listeners: list[Callable[[str], None]] = []
        self.revocations = revocations if revocations is not None else Revocations()

    def migrate(self) -> None:
        """Create or upgrade the tables; synchronous, at start-up."""
        self._db.migrate(COMPONENT, MIGRATIONS)

    def subscribe(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def standing(self, username: str) -> Standing:
        return self.revocations.standing(username)

    def _revoke(self, result: Any, username: str, reason: str) -> Any:
        # Before the caller (the admin API) hears of the change: once it
        # has answered, no open session of the user sends again.
        if result:
            self.revocations.revoke(username, reason)
        return result

    def _changed(self, result: Any, username: str) -> Any:
        if result:
            for listener in self._listeners:
                listener(username)
        return result

    def _now(self) -> str:
        return iso_utc(self._clock.seconds())

    def create(self, fields: dict[str, Any], password_hash: bytes) -> Deferred[dict[str, Any]]:
        now = self._now()

        def insert(conn: sqlite3.Connection) -> dict[str, Any]:
            try:
                conn.execute(
                    "INSERT INTO users (username, enabled, priority, notes, authorized_domains, authorized_senders, "
                    "aggregation, password_hash, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (fields["username"], *(_column_value(c, fields[c]) for c in _COLUMNS), password_hash, now, now),
                )
            except sqlite3.IntegrityError:
                raise DuplicateUser(fields["username"]) from None
            return _user(conn.execute("SELECT * FROM users WHERE username = ?", (fields["username"],)).fetchone())

        return self._db.transaction(insert).addCallback(self._changed, fields["username"])

    def get(self, username: str) -> Deferred[dict[str, Any] | None]:
        def select(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()
            return None if row is None else _user(row)

        return self._db.run(select)

    def list(self) -> Deferred[list[dict[str, Any]]]:
        def select(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            return [_user(row) for row in conn.execute("SELECT * FROM users ORDER BY username")]

        return self._db.run(select)

    def update(self, username: str, fields: dict[str, Any]) -> Deferred[dict[str, Any] | None]:
        columns = [c for c in _COLUMNS if c in fields]
        now = self._now()

        def change(conn: sqlite3.Connection) -> dict[str, Any] | None:
            assignments = "".join(f"{c} = ?, " for c in columns)
            cursor = conn.execute(
                f"UPDATE users SET {assignments}generation = generation + 1, updated_at = ? WHERE username = ?",
                (*(_column_value(c, fields[c]) for c in columns), now, username),
            )
            if cursor.rowcount == 0:
                return None
            return _user(conn.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone())

        d = self._db.transaction(change)
        if fields.get("enabled") is False:
            d.addCallback(self._revoke, username, "disabled")
        return d.addCallback(self._changed, username)

    def delete(self, username: str) -> Deferred[bool]:
        def remove(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM users WHERE username = ?", (username,)).rowcount > 0

        d = self._db.transaction(remove).addCallback(self._revoke, username, "deleted")
        return d.addCallback(self._changed, username)

    def set_password_hash(self, username: str, password_hash: bytes) -> Deferred[bool]:
        now = self._now()

        def change(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE users SET password_hash = ?, generation = generation + 1, updated_at = ? WHERE username = ?",
                (password_hash, now, username),
            )
            return cursor.rowcount > 0

        return self._db.transaction(change).addCallback(self._changed, username)

    def login_record(self, username: str) -> Deferred[LoginRecord | None]:
        def select(conn: sqlite3.Connection) -> LoginRecord | None:
            row = conn.execute(
                "SELECT username, enabled, password_hash, generation FROM users WHERE username = ?", (username,)
            ).fetchone()
            if row is None:
                return None
            return LoginRecord(row["username"], bool(row["enabled"]), bytes(row["password_hash"]), row["generation"])

        return self._db.run(select)
