"""
User fields: validation and normalization of what the REST API receives,
before it becomes a L{User} or a change of one.  Pure functions, no I/O.

The fields themselves are declared once, by L{smtpplus.model.User}, with
the JSON schema the OpenAPI document shows; this module holds one check per
writable field, which admits exactly what that schema admits (the lists by
the very patterns the schema holds) and never refuses a value it admits.
Domains are stored lower-case, international ones as their IDNA A-labels,
so that the sender check can compare them byte for byte with a normalized
sender domain (see L{smtpplus.address.normalize_domain}).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from typing import Any

import idna

from smtpplus.model import (
    ADDRESS_PATTERN,
    DOMAIN_PATTERN,
    MAX_LIST_ITEMS,
    MAX_NOTES,
    MAX_PRIORITY,
    MAX_PRIORITY_BUDGET,
    MIN_PRIORITY,
    USER_TIMESTAMPS,
    USERNAME_RE,
    Aggregation,
    User,
)

READ_ONLY = (*USER_TIMESTAMPS, "password")
_DOMAIN_RE = re.compile(DOMAIN_PATTERN)
_ADDRESS_RE = re.compile(ADDRESS_PATTERN)
_BLANKS = " \t"
_AGGREGATIONS = frozenset(a.value for a in Aggregation)

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
    """C{value} when it is a username the contract allows; else a L{ValidationError}."""
    if not isinstance(value, str) or not USERNAME_RE.fullmatch(value):
        raise ValidationError(
            "username", "must be 1-64 characters: letters, digits and . _ @ + -, starting with a letter or digit"
        )
    return value


def _string_list(field: str, value: Any) -> list[str]:
    if isinstance(value, str):
        items = value.split(";")
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        if len(value) > MAX_LIST_ITEMS:
            raise ValidationError(field, f"must not have more than {MAX_LIST_ITEMS} items")
        items = value
    else:
        raise ValidationError(field, 'must be a list of strings or one ";"-separated string')
    return [item.strip(_BLANKS) for item in items if item.strip(_BLANKS)]


def _stored_domain(domain: str) -> str:
    """A domain as it is stored and compared: lower-case, without a final dot."""
    return domain.rstrip(".").lower()


def _a_labels(item: str) -> str:
    """C{item} with a domain written in Unicode as its IDNA A-labels, when it is valid IDNA."""
    local, at, domain = item.rpartition("@")
    if not domain.isascii():
        try:
            return local + at + idna.encode(domain.rstrip("."), uts46=True).decode("ascii")
        except idna.IDNAError:
            pass
    return item


def _domains(field: str, value: Any) -> list[str]:
    seen: dict[str, None] = {}
    for item in map(_a_labels, _string_list(field, value)):
        if not _DOMAIN_RE.fullmatch(item):
            raise ValidationError(field, f"{item!r} is not a domain name")
        seen[_stored_domain(item)] = None
    return list(seen)


def _senders(field: str, value: Any) -> list[str]:
    seen: dict[str, None] = {}
    for item in map(_a_labels, _string_list(field, value)):
        if not _ADDRESS_RE.fullmatch(item):
            raise ValidationError(field, f"{item!r} is not an email address (its local part must be ASCII)")
        local, _, domain = item.rpartition("@")
        seen[f"{local}@{_stored_domain(domain)}"] = None
    return list(seen)


def _enabled(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(field, "must be true or false")
    return value


def _priority(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise ValidationError(field, "must be an integer from 1 (very high) to 5 (very low)")
    return value


def _notes(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValidationError(field, "must be a string")
    if len(value) > MAX_NOTES:
        raise ValidationError(field, f"must not be longer than {MAX_NOTES} characters")
    if "\0" in value:
        raise ValidationError(field, "must not hold NUL characters")
    return value


def _aggregation(field: str, value: Any) -> Aggregation:
    if not isinstance(value, str) or value not in _AGGREGATIONS:
        raise ValidationError(field, f"must be one of {', '.join(Aggregation)}")
    return Aggregation(value)


def _priority_budget(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PRIORITY_BUDGET:
        raise ValidationError(field, f"must be an integer from 0 (no limit) to {MAX_PRIORITY_BUDGET}")
    return value


# One check per writable field of L{User}, in the same order.
CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "username": lambda field, value: validate_username(value),
    "enabled": _enabled,
    "priority": _priority,
    "notes": _notes,
    "authorized_domains": _domains,
    "authorized_senders": _senders,
    "aggregation": _aggregation,
    "sandbox": _enabled,
    "priority_budget": _priority_budget,
}


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
        check = CHECKS.get(field)
        if check is None:
            raise ValidationError(field, "unknown field")
        result[field] = check(field, value)
    return result


def new_user(data: Any) -> User:
    """
    A new L{User} from a create request's body: L{validate_fields}, the
    model's defaults for what is absent and, without a username, a
    generated one.
    """
    fields = validate_fields(data)
    fields.setdefault("username", generate_username())
    return User(**fields)
