"""The message read model the admin API serves (contract section 4)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from smtpplus.delivery.interfaces import IQueueStore
from smtpplus.interfaces import IMessageQuery
from smtpplus.model import iso_utc


def iso(moment: float | None) -> str | None:
    """L{iso_utc} of a stored time that may be missing (None stays None)."""
    return None if moment is None else iso_utc(moment)


def render(row: dict[str, Any]) -> dict[str, Any]:
    """A stored message as the contract's message object."""
    return {
        "id": row["id"],
        "user": row["user"],
        "mail_from": row["mail_from"],
        "header_from": row["header_from"],
        "subject": row["subject"],
        "priority": row["priority"],
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
    }


@implementer(IMessageQuery)
class MessageQuery:
    """Reads messages from the queue store."""

    def __init__(self, store: IQueueStore) -> None:
        self._store = store

    def list_messages(self, user: str | None, status: str | None, limit: int) -> Deferred[list[dict[str, Any]]]:
        d = self._store.list_messages(user, status, limit)
        return d.addCallback(lambda rows: [render(row) for row in rows])

    def get_message(self, message_id: str) -> Deferred[dict[str, Any] | None]:
        d = self._store.load_message(message_id)
        return d.addCallback(lambda row: None if row is None else render(row))
