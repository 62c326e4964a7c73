"""
The vocabulary every layer shares: statuses, event types, aggregation
policies, the user record, timestamps.

A leaf: imports nothing from smtpplus, so that the wire, the stores, the
API and the notifier can all depend on it.  A new user field is one
L{User} attribute here (its JSON schema in the field's metadata; the
OpenAPI document, the store's columns and the API output follow) plus its
migration and its check in L{smtpplus.auth.users}.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import attrs


class MessageStatus(StrEnum):
    """A message's status in the queue (contract section 4)."""

    QUEUED = "queued"
    SCHEDULED = "scheduled"
    SENDING = "sending"
    DEFERRED = "deferred"
    SENT = "sent"
    BOUNCED = "bounced"
    # Final: some recipients sent, the others bounced.
    PARTIAL = "partial"


class RecipientStatus(StrEnum):
    """One recipient's status in the queue."""

    QUEUED = "queued"
    SENDING = "sending"
    DEFERRED = "deferred"
    SENT = "sent"
    BOUNCED = "bounced"


class EventType(StrEnum):
    """The notification events (contract section 4)."""

    SENDER_DOMAIN = "sender_domain"
    SEND_PROBLEM = "send_problem"
    BOUNCE = "bounce"
    DELIVERY_DELAY = "delivery_delay"
    ACCOUNT_BLOCK = "account_block"


class Aggregation(StrEnum):
    """A statistics aggregation policy: how messages are grouped."""

    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    YEAR = "year"
    SUBJECT = "subject"
    DYNAMIC_SUBJECT = "dynamic_subject"
    SENDER_EMAIL = "sender_email"
    SENDER_NAME = "sender_name"
    SENDER_EMAIL_SUBJECT = "sender_email_subject"
    USER = "user"


USERNAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}"
USERNAME_RE = re.compile(USERNAME_PATTERN)
MIN_PRIORITY, MAX_PRIORITY, DEFAULT_PRIORITY = 1, 5, 3
MAX_NOTES = 10000


def iso_utc(seconds: float) -> str:
    """C{seconds} since the epoch as ISO 8601 UTC to the second, e.g. C{2024-05-01T12:00:00Z}."""
    return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"schema": schema}


_STRINGS = {"type": "array", "items": {"type": "string"}}


@attrs.frozen
class User:
    """
    One user as the stores hand it out and the API shows it; never the
    password or its hash (those stay in the store's C{LoginRecord}).

    Domains are lower-case IDNA A-labels and sender addresses have such a
    domain (normalized by L{smtpplus.auth.users} before they get here).
    C{created_at} and C{updated_at} are ISO 8601 UTC, set by the store.
    """

    username: str = attrs.field(metadata=_schema({"type": "string", "pattern": f"^{USERNAME_PATTERN}$"}))
    enabled: bool = attrs.field(default=True, metadata=_schema({"type": "boolean"}))
    priority: int = attrs.field(
        default=DEFAULT_PRIORITY,
        metadata=_schema(
            {
                "type": "integer",
                "minimum": MIN_PRIORITY,
                "maximum": MAX_PRIORITY,
                "description": "1 very high ... 5 very low.",
            }
        ),
    )
    notes: str = attrs.field(default="", metadata=_schema({"type": "string"}))
    authorized_domains: tuple[str, ...] = attrs.field(default=(), converter=tuple, metadata=_schema(_STRINGS))
    authorized_senders: tuple[str, ...] = attrs.field(default=(), converter=tuple, metadata=_schema(_STRINGS))
    aggregation: Aggregation = attrs.field(
        default=Aggregation.DAY,
        converter=Aggregation,
        metadata=_schema({"type": "string", "enum": [a.value for a in Aggregation]}),
    )
    created_at: str = attrs.field(default="", metadata=_schema({"type": "string", "format": "date-time"}))
    updated_at: str = attrs.field(default="", metadata=_schema({"type": "string", "format": "date-time"}))

    def to_json(self) -> dict[str, Any]:
        """The contract's C{user} object: plain JSON types, keys in field order."""
        return {
            name: (list(value) if isinstance(value, tuple) else str(value) if isinstance(value, StrEnum) else value)
            for name, value in attrs.asdict(self, recurse=False).items()
        }


# Fields the store stamps; an API client cannot set them.
USER_TIMESTAMPS = ("created_at", "updated_at")
# Fields an API client may set, in order; the first is the key.
USER_WRITABLE = tuple(f.name for f in attrs.fields(User) if f.name not in USER_TIMESTAMPS)
# Fields the store keeps as lists (JSON arrays).
USER_LISTS = tuple(f.name for f in attrs.fields(User) if f.default == ())
