"""
The queue and the suppression list in PostgreSQL (C{[storage] backend =
"postgresql"}): L{PostgresQueueStore} and L{PostgresSuppressionList}, the
same interfaces and contract tests as their SQLite counterparts, on a
L{smtpplus.storage.postgres.PostgresDatabase}.  The schema comes from the
same migration lists (L{smtpplus.delivery.queue.MIGRATIONS},
L{smtpplus.delivery.suppressions.MIGRATIONS}).

Unlike the SQLite queue, this one keeps each message's content in the
database (C{queue_contents}), so that any node sharing it can deliver any
message: L{PostgresQueueStore.insert_with_content} writes the rows and the
bytes in one transaction, the durable point of an accepted message.

Functions taking C{conn} run on a database thread, each call one
transaction (see L{PostgresDatabase.run}).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row
from twisted.internet.defer import Deferred
from zope.interface import implementer

from smtpplus.delivery import dkim, queue, suppressions
from smtpplus.delivery.dkim import IDKIMStore, StoredKey
from smtpplus.delivery.interfaces import Duplicate, IContentStore, IQueueStore, ISharedQueueStore, MessageFilter
from smtpplus.delivery.queue import (
    ACTIVE,
    DELETABLE,
    FINAL_RECIPIENT,
    WAITING,
    FinishAttempt,
    MarkSending,
    NewMessage,
    RecipientUpdate,
    StateChange,
)
from smtpplus.interfaces import ISuppressionList
from smtpplus.model import Suppression
from smtpplus.storage.postgres import PostgresDatabase

Conn = psycopg.Connection[Any]

# What a message row is made of, as the SQLite store returns it: the claim
# columns (for the nodes) are not part of it.
_COLUMNS = (
    'seq, id, "user", mail_from, header_from, subject, priority, status, campaign_name, campaign_code, '
    "schedule_at, next_attempt, size, internal, delay_notified, duplicates, created_at, updated_at, sandbox"
)
_INSERT = (
    'INSERT INTO queue_messages (id, "user", mail_from, header_from, subject, priority, status, '
    "campaign_name, campaign_code, schedule_at, next_attempt, size, internal, delay_notified, created_at, updated_at, "
    "sandbox, claimed_by) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING seq"
)


def _first_of(conn: Conn, key: tuple[str, str, str], message_id: str, created_at: float, since: float) -> str | None:
    """
    The id of the message C{key} was accepted as since C{since}, counting
    one more duplicate of it; None when C{message_id} is the first, which
    is then recorded.  One statement on the unique index, so that two
    nodes inserting the same copy at once are serialised by its row lock.
    """
    row = conn.execute(
        'INSERT INTO queue_dedup ("user", message_id, recipients, first_id, created_at) VALUES (%s, %s, %s, %s, %s) '
        'ON CONFLICT ("user", message_id, recipients) DO UPDATE SET '
        "first_id = CASE WHEN queue_dedup.created_at < %s THEN excluded.first_id ELSE queue_dedup.first_id END, "
        "created_at = CASE WHEN queue_dedup.created_at < %s THEN excluded.created_at ELSE queue_dedup.created_at END "
        "RETURNING first_id",
        (*key, message_id, created_at, since, since),
    ).fetchone()
    assert row is not None
    first = row[0]
    if first == message_id:
        return None
    counted = conn.execute("UPDATE queue_messages SET duplicates = duplicates + 1 WHERE id = %s", (first,))
    if counted.rowcount:
        return first
    # A first message whose row is gone cannot answer for the resent one.
    conn.execute(
        'UPDATE queue_dedup SET first_id = %s, created_at = %s WHERE "user" = %s AND message_id = %s AND recipients = %s',
        (message_id, created_at, *key),
    )
    return None


def insert_messages(
    conn: Conn,
    messages: Sequence[NewMessage],
    contents: Sequence[bytes] | None = None,
    dedup_window: float = 0,
    node: str | None = None,
) -> list[int | Duplicate]:
    """
    Insert a batch of new messages (and their contents, when given),
    claimed by C{node}; returns their sequence numbers, or a L{Duplicate}
    for a message resent within C{dedup_window} seconds, which is not
    inserted.
    """
    seqs: list[int | Duplicate] = []
    kept: list[tuple[NewMessage, bytes | None]] = []
    with conn.cursor() as cursor:
        for n, m in enumerate(messages):
            key = queue.dedup_key(m) if dedup_window > 0 else None
            if key is not None:
                first = _first_of(conn, key, m.id, m.created_at, m.created_at - dedup_window)
                if first is not None:
                    seqs.append(Duplicate(first))
                    continue
            cursor.execute(
                _INSERT,
                (
                    m.id, m.user, m.mail_from, m.header_from, m.subject, m.priority, m.status,
                    m.campaign_name, m.campaign_code, m.schedule_at, m.schedule_at, m.size,
                    int(m.internal), 0, m.created_at, m.created_at, int(m.sandbox), node,
                ),
            )
            row = cursor.fetchone()
            assert row is not None
            seqs.append(row[0])
            kept.append((m, None if contents is None else contents[n]))
        cursor.executemany(
            "INSERT INTO queue_recipients (message_id, idx, address, status) VALUES (%s, %s, %s, 'queued')",
            [(m.id, i, address) for m, _ in kept for i, address in enumerate(m.recipients)],
        )
        if contents is not None:
            cursor.executemany(
                "INSERT INTO queue_contents (message_id, content) VALUES (%s, %s)",
                [(m.id, content) for m, content in kept],
            )
    return seqs


def prune_dedup(conn: Conn, before: float, limit: int) -> int:
    """Forget at most C{limit} dedup records older than C{before}, oldest first; returns how many."""
    cursor = conn.execute(
        "DELETE FROM queue_dedup WHERE ctid = ANY(ARRAY("
        "SELECT ctid FROM queue_dedup WHERE created_at < %s ORDER BY created_at LIMIT %s))",
        (before, limit),
    )
    return cursor.rowcount


def load_content(conn: Conn, message_id: str) -> bytes | None:
    """The bytes of C{message_id} as accepted, or None when the database has none."""
    row = conn.execute("SELECT content FROM queue_contents WHERE message_id = %s", (message_id,)).fetchone()
    return None if row is None else bytes(row[0])


def store_content(conn: Conn, message_id: str, content: bytes) -> None:
    """Keep C{content} for C{message_id} (whose row exists), replacing any held before."""
    conn.execute(
        "INSERT INTO queue_contents (message_id, content) VALUES (%s, %s) "
        "ON CONFLICT (message_id) DO UPDATE SET content = excluded.content",
        (message_id, content),
    )


def _release_attempts(conn: Conn, where: str, args: Sequence[Any], now: float) -> None:
    """Put the interrupted attempts (C{sending}) of the messages C{where} selects back in the queue."""
    conn.execute(
        "UPDATE queue_recipients SET status = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'queued' END "
        f"WHERE status = 'sending' AND message_id IN (SELECT id FROM queue_messages WHERE {where})",
        args,
    )
    conn.execute(
        "UPDATE queue_messages SET status = 'queued', next_attempt = NULL, updated_at = %s "
        f"WHERE status = 'sending' AND {where}",
        (now, *args),
    )


def recover(conn: Conn, now: float, node: str | None = None) -> list[dict[str, Any]]:
    """
    What L{smtpplus.delivery.queue.recover} does, for the messages of
    C{node}: those it claimed before it stopped, and any nobody claims.
    Another node's messages stay with it (or go to whoever takes them over
    once it is silent, see L{take_over}).
    """
    conn.execute(
        "UPDATE queue_messages SET claimed_by = %s WHERE claimed_by IS NULL AND status = ANY(%s)", (node, list(ACTIVE))
    )
    mine = "claimed_by IS NOT DISTINCT FROM %s"
    _release_attempts(conn, mine, (node,), now)
    with conn.cursor(row_factory=dict_row) as cursor:
        cursor.execute(
            f'SELECT id, seq, "user", priority, next_attempt FROM queue_messages WHERE status = ANY(%s) AND {mine} '
            "ORDER BY seq",
            (list(ACTIVE), node),
        )
        return cursor.fetchall()


def take_over(conn: Conn, node: str, silent_since: float, now: float, limit: int) -> list[dict[str, Any]]:
    """
    Claim for C{node} at most C{limit} unfinished messages (priority first)
    of the nodes whose heartbeat is older than C{silent_since}, or that
    left (no row in C{nodes}: stopped cleanly), or of nobody; their
    interrupted attempts go back in the queue.  Each row names the node
    it was taken from (C{previous}, None for nobody).  Rows another node is
    taking at the same moment are skipped (C{SKIP LOCKED}): each message
    gets one new owner.
    """
    with conn.cursor(row_factory=dict_row) as cursor:
        cursor.execute(
            "WITH victims AS (SELECT id, claimed_by AS previous FROM queue_messages WHERE status = ANY(%s) "
            "AND claimed_by IS DISTINCT FROM %s "
            "AND (claimed_by IS NULL OR claimed_by NOT IN (SELECT name FROM nodes WHERE last_seen >= %s)) "
            "ORDER BY priority, seq LIMIT %s FOR UPDATE SKIP LOCKED) "
            "UPDATE queue_messages q SET claimed_by = %s FROM victims v WHERE q.id = v.id "
            'RETURNING q.id, q.seq, q."user", q.priority, q.next_attempt, q.status, v.previous',
            (list(ACTIVE), node, silent_since, limit, node),
        )
        # RETURNING keeps no order: priority first, as they were chosen.
        rows = sorted(cursor.fetchall(), key=lambda row: (row["priority"], row["seq"]))
    interrupted = [row["id"] for row in rows if row["status"] == "sending"]
    if interrupted:
        _release_attempts(conn, "id = ANY(%s)", (interrupted,), now)
    for row in rows:
        if row.pop("status") == "sending":
            row["next_attempt"] = None
    return rows


def load_claimed(conn: Conn, message_ids: Sequence[str], node: str | None) -> dict[str, dict[str, Any]]:
    """L{load_message} of each of C{message_ids} that is C{node}'s to attempt (not taken by another node), by id."""
    with conn.cursor(row_factory=dict_row) as cursor:
        # One query for the usual case (the rows are this node's): a round
        # trip per query, not per message.
        cursor.execute(f"SELECT {_COLUMNS}, claimed_by FROM queue_messages WHERE id = ANY(%s)", (list(message_ids),))
        rows = cursor.fetchall()
    mine = []
    for row in rows:
        claimant = row.pop("claimed_by")
        if claimant is None and node is not None:
            # A row nobody claims (rebuilt after it was lost): the first node to load it takes it.
            taken = conn.execute(
                "UPDATE queue_messages SET claimed_by = COALESCE(claimed_by, %s) WHERE id = %s RETURNING claimed_by",
                (node, row["id"]),
            ).fetchone()
            claimant = None if taken is None else taken[0]
        if claimant == node:
            mine.append(row)
    return {row["id"]: row for row in _with_recipients(conn, mine)} if mine else {}


def statuses(conn: Conn, message_ids: Sequence[str]) -> dict[str, str]:
    """The status of each of C{message_ids} that has a queue row."""
    rows = conn.execute("SELECT id, status FROM queue_messages WHERE id = ANY(%s)", (list(message_ids),)).fetchall()
    return {row[0]: row[1] for row in rows}


def _with_recipients(conn: Conn, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Attach each message's recipients, in index order, with one query for the lot."""
    if not messages:
        return messages
    by_id = {m["id"]: m for m in messages}
    for m in messages:
        m["recipients"] = []
    with conn.cursor(row_factory=dict_row) as cursor:
        cursor.execute(
            "SELECT message_id, idx, address, status, attempts, last_response, next_attempt FROM queue_recipients "
            "WHERE message_id = ANY(%s) ORDER BY message_id, idx",
            (list(by_id),),
        )
        for row in cursor:
            by_id[row.pop("message_id")]["recipients"].append(row)
    return messages


def load_message(conn: Conn, message_id: str) -> dict[str, Any] | None:
    """One message row with its recipients, or None."""
    with conn.cursor(row_factory=dict_row) as cursor:
        cursor.execute(f"SELECT {_COLUMNS} FROM queue_messages WHERE id = %s", (message_id,))
        row = cursor.fetchone()
    return None if row is None else _with_recipients(conn, [row])[0]


def list_messages(conn: Conn, where: MessageFilter, limit: int) -> list[dict[str, Any]]:
    """Messages newest first (by arrival), filtered as L{MessageFilter} says."""
    clauses: list[str] = []
    args: list[Any] = []
    for clause, value in (
        ('"user" = %s', where.user),
        ("status = %s", where.status),
        ("campaign_code = %s", where.campaign_code),
        ("created_at >= %s", where.since),
        ("created_at < %s", where.until),
        ("seq < %s", where.before),
        # ASCII letters folded, as SQLite's NOCASE (the column's collation is C).
        ("id IN (SELECT message_id FROM queue_recipients WHERE lower(address) = lower(%s::text COLLATE \"C\"))",
         where.recipient),
    ):
        if value is not None:
            clauses.append(clause)
            args.append(value)
    condition = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    with conn.cursor(row_factory=dict_row) as cursor:
        cursor.execute(f"SELECT {_COLUMNS} FROM queue_messages {condition} ORDER BY seq DESC LIMIT %s", (*args, limit))
        rows = cursor.fetchall()
    return _with_recipients(conn, rows)


def count_active(conn: Conn) -> dict[tuple[str, int], int]:
    """How many messages are in each active status, per priority."""
    rows = conn.execute(
        "SELECT status, priority, COUNT(*) FROM queue_messages WHERE status = ANY(%s) GROUP BY status, priority",
        (list(ACTIVE),),
    ).fetchall()
    return {(status, priority): count for status, priority, count in rows}


def count_urgent(conn: Conn, user: str, since: float) -> int:
    """How many of C{user}'s own messages at priority 1 arrived from C{since} on (the partial index)."""
    row = conn.execute(
        'SELECT COUNT(*) FROM queue_messages WHERE "user" = %s AND created_at >= %s AND priority = 1 AND internal = 0',
        (user, since),
    ).fetchone()
    assert row is not None
    return int(row[0])


def _lock_status(conn: Conn, message_id: str) -> str | None:
    # FOR UPDATE: the check and the change that follows see the same row,
    # whichever node (or admin call) writes it meanwhile.
    row = conn.execute("SELECT status FROM queue_messages WHERE id = %s FOR UPDATE", (message_id,)).fetchone()
    return None if row is None else row[0]


def retry_message(conn: Conn, message_id: str, now: float, node: str | None = None) -> tuple[str, dict[str, Any]] | None:
    """
    What L{smtpplus.delivery.queue.retry_message} does; the waiting
    message becomes C{node}'s, the node whose admin API was asked and
    which attempts it now (its former owner's timer finds it gone).
    """
    status = _lock_status(conn, message_id)
    if status is None:
        return None
    if status in WAITING:
        conn.execute(
            "UPDATE queue_messages SET status = CASE status WHEN 'scheduled' THEN 'queued' ELSE status END, "
            "next_attempt = %s, updated_at = %s, claimed_by = %s WHERE id = %s",
            (now, now, node, message_id),
        )
        conn.execute(
            "UPDATE queue_recipients SET next_attempt = %s WHERE message_id = %s AND status = 'deferred'",
            (now, message_id),
        )
    message = load_message(conn, message_id)
    assert message is not None
    return status, message


def delete_message(conn: Conn, message_id: str, now: float) -> tuple[str, dict[str, Any]] | None:
    """What L{smtpplus.delivery.queue.delete_message} does."""
    status = _lock_status(conn, message_id)
    if status is None:
        return None
    if status in DELETABLE:
        conn.execute(
            "UPDATE queue_messages SET status = 'deleted', next_attempt = NULL, updated_at = %s WHERE id = %s",
            (now, message_id),
        )
        conn.execute(
            "UPDATE queue_recipients SET status = 'deleted', next_attempt = NULL "
            "WHERE message_id = %s AND status NOT IN ('sent', 'bounced')",
            (message_id,),
        )
    message = load_message(conn, message_id)
    assert message is not None
    return status, message


def mark_sending(conn: Conn, message_id: str, now: float) -> None:
    """Mark an active message and its unfinished recipients C{sending} (one statement: one round trip)."""
    conn.execute(
        "WITH m AS (UPDATE queue_messages SET status = 'sending', updated_at = %s WHERE id = %s AND status = ANY(%s)) "
        "UPDATE queue_recipients SET status = 'sending' WHERE message_id = %s AND status <> ALL(%s)",
        (now, message_id, list(ACTIVE), message_id, list(FINAL_RECIPIENT)),
    )


def finish_attempt(
    conn: Conn,
    message: dict[str, Any],
    status: str,
    next_attempt: float | None,
    updates: Sequence[RecipientUpdate],
    delay_notified: bool,
    now: float,
) -> None:
    """What L{smtpplus.delivery.queue.finish_attempt} does: a lost row comes back from the attempt."""
    cursor = conn.execute(
        "UPDATE queue_messages SET status = %s, next_attempt = %s, delay_notified = GREATEST(delay_notified, %s), "
        "updated_at = %s WHERE id = %s",
        (status, next_attempt, int(delay_notified), now, message["id"]),
    )
    if cursor.rowcount == 0:
        _reinsert(conn, message, status, next_attempt, delay_notified, now)
    with conn.cursor() as many:
        many.executemany(
            "UPDATE queue_recipients SET status = %s, attempts = %s, last_response = %s, next_attempt = %s "
            "WHERE message_id = %s AND idx = %s",
            [(u.status, u.attempts, u.last_response, u.next_attempt, message["id"], u.idx) for u in updates],
        )


def _reinsert(
    conn: Conn, message: dict[str, Any], status: str, next_attempt: float | None, delay_notified: bool, now: float
) -> None:
    queue.log.warn(
        "message {id} had no queue entry: rebuilt from its delivery attempt (status {status})",
        id=message["id"],
        status=status,
    )
    conn.execute(
        _INSERT,
        (
            message["id"], message["user"], message["mail_from"], message["header_from"], message["subject"],
            message["priority"], status, message["campaign_name"], message["campaign_code"], message["schedule_at"],
            next_attempt, message["size"], int(message["internal"]), int(delay_notified or message["delay_notified"]),
            # Unclaimed: the node finishing the attempt claims it on its next load.
            message["created_at"], now, int(message.get("sandbox", 0)), None,
        ),
    )
    with conn.cursor() as many:
        many.executemany(
            "INSERT INTO queue_recipients (message_id, idx, address, status, attempts, last_response, next_attempt) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [
                (message["id"], r["idx"], r["address"], r["status"], r["attempts"], r["last_response"], r["next_attempt"])
                for r in message["recipients"]
            ],
        )


def _apply(conn: Conn, change: StateChange) -> None:
    if isinstance(change, MarkSending):
        mark_sending(conn, change.message_id, change.now)
    else:
        assert isinstance(change, FinishAttempt)
        finish_attempt(
            conn, change.message, change.status, change.next_attempt, change.updates, change.delay_notified, change.now
        )


def apply_changes(conn: Conn, changes: Sequence[StateChange]) -> list[BaseException | None]:
    """
    Apply C{changes} in the call's transaction; one failing change is
    undone alone.  Returns its error or None per change.

    All of them go first under one savepoint: a savepoint per change
    would cost two more round trips each, and a change almost never
    fails.  Only when one does is the batch undone and applied again a
    change per savepoint, to tell which.
    """
    try:
        with conn.transaction():
            for change in changes:
                _apply(conn, change)
        return [None] * len(changes)
    except psycopg.OperationalError:
        # The connection, not a change: the batch fails as a whole.
        raise
    except psycopg.Error:
        pass
    errors: list[BaseException | None] = []
    for change in changes:
        try:
            with conn.transaction():
                _apply(conn, change)
        except psycopg.OperationalError:
            raise
        except psycopg.Error as e:
            errors.append(e)
        else:
            errors.append(None)
    return errors


@implementer(IQueueStore, IContentStore, ISharedQueueStore)
class PostgresQueueStore:
    """The queue tables, with each message's content, in PostgreSQL."""

    def __init__(self, database: PostgresDatabase, node: str | None = None) -> None:
        self._database = database
        self.node = node

    def migrate(self) -> None:
        """Create or upgrade the tables; synchronous, at start-up."""
        self._database.migrate(queue.COMPONENT, queue.MIGRATIONS)

    def recover(self, now: float) -> list[dict[str, Any]]:
        return self._database.run_sync(recover, now, self.node)

    def take_over(self, silent_since: float, now: float, limit: int = 1000) -> Deferred[list[dict[str, Any]]]:
        """Claim unfinished messages of the nodes silent since C{silent_since} (see L{take_over})."""
        assert self.node is not None
        return self._database.write(take_over, self.node, silent_since, now, limit)

    def load_for_attempts(self, message_ids: list[str]) -> Deferred[dict[str, dict[str, Any]]]:
        return self._database.run(load_claimed, message_ids, self.node)

    def insert(self, messages: list[NewMessage], dedup_window: float = 0) -> Deferred[list[int | Duplicate]]:
        return self._database.transaction(insert_messages, messages, None, dedup_window, self.node)

    def insert_with_content(
        self, batch: list[tuple[NewMessage, bytes]], dedup_window: float = 0
    ) -> Deferred[list[int | Duplicate]]:
        """
        Insert new messages with their bytes in one transaction (all or
        none): once it commits, any node can deliver them.  Fires with their
        arrival sequence numbers (or L{Duplicate}s), in order.
        """
        messages = [message for message, _ in batch]
        contents = [content for _, content in batch]
        return self._database.transaction(insert_messages, messages, contents, dedup_window, self.node)

    def prune_dedup(self, before: float, limit: int) -> Deferred[int]:
        return self._database.transaction(prune_dedup, before, limit)

    def store_content(self, message_id: str, content: bytes) -> Deferred[None]:
        """Keep the bytes of a message whose row exists (replacing any held)."""
        return self._database.transaction(store_content, message_id, content)

    def load_content(self, message_id: str) -> Deferred[bytes | None]:
        """The bytes of C{message_id}, or None when the database holds none."""
        return self._database.run(load_content, message_id)

    def statuses(self, message_ids: list[str]) -> Deferred[dict[str, str]]:
        return self._database.run(statuses, message_ids)

    def load_message(self, message_id: str) -> Deferred[dict[str, Any] | None]:
        return self._database.run(load_message, message_id)

    def list_messages(self, where: MessageFilter, limit: int) -> Deferred[list[dict[str, Any]]]:
        return self._database.run(list_messages, where, limit)

    def retry_message(self, message_id: str, now: float) -> Deferred[tuple[str, dict[str, Any]] | None]:
        return self._database.transaction(retry_message, message_id, now, self.node)

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
        # The rows live in the server, not in a file that can be replaced
        # under the daemon: an outage ends with the same rows, nothing to rebuild.
        pass


def _find(conn: Conn, user: str, address: str) -> Suppression | None:
    row = conn.execute(
        'SELECT address, reason, created_at FROM suppressions WHERE lower("user") = lower(%s::text COLLATE "C") '
        "AND address = %s",
        (user, address),
    ).fetchone()
    return None if row is None else Suppression(*row)


def _add(conn: Conn, user: str, address: str, reason: str, created_at: float) -> Suppression:
    conn.execute(
        'INSERT INTO suppressions ("user", address, reason, created_at) VALUES (%s, %s, %s, %s) '
        'ON CONFLICT (lower("user"), address) DO UPDATE SET reason = excluded.reason, created_at = excluded.created_at',
        (user, address, reason, created_at),
    )
    return Suppression(address, reason, created_at)


def _remove(conn: Conn, user: str, address: str) -> bool:
    cursor = conn.execute(
        'DELETE FROM suppressions WHERE lower("user") = lower(%s::text COLLATE "C") AND address = %s', (user, address)
    )
    return cursor.rowcount > 0


def _list(conn: Conn, user: str) -> list[Suppression]:
    rows = conn.execute(
        'SELECT address, reason, created_at FROM suppressions WHERE lower("user") = lower(%s::text COLLATE "C") '
        "ORDER BY address",
        (user,),
    ).fetchall()
    return [Suppression(*row) for row in rows]


@implementer(ISuppressionList)
class PostgresSuppressionList:
    """The suppression list in PostgreSQL, shared by every node."""

    def __init__(self, database: PostgresDatabase) -> None:
        self._database = database

    def migrate(self) -> None:
        """Create or upgrade the table; synchronous, at start-up."""
        self._database.migrate(suppressions.COMPONENT, suppressions.MIGRATIONS)

    def find(self, user: str, address: str) -> Deferred[Suppression | None]:
        return self._database.run(_find, user, suppressions.address_key(address))

    def add(self, user: str, address: str, reason: str, created_at: float) -> Deferred[Suppression]:
        return self._database.write(_add, user, suppressions.address_key(address), reason, created_at)

    def remove(self, user: str, address: str) -> Deferred[bool]:
        return self._database.write(_remove, user, suppressions.address_key(address))

    def list(self, user: str) -> Deferred[list[Suppression]]:
        return self._database.run(_list, user)


def _dkim_key(row: dict[str, Any]) -> StoredKey:
    return StoredKey(**{**row, "enabled": bool(row["enabled"])})


def _dkim_load_all(conn: Conn) -> list[StoredKey]:
    with conn.cursor(row_factory=dict_row) as cursor:
        return [_dkim_key(row) for row in cursor.execute("SELECT * FROM dkim_keys ORDER BY domain")]


def _dkim_insert(conn: Conn, key: StoredKey) -> bool:
    cursor = conn.execute(
        "INSERT INTO dkim_keys (domain, selector, algorithm, private_key, public_key, enabled, created_at) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (domain) DO NOTHING",
        (key.domain, key.selector, key.algorithm, key.private_key, key.public_key, int(key.enabled), key.created_at),
    )
    return cursor.rowcount == 1


def _dkim_set_enabled(conn: Conn, domain: str, enabled: bool) -> StoredKey | None:
    with conn.cursor(row_factory=dict_row) as cursor:
        row = cursor.execute(
            "UPDATE dkim_keys SET enabled = %s WHERE domain = %s RETURNING *", (int(enabled), domain)
        ).fetchone()
    return None if row is None else _dkim_key(row)


def _dkim_delete(conn: Conn, domain: str) -> bool:
    return conn.execute("DELETE FROM dkim_keys WHERE domain = %s", (domain,)).rowcount == 1


@implementer(IDKIMStore)
class PostgresDKIMStore:
    """
    The signing keys in PostgreSQL, shared by every node (a key made
    through one node's API signs on all); a plain column, readable only by
    the database role the nodes use.
    """

    def __init__(self, database: PostgresDatabase) -> None:
        self._database = database

    def migrate(self) -> None:
        """Create or upgrade the table; synchronous, at start-up."""
        self._database.migrate(dkim.COMPONENT, dkim.MIGRATIONS)

    def load_all(self) -> list[StoredKey]:
        return self._database.run_sync(_dkim_load_all)

    def insert(self, key: StoredKey) -> Deferred[bool]:
        return self._database.write(_dkim_insert, key)

    def list(self) -> Deferred[list[StoredKey]]:
        return self._database.run(_dkim_load_all)

    def set_enabled(self, domain: str, enabled: bool) -> Deferred[StoredKey | None]:
        return self._database.write(_dkim_set_enabled, domain, enabled)

    def delete(self, domain: str) -> Deferred[bool]:
        return self._database.write(_dkim_delete, domain)
