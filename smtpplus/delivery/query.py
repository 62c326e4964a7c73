"""
The message read model the admin API serves (contract sections 4 and 6),
and the queue management it offers: trying a message now, dropping it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from smtpplus.delivery import queue
from smtpplus.delivery.interfaces import IQueueStore, MessageFilter
from smtpplus.delivery.scheduler import Job, Scheduler
from smtpplus.interfaces import IMessageQuery, QueueConflict
from smtpplus.model import iso_utc
from smtpplus.paging import decode_cursor, encode_cursor

log = Logger()


def iso(moment: float | None) -> str | None:
    """L{iso_utc} of a stored time that may be missing (None stays None)."""
    return None if moment is None else iso_utc(moment)


def render(row: dict[str, Any]) -> dict[str, Any]:
    """A stored message as the contract's message object."""
    # A message being sent has no next attempt until this one ends; a
    # final one never has one.
    waiting = row["status"] in queue.DELETABLE
    return {
        "id": row["id"],
        "user": row["user"],
        "mail_from": row["mail_from"],
        "header_from": row["header_from"],
        "subject": row["subject"],
        "priority": row["priority"],
        "size": row["size"],
        "status": row["status"],
        "recipients": [
            {
                "address": r["address"],
                "status": r["status"],
                "attempts": r["attempts"],
                "last_response": r["last_response"],
            }
            for r in row["recipients"]
        ],
        "campaign_code": row["campaign_code"],
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
        "next_attempt_at": iso(row["next_attempt"]) if waiting else None,
        "duplicates": row.get("duplicates", 0),
    }


class QueueControl:
    """
    What queue management acts on besides the store: the scheduler's
    waiting jobs, the first-attempt cache, the spool file.

    @param forget: drops a message from the delivery agent's cache.
    @param erase: removes a message's spool file; returns a Deferred.
    """

    def __init__(
        self, scheduler: Scheduler, forget: Callable[[str], None], erase: Callable[[str], Deferred[Any]]
    ) -> None:
        self.scheduler = scheduler
        self.forget = forget
        self.erase = erase


@implementer(IMessageQuery)
class MessageQuery:
    """Reads messages from the queue store; retries and deletes them with C{control}."""

    def __init__(self, store: IQueueStore, clock: IReactorTime, control: QueueControl) -> None:
        self._store = store
        self._clock = clock
        self._control = control
        # Messages whose deletion is being written: a retry answered
        # meanwhile must not hand them back to the scheduler.
        self._deleting: set[str] = set()

    def list_messages(self, user: str | None, status: str | None, limit: int) -> Deferred[list[dict[str, Any]]]:
        d = self._store.list_messages(MessageFilter(user=user, status=status), limit)
        return d.addCallback(lambda rows: [render(row) for row in rows])

    def page_messages(
        self, filters: Mapping[str, Any], limit: int, cursor: str | None
    ) -> Deferred[tuple[list[dict[str, Any]], str | None]]:
        before = None if cursor is None else decode_cursor(cursor)
        # One more than asked for tells whether there is a next page.
        where = MessageFilter(
            user=filters.get("user"),
            status=filters.get("status"),
            recipient=filters.get("recipient"),
            campaign_code=filters.get("campaign_code"),
            since=filters.get("since"),
            until=filters.get("until"),
            before=before,
        )
        d = self._store.list_messages(where, limit + 1)

        def page(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
            shown = rows[:limit]
            more = len(rows) > limit
            return [render(row) for row in shown], encode_cursor(shown[-1]["seq"]) if more else None

        return d.addCallback(page)

    def get_message(self, message_id: str) -> Deferred[dict[str, Any] | None]:
        d = self._store.load_message(message_id)
        return d.addCallback(lambda row: None if row is None else render(row))

    @inlineCallbacks
    def retry_message(self, message_id: str) -> Any:
        control = self._control
        if message_id in control.scheduler.in_flight:
            # Being tried this very moment: nothing to hurry.
            return (yield self.get_message(message_id))
        result = yield self._store.retry_message(message_id, self._clock.seconds())
        if result is None:
            return None
        before, row = result
        if before not in queue.ACTIVE:
            raise QueueConflict(f"message {message_id} is {before}: it is not in the queue any more")
        if message_id in self._deleting:
            return render(row)
        control.scheduler.hurry(Job(row["id"], row["priority"], row["seq"], row["user"]))
        log.info("message {id} ({status}) to be tried now, as an administrator asked", id=message_id, status=before)
        return render(row)

    @inlineCallbacks
    def delete_message(self, message_id: str) -> Any:
        control = self._control
        if message_id in control.scheduler.in_flight:
            raise QueueConflict(f"message {message_id} is being sent; try again when this attempt has ended")
        if message_id in self._deleting:
            raise QueueConflict(f"message {message_id} is being deleted already")
        # Out of the scheduler first, so that no attempt starts while the
        # store marks it; put back if the store does not.
        waiting = control.scheduler.remove(message_id)
        self._deleting.add(message_id)
        try:
            result = yield self._store.delete_message(message_id, self._clock.seconds())
        except Exception:
            self._put_back(waiting)
            raise
        finally:
            self._deleting.discard(message_id)
        if result is None:
            self._put_back(waiting)
            return None
        before, row = result
        if before not in queue.DELETABLE:
            self._put_back(waiting)
            why = "is being sent" if before == "sending" else "is final"
            raise QueueConflict(f"message {message_id} {why} ({before}): it cannot be deleted")
        control.forget(message_id)
        log.info(
            "message {id} ({status}, user {user}, {n} recipients) deleted by an administrator",
            id=message_id,
            status=before,
            user=row["user"],
            n=len(row["recipients"]),
        )
        # The deleted status is committed: a crash before the file goes
        # leaves it to the start-up clean-up, which removes files of final
        # messages.
        try:
            yield control.erase(message_id)
        except OSError as e:
            log.error("cannot remove the spool file of deleted message {id}: {error}", id=message_id, error=e)
        return render(row)

    def _put_back(self, waiting: tuple[Job, float | None] | None) -> None:
        if waiting is not None:
            job, due = waiting
            self._control.scheduler.add(job, due)
