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
from collections.abc import Callable
from hashlib import blake2b

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger
from zope.interface import implementer

from smtpplus.interfaces import ISuppressionKeys, ISuppressionList
from smtpplus.model import Suppression
from smtpplus.storage.database import Database
from smtpplus.storage.migrations import Migration

log = Logger()

COMPONENT = "suppressions"
MIGRATIONS = [
    # The primary key is the lookup of every RCPT TO: one B-tree search.
    Migration(
        sqlite="""
    CREATE TABLE suppressions (
        user TEXT NOT NULL COLLATE NOCASE,
        address TEXT NOT NULL,
        reason TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (user, address)
    ) WITHOUT ROWID;
    """,
        postgresql="""
    CREATE TABLE suppressions (
        "user" text COLLATE "C" NOT NULL,
        address text COLLATE "C" NOT NULL,
        reason text NOT NULL,
        created_at double precision NOT NULL
    );
    CREATE UNIQUE INDEX suppressions_key ON suppressions (lower("user"), address);
    """,
    ),
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


class KeyFilter:
    """
    A Bloom filter of (user, address) keys: C{False} from L{may_hold} is
    certain, C{True} means "ask the table".  Fixed at 1 MiB with four bits
    a key: about 1 lookup in 10,000 goes to the table needlessly with
    100,000 suppressions, 1 in 50 with a million, more as the list grows
    past that, never a wrong answer.  Removing a key leaves its bits (a
    needless lookup, no more).
    """

    BITS = 1 << 23

    def __init__(self) -> None:
        self._bits = bytearray(self.BITS // 8)

    @staticmethod
    def _positions(user: str, address: str) -> list[int]:
        # Four 24-bit slices of one digest, each cut to the filter's size.
        digest = int.from_bytes(blake2b(f"{user.lower()}\0{address}".encode(), digest_size=12).digest(), "little")
        return [(digest >> (24 * i)) & (KeyFilter.BITS - 1) for i in range(4)]

    def add(self, user: str, address: str) -> None:
        """Note C{user}'s key of C{address} (an address key already)."""
        for bit in self._positions(user, address):
            self._bits[bit >> 3] |= 1 << (bit & 7)

    def may_hold(self, user: str, address: str) -> bool:
        """False when C{user} surely has no suppression of C{address} (an address key already)."""
        return all(self._bits[bit >> 3] & (1 << (bit & 7)) for bit in self._positions(user, address))

    def to_bytes(self) -> bytes:
        """The filter as another process takes it (L{merge})."""
        return bytes(self._bits)

    def merge(self, bits: bytes) -> None:
        """Hold every key of another filter's L{to_bytes} too."""
        if len(bits) != len(self._bits):
            raise ValueError(f"a key filter of {len(bits)} bytes, not {len(self._bits)}")
        merged = int.from_bytes(self._bits, "little") | int.from_bytes(bits, "little")
        self._bits[:] = merged.to_bytes(len(self._bits), "little")


def _key_filter(conn: sqlite3.Connection) -> KeyFilter:
    # Built on the database thread: a long list takes a while to hash.
    keys = KeyFilter()
    for user, address in conn.execute("SELECT user, address FROM suppressions"):
        keys.add(user, address)
    return keys


def _list(conn: sqlite3.Connection, user: str) -> list[Suppression]:
    rows = conn.execute(
        "SELECT address, reason, created_at FROM suppressions WHERE user = ? ORDER BY address", (user,)
    ).fetchall()
    return [Suppression(*row) for row in rows]


@implementer(ISuppressionList, ISuppressionKeys)
class SQLiteSuppressionList:
    """
    The suppression list in the daemon's SQLite database.

    Every RCPT TO asks it, and almost every answer is "not suppressed": a
    L{KeyFilter} of the table's keys, loaded on the database thread at the
    first lookup and kept up to date by L{add} (this process is the
    table's only writer), answers those without a trip to the database
    thread.  Until it is loaded every lookup asks the table.
    """

    def __init__(self, database: Database) -> None:
        self._database = database
        self._filter = KeyFilter()
        self._loaded = False
        self._loading: Deferred[None] | None = None
        self._added: list[Callable[[str, str], Deferred[object]]] = []

    def migrate(self) -> None:
        """Create or upgrade the table; synchronous, at start-up."""
        self._database.migrate(COMPONENT, MIGRATIONS)

    def _load(self) -> None:
        def loaded(keys: KeyFilter) -> None:
            # Keys added meanwhile are in self._filter already.
            self._filter.merge(keys.to_bytes())
            self._loaded = True

        def failed(failure: object) -> None:
            # Asked again at the next lookup; meanwhile the table answers.
            self._loading = None
            log.warn("loading the suppression keys failed: {error}", error=getattr(failure, "value", failure))

        self._loading = self._database.run(_key_filter)
        self._loading.addCallbacks(loaded, failed)

    def key_filter(self) -> Deferred[KeyFilter]:
        """
        The filter of every key, once loaded: the SMTP workers keep a copy
        and answer the RCPT TO lookups it rules out themselves.  Fails
        when the keys cannot be read.
        """
        if self._loaded:
            return succeed(self._filter)
        if self._loading is None:
            self._load()
        assert self._loading is not None
        waiting: Deferred[None] = Deferred()
        self._loading.addBoth(lambda result: (waiting.callback(None), result)[1])

        def ready(_: object) -> KeyFilter:
            if not self._loaded:
                raise RuntimeError("the suppression keys could not be read")
            return self._filter

        return waiting.addCallback(ready)

    def on_added(self, listener: Callable[[str, str], Deferred[object]]) -> None:
        """
        Call C{listener(user, address key)} for each suppression added from
        now on; L{add} fires once its Deferred has (the workers' copies
        hold the key before the API answers).
        """
        self._added.append(listener)

    def find(self, user: str, address: str) -> Deferred[Suppression | None]:
        key = address_key(address)
        if self._loaded and not self._filter.may_hold(user, key):
            return succeed(None)
        if self._loading is None:
            self._load()
        return self._database.run(_find, user, key)

    def add(self, user: str, address: str, reason: str, created_at: float) -> Deferred[Suppression]:
        key = address_key(address)
        # Before the write: a lookup between the two asks the table.
        self._filter.add(user, key)
        told = [listener(user, key) for listener in self._added]
        d = self._database.write(_add, user, key, reason, created_at)
        if not told:
            return d
        return gatherResults([d, *told], consumeErrors=True).addCallbacks(
            lambda results: results[0], lambda failure: failure.value.subFailure
        )

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
