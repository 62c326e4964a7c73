"""
The user store: L{UserStoreBase}, what every backend shares (timestamps,
change listeners, revocations), and its SQLite implementation on the shared
L{Database}.  The in-memory one is in L{smtpplus.auth.memory}; both provide
L{smtpplus.interfaces.IUserStore}.

Users cross this boundary as L{User} objects; the password hash leaves the
store only inside a L{LoginRecord}, for the credentials checker.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from smtpplus.interfaces import IUserStore
from smtpplus.model import USER_LISTS, USER_WRITABLE, User, iso_utc
from smtpplus.storage.database import Database
from smtpplus.storage.migrations import Migration

COMPONENT = "users"

MIGRATIONS = [
    Migration(
        sqlite="""
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
        postgresql="""
    CREATE TABLE users (
        username text COLLATE "C" NOT NULL PRIMARY KEY,
        enabled integer NOT NULL,
        priority integer NOT NULL,
        notes text NOT NULL,
        authorized_domains text NOT NULL,
        authorized_senders text NOT NULL,
        aggregation text NOT NULL,
        password_hash bytea NOT NULL,
        generation integer NOT NULL DEFAULT 1,
        created_at text NOT NULL,
        updated_at text NOT NULL
    );
    -- SQLite's COLLATE NOCASE: one user per name with ASCII letters folded
    -- (lower() under the C collation folds ASCII only, whatever the locale).
    CREATE UNIQUE INDEX users_username_nocase ON users (lower(username));
    """,
    ),
    # Sandbox users and the priority budget (contract section 8).
    Migration(
        sqlite="""
    ALTER TABLE users ADD COLUMN sandbox INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE users ADD COLUMN priority_budget INTEGER NOT NULL DEFAULT 0;
    """,
        postgresql="""
    ALTER TABLE users ADD COLUMN sandbox integer NOT NULL DEFAULT 0;
    ALTER TABLE users ADD COLUMN priority_budget integer NOT NULL DEFAULT 0;
    """,
    ),
    # Nodes sharing PostgreSQL: each change of a user, so that the other
    # nodes end the open sessions of a disabled or deleted account and drop
    # what they hold of it (see PostgresUserStore.poll_changes).
    Migration(
        sqlite=None,
        postgresql="""
    CREATE TABLE user_changes (
        seq bigserial PRIMARY KEY,
        username text NOT NULL,
        revoked text,
        node text NOT NULL,
        at double precision NOT NULL
    );
    CREATE INDEX user_changes_at ON user_changes (at);
    """,
    ),
]

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

    def __init__(self, on_revoke: Callable[[str, str], object] | None = None) -> None:
        self._count = 0
        # casefolded username -> (revocation number, reason)
        self._revoked: dict[str, tuple[int, str]] = {}
        # Told of each revocation: the coordinator passes it on to its SMTP workers.
        self._on_revoke = on_revoke

    def revoke(self, username: str, reason: str) -> None:
        """End every standing of C{username} issued so far; C{reason} is "disabled" or "deleted"."""
        self._count += 1
        self._revoked[username.casefold()] = (self._count, reason)
        if self._on_revoke is not None:
            self._on_revoke(username, reason)

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


# The columns of the users table that hold a User field, besides the key.
USER_COLUMNS = tuple(name for name in USER_WRITABLE if name != "username")


def user_from_row(row: Any) -> User:
    """A L{User} from a users row (any mapping of column names)."""
    values: dict[str, Any] = {}
    for field in attrs.fields(User):
        value = row[field.name]
        if field.name in USER_LISTS:
            value = json.loads(value)
        elif isinstance(field.default, bool):
            value = bool(value)
        values[field.name] = value
    return User(**values)


def column_value(name: str, value: Any) -> Any:
    """How the users table keeps the value of field C{name}."""
    if name in USER_LISTS:
        return json.dumps(list(value))
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, StrEnum):
        return value.value
    return value


class UserStoreBase:
    """
    What every L{IUserStore} shares: the timestamps, the change listeners
    and the revocations, around the reads and writes a backend implements
    (C{_insert}, C{_update}, C{_delete}, C{_set_password_hash}, each
    returning a Deferred).
    """

    def __init__(self, clock: IReactorTime, revocations: Revocations | None = None) -> None:
        self._clock = clock
        self._listeners: list[Callable[[str], None]] = []
        self.revocations = revocations if revocations is not None else Revocations()

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

    def create(self, user: User, password_hash: bytes) -> Deferred[User]:
        now = self._now()
        d = self._insert(attrs.evolve(user, created_at=now, updated_at=now), password_hash)
        return d.addCallback(self._changed, user.username)

    def update(self, username: str, fields: Mapping[str, Any]) -> Deferred[User | None]:
        changes = {name: fields[name] for name in USER_COLUMNS if name in fields}
        d = self._update(username, changes, self._now())
        if changes.get("enabled") is False:
            d.addCallback(self._revoke, username, "disabled")
        return d.addCallback(self._changed, username)

    def delete(self, username: str) -> Deferred[bool]:
        d = self._delete(username).addCallback(self._revoke, username, "deleted")
        return d.addCallback(self._changed, username)

    def set_password_hash(self, username: str, password_hash: bytes) -> Deferred[bool]:
        d = self._set_password_hash(username, password_hash, self._now())
        return d.addCallback(self._changed, username)

    def _insert(self, user: User, password_hash: bytes) -> Deferred[User]:
        """Add C{user}, timestamps set; fail with L{DuplicateUser}."""
        raise NotImplementedError

    def _update(self, username: str, changes: dict[str, Any], now: str) -> Deferred[User | None]:
        """Set the C{changes} (column names only) and C{updated_at}; bump the generation."""
        raise NotImplementedError

    def _delete(self, username: str) -> Deferred[bool]:
        raise NotImplementedError

    def _set_password_hash(self, username: str, password_hash: bytes, now: str) -> Deferred[bool]:
        raise NotImplementedError


@implementer(IUserStore)
class SQLiteUserStore(UserStoreBase):
    """L{IUserStore} in the daemon's SQLite database (migration component C{"users"})."""

    def __init__(self, database: Database, clock: IReactorTime, revocations: Revocations | None = None) -> None:
        super().__init__(clock, revocations)
        self._db = database

    def migrate(self) -> None:
        """Create or upgrade the tables; synchronous, at start-up."""
        self._db.migrate(COMPONENT, MIGRATIONS)

    def _insert(self, user: User, password_hash: bytes) -> Deferred[User]:
        def insert(conn: sqlite3.Connection) -> User:
            try:
                conn.execute(
                    f"INSERT INTO users (username, {', '.join(USER_COLUMNS)}, password_hash, created_at, updated_at) "
                    f"VALUES (?, {'?, ' * len(USER_COLUMNS)}?, ?, ?)",
                    (
                        user.username,
                        *(column_value(c, getattr(user, c)) for c in USER_COLUMNS),
                        password_hash,
                        user.created_at,
                        user.updated_at,
                    ),
                )
            except sqlite3.IntegrityError:
                raise DuplicateUser(user.username) from None
            return user_from_row(conn.execute("SELECT * FROM users WHERE username = ?", (user.username,)).fetchone())

        return self._db.transaction(insert)

    def get(self, username: str) -> Deferred[User | None]:
        def select(conn: sqlite3.Connection) -> User | None:
            row = conn.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()
            return None if row is None else user_from_row(row)

        return self._db.run(select)

    def list(self) -> Deferred[list[User]]:
        def select(conn: sqlite3.Connection) -> list[User]:
            return [user_from_row(row) for row in conn.execute("SELECT * FROM users ORDER BY username")]

        return self._db.run(select)

    def _update(self, username: str, changes: dict[str, Any], now: str) -> Deferred[User | None]:
        def change(conn: sqlite3.Connection) -> User | None:
            assignments = "".join(f"{c} = ?, " for c in changes)
            cursor = conn.execute(
                f"UPDATE users SET {assignments}generation = generation + 1, updated_at = ? WHERE username = ?",
                (*(column_value(c, v) for c, v in changes.items()), now, username),
            )
            if cursor.rowcount == 0:
                return None
            return user_from_row(conn.execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone())

        return self._db.transaction(change)

    def _delete(self, username: str) -> Deferred[bool]:
        def remove(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM users WHERE username = ?", (username,)).rowcount > 0

        return self._db.transaction(remove)

    def _set_password_hash(self, username: str, password_hash: bytes, now: str) -> Deferred[bool]:
        def change(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "UPDATE users SET password_hash = ?, generation = generation + 1, updated_at = ? WHERE username = ?",
                (password_hash, now, username),
            )
            return cursor.rowcount > 0

        return self._db.transaction(change)

    def login_record(self, username: str) -> Deferred[LoginRecord | None]:
        def select(conn: sqlite3.Connection) -> LoginRecord | None:
            row = conn.execute(
                "SELECT username, enabled, password_hash, generation FROM users WHERE username = ?", (username,)
            ).fetchone()
            if row is None:
                return None
            return LoginRecord(row["username"], bool(row["enabled"]), bytes(row["password_hash"]), row["generation"])

        return self._db.run(select)
