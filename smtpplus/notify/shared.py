"""
Notification mail when several nodes share one PostgreSQL database: one
summary per (type, user) coalescing window and one digest per period for
the whole relay, not one per node.

Every node stores its events in the shared C{events} table (as with one
node) and POSTs its own events to the webhook (each event once, by the
node that recorded it); no node mails the events it records.  The mails
are the leader's duty (L{smtpplus.nodes.leader}): L{SharedMailFeed} reads
the table in arrival order and hands each event to the leader's
L{smtpplus.notify.dispatch.MailNotifier}, which coalesces and digests
exactly as a single node does.  The position reached is stored in
C{notify_feed}, so that a new leader goes on where the last one stopped;
a leader that stops (losing the lock, or at shutdown) sends the summaries
and digest it has collected, as a single node does at shutdown.  A leader
that dies loses the summaries it had collected, as a single node that dies
does; the next leader mails the events after the position last stored.

This was chosen over a window row per (type, user) claimed by the node
that sees the first event: there the digests would still need one node,
and a window whose node died would need a sweeper: the same election,
with more rows.  The price is that mails go out up to L{POLL_SECONDS}
after the event (and up to L{GAP_WAIT} later behind an insert still in
flight on another node).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from smtpplus.notify.dispatch import Notifier
from smtpplus.storage.database import StorageUnavailable
from smtpplus.storage.migrations import Migration
from smtpplus.storage.postgres import PostgresDatabase

log = Logger()

Conn = psycopg.Connection[Any]

# The events recorded before this component existed were mailed by their
# nodes: the feed starts after them.
MIGRATIONS = [
    Migration(
        sqlite=None,
        postgresql="""
    CREATE TABLE notify_feed (name text PRIMARY KEY, seq bigint NOT NULL);
    INSERT INTO notify_feed (name, seq) SELECT 'mail', COALESCE(MAX(seq), 0) FROM events;
    """,
    ),
]

POLL_SECONDS = 1.0
# Events read per poll.
BATCH = 500
# An event number is taken when its insert starts and visible when it
# commits, so a later number can be seen first.  The feed waits this long
# for a missing number before it takes it for a rolled-back insert.
GAP_WAIT = 5.0


def _read(conn: Conn, after: int, limit: int) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cursor:
        cursor.execute(
            'SELECT seq, id, type, "user", message_id, detail, created_at FROM events WHERE seq > %s '
            "ORDER BY seq LIMIT %s",
            (after, limit),
        )
        return cursor.fetchall()


def _position(conn: Conn) -> int:
    row = conn.execute("SELECT seq FROM notify_feed WHERE name = 'mail'").fetchone()
    assert row is not None
    return int(row[0])


def _store_position(conn: Conn, seq: int) -> None:
    conn.execute("UPDATE notify_feed SET seq = %s WHERE name = 'mail'", (seq,))


class SharedMailFeed:
    """
    A leader's duty: every C{interval} seconds, the events recorded by any
    node since the stored position go to C{notifier.mail} (the one of the
    moment: a reload replaces it), in order.
    """

    def __init__(
        self,
        db: PostgresDatabase,
        clock: IReactorTime,
        notifier: Notifier,
        interval: float = POLL_SECONDS,
        gap_wait: float = GAP_WAIT,
    ) -> None:
        self._db = db
        self._clock = clock
        self._notifier = notifier
        self._gap_wait = gap_wait
        self._position: int | None = None
        # When the feed first waited at the current gap.
        self._gap_since: float | None = None
        self._polling: Deferred[None] = succeed(None)
        self._loop = LoopingCall(self._poll)
        self._loop.clock = clock
        self._interval = interval
        db.migrate("notify_feed", MIGRATIONS)

    def start(self) -> None:
        """Go on from the stored position."""
        self._position = None
        self._gap_since = None
        self._loop.start(self._interval, now=True)

    def stop(self) -> Deferred[Any]:
        """Stop reading; the mails collected so far go out."""
        if self._loop.running:
            self._loop.stop()
        d: Deferred[Any] = Deferred()
        self._polling.addBoth(lambda _: d.callback(None))
        return d.addCallback(lambda _: self._flush())

    def _flush(self) -> Deferred[Any] | None:
        mail = self._notifier.mail
        return mail.flush() if mail is not None else None

    def _poll(self) -> Deferred[None]:
        if self._position is None:
            d = self._db.run(_position)
            d.addCallback(self._positioned)
        else:
            d = self._read_more()
        # Never fails: a failed LoopingCall would stop for good.  An outage is logged by the database.
        self._polling = d.addErrback(self._failed)
        return self._polling

    def _positioned(self, position: int) -> Deferred[None]:
        self._position = position
        return self._read_more()

    def _read_more(self) -> Deferred[None]:
        assert self._position is not None
        return self._db.run(_read, self._position, BATCH).addCallback(self._feed)

    def _feed(self, rows: list[dict[str, Any]]) -> Deferred[None] | None:
        assert self._position is not None
        position = self._position
        for row in rows:
            if row["seq"] != position + 1 and not self._gap_passed():
                break
            self._gap_since = None
            position = row["seq"]
            del row["seq"]
            mail = self._notifier.mail
            if mail is not None:
                mail.dispatch(row)
        if position == self._position:
            return None
        self._position = position
        return self._db.write(_store_position, position)

    def _gap_passed(self) -> bool:
        now = self._clock.seconds()
        if self._gap_since is None:
            self._gap_since = now
        return now - self._gap_since >= self._gap_wait

    def _failed(self, failure: Failure) -> None:
        if not failure.check(StorageUnavailable):
            log.failure("reading the events to mail failed", failure)
