"""
The user store in PostgreSQL (C{[storage] backend = "postgresql"}): the
same L{smtpplus.interfaces.IUserStore} and contract tests as
L{smtpplus.auth.store.SQLiteUserStore}, its schema from the same migration
list, so that every node sharing the database knows the same users,
passwords and login records.  Usernames compare with ASCII letters folded,
as SQLite's C{NOCASE} does (C{lower()} under the C collation).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from smtpplus.auth.store import (
    COMPONENT,
    MIGRATIONS,
    USER_COLUMNS,
    DuplicateUser,
    LoginRecord,
    Revocations,
    UserStoreBase,
    column_value,
    user_from_row,
)
from smtpplus.interfaces import IUserStore
from smtpplus.model import User
from smtpplus.storage.postgres import PostgresDatabase

Conn = psycopg.Connection[Any]

_BY_NAME = 'lower(username) = lower(%s::text COLLATE "C")'


def _select_user(conn: Conn, username: str) -> User | None:
    with conn.cursor(row_factory=dict_row) as cursor:
        cursor.execute(f"SELECT * FROM users WHERE {_BY_NAME}", (username,))
        row = cursor.fetchone()
    return None if row is None else user_from_row(row)


# How long a change stays in user_changes, and how far back each poll
# looks: far more than a transaction takes to commit, so that a change
# committed after a later-numbered one is still seen.
CHANGES_KEPT = 3600.0
CHANGES_LOOKBACK = 120.0


def _note_change(conn: Conn, node: str, now: float, username: str, revoked: str | None = None) -> None:
    conn.execute(
        "INSERT INTO user_changes (username, revoked, node, at) VALUES (%s, %s, %s, %s)",
        (username, revoked, node, now),
    )


def _recent_changes(conn: Conn, node: str, since: float, forget_before: float) -> list[tuple[int, str, str | None]]:
    conn.execute("DELETE FROM user_changes WHERE at < %s", (forget_before,))
    return conn.execute(
        "SELECT seq, username, revoked FROM user_changes WHERE at >= %s AND node <> %s ORDER BY seq", (since, node)
    ).fetchall()


@implementer(IUserStore)
class PostgresUserStore(UserStoreBase):
    """
    L{IUserStore} in PostgreSQL (migration component C{"users"}).

    Each write also notes the change in C{user_changes}, in the same
    transaction, under this node's name: L{poll_changes} (after each
    heartbeat) gives the other nodes' changes to the same revocations and
    listeners as this node's own, so that a user disabled through one
    node's API cannot send on a session open on another.
    """

    def __init__(
        self,
        database: PostgresDatabase,
        clock: IReactorTime,
        revocations: Revocations | None = None,
        node: str = "",
    ) -> None:
        super().__init__(clock, revocations)
        self._db = database
        self.node = node
        # seq -> when it was applied, for the changes still in the lookback.
        self._applied: dict[int, float] = {}

    def poll_changes(self) -> Deferred[int]:
        """Apply the other nodes' recent user changes not applied yet; fires with how many."""
        now = self._clock.seconds()

        def apply(rows: list[tuple[int, str, str | None]]) -> int:
            self._applied = {seq: at for seq, at in self._applied.items() if at >= now - 2 * CHANGES_LOOKBACK}
            fresh = [row for row in rows if row[0] not in self._applied]
            for seq, username, revoked in fresh:
                self._applied[seq] = now
                if revoked:
                    self._revoke(True, username, revoked)
                self._changed(True, username)
            return len(fresh)

        d = self._db.run(_recent_changes, self.node, now - CHANGES_LOOKBACK, now - CHANGES_KEPT)
        return d.addCallback(apply)

    def skip_past_changes(self) -> None:
        """At start: the changes already there were made before any session of this node; synchronous."""

        def seqs(conn: Conn) -> list[tuple[int]]:
            return conn.execute(
                "SELECT seq FROM user_changes WHERE at >= %s", (self._clock.seconds() - CHANGES_LOOKBACK,)
            ).fetchall()

        now = self._clock.seconds()
        self._applied = {seq: now for (seq,) in self._db.run_sync(seqs)}

    def migrate(self) -> None:
        """Create or upgrade the tables; synchronous, at start-up."""
        self._db.migrate(COMPONENT, MIGRATIONS)

    def _insert(self, user: User, password_hash: bytes) -> Deferred[User]:
        def insert(conn: Conn) -> User:
            try:
                # A savepoint: the transaction stays usable for the answer.
                with conn.transaction():
                    conn.execute(
                        f"INSERT INTO users (username, {', '.join(USER_COLUMNS)}, password_hash, created_at, updated_at) "
                        f"VALUES (%s, {'%s, ' * len(USER_COLUMNS)}%s, %s, %s)",
                        (
                            user.username,
                            *(column_value(c, getattr(user, c)) for c in USER_COLUMNS),
                            password_hash,
                            user.created_at,
                            user.updated_at,
                        ),
                    )
            except psycopg.errors.UniqueViolation:
                raise DuplicateUser(user.username) from None
            _note_change(conn, self.node, self._clock.seconds(), user.username)
            found = _select_user(conn, user.username)
            assert found is not None
            return found

        return self._db.transaction(insert)

    def get(self, username: str) -> Deferred[User | None]:
        return self._db.run(_select_user, username)

    def list(self) -> Deferred[list[User]]:
        def select(conn: Conn) -> list[User]:
            with conn.cursor(row_factory=dict_row) as cursor:
                cursor.execute("SELECT * FROM users ORDER BY lower(username)")
                return [user_from_row(row) for row in cursor]

        return self._db.run(select)

    def _update(self, username: str, changes: dict[str, Any], now: str) -> Deferred[User | None]:
        def change(conn: Conn) -> User | None:
            assignments = "".join(f"{c} = %s, " for c in changes)
            cursor = conn.execute(
                f"UPDATE users SET {assignments}generation = generation + 1, updated_at = %s WHERE {_BY_NAME}",
                (*(column_value(c, v) for c, v in changes.items()), now, username),
            )
            if cursor.rowcount == 0:
                return None
            revoked = "disabled" if changes.get("enabled") is False else None
            _note_change(conn, self.node, self._clock.seconds(), username, revoked)
            return _select_user(conn, username)

        return self._db.transaction(change)

    def _delete(self, username: str) -> Deferred[bool]:
        def remove(conn: Conn) -> bool:
            if conn.execute(f"DELETE FROM users WHERE {_BY_NAME}", (username,)).rowcount == 0:
                return False
            _note_change(conn, self.node, self._clock.seconds(), username, "deleted")
            return True

        return self._db.transaction(remove)

    def _set_password_hash(self, username: str, password_hash: bytes, now: str) -> Deferred[bool]:
        def change(conn: Conn) -> bool:
            cursor = conn.execute(
                f"UPDATE users SET password_hash = %s, generation = generation + 1, updated_at = %s WHERE {_BY_NAME}",
                (password_hash, now, username),
            )
            if cursor.rowcount == 0:
                return False
            _note_change(conn, self.node, self._clock.seconds(), username)
            return True

        return self._db.transaction(change)

    def login_record(self, username: str) -> Deferred[LoginRecord | None]:
        def select(conn: Conn) -> LoginRecord | None:
            row = conn.execute(
                f"SELECT username, enabled, password_hash, generation FROM users WHERE {_BY_NAME}", (username,)
            ).fetchone()
            if row is None:
                return None
            return LoginRecord(row[0], bool(row[1]), bytes(row[2]), row[3])

        return self._db.run(select)
