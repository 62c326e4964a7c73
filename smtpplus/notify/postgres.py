"""
Events and statistics in PostgreSQL (C{[storage] backend = "postgresql"}):
L{PostgresEventStore} and L{PostgresStatistics}, the same interfaces and
contract tests as the SQLite ones, their schemas from the same migration
lists, shared by every node using the database.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from smtpplus.interfaces import IEventQuery, IEventRecorder, IStatsQuery, IStatsRecorder
from smtpplus.notify import events, stats
from smtpplus.notify.events import EventSink, EventStoreBase
from smtpplus.notify.stats import COLUMNS, FLUSH_SECONDS, StatisticsBase, UserPolicy
from smtpplus.storage.postgres import PostgresDatabase

Conn = psycopg.Connection[Any]


def _insert_event(conn: Conn, event: dict[str, Any]) -> None:
    conn.execute(
        'INSERT INTO events (id, type, "user", message_id, detail, created_at) VALUES (%s, %s, %s, %s, %s, %s)',
        (event["id"], event["type"], event["user"], event["message_id"], event["detail"], event["created_at"]),
    )


def _select_events(
    conn: Conn, type: str | None, user: str | None, limit: int | None, before: int | None
) -> list[dict[str, Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    for clause, value in (("type = %s", type), ('"user" = %s', user), ("seq < %s", before)):
        if value is not None:
            clauses.append(clause)
            args.append(value)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    with conn.cursor(row_factory=dict_row) as cursor:
        # LIMIT NULL is no limit.
        cursor.execute(
            f'SELECT seq, id, type, "user", message_id, detail, created_at FROM events {where} '
            "ORDER BY seq DESC LIMIT %s",
            (*args, limit),
        )
        return cursor.fetchall()


@implementer(IEventRecorder, IEventQuery)
class PostgresEventStore(EventStoreBase):
    """The events table in PostgreSQL (migration component C{"events"})."""

    def __init__(self, db: PostgresDatabase, clock: IReactorTime, sink: EventSink | None = None) -> None:
        super().__init__(clock, sink)
        self._db = db
        db.migrate("events", events.MIGRATIONS)

    def _insert(self, event: dict[str, Any]) -> Deferred[None]:
        return self._db.run(_insert_event, event)

    def _select(
        self, type: str | None, user: str | None, limit: int | None, before: int | None
    ) -> Deferred[list[dict[str, Any]]]:
        return self._db.run(_select_events, type, user, limit, before)


def _upsert(conn: Conn, rows: list[tuple[Any, ...]]) -> None:
    with conn.cursor() as cursor:
        cursor.executemany(
            'INSERT INTO stats_groups (policy, "user", key, messages, recipients, sent, deferred, bounced, rejected) '
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
            'ON CONFLICT (policy, "user", key) DO UPDATE SET '
            + ", ".join(f"{c} = stats_groups.{c} + excluded.{c}" for c in COLUMNS),
            rows,
        )


# Day keys (YYYY-MM-DD) folded into the ISO week, the month, the year.
_KEY_EXPRESSIONS = {
    "week": "to_char(key::date, 'IYYY-\"W\"IW')",
    "month": "substr(key, 1, 7)",
    "year": "substr(key, 1, 4)",
}


def _select_groups(conn: Conn, policy: str, user: str) -> tuple[list[list[Any]], list[list[Any]]]:
    """
    The groups of C{policy} and the campaign groups, each as one JSON array
    of C{[key, messages, ...]} in key order, built by the server.
    """
    values = ", ".join(COLUMNS)
    expression = _KEY_EXPRESSIONS.get(policy)
    if expression is None:
        inner = f'SELECT key AS k, {values} FROM stats_groups WHERE policy = %s AND "user" = %s'
    else:
        sums = ", ".join(f"SUM({c}) AS {c}" for c in COLUMNS)
        inner = f'SELECT {expression} AS k, {sums} FROM stats_groups WHERE policy = %s AND "user" = %s GROUP BY k'
    outer = f"SELECT COALESCE(json_agg(json_build_array(k, {values}) ORDER BY k COLLATE \"C\"), '[]') FROM ({{}}) g"
    groups = conn.execute(outer.format(inner), (stats.STORED_AS.get(policy, policy), user)).fetchone()
    campaign_inner = f'SELECT key AS k, {values} FROM stats_groups WHERE policy = %s AND "user" = %s'
    campaigns = conn.execute(outer.format(campaign_inner), (stats.CAMPAIGN_POLICY, user)).fetchone()
    assert groups is not None and campaigns is not None
    return groups[0], campaigns[0]


@implementer(IStatsRecorder, IStatsQuery)
class PostgresStatistics(StatisticsBase):
    """The statistics store in PostgreSQL's C{stats_groups} (migration component C{"stats"})."""

    def __init__(
        self, db: PostgresDatabase, clock: IReactorTime, user_policy: UserPolicy, flush_seconds: float = FLUSH_SECONDS
    ) -> None:
        super().__init__(clock, user_policy, flush_seconds)
        self._db = db
        db.migrate("stats", stats.MIGRATIONS)

    def _write(self, rows: list[tuple[Any, ...]]) -> Deferred[None]:
        return self._db.transaction(_upsert, rows)

    def _read(self, policy: str, user: str) -> Deferred[list[dict[str, Any]]]:
        # Calls run on several threads: the read waits for the writes of
        # the counters flushed before it, which one SQLite thread orders by itself.
        d = self.flush()
        d.addCallback(lambda _: self._db.run(_select_groups, policy, user))
        return d.addCallback(lambda arrays: stats.merge_groups(*arrays))
