"""
User fields: validation and normalization, shared by the REST API and the
stores.  Pure functions, no I/O.

Domains are stored as lower-case IDNA A-labels (C{xn--...}) so that the
sender check can compare them byte for byte with a normalized sender domain
(see L{normalize_domain}).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from typing import Any

import idna

from smtpplus.smtp.protocol import parse_mailbox

USERNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
AGGREGATIONS = (
    "day",
    "week",
    "month",
    "year",
    "subject",
    "dynamic_subject",
    "sender_email",
    "sender_name",
    "sender_email_subject",
    "user",
)
DEFAULTS: Mapping[str, Any] = {
    "enabled": True,
    "priority": 3,
    "notes": "",
    "authorized_domains": [],
    "authorized_senders": [],
    "aggregation": "day",
}
WRITABLE = ("username", *DEFAULTS)
READ_ONLY = ("created_at", "updated_at", "password")
MAX_NOTES = 10000
MAX_LIST_ITEMS = 1000

_GENERATED_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
# Passwords avoid look-alikes (0/o, 1/l/i) so that they can be read off a
# screen and typed into a mail client: 31 symbols, 4.95 bits each.
PASSWORD_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
PASSWORD_GROUPS = 7
PASSWORD_GROUP_SIZE = 4  # 28 symbols: 138 bits


class ValidationError(ValueError):
    """A user field is wrong; C{field} names it (None: the body as a whole)."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


def generate_username() -> str:
    """A fresh username like C{smtp-k3v9x2qa}."""
    return "smtp-" + "".join(secrets.choice(_GENERATED_ALPHABET) for _ in range(8))


def generate_password() -> str:
    """
    A fresh password of 138 random bits from C{secrets}, in dash-separated
    groups of unambiguous lower-case letters and digits, e.g.
    C{k3v9-x2qa-...}.
    """
    groups = (
        "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(PASSWORD_GROUP_SIZE)) for _ in range(PASSWORD_GROUPS)
    )
    return "-".join(groups)


def validate_username(value: Any) -> str:
    if not isinstance(value, str) or not USERNAME_RE.fullmatch(value):
        raise ValidationError(
            "username", "must be 1-64 characters: letters, digits and . _ @ + -, starting with a letter or digit"
        )
    return value


def normalize_domain(value: str) -> str:
    """
    Return C{value} as a lower-case IDNA A-label domain (C{Bücher.Example} ->
    C{xn--bcher-kva.example}); raise C{ValueError} when it is not a domain.
    """
    text = value.strip().rstrip(".")
    if not text or any(c.isspace() or c in "@[]/\\:" for c in text):
        raise ValueError(f"{value!r} is not a domain name")
    try:
        ascii_name = idna.encode(text, uts46=True).decode("ascii")
    except idna.IDNAError as e:
        raise ValueError(f"{value!r} is not a domain name ({e})") from None
    labels = ascii_name.split(".")
    if len(ascii_name) > 253 or any(not label or len(label) > 63 for label in labels):
        raise ValueError(f"{value!r} is not a domain name")
    return ascii_name.lower()


def normalize_address(value: str) -> str:
    """
    Return the mailbox C{local@domain} with its domain normalized as by
    L{normalize_domain}; the local part is kept as written.
    """
    address = parse_mailbox(value.strip())
    if address is None or address.endswith("]"):
        raise ValueError(f"{value!r} is not an email address")
    local, _, domain = address.rpartition("@")
    return f"{local}@{normalize_domain(domain)}"


def _string_list(field: str, value: Any) -> list[str]:
    if isinstance(value, str):
        items = value.split(";")
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        items = value
    else:
        raise ValidationError(field, 'must be a list of strings or one ";"-separated string')
    result = [item.strip() for item in items if item.strip()]
    if len(result) > MAX_LIST_ITEMS:
        raise ValidationError(field, f"must not have more than {MAX_LIST_ITEMS} items")
    return result


def _normalized_list(field: str, value: Any, normalize: Any) -> list[str]:
    seen: dict[str, None] = {}
    for item in _string_list(field, value):
        try:
            seen[normalize(item)] = None
        except ValueError as e:
            raise ValidationError(field, str(e)) from None
    return list(seen)


def _check(field: str, value: Any) -> Any:
    if field == "username":
        return validate_username(value)
    if field == "enabled":
        if not isinstance(value, bool):
            raise ValidationError(field, "must be true or false")
        return value
    if field == "priority":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
            raise ValidationError(field, "must be an integer from 1 (very high) to 5 (very low)")
        return value
    if field == "notes":
        if not isinstance(value, str):
            raise ValidationError(field, "must be a string")
        if len(value) > MAX_NOTES:
            raise ValidationError(field, f"must not be longer than {MAX_NOTES} characters")
        return value
    if field == "authorized_domains":
        return _normalized_list(field, value, normalize_domain)
    if field == "authorized_senders":
        return _normalized_list(field, value, normalize_address)
    if field == "aggregation":
        if value not in AGGREGATIONS:
            raise ValidationError(field, f"must be one of {', '.join(AGGREGATIONS)}")
        return value
    raise ValidationError(field, "unknown field")


def validate_fields(data: Any) -> dict[str, Any]:
    """
    Validate and normalize the user fields present in C{data} (a JSON
    object), for a create or a partial update.  Unknown and read-only fields
    are errors.
    """
    if not isinstance(data, dict):
        raise ValidationError(None, "the request body must be a JSON object")
    result = {}
    for field, value in data.items():
        if field in READ_ONLY:
            raise ValidationError(field, "is read-only")
        if field not in WRITABLE:
            raise ValidationError(field, "unknown field")
        result[field] = _check(field, value)
    return result


def new_user_fields(data: Any) -> dict[str, Any]:
    """L{validate_fields} for a new user, with the defaults filled in (no username if none was given)."""
    fields = validate_fields(data)
    return {**{k: (list(v) if isinstance(v, list) else v) for k, v in DEFAULTS.items()}, **fields}
