"""
The suppression list (contract section 8): per user, the recipients its
messages may no longer go to.  L{SQLiteSuppressionList} keeps it in the
daemon's database (component C{"suppressions"}), so that every SMTP
session, in whatever process, asks the same list; L{MemorySuppressionList}
is the fake that passes the same contract tests
(C{tests/test_delivery_suppressions.py}).
"""

from __future__ import annotations

import sqlite3

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from smtpplus.interfaces import ISuppressionList
from smtpplus.model import Suppression
from smtpplus.storage.database import Database

COMPONENT = "suppressions"
MIGRATIONS = [
    # The primary key is the lookup of every RCPT TO: one B-tree search.
    """
    CREATE TABLE suppressions (
        user TEXT NOT NULL COLLATE NOCASE,
        address TEXT NOT NULL,
        reason TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (user, address)
    ) WITHOUT ROWID;
    """,
]


def address_key(address: str) -> str:
    """How an address is kept and compared: lower-cased (its domain is IDNA A-labels already)."""
    return address.strip().lower()


def _find(conn: sqlite3.Connection, user: str, address: str) -> Suppression | None:
    row = conn.execute(
        "SELECT address, reason, created_at FROM suppressions WHERE user = ? AND address = ?", (user, address)
    ).fetchone()
    return None if row is None else Suppression(*row)


def _add(conn: sqlite3.Connection, user: str, address: str, reason: str, created_at: float) -> Suppression:
    conn.execute(
        "INSERT INTO suppressions (user, address, reason, created_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (user, address) DO UPDATE SET reason = excluded.reason, created_at = excluded.created_at",
        (user, address, reason, created_at),
    )
    return Suppression(address, reason, created_at)


def _remove(conn: sqlite3.Connection, user: str, address: str) -> bool:
    return conn.execute("DELETE FROM suppressions WHERE user = ? AND address = ?", (user, address)).rowcount > 0


def _list(conn: sqlite3.Connection, user: str) -> list[Suppression]:
    rows = conn.execute(
        "SELECT address, reason, created_at FROM suppressions WHERE user = ? ORDER BY address", (user,)
    ).fetchall()
    return [Suppression(*row) for row in rows]


@implementer(ISuppressionList)
class SQLiteSuppressionList:
    """The suppression list in the daemon's SQLite database."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def migrate(self) -> None:
        """Create or upgrade the table; synchronous, at start-up."""
        self._database.migrate(COMPONENT, MIGRATIONS)

    def find(self, user: str, address: str) -> Deferred[Suppression | None]:
        return self._database.run(_find, user, address_key(address))

    def add(self, user: str, address: str, reason: str, created_at: float) -> Deferred[Suppression]:
        return self._database.write(_add, user, address_key(address), reason, created_at)

    def remove(self, user: str, address: str) -> Deferred[bool]:
        return self._database.write(_remove, user, address_key(address))

    def list(self, user: str) -> Deferred[list[Suppression]]:
        return self._database.run(_list, user)


@implementer(ISuppressionList)
class MemorySuppressionList:
    """The suppression list in a dict, for tests; answers at once."""

    def __init__(self) -> None:
        # (casefolded user, address key) -> suppression
        self.entries: dict[tuple[str, str], Suppression] = {}

    def find(self, user: str, address: str) -> Deferred[Suppression | None]:
        return succeed(self.entries.get((user.casefold(), address_key(address))))

    def add(self, user: str, address: str, reason: str, created_at: float) -> Deferred[Suppression]:
        entry = Suppression(address_key(address), reason, created_at)
        self.entries[(user.casefold(), entry.address)] = entry
        return succeed(entry)

    def remove(self, user: str, address: str) -> Deferred[bool]:
        return succeed(self.entries.pop((user.casefold(), address_key(address)), None) is not None)

    def list(self, user: str) -> Deferred[list[Suppression]]:
        key = user.casefold()
        return succeed(sorted((s for (u, _), s in self.entries.items() if u == key), key=lambda s: s.address))
