"""
Notification events: stored in the database, listed for the admin API, and
handed to the dispatcher that mails and POSTs them.
"""

from __future__ import annotations

import secrets
import sqlite3
from datetime import UTC, datetime
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from smtpplus.admin.interfaces import IEventQuery
from smtpplus.config import EVENT_TYPES
from smtpplus.notify.interfaces import IEventRecorder
from smtpplus.storage.database import Database

log = Logger()

MIGRATIONS = [
    """
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
]


class EventSink(Protocol):
    """Where stored events go next (the dispatcher)."""

    def dispatch(self, event: dict[str, Any]) -> None: ...


def utc_timestamp(seconds: float) -> str:
    """ISO 8601 UTC with a C{Z}, to the second: C{2024-05-01T12:00:00Z}."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_event_id() -> str:
    """A random, URL-safe event id such as C{evt-3k9x2qa7m4p1}."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "evt-" + "".join(secrets.choice(alphabet) for _ in range(12))


def _insert(conn: sqlite3.Connection, event: dict[str, Any]) -> None:
    conn.execute(
        "INSERT INTO events (id, type, user, message_id, detail, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        (event["id"], event["type"], event["user"], event["message_id"], event["detail"], event["created_at"]),
    )


def _select(conn: sqlite3.Connection, type: str | None, user: str | None, limit: int) -> list[dict[str, Any]]:
    clauses, args = [], []
    if type is not None:
        clauses.append("type = ?")
        args.append(type)
    if user is not None:
        clauses.append("user = ?")
        args.append(user)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(
        f"SELECT id, type, user, message_id, detail, created_at FROM events {where} ORDER BY seq DESC LIMIT ?",
        (*args, limit),
    ).fetchall()
    return [dict(row) for row in rows]


@implementer(IEventRecorder, IEventQuery)
class EventStore:
    """
    The events table (migration component C{"events"}).

    L{record} returns once the event is stored; delivery by mail and webhook
    happens afterwards in the C{sink}, which never makes the caller wait.
    """

    def __init__(self, db: Database, clock: IReactorTime, sink: EventSink | None = None) -> None:
        self._db = db
        self._clock = clock
        self.sink = sink
        db.migrate("events", MIGRATIONS)

    def record(self, type: str, user: str | None, message_id: str | None, detail: str) -> Deferred[dict[str, Any]]:
        """Store one event and hand it to the sink; Deferred of the event dict."""
        if type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type!r}")
        event = {
            "id": new_event_id(),
            "type": type,
            "user": user,
            "message_id": message_id,
            "detail": str(detail),
            "created_at": utc_timestamp(self._clock.seconds()),
        }
        d = self._db.run(_insert, event)
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
        if limit is None or limit < 1:
            limit = -1  # SQLite: no limit
        return self._db.run(_select, type, user, limit)
