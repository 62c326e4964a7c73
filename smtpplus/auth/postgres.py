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


@implementer(IUserStore)
class PostgresUserStore(UserStoreBase):
    """L{IUserStore} in PostgreSQL (migration component C{"users"})."""

    def __init__(self, database: PostgresDatabase, clock: IReactorTime, revocations: Revocations | None = None) -> None:
        super().__init__(clock, revocations)
        self._db = database

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
            return _select_user(conn, username)

        return self._db.transaction(change)

    def _delete(self, username: str) -> Deferred[bool]:
        def remove(conn: Conn) -> bool:
            return conn.execute(f"DELETE FROM users WHERE {_BY_NAME}", (username,)).rowcount > 0

        return self._db.transaction(remove)

    def _set_password_hash(self, username: str, password_hash: bytes, now: str) -> Deferred[bool]:
        def change(conn: Conn) -> bool:
            cursor = conn.execute(
                f"UPDATE users SET password_hash = %s, generation = generation + 1, updated_at = %s WHERE {_BY_NAME}",
                (password_hash, now, username),
            )
            return cursor.rowcount > 0

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
