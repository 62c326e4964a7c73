"""
An in-memory L{IQueueStore}: the queue for unit tests (and the reference
the SQLite store is held to: both pass the same contract tests in
C{tests/test_delivery_queue_store.py}).  Every call answers at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from smtpplus.delivery.interfaces import Duplicate, IQueueStore, MessageFilter
from smtpplus.delivery.queue import (
    ACTIVE,
    DELETABLE,
    FINAL_RECIPIENT,
    WAITING,
    FinishAttempt,
    MarkSending,
    NewMessage,
    StateChange,
    as_row,
    dedup_key,
)

log = Logger()


class QueueStoreError(Exception):
    """A write the memory store refuses, as SQLite refuses a duplicate key."""


def _copy(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "recipients": [dict(r) for r in row["recipients"]]}


# SQLite's NOCASE folds ASCII letters only.
_NOCASE = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _matches(row: dict[str, Any], where: MessageFilter) -> bool:
    return (
        (where.user is None or row["user"] == where.user)
        and (where.status is None or row["status"] == where.status)
        and (where.campaign_code is None or row["campaign_code"] == where.campaign_code)
        and (where.since is None or row["created_at"] >= where.since)
        and (where.until is None or row["created_at"] < where.until)
        and (where.before is None or row["seq"] < where.before)
        and (
            where.recipient is None
            or any(r["address"].translate(_NOCASE) == where.recipient.translate(_NOCASE) for r in row["recipients"])
        )
    )


@implementer(IQueueStore)
class MemoryQueueStore:
    """
    The queue in dicts.

    @ivar rows: message id -> stored row (with its recipients).
    @ivar dedup: the dedup records, by L{dedup_key}.
    """

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        # dedup key -> (first message id, its created_at)
        self.dedup: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._last_seq = 0
        self._listeners: list[Callable[[], object]] = []

    def _next_seq(self) -> int:
        self._last_seq += 1
        return self._last_seq

    def recover(self, now: float) -> list[dict[str, Any]]:
        for row in self.rows.values():
            for r in row["recipients"]:
                if r["status"] == "sending":
                    r["status"] = "deferred" if r["attempts"] > 0 else "queued"
            if row["status"] == "sending":
                row.update(status="queued", next_attempt=None, updated_at=now)
        active = sorted((row for row in self.rows.values() if row["status"] in ACTIVE), key=lambda row: row["seq"])
        return [{k: row[k] for k in ("id", "seq", "user", "priority", "next_attempt")} for row in active]

    def insert(self, messages: list[NewMessage], dedup_window: float = 0) -> Deferred[list[int | Duplicate]]:
        ids = [m.id for m in messages]
        if len(set(ids)) != len(ids) or any(i in self.rows for i in ids):
            return fail(QueueStoreError("a message with this id is queued already"))
        seqs: list[int | Duplicate] = []
        for m in messages:
            key = dedup_key(m) if dedup_window > 0 else None
            if key is not None:
                first_id, created_at = self.dedup.get(key, (None, 0.0))
                first = self.rows.get(first_id) if first_id is not None else None
                if first is not None and created_at >= m.created_at - dedup_window:
                    first["duplicates"] += 1
                    seqs.append(Duplicate(first["id"]))
                    continue
                self.dedup[key] = (m.id, m.created_at)
            seq = self._next_seq()
            self.rows[m.id] = {**as_row(m), "seq": seq}
            seqs.append(seq)
        return succeed(seqs)

    def prune_dedup(self, before: float, limit: int) -> Deferred[int]:
        old = sorted((created_at, key) for key, (_, created_at) in self.dedup.items() if created_at < before)[:limit]
        for _, key in old:
            del self.dedup[key]
        return succeed(len(old))

    def statuses(self, message_ids: list[str]) -> Deferred[dict[str, str]]:
        return succeed({i: self.rows[i]["status"] for i in message_ids if i in self.rows})

    def load_message(self, message_id: str) -> Deferred[dict[str, Any] | None]:
        row = self.rows.get(message_id)
        return succeed(None if row is None else _copy(row))

    def load_for_attempts(self, message_ids: list[str]) -> Deferred[dict[str, dict[str, Any]]]:
        # One node: every message is its own.
        return succeed({m: _copy(self.rows[m]) for m in message_ids if m in self.rows})

    def list_messages(self, where: MessageFilter, limit: int) -> Deferred[list[dict[str, Any]]]:
        found = [row for row in self.rows.values() if _matches(row, where)]
        found.sort(key=lambda row: row["seq"], reverse=True)
        return succeed([_copy(row) for row in found[:limit]])

    def retry_message(self, message_id: str, now: float) -> Deferred[tuple[str, dict[str, Any]] | None]:
        row = self.rows.get(message_id)
        if row is None:
            return succeed(None)
        status = row["status"]
        if status in WAITING:
            row.update(status="queued" if status == "scheduled" else status, next_attempt=now, updated_at=now)
            for r in row["recipients"]:
                if r["status"] == "deferred":
                    r["next_attempt"] = now
        return succeed((status, _copy(row)))

    def delete_message(self, message_id: str, now: float) -> Deferred[tuple[str, dict[str, Any]] | None]:
        row = self.rows.get(message_id)
        if row is None:
            return succeed(None)
        status = row["status"]
        if status in DELETABLE:
            row.update(status="deleted", next_attempt=None, updated_at=now)
            for r in row["recipients"]:
                if r["status"] not in ("sent", "bounced"):
                    r.update(status="deleted", next_attempt=None)
        return succeed((status, _copy(row)))

    def count_urgent(self, user: str, since: float) -> Deferred[int]:
        return succeed(
            sum(
                1
                for row in self.rows.values()
                if row["user"] == user and row["priority"] == 1 and not row["internal"] and row["created_at"] >= since
            )
        )

    def write_state(self, changes: list[StateChange]) -> Deferred[list[BaseException | None]]:
        errors: list[BaseException | None] = []
        for change in changes:
            try:
                self._apply(change)
            except QueueStoreError as e:
                errors.append(e)
            else:
                errors.append(None)
        return succeed(errors)

    def _apply(self, change: StateChange) -> None:
        # Each change is checked before anything is written: a refused one
        # leaves no trace, as a rolled-back savepoint does.
        if isinstance(change, MarkSending):
            row = self.rows.get(change.message_id)
            if row is None:
                return
            if row["status"] in ACTIVE:
                row.update(status="sending", updated_at=change.now)
            for r in row["recipients"]:
                if r["status"] not in FINAL_RECIPIENT:
                    r["status"] = "sending"
            return
        self._finish(change)

    def _finish(self, change: FinishAttempt) -> None:
        message = change.message
        row = self.rows.get(message["id"])
        if row is None:
            idxs = [r["idx"] for r in message["recipients"]]
            if len(set(idxs)) != len(idxs):
                raise QueueStoreError(f"message {message['id']} has two recipients of one index")
            log.warn(
                "message {id} had no queue entry: rebuilt from its delivery attempt (status {status})",
                id=message["id"],
                status=change.status,
            )
            row = _copy(message)
            row.update(
                seq=self._next_seq(),
                delay_notified=int(change.delay_notified or message["delay_notified"]),
                internal=int(message["internal"]),
            )
            self.rows[message["id"]] = row
        else:
            row["delay_notified"] = max(row["delay_notified"], int(change.delay_notified))
        row.update(status=change.status, next_attempt=change.next_attempt, updated_at=change.now)
        by_idx = {r["idx"]: r for r in row["recipients"]}
        for u in change.updates:
            r = by_idx.get(u.idx)
            if r is not None:
                r.update(status=u.status, attempts=u.attempts, last_response=u.last_response, next_attempt=u.next_attempt)

    def on_reset(self, listener: Callable[[], object]) -> None:
        self._listeners.append(listener)

    def reset(self) -> None:
        """Lose every row, as a replaced database file does, and tell the listeners."""
        self.rows.clear()
        self.dedup.clear()
        for listener in self._listeners:
            listener()

