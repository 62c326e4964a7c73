"""
Notification events: stored, listed for the admin API, and handed to the
dispatcher that mails and POSTs them.  L{EventStore} keeps them in the
daemon's SQLite database, L{MemoryEventStore} in a list; both provide
L{IEventRecorder} and L{IEventQuery} and pass the same contract tests.
"""

from __future__ import annotations

import secrets
import sqlite3
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from smtpplus.interfaces import IEventQuery, IEventRecorder
from smtpplus.model import EventType, iso_utc
from smtpplus.paging import decode_cursor, encode_cursor
from smtpplus.storage.database import Database
from smtpplus.storage.migrations import Migration

log = Logger()

_EVENT_TYPES = frozenset(t.value for t in EventType)

MIGRATIONS = [
    Migration(
        sqlite="""
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        user TEXT,
        message_id TEXT,
        detail TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX events_by_type ON events (type, seq);
    CREATE INDEX events_by_user ON events (user, seq);
    """,
        postgresql="""
    CREATE TABLE events (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id text NOT NULL UNIQUE,
        type text NOT NULL,
        "user" text,
        message_id text,
        detail text NOT NULL,
        created_at text NOT NULL
    );
    CREATE INDEX events_by_type ON events (type, seq);
    CREATE INDEX events_by_user ON events ("user", seq);
    """,
    ),
]


class EventSink(Protocol):
    """Where stored events go next (the dispatcher)."""

    def dispatch(self, event: dict[str, Any]) -> None: ...


def new_event_id() -> str:
    """A random, URL-safe event id such as C{evt-3k9x2qa7m4p1}."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "evt-" + "".join(secrets.choice(alphabet) for _ in range(12))


def _insert(conn: sqlite3.Connection, event: dict[str, Any]) -> None:
    conn.execute(
        "INSERT INTO events (id, type, user, message_id, detail, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        (event["id"], event["type"], event["user"], event["message_id"], event["detail"], event["created_at"]),
    )


def _select(
    conn: sqlite3.Connection, type: str | None, user: str | None, limit: int, before: int | None
) -> list[dict[str, Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    for clause, value in (("type = ?", type), ("user = ?", user), ("seq < ?", before)):
        if value is not None:
            clauses.append(clause)
            args.append(value)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(
        f"SELECT seq, id, type, user, message_id, detail, created_at FROM events {where} ORDER BY seq DESC LIMIT ?",
        (*args, limit),
    ).fetchall()
    return [dict(row) for row in rows]


def _without_seq(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for row in rows:
        del row["seq"]
    return rows


class EventStoreBase:
    """
    What every event store shares: the event object and the hand-over to
    the sink, around the C{_insert} and C{_select} a backend implements.

    L{record} returns once the event is stored; delivery by mail and webhook
    happens afterwards in the C{sink}, which never makes the caller wait.
    """

    def __init__(self, clock: IReactorTime, sink: EventSink | None = None) -> None:
        self._clock = clock
        self.sink = sink

    def record(self, type: str, user: str | None, message_id: str | None, detail: str) -> Deferred[dict[str, Any]]:
        """Store one event and hand it to the sink; Deferred of the event dict."""
        if type not in _EVENT_TYPES:
            raise ValueError(f"unknown event type {type!r}")
        event = {
            "id": new_event_id(),
            "type": str(type),
            "user": user,
            "message_id": message_id,
            "detail": str(detail),
            "created_at": iso_utc(self._clock.seconds()),
        }
        d = self._insert(event)
        d.addCallback(self._stored, event)
        return d

    def _stored(self, _: None, event: dict[str, Any]) -> dict[str, Any]:
        if self.sink is not None:
            try:
                self.sink.dispatch(dict(event))
            except Exception:
                # A notifier bug must not turn into an SMTP error for the caller.
                log.failure("dispatching event {id} failed", id=event["id"])
        return event

    def list_events(self, type: str | None, user: str | None, limit: int | None) -> Deferred[list[dict[str, Any]]]:
        """Events matching the filters, newest first; C{limit} None or < 1 means all."""
        d = self._select(type, user, None if limit is None or limit < 1 else limit, None)
        return d.addCallback(_without_seq)

    def page_events(
        self, type: str | None, user: str | None, limit: int, cursor: str | None
    ) -> Deferred[tuple[list[dict[str, Any]], str | None]]:
        """At most C{limit} matching events recorded before the one C{cursor} names, and the next cursor."""
        before = None if cursor is None else decode_cursor(cursor)
        # One more than asked for tells whether there is a next page.
        d = self._select(type, user, limit + 1, before)

        def page(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
            shown = rows[:limit]
            next_cursor = encode_cursor(shown[-1]["seq"]) if len(rows) > limit else None
            return _without_seq(shown), next_cursor

        return d.addCallback(page)

    def _insert(self, event: dict[str, Any]) -> Deferred[None]:
        raise NotImplementedError

    def _select(
        self, type: str | None, user: str | None, limit: int | None, before: int | None
    ) -> Deferred[list[dict[str, Any]]]:
        """
        Matching events with their arrival number C{seq}, newest first, at
        most C{limit} (None: all), only those before C{before} when given.
        """
        raise NotImplementedError


@implementer(IEventRecorder, IEventQuery)
class EventStore(EventStoreBase):
    """The events table (migration component C{"events"})."""

    def __init__(self, db: Database, clock: IReactorTime, sink: EventSink | None = None) -> None:
        super().__init__(clock, sink)
        self._db = db
        db.migrate("events", MIGRATIONS)

    def _insert(self, event: dict[str, Any]) -> Deferred[None]:
        return self._db.run(_insert, event)

    def _select(
        self, type: str | None, user: str | None, limit: int | None, before: int | None
    ) -> Deferred[list[dict[str, Any]]]:
        # SQLite: LIMIT -1 is no limit.
        return self._db.run(_select, type, user, -1 if limit is None else limit, before)


@implementer(IEventRecorder, IEventQuery)
class MemoryEventStore(EventStoreBase):
    """Events in a list: for tests, and the template for another backend."""

    def __init__(self, clock: IReactorTime, sink: EventSink | None = None) -> None:
        super().__init__(clock, sink)
        self._events: list[dict[str, Any]] = []

    def _insert(self, event: dict[str, Any]) -> Deferred[None]:
        self._events.append(dict(event))
        return succeed(None)

    def _select(
        self, type: str | None, user: str | None, limit: int | None, before: int | None
    ) -> Deferred[list[dict[str, Any]]]:
        # An event's arrival number is its place in the list, from 1 as in SQLite.
        found = [
            {**event, "seq": seq}
            for seq, event in reversed(list(enumerate(self._events, 1)))
            if (type is None or event["type"] == type)
            and (user is None or event["user"] == user)
            and (before is None or seq < before)
        ]
        return succeed(found[:limit])
