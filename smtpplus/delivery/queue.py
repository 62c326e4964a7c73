"""
The queue records: their SQLite implementation of
L{smtpplus.delivery.interfaces.IQueueStore} (component C{"queue"}), the
batched writer of delivery state, and the group committer that makes an
accepted message durable before its queue id is given out.

Functions taking C{conn} run on the database thread via
L{smtpplus.storage.database.Database}; L{SQLiteQueueStore} is their one
caller.  The in-memory store is L{smtpplus.delivery.memory}.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import attrs
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from zope.interface import implementer

from smtpplus.delivery.batching import Batcher
from smtpplus.delivery.interfaces import Duplicate, IQueueStore, MessageFilter, RunInThread
from smtpplus.delivery.spool import Envelope, Spool, TempMessage, local_failure
from smtpplus.storage.database import Database
from smtpplus.storage.migrations import Migration

log = Logger()

COMPONENT = "queue"
MIGRATIONS = [
    Migration(
        sqlite="""
    CREATE TABLE queue_messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        user TEXT,
        mail_from TEXT NOT NULL,
        header_from TEXT NOT NULL DEFAULT '',
        subject TEXT NOT NULL DEFAULT '',
        priority INTEGER NOT NULL,
        status TEXT NOT NULL,
        campaign_name TEXT,
        campaign_code TEXT,
        schedule_at REAL,
        next_attempt REAL,
        size INTEGER NOT NULL DEFAULT 0,
        internal INTEGER NOT NULL DEFAULT 0,
        delay_notified INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX queue_messages_user ON queue_messages (user, seq);
    CREATE INDEX queue_messages_status ON queue_messages (status, seq);
    CREATE TABLE queue_recipients (
        message_id TEXT NOT NULL REFERENCES queue_messages (id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        address TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_response TEXT,
        next_attempt REAL,
        PRIMARY KEY (message_id, idx)
    );
    """,
        # "user" is a reserved word in PostgreSQL.
        postgresql="""
    CREATE TABLE queue_messages (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id text NOT NULL UNIQUE,
        "user" text,
        mail_from text NOT NULL,
        header_from text NOT NULL DEFAULT '',
        subject text NOT NULL DEFAULT '',
        priority integer NOT NULL,
        status text NOT NULL,
        campaign_name text,
        campaign_code text,
        schedule_at double precision,
        next_attempt double precision,
        size bigint NOT NULL DEFAULT 0,
        internal integer NOT NULL DEFAULT 0,
        delay_notified integer NOT NULL DEFAULT 0,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL
    );
    CREATE INDEX queue_messages_user ON queue_messages ("user", seq);
    CREATE INDEX queue_messages_status ON queue_messages (status, seq);
    CREATE TABLE queue_recipients (
        message_id text NOT NULL REFERENCES queue_messages (id) ON DELETE CASCADE,
        idx integer NOT NULL,
        address text COLLATE "C" NOT NULL,
        status text NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        last_response text,
        next_attempt double precision,
        PRIMARY KEY (message_id, idx)
    );
    """,
    ),
    # The listing filters: by recipient (case-insensitive), campaign and time.
    Migration(
        sqlite="""
    CREATE INDEX queue_recipients_address ON queue_recipients (address COLLATE NOCASE, message_id);
    CREATE INDEX queue_messages_campaign ON queue_messages (campaign_code, seq);
    CREATE INDEX queue_messages_created ON queue_messages (created_at);
    """,
        postgresql="""
    CREATE INDEX queue_recipients_address ON queue_recipients (lower(address), message_id);
    CREATE INDEX queue_messages_campaign ON queue_messages (campaign_code, seq);
    CREATE INDEX queue_messages_created ON queue_messages (created_at);
    """,
    ),
    # Sandbox users' messages, and the priority budget's count: a user's
    # own messages at effective priority 1 since a time (contract section 8).
    Migration(
        sqlite="""
    ALTER TABLE queue_messages ADD COLUMN sandbox INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX queue_messages_urgent ON queue_messages (user, created_at) WHERE priority = 1 AND internal = 0;
    """,
        postgresql="""
    ALTER TABLE queue_messages ADD COLUMN sandbox integer NOT NULL DEFAULT 0;
    CREATE INDEX queue_messages_urgent ON queue_messages ("user", created_at) WHERE priority = 1 AND internal = 0;
    """,
    ),
    # Idempotent submission: one row per (user, Message-ID, recipient set)
    # accepted within the window, found through its unique index; pruned by
    # age through the created_at index.
    Migration(
        sqlite="""
    ALTER TABLE queue_messages ADD COLUMN duplicates INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE queue_dedup (
        user TEXT NOT NULL,
        message_id TEXT NOT NULL,
        recipients TEXT NOT NULL,
        first_id TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE UNIQUE INDEX queue_dedup_key ON queue_dedup (user, message_id, recipients);
    CREATE INDEX queue_dedup_created ON queue_dedup (created_at);
    """,
        postgresql="""
    ALTER TABLE queue_messages ADD COLUMN duplicates integer NOT NULL DEFAULT 0;
    CREATE TABLE queue_dedup (
        "user" text NOT NULL,
        message_id text NOT NULL,
        recipients text NOT NULL,
        first_id text NOT NULL,
        created_at double precision NOT NULL
    );
    CREATE UNIQUE INDEX queue_dedup_key ON queue_dedup ("user", message_id, recipients);
    CREATE INDEX queue_dedup_created ON queue_dedup (created_at);
    """,
    ),
    # Shared by nodes (contract section 5): each message's content, so that
    # any node can deliver it; the node that claims each message (its lease
    # is that node's heartbeat in nodes, not a column per message); the
    # nodes' heartbeats.  SQLite serves one machine: its messages' content
    # stays in the spool files.
    Migration(
        sqlite=None,
        postgresql="""
    CREATE TABLE queue_contents (
        message_id text PRIMARY KEY REFERENCES queue_messages (id) ON DELETE CASCADE,
        content bytea NOT NULL
    );
    ALTER TABLE queue_messages ADD COLUMN claimed_by text;
    CREATE INDEX queue_messages_claimed ON queue_messages (claimed_by, status);
    CREATE TABLE nodes (
        name text PRIMARY KEY,
        workers integer NOT NULL,
        started_at double precision NOT NULL,
        last_seen double precision NOT NULL
    );
    """,
    ),
]

ACTIVE = ("queued", "scheduled", "sending", "deferred")
# What an administrator may delete: active, but not in the middle of an attempt.
DELETABLE = ("queued", "scheduled", "deferred")
# What an administrator's retry cuts short: a retry timer, a schedule.
WAITING = ("scheduled", "deferred")
FINAL_RECIPIENT = ("sent", "bounced", "deleted", "sandboxed")


@attrs.frozen
class NewMessage:
    """What is known of an accepted message when it is committed."""

    id: str
    user: str | None
    mail_from: str
    header_from: str
    subject: str
    priority: int
    recipients: tuple[str, ...]
    campaign_name: str | None
    campaign_code: str | None
    schedule_at: float | None
    size: int
    internal: bool
    created_at: float
    # The Message-ID header as received: with the user and the recipients
    # it tells a resent message (see L{dedup_key}); None never matches.
    header_message_id: str | None = None
    # A sandbox user's message: queued, then finished without relaying.
    sandbox: bool = False

    @property
    def status(self) -> str:
        return "scheduled" if self.schedule_at is not None and self.schedule_at > self.created_at else "queued"

    @classmethod
    def from_envelope(cls, message_id: str, envelope: Envelope) -> NewMessage:
        """The message as it was committed, rebuilt from its spool file."""
        return cls(id=message_id, **attrs.asdict(envelope, recurse=False))


def dedup_key(m: NewMessage) -> tuple[str, str, str] | None:
    """
    What makes C{m} the same submission as another: its user, its
    Message-ID and its set of envelope recipients, lower-cased (hashed, so
    that the key stays short whatever the number of recipients).  None for
    a message that is never deduplicated (the daemon's own, or without a
    Message-ID).
    """
    if m.internal or m.user is None or not m.header_message_id:
        return None
    recipients = "\n".join(sorted({r.lower() for r in m.recipients}))
    return m.user, m.header_message_id, hashlib.sha256(recipients.encode("utf-8")).hexdigest()


def _first_of(conn: sqlite3.Connection, key: tuple[str, str, str], since: float) -> str | None:
    """The id of the message C{key} was accepted as since C{since}, counting one more duplicate of it."""
    row = conn.execute(
        "SELECT first_id FROM queue_dedup WHERE user = ? AND message_id = ? AND recipients = ? AND created_at >= ?",
        (*key, since),
    ).fetchone()
    if row is None:
        return None
    cursor = conn.execute("UPDATE queue_messages SET duplicates = duplicates + 1 WHERE id = ?", (row[0],))
    # A first message whose row is gone cannot answer for the resent one.
    return row[0] if cursor.rowcount else None


def insert_messages(
    conn: sqlite3.Connection, messages: Sequence[NewMessage], dedup_window: float = 0
) -> list[int | Duplicate]:
    """
    Insert a batch of new messages; returns their arrival sequence
    numbers, or a L{Duplicate} for a message resent within C{dedup_window}
    seconds (0: none is), which is not inserted.
    """
    seqs: list[int | Duplicate] = []
    for m in messages:
        key = dedup_key(m) if dedup_window > 0 else None
        if key is not None:
            first = _first_of(conn, key, m.created_at - dedup_window)
            if first is not None:
                seqs.append(Duplicate(first))
                continue
            conn.execute(
                "INSERT OR REPLACE INTO queue_dedup (user, message_id, recipients, first_id, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (*key, m.id, m.created_at),
            )
        cursor = conn.execute(
            "INSERT INTO queue_messages (id, user, mail_from, header_from, subject, priority, status, "
            "campaign_name, campaign_code, schedule_at, next_attempt, size, internal, created_at, updated_at, sandbox) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                m.id, m.user, m.mail_from, m.header_from, m.subject, m.priority, m.status,
                m.campaign_name, m.campaign_code, m.schedule_at, m.schedule_at, m.size,
                int(m.internal), m.created_at, m.created_at, int(m.sandbox),
            ),
        )
        seqs.append(cursor.lastrowid)
        conn.executemany(
            "INSERT INTO queue_recipients (message_id, idx, address, status) VALUES (?, ?, ?, 'queued')",
            [(m.id, i, address) for i, address in enumerate(m.recipients)],
        )
    return seqs


def as_row(m: NewMessage) -> dict[str, Any]:
    """What L{load_message} returns for C{m} right after L{insert_messages}."""
    return {
        "seq": None,
        "id": m.id,
        "user": m.user,
        "mail_from": m.mail_from,
        "header_from": m.header_from,
        "subject": m.subject,
        "priority": m.priority,
        "status": m.status,
        "campaign_name": m.campaign_name,
        "campaign_code": m.campaign_code,
        "schedule_at": m.schedule_at,
        "next_attempt": m.schedule_at,
        "size": m.size,
        "internal": int(m.internal),
        "delay_notified": 0,
        "duplicates": 0,
        "created_at": m.created_at,
        "updated_at": m.created_at,
        "sandbox": int(m.sandbox),
        "recipients": [
            {"idx": i, "address": address, "status": "queued", "attempts": 0, "last_response": None, "next_attempt": None}
            for i, address in enumerate(m.recipients)
        ],
    }


def prune_dedup(conn: sqlite3.Connection, before: float, limit: int) -> int:
    """Forget at most C{limit} dedup records older than C{before}, oldest first; returns how many."""
    cursor = conn.execute(
        "DELETE FROM queue_dedup WHERE rowid IN "
        "(SELECT rowid FROM queue_dedup WHERE created_at < ? ORDER BY created_at LIMIT ?)",
        (before, limit),
    )
    return cursor.rowcount


def schedule_row(m: NewMessage, seq: int) -> dict[str, Any]:
    """The scheduling row of C{m} once inserted as number C{seq}."""
    return {"id": m.id, "seq": seq, "user": m.user, "priority": m.priority, "next_attempt": m.schedule_at}


def recover(conn: sqlite3.Connection, now: float) -> list[dict[str, Any]]:
    """
    At start-up: whatever was in flight when the daemon died goes back to
    the ready set (delivery is at least once).  Returns every active
    message's scheduling data, in arrival order.
    """
    with conn:
        conn.execute(
            "UPDATE queue_recipients SET status = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END "
            "WHERE status = 'sending'"
        )
        conn.execute(
            "UPDATE queue_messages SET status = 'queued', next_attempt = NULL, updated_at = ? WHERE status = 'sending'",
            (now,),
        )
    rows = conn.execute(
        "SELECT id, seq, user, priority, next_attempt FROM queue_messages WHERE status IN (?, ?, ?, ?) ORDER BY seq",
        ACTIVE,
    ).fetchall()
    return [dict(row) for row in rows]


def statuses(conn: sqlite3.Connection, message_ids: Sequence[str]) -> dict[str, str]:
    """The status of each of C{message_ids} that has a queue row."""
    found: dict[str, str] = {}
    for start in range(0, len(message_ids), 500):
        chunk = message_ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(f"SELECT id, status FROM queue_messages WHERE id IN ({marks})", chunk).fetchall()
        found.update((row[0], row[1]) for row in rows)
    return found


def _recipients(conn: sqlite3.Connection, message_id: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT idx, address, status, attempts, last_response, next_attempt FROM queue_recipients "
        "WHERE message_id = ? ORDER BY idx",
        (message_id,),
    ).fetchall()
    return [dict(row) for row in rows]


def load_message(conn: sqlite3.Connection, message_id: str) -> dict[str, Any] | None:
    """One message row with its recipients, or None."""
    row = conn.execute("SELECT * FROM queue_messages WHERE id = ?", (message_id,)).fetchone()
    if row is None:
        return None
    message = dict(row)
    message["recipients"] = _recipients(conn, message_id)
    return message


def load_messages(conn: sqlite3.Connection, message_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """L{load_message} of each of C{message_ids} that has a row, by id."""
    found = {}
    for message_id in message_ids:
        message = load_message(conn, message_id)
        if message is not None:
            found[message_id] = message
    return found


def list_messages(conn: sqlite3.Connection, where: MessageFilter, limit: int) -> list[dict[str, Any]]:
    """Messages newest first (by arrival), filtered as L{MessageFilter} says."""
    clauses: list[str] = []
    args: list[Any] = []
    for clause, value in (
        ("user = ?", where.user),
        ("status = ?", where.status),
        ("campaign_code = ?", where.campaign_code),
        ("created_at >= ?", where.since),
        ("created_at < ?", where.until),
        ("seq < ?", where.before),
        ("id IN (SELECT message_id FROM queue_recipients WHERE address = ? COLLATE NOCASE)", where.recipient),
    ):
        if value is not None:
            clauses.append(clause)
            args.append(value)
    condition = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(f"SELECT * FROM queue_messages {condition} ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
    result = []
    for row in rows:
        message = dict(row)
        message["recipients"] = _recipients(conn, message["id"])
        result.append(message)
    return result


def count_active(conn: sqlite3.Connection) -> dict[tuple[str, int], int]:
    """How many messages are in each active status, per priority (through the status index)."""
    rows = conn.execute(
        f"SELECT status, priority, COUNT(*) FROM queue_messages WHERE status IN ({', '.join('?' * len(ACTIVE))}) "
        "GROUP BY status, priority",
        ACTIVE,
    )
    return {(status, priority): count for status, priority, count in rows}


def count_urgent(conn: sqlite3.Connection, user: str, since: float) -> int:
    """How many of C{user}'s own messages at priority 1 arrived from C{since} on (the partial index)."""
    row = conn.execute(
        "SELECT COUNT(*) FROM queue_messages WHERE user = ? AND created_at >= ? AND priority = 1 AND internal = 0",
        (user, since),
    ).fetchone()
    return int(row[0])


def _status(conn: sqlite3.Connection, message_id: str) -> str | None:
    row = conn.execute("SELECT status FROM queue_messages WHERE id = ?", (message_id,)).fetchone()
    return None if row is None else row[0]


def retry_message(conn: sqlite3.Connection, message_id: str, now: float) -> tuple[str, dict[str, Any]] | None:
    """
    A scheduled or deferred message becomes due at C{now} (a scheduled one
    turns C{queued}); others are left alone.  Returns the status it had and
    the message as stored, or None when there is none.
    """
    status = _status(conn, message_id)
    if status is None:
        return None
    if status in WAITING:
        conn.execute(
            "UPDATE queue_messages SET status = CASE status WHEN 'scheduled' THEN 'queued' ELSE status END, "
            "next_attempt = ?, updated_at = ? WHERE id = ?",
            (now, now, message_id),
        )
        conn.execute(
            "UPDATE queue_recipients SET next_attempt = ? WHERE message_id = ? AND status = 'deferred'",
            (now, message_id),
        )
    message = load_message(conn, message_id)
    assert message is not None
    return status, message


def delete_message(conn: sqlite3.Connection, message_id: str, now: float) -> tuple[str, dict[str, Any]] | None:
    """
    A message in a L{DELETABLE} status becomes C{deleted}, and so do its
    unfinished recipients; others are left alone.  Returns the status it
    had and the message as stored, or None when there is none.
    """
    status = _status(conn, message_id)
    if status is None:
        return None
    if status in DELETABLE:
        conn.execute(
            "UPDATE queue_messages SET status = 'deleted', next_attempt = NULL, updated_at = ? WHERE id = ?",
            (now, message_id),
        )
        conn.execute(
            "UPDATE queue_recipients SET status = 'deleted', next_attempt = NULL "
            "WHERE message_id = ? AND status NOT IN ('sent', 'bounced')",
            (message_id,),
        )
    message = load_message(conn, message_id)
    assert message is not None
    return status, message


def mark_sending(conn: sqlite3.Connection, message_id: str, now: float) -> None:
    """Mark an active message and its unfinished recipients C{sending}."""
    conn.execute(
        "UPDATE queue_messages SET status = 'sending', updated_at = ? WHERE id = ? AND status IN (?, ?, ?, ?)",
        (now, message_id, *ACTIVE),
    )
    conn.execute(
        f"UPDATE queue_recipients SET status = 'sending' WHERE message_id = ? "
        f"AND status NOT IN ({', '.join('?' * len(FINAL_RECIPIENT))})",
        (message_id, *FINAL_RECIPIENT),
    )


@attrs.frozen
class RecipientUpdate:
    """The outcome of one attempt for one recipient."""

    idx: int
    status: str
    attempts: int
    last_response: str
    next_attempt: float | None


def finish_attempt(
    conn: sqlite3.Connection,
    message: dict[str, Any],
    status: str,
    next_attempt: float | None,
    updates: Sequence[RecipientUpdate],
    delay_notified: bool,
    now: float,
) -> None:
    """
    Store the outcome of one delivery attempt.  A message whose row is gone
    (the database was lost during the attempt) gets it back, from what the
    attempt knew: its spool file is not queued twice.
    """
    message_id = message["id"]
    cursor = conn.execute(
        "UPDATE queue_messages SET status = ?, next_attempt = ?, delay_notified = MAX(delay_notified, ?), "
        "updated_at = ? WHERE id = ?",
        (status, next_attempt, int(delay_notified), now, message_id),
    )
    if cursor.rowcount == 0:
        _reinsert(conn, message, status, next_attempt, delay_notified, now)
    conn.executemany(
        "UPDATE queue_recipients SET status = ?, attempts = ?, last_response = ?, next_attempt = ? "
        "WHERE message_id = ? AND idx = ?",
        [(u.status, u.attempts, u.last_response, u.next_attempt, message_id, u.idx) for u in updates],
    )


def _reinsert(
    conn: sqlite3.Connection, message: dict[str, Any], status: str, next_attempt: float | None, delay_notified: bool, now: float
) -> None:
    log.warn(
        "message {id} had no queue entry: rebuilt from its delivery attempt (status {status})",
        id=message["id"],
        status=status,
    )
    conn.execute(
        "INSERT INTO queue_messages (id, user, mail_from, header_from, subject, priority, status, "
        "campaign_name, campaign_code, schedule_at, next_attempt, size, internal, delay_notified, duplicates, "
        "created_at, updated_at, sandbox) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            message["id"], message["user"], message["mail_from"], message["header_from"], message["subject"],
            message["priority"], status, message["campaign_name"], message["campaign_code"], message["schedule_at"],
            next_attempt, message["size"], int(message["internal"]), int(delay_notified or message["delay_notified"]),
            message.get("duplicates", 0), message["created_at"], now, int(message.get("sandbox", 0)),
        ),
    )
    conn.executemany(
        "INSERT INTO queue_recipients (message_id, idx, address, status, attempts, last_response, next_attempt) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (message["id"], r["idx"], r["address"], r["status"], r["attempts"], r["last_response"], r["next_attempt"])
            for r in message["recipients"]
        ],
    )


# State changes are named tuples rather than attrs classes: two are made
# per delivered message, and a tuple costs the fewest calls to build.
class MarkSending(NamedTuple):
    """A state change: an attempt of C{message_id} started at C{now}."""

    message_id: str
    now: float


class FinishAttempt(NamedTuple):
    """A state change: the outcome of one attempt (see L{finish_attempt})."""

    message: dict[str, Any]
    status: str
    next_attempt: float | None
    updates: Sequence[RecipientUpdate]
    delay_notified: bool
    now: float


StateChange = MarkSending | FinishAttempt


def apply_change(conn: sqlite3.Connection, change: StateChange) -> None:
    """Write one state change."""
    if isinstance(change, MarkSending):
        mark_sending(conn, change.message_id, change.now)
    else:
        finish_attempt(
            conn, change.message, change.status, change.next_attempt, change.updates, change.delay_notified, change.now
        )


def apply_changes(conn: sqlite3.Connection, changes: Sequence[StateChange]) -> list[BaseException | None]:
    """
    Apply C{changes} in one transaction, each in a savepoint so that one
    failing change is undone alone.  Returns its error or None per change.
    """
    errors: list[BaseException | None] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for change in changes:
            conn.execute("SAVEPOINT change")
            try:
                apply_change(conn, change)
            except sqlite3.Error as e:
                conn.execute("ROLLBACK TO change")
                errors.append(e)
            else:
                errors.append(None)
            conn.execute("RELEASE change")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return errors


@implementer(IQueueStore)
class SQLiteQueueStore:
    """The queue tables of the daemon's SQLite database."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def migrate(self) -> None:
        """Create or upgrade the tables; synchronous, at start-up."""
        self._database.migrate(COMPONENT, MIGRATIONS)

    def recover(self, now: float) -> list[dict[str, Any]]:
        return self._database.run_sync(recover, now)

    def insert(self, messages: list[NewMessage], dedup_window: float = 0) -> Deferred[list[int | Duplicate]]:
        return self._database.transaction(insert_messages, messages, dedup_window)

    def prune_dedup(self, before: float, limit: int) -> Deferred[int]:
        return self._database.transaction(prune_dedup, before, limit)

    def statuses(self, message_ids: list[str]) -> Deferred[dict[str, str]]:
        return self._database.run(statuses, message_ids)

    def load_message(self, message_id: str) -> Deferred[dict[str, Any] | None]:
        return self._database.run(load_message, message_id)

    def load_for_attempts(self, message_ids: list[str]) -> Deferred[dict[str, dict[str, Any]]]:
        # One node: every message is its own.
        return self._database.run(load_messages, message_ids)

    def list_messages(self, where: MessageFilter, limit: int) -> Deferred[list[dict[str, Any]]]:
        return self._database.run(list_messages, where, limit)

    def retry_message(self, message_id: str, now: float) -> Deferred[tuple[str, dict[str, Any]] | None]:
        return self._database.transaction(retry_message, message_id, now)

    def delete_message(self, message_id: str, now: float) -> Deferred[tuple[str, dict[str, Any]] | None]:
        return self._database.transaction(delete_message, message_id, now)

    def count_urgent(self, user: str, since: float) -> Deferred[int]:
        return self._database.run(count_urgent, user, since)

    def count_active(self) -> Deferred[dict[tuple[str, int], int]]:
        """The queue's size per active status and priority, for the metrics."""
        return self._database.run(count_active)

    def write_state(self, changes: list[StateChange]) -> Deferred[list[BaseException | None]]:
        return self._database.write(apply_changes, changes)

    def on_reset(self, listener: Callable[[], object]) -> None:
        self._database.on_reopen(listener)


class StateWriter:
    """
    Writes delivery state changes (attempt started, attempt finished) in
    group commits, as the L{Committer} does for new messages: one
    transaction, one sync, for every change that arrived meanwhile.  An
    attempt that ends before its start was written (the next hop answered
    while an earlier batch was being committed) skips that write: the
    message goes from queued to its outcome, and a statement per message
    is saved under load.

    Recovery does not depend on it: a change lost in a crash leaves the
    message active on disk, and it is tried again (at least once).
    """

    def __init__(self, store: IQueueStore) -> None:
        self._store = store
        self._batcher: Batcher[StateChange] = Batcher(self._apply)
        # Messages whose MarkSending waits for a batch.
        self._marking: set[str] = set()
        self.batches = 0

    def _apply(self, changes: list[StateChange]) -> Deferred[list[BaseException | None]]:
        self.batches += 1
        for change in changes:
            if isinstance(change, MarkSending):
                self._marking.discard(change.message_id)
        return self._store.write_state(changes)

    def write(self, change: StateChange) -> Deferred[None]:
        """Queue C{change}; fires once it is committed (or found unneeded), fails with its own error."""
        if isinstance(change, MarkSending):
            self._marking.add(change.message_id)
        elif change.message["id"] in self._marking:
            message_id = change.message["id"]
            self._marking.discard(message_id)
            self._batcher.withdraw(lambda c: isinstance(c, MarkSending) and c.message_id == message_id)
        return self._batcher.add(change)


# Records a batch of durable messages, each with its bytes when they were
# held in memory: inserts their rows and hands them to the scheduler.
# Fires with their arrival sequence numbers, or a Duplicate for a message
# resent within the dedup window (not queued; its file removed).
RecordMessages = Callable[[list[tuple[NewMessage, "bytes | None"]]], Deferred[list["int | Duplicate"]]]


class Committer:
    """
    Makes accepted messages durable in batches: every message that reaches
    the end of DATA while a batch is being synced joins the next batch, so
    concurrent sessions share one directory fsync and one transaction.
    C{record(batch)} inserts the queue rows of a synced batch and schedules
    them: in one process, the delivery's own; in an SMTP worker, a call to
    the coordinator that owns the queue.  A message it answers with a
    L{Duplicate} (resent within the dedup window; the recorder removed its
    file) is answered with the first message's id.

    @ivar batches: how many batches were committed (observable in tests).
    """

    def __init__(self, run_in_thread: RunInThread, spool: Spool, record: RecordMessages) -> None:
        self._in_thread = run_in_thread
        self._spool = spool
        self._record = record
        # Two stages, each one batch at a time: files are synced while the
        # previous batch's rows are being recorded.  Recording is a round
        # trip to another process in a worker; waiting for it before the
        # next fsync would leave the disk idle and the batches small.
        self._waiting: list[tuple[TempMessage, NewMessage, Deferred[str]]] = []
        self._syncing: list[tuple[TempMessage, NewMessage, Deferred[str]]] = []
        self._synced: list[tuple[TempMessage, NewMessage, Deferred[str]]] = []
        self._recording: list[tuple[TempMessage, NewMessage, Deferred[str]]] = []
        self._sync_busy = False
        self._record_busy = False
        self.batches = 0

    def committing(self) -> set[str]:
        """The ids of the messages being committed: their files may be in C{msg/} before their rows exist."""
        entries = self._waiting + self._syncing + self._synced + self._recording
        return {message.id for _, message, _ in entries}

    def commit(self, temp: TempMessage, message: NewMessage) -> Deferred[str]:
        """Fires with the queue id once file and record are durable."""
        d: Deferred[str] = Deferred()
        temp.envelope = message
        self._waiting.append((temp, message, d))
        if not self._sync_busy:
            self._sync_batches()
        return d

    @inlineCallbacks
    def _sync_batches(self) -> Any:
        self._sync_busy = True
        try:
            while self._waiting:
                self._syncing, self._waiting = self._waiting, []
                synced = yield self._sync(self._syncing)
                self._syncing = []
                if synced:
                    self._synced += synced
                    if not self._record_busy:
                        self._record_batches()
        finally:
            self._syncing = []
            self._sync_busy = False

    @inlineCallbacks
    def _sync(self, batch: list[tuple[TempMessage, NewMessage, Deferred[str]]]) -> Any:
        """Make a batch's files durable; fails the messages that could not be, returns the others."""
        try:
            errors = yield self._in_thread(self._spool.make_durable, [temp for temp, _, _ in batch])
        except Exception as e:
            errors = [e] * len(batch)
        for (_, message, d), error in zip(batch, errors, strict=True):
            if error is not None:
                log.error("cannot store message {id}: {error}", id=message.id, error=error)
                d.errback(local_failure(error))
        return [entry for entry, error in zip(batch, errors, strict=True) if error is None]

    @inlineCallbacks
    def _record_batches(self) -> Any:
        self._record_busy = True
        try:
            while self._synced:
                # Every batch synced meanwhile: one transaction for all.
                self._recording, self._synced = self._synced, []
                yield self._record_batch(self._recording)
        finally:
            self._recording = []
            self._record_busy = False

    @inlineCallbacks
    def _record_batch(self, synced: list[tuple[TempMessage, NewMessage, Deferred[str]]]) -> Any:
        try:
            results = yield self._record([(message, temp.content) for temp, message, _ in synced])
        except Exception as e:
            log.error("cannot record {n} messages: {error}", n=len(synced), error=e)
            try:
                yield self._in_thread(lambda: [temp.discard() for temp, _, _ in synced])
            except Exception:
                log.failure("cannot remove unrecorded messages")
            for _, _, d in synced:
                d.errback(local_failure(e))
            return
        self.batches += 1
        for (_, message, d), result in zip(synced, results, strict=True):
            if isinstance(result, Duplicate):
                d.callback(result.first_id)
                continue
            d.callback(message.id)
