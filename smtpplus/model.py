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
from functools import lru_cache
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
    # Final: dropped from the queue by an administrator.
    DELETED = "deleted"
    # Final: a sandbox user's message, accepted and never relayed.
    SANDBOXED = "sandboxed"


class RecipientStatus(StrEnum):
    """One recipient's status in the queue."""

    QUEUED = "queued"
    SENDING = "sending"
    DEFERRED = "deferred"
    SENT = "sent"
    BOUNCED = "bounced"
    DELETED = "deleted"
    SANDBOXED = "sandboxed"


class EventType(StrEnum):
    """The notification events (contract section 4)."""

    SENDER_DOMAIN = "sender_domain"
    SEND_PROBLEM = "send_problem"
    BOUNCE = "bounce"
    DELIVERY_DELAY = "delivery_delay"
    ACCOUNT_BLOCK = "account_block"
    PRIORITY_BUDGET = "priority_budget"


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
MAX_LIST_ITEMS = 1000
MAX_PRIORITY_BUDGET = 1_000_000

# What a user's lists hold, as regular expressions that mean the same to
# Python's re.fullmatch (the API's check) and anchored in the OpenAPI
# document (ECMA-262, what clients and schema fuzzers read): ASCII only, an
# international domain as its IDNA A-labels, an optional final dot.  The API
# also takes a valid international domain written in Unicode and stores its
# A-labels (smtpplus.auth.users): that is how people type such a domain.  The
# document leaves that form out because no regular expression states which
# Unicode names are valid IDNA, and a pattern admitting Unicode letters makes
# schema fuzzers' generation too slow to be of use.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DOMAIN_PATTERN = rf"{_LABEL}(?:\.{_LABEL})*\.?"
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# A local part: a dot-atom, or a quoted string of printable ASCII but ";",
# which separates the items of a list given as one string.
_LOCAL = rf'(?:{_ATOM}(?:\.{_ATOM})*|"(?:[ !#-:<-\[\]-~]|\\[ -:<-~])*")'
ADDRESS_PATTERN = rf"{_LOCAL}@{DOMAIN_PATTERN}"


def list_item_pattern(item: str) -> str:
    """One item of a list on input: C{item}, blanks around it allowed, or blanks alone (ignored)."""
    return rf"[ \t]*(?:{item})?[ \t]*"


def list_text_pattern(item: str) -> str:
    """A list given as one string: items as in L{list_item_pattern}, separated by C{;}."""
    one = list_item_pattern(item)
    return rf"{one}(?:;{one})*"


def anchored(pattern: str) -> str:
    """C{pattern} for a JSON Schema C{pattern}, which matches anywhere unless anchored."""
    return f"^(?:{pattern})$"


def iso_utc(seconds: float) -> str:
    """C{seconds} since the epoch as ISO 8601 UTC to the second, e.g. C{2024-05-01T12:00:00Z}."""
    return _iso_second(int(seconds))


# Several times per message, mostly for the same few seconds.
@lru_cache(maxsize=256)
def _iso_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _schema(schema: dict[str, Any], input: dict[str, Any] | None = None) -> dict[str, Any]:
    """Field metadata: its JSON schema, and the one its API input takes when that differs."""
    return {"schema": schema} if input is None else {"schema": schema, "input": input}


def _list(item: str, what: str) -> dict[str, Any]:
    return _schema(
        {"type": "array", "items": {"type": "string", "pattern": anchored(item)}},
        input={
            "oneOf": [
                {
                    "type": "array",
                    "maxItems": MAX_LIST_ITEMS,
                    "items": {"type": "string", "pattern": anchored(list_item_pattern(item))},
                },
                {"type": "string", "pattern": anchored(list_text_pattern(item))},
            ],
            "description": f'{what}: a list, or one string of items separated by ";"; blanks around items are'
            " stripped and empty items ignored. ASCII only: an international domain in its IDNA A-label"
            " form (xn--...).",
        },
    )


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
    notes: str = attrs.field(
        default="", metadata=_schema({"type": "string", "maxLength": MAX_NOTES, "pattern": "^[^\\u0000]*$"})
    )
    authorized_domains: tuple[str, ...] = attrs.field(
        default=(), converter=tuple, metadata=_list(DOMAIN_PATTERN, "Domain names")
    )
    authorized_senders: tuple[str, ...] = attrs.field(
        default=(), converter=tuple, metadata=_list(ADDRESS_PATTERN, "Email addresses")
    )
    aggregation: Aggregation = attrs.field(
        default=Aggregation.DAY,
        converter=Aggregation,
        metadata=_schema({"type": "string", "enum": [a.value for a in Aggregation]}),
    )
    sandbox: bool = attrs.field(
        default=False,
        metadata=_schema(
            {"type": "boolean", "description": "Messages pass every rule and are queued, but are never relayed."}
        ),
    )
    priority_budget: int = attrs.field(
        default=0,
        metadata=_schema(
            {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_PRIORITY_BUDGET,
                "description": "Messages per rolling hour sent at priority 1; past it they go at 2. 0: no limit.",
            }
        ),
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


# DKIM keys (contract section 8): the algorithms, the defaults, and what a
# selector may be (one or more DNS labels, RFC 6376 section 3.1).
DKIM_ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
DKIM_DEFAULT_ALGORITHM = "rsa-sha256"
DKIM_DEFAULT_SELECTOR = "smtpplus"
DKIM_SELECTOR_PATTERN = rf"{_LABEL}(?:\.{_LABEL})*"
DKIM_SELECTOR_RE = re.compile(DKIM_SELECTOR_PATTERN)
@attrs.frozen
class Suppression:
    """
    One address a user's messages may no longer go to: the next hop
    refused it for good (C{reason} is its reply), or an administrator
    added it.  C{address} is lower-cased; C{created_at} in seconds since
    the epoch.
    """

    address: str
    reason: str
    created_at: float

    def to_json(self) -> dict[str, Any]:
        """The contract's suppression object."""
        return {"address": self.address, "reason": self.reason, "created_at": iso_utc(self.created_at)}
